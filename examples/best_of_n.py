# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
"""
Best-of-n for a user: rerank candidate notes with a PAL reward model trained on the built-in demo data.

For held-out requests (validation topics), the candidates are the demo notes written for that request (formal or
casual, bulleted or not, long or short, enthusiastic or plain). The same candidates are reranked for a user of the
"formal" group, a user of the "casual" group and an even mixture of the two; the script prints the winners and how
often each reranking picks a formal note. With `--policy smollm2` the candidates are sampled from
SmolLM2-135M-Instruct instead (`pal_rm.best_of_n.sample_and_rerank`).

```bash
python examples/best_of_n.py
python examples/best_of_n.py --policy smollm2 --n 4 --num_prompts 2
```
"""

import argparse
import json
import os
from collections import defaultdict

from _shared import add_reward_model_argument, demo_user, load_demo_reward_model

from pal_rm.best_of_n import best_of_n, sample_and_rerank
from pal_rm.utils import load_smollm2


def candidate_pool(split, n: int, num_prompts: int):
    """`(prompts, candidates, is_formal)`: n distinct demo notes for each of the first `num_prompts` requests."""
    notes = defaultdict(dict)
    for row in split:
        notes[row["prompt"]].setdefault(row["chosen"], row["chosen_formal"])
        notes[row["prompt"]].setdefault(row["rejected"], row["rejected_formal"])
    prompts = [prompt for prompt in sorted(notes) if len(notes[prompt]) >= n][:num_prompts]
    candidates = [list(notes[prompt])[:n] for prompt in prompts]
    return prompts, candidates, [[notes[p][c] for c in group] for p, group in zip(prompts, candidates)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_reward_model_argument(parser)
    parser.add_argument("--n", type=int, default=6, help="Candidates per request.")
    parser.add_argument("--num_prompts", type=int, default=20)
    parser.add_argument(
        "--policy", choices=["none", "smollm2"], default="none", help="Sample candidates from a policy."
    )
    parser.add_argument("--output", default="outputs/examples/best_of_n.json")
    args = parser.parse_args(argv)

    model, tokenizer, dataset = load_demo_reward_model(args.reward_model)
    users = {"formal user": demo_user(dataset, 0), "casual user": demo_user(dataset, 1)}
    formal_row, casual_row = (
        model.config.user_ids.index(users["formal user"]),
        model.config.user_ids.index(users["casual user"]),
    )
    weights = model.user_mixture_weights()
    even = (0.5 * (weights[formal_row] + weights[casual_row])).tolist()
    targets = {**{name: {"users": user} for name, user in users.items()}, "even mix": {"mixture_weights": even}}

    results = {"users": users, "n": args.n}
    if args.policy == "smollm2":
        policy, policy_tokenizer = load_smollm2()
        prompts = sorted(set(dataset["validation"]["prompt"]))[: args.num_prompts]
        for name, target in targets.items():
            output = sample_and_rerank(policy, policy_tokenizer, model, tokenizer, prompts, args.n, **target)
            print(f"\n{name}: {output.best[0]!r}")
            results[name] = {"best": output.best, "rewards": output.rewards.tolist()}
    else:
        prompts, candidates, is_formal = candidate_pool(dataset["validation"], args.n, args.num_prompts)
        if not prompts:
            raise ValueError(f"No validation request has {args.n} distinct notes; lower --n.")
        print(f"{len(prompts)} held-out requests, {args.n} candidate notes each.\n")
        for name, target in targets.items():
            output = best_of_n(model, tokenizer, prompts, candidates, **target)
            formal_share = sum(flags[i] for flags, i in zip(is_formal, output.best_index)) / len(prompts)
            results[name] = {"formal_share": formal_share, "best_index": output.best_index}
            print(
                f"{name:>12}: picks a formal note for {formal_share:.0%} of requests; first pick: {output.best[0]!r}"
            )
        results["formal_share_of_candidates"] = sum(map(sum, is_formal)) / (len(prompts) * args.n)
        print(f"\n(formal notes among the candidates: {results['formal_share_of_candidates']:.0%})")
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as file:
        json.dump(results, file, indent=2)


if __name__ == "__main__":
    main()
