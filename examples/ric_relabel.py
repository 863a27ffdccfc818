# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
"""
Relabel a preference dataset with PAL's K prototype rewards in the Rewards-in-Context (RiC) format.

RiC (Yang et al., 2024, "Rewards-in-Context: Multi-objective Alignment of Foundation Models with Dynamic Preference
Adjustment") fine-tunes a policy on responses whose prompt states the rewards the response earned, one per objective,
and steers it at inference by writing the rewards one wants into the prompt. A PAL model gives K such objectives for
free: prototype k's reward is the reward of a user whose mixture is `e_k`. This script scores every response of a
preference dataset for each prototype, normalizes each prototype's rewards over the dataset (zero mean, unit
variance, as RiC does), and writes one SFT row per response:

    {"prompt": "<prompt> <rm1_score> 0.8 <rm2_score> -1.2 ...", "completion": "<response>", "rewards": [...]}

To steer a RiC-trained policy towards a user with mixture `w`, put high scores on the prototypes with large `w_k`
(`ric_prompt(prompt, desired_scores)`). The normalization statistics are saved next to the rows.

```bash
python examples/ric_relabel.py                                  # the built-in demo data, a PAL model trained on it
python examples/ric_relabel.py --reward_model outputs/pal-demo --output outputs/examples/ric_demo.jsonl
```
"""

import argparse
import json
import os

import torch
from _shared import add_reward_model_argument, load_demo_reward_model
from datasets import Dataset
from tqdm.auto import tqdm

SCORE_TAG = "<rm{k}_score>"


def ric_prompt(prompt: str, scores) -> str:
    """`prompt` followed by the RiC reward tags: `<rm1_score> s_1 <rm2_score> s_2 ...` (scores rounded to 0.1)."""
    tags = " ".join(f"{SCORE_TAG.format(k=k + 1)} {float(score):.1f}" for k, score in enumerate(scores))
    return f"{prompt} {tags}"


@torch.inference_mode()
def prototype_rewards(model, tokenizer, prompts, responses, batch_size: int = 64) -> torch.Tensor:
    """`(N, K)` rewards of `responses[i]` to `prompts[i]` for each of the model's K prototypes."""
    chunks = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="Scoring responses"):
        _, per_prototype = model.score_texts(
            tokenizer,
            prompts[start : start + batch_size],
            responses[start : start + batch_size],
            batch_size=batch_size,
            return_prototype_rewards=True,
        )
        chunks.append(per_prototype)
    return torch.cat(chunks) if chunks else torch.empty(0, model.config.num_prototypes)


def relabel(model, tokenizer, dataset: Dataset, batch_size: int = 64) -> tuple[Dataset, dict]:
    """
    RiC rows for every response (chosen and rejected) of a preference `dataset` with `prompt`, `chosen` and `rejected`
    columns (plain text), and the per-prototype normalization `{"mean": [...], "std": [...]}`.
    """
    missing = [column for column in ("prompt", "chosen", "rejected") if column not in dataset.column_names]
    if missing:
        raise ValueError(f"The dataset has no {missing} column(s); RiC relabelling needs prompt, chosen and rejected.")
    if len(dataset) == 0:
        raise ValueError("The dataset is empty.")
    prompts = list(dataset["prompt"]) * 2
    responses = list(dataset["chosen"]) + list(dataset["rejected"])
    rewards = prototype_rewards(model, tokenizer, prompts, responses, batch_size)
    mean, std = rewards.mean(dim=0), rewards.std(dim=0).clamp(min=1e-6)
    normalized = (rewards - mean) / std
    rows = {
        "prompt": [ric_prompt(prompt, scores) for prompt, scores in zip(prompts, normalized.tolist())],
        "completion": responses,
        "rewards": normalized.tolist(),
        "raw_rewards": rewards.tolist(),
        "source_prompt": prompts,
        "is_chosen": [True] * len(dataset) + [False] * len(dataset),
    }
    return Dataset.from_dict(rows), {"mean": mean.tolist(), "std": std.tolist()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_reward_model_argument(parser)
    parser.add_argument("--split", default="train", help="Split of the built-in demo data to relabel.")
    parser.add_argument("--max_rows", type=int, default=None, help="Relabel only the first rows.")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--output", default="outputs/examples/ric_demo.jsonl")
    args = parser.parse_args(argv)

    model, tokenizer, dataset = load_demo_reward_model(args.reward_model)
    data = dataset[args.split]
    if args.max_rows is not None:
        data = data.select(range(min(args.max_rows, len(data))))
    rows, normalization = relabel(model, tokenizer, data, args.batch_size)
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    rows.to_json(args.output, lines=True)
    with open(os.path.splitext(args.output)[0] + ".normalization.json", "w") as file:
        json.dump({"num_prototypes": model.config.num_prototypes, **normalization}, file, indent=2)

    # How well the prototype rewards separate chosen from rejected, per prototype and for each seen user's mixture.
    half = len(data)
    rewards = torch.tensor(rows["rewards"])
    chosen, rejected = rewards[:half], rewards[half:]
    agreement = (chosen > rejected).float().mean(dim=0)
    print(f"\nWrote {len(rows)} RiC rows ({half} comparisons x 2 responses) to {args.output}. First row:\n")
    print(f"  prompt:     {rows[0]['prompt']}\n  completion: {rows[0]['completion']!r}\n")
    for k, value in enumerate(agreement.tolist()):
        print(f"  prototype {k + 1}: prefers the chosen response in {value:.1%} of comparisons")


if __name__ == "__main__":
    main()
