# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
"""
Downstream check on the built-in demo data: does each user's best-of-n pick match the one their true preference makes?

Reward accuracy on comparisons predicts downstream quality only weakly, so this benchmark asks the question best-of-n
reranking asks. For every test comparison of every seen user (`test`) and of every new user (`unseen_test`, after
fitting the user on their `unseen_train` comparisons), the candidates are its two responses and `n - 2` other notes on
the same (test) topic from the notes the data was drawn from (`pal_rm.data.demo_response_pool`), all scored as answers
to the comparison's prompt; candidate sets where two notes have the same true utility for the user are redrawn, so the
true best is unique. The true utility of a note is
the user's property weights (`pal_rm.data.demo_utility_weights` of the true `mixture_weights`) times its properties.
Reported: how often the model's best-of-n pick is the true best (chance is 1/n), next to the model's pairwise accuracy
on the same comparisons, for PAL-B (K = 4, the demo's recipe), LoRe and one reward for everyone, all on the frozen MiniLM's features. Settings are the demo recipe's, fixed
before the run.

```bash
python examples/benchmarks/downstream.py            # a few minutes on 2 cores
python examples/benchmarks/downstream.py --smoke    # seconds
```

Writes `outputs/benchmarks/downstream.json`.
"""

import argparse
import os
import time
from collections import defaultdict

import numpy as np
import torch
from _common import OUTPUT_DIR, accuracy, machine, markdown_table, pal_model, train, training_args, write_json
from transformers import AutoTokenizer, set_seed
from transformers.utils import logging

from pal_rm import PalRewardModel
from pal_rm.baselines import LowRankRewardBasis, one_reward_model
from pal_rm.cache import FeatureStore, featurize_preferences
from pal_rm.data import demo_response_pool, demo_utility_weights, load_demo_preferences
from pal_rm.utils import MINILM, resolve_model_path

logger = logging.get_logger(__name__)
LORE_GRID = [(rank, l2) for rank in (1, 2, 4, 8) for l2 in (1e-3, 1e-2, 1e-1)]


def candidate_sets(dataset, splits, n: int, seed: int) -> list[dict]:
    """One best-of-n question per comparison of `splits`: its prompt, user, n notes (texts) and their true utilities."""
    notes = demo_response_pool(seed)  # the notes the dataset was drawn from, with their properties
    rng = np.random.default_rng(seed)
    questions, skipped = [], 0
    for split in splits:
        for row in dataset[split]:
            weights = demo_utility_weights(row["mixture_weights"])
            topic_notes = notes[row["topic"]]
            pool = [text for text in topic_notes if text not in (row["chosen"], row["rejected"])]
            for _ in range(100):
                others = [pool[i] for i in rng.choice(len(pool), size=n - 2, replace=False)]
                texts = [row["chosen"], row["rejected"], *others]
                utilities = [float(topic_notes[text] @ weights) for text in texts]
                if len(set(np.round(utilities, 9))) == n:
                    break
            else:
                skipped += 1  # no candidate set with a unique best for this user and topic
                continue
            questions.append(
                {
                    "split": split,
                    "user_id": row["user_id"],
                    "prompt": row["prompt"],
                    "texts": texts,
                    "utilities": utilities,
                }
            )
    if skipped:
        logger.warning(f"{skipped} comparisons have no candidate set of {n} notes with a unique best; skipped.")
    return questions


def agreement(questions, rewards: torch.Tensor, n: int) -> dict[str, float]:
    """Share of questions whose highest-reward candidate is the true best, per split."""
    picks = rewards.view(len(questions), n).argmax(-1).tolist()
    hits = defaultdict(list)
    for question, pick in zip(questions, picks):
        hits[question["split"]].append(pick == int(np.argmax(question["utilities"])))
    return {split: float(np.mean(values)) for split, values in hits.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=4, help="Candidates per question.")
    parser.add_argument("--epochs", type=float, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default=OUTPUT_DIR)
    parser.add_argument("--smoke", action="store_true", help="A small demo dataset, 2 epochs and one LoRe setting.")
    args = parser.parse_args(argv)
    if args.n < 2:
        parser.error(f"--n must be at least 2 (the comparison's two notes), got {args.n}.")
    start = time.perf_counter()
    data_kwargs = {}
    if args.smoke:
        data_kwargs = {"users_per_group": 2, "num_mixture_users": 0, "pairs_per_user": 16, "num_unseen_users": 2}
        data_kwargs.update(unseen_shots=8, unseen_test_pairs=8)
        args.epochs = 2
    dataset = load_demo_preferences(seed=args.seed, **data_kwargs)
    backbone = resolve_model_path(MINILM)
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    encoder = PalRewardModel.from_backbone(backbone, variant="b", num_prototypes=1).eval()
    store = FeatureStore()
    features = featurize_preferences(dataset, encoder, tokenizer, cache=store)
    feature_dim = encoder.config.hidden_size

    questions = candidate_sets(dataset, ("test", "unseen_test"), args.n, args.seed)
    prompts = [q["prompt"] for q in questions for _ in range(args.n)]
    responses = [text for q in questions for text in q["texts"]]
    users = [q["user_id"] for q in questions for _ in range(args.n)]
    item_features, prompt_features = encoder.text_scorer(tokenizer).pair_features(prompts, responses)

    def run_args(name):
        return training_args(
            os.path.join(args.output_dir, "runs", f"downstream-{name}"),
            args.epochs,
            args.seed,
            per_device_train_batch_size=32,
            learning_rate=1e-3,
            user_learning_rate=5e-3,
            prototype_learning_rate=5e-3,
        )

    def pal_rewards(trainer) -> torch.Tensor:
        model = trainer.pal_model
        if model.config.num_prototypes > 1:
            trainer.adapt_users(features["unseen_train"])
        rows = model.user_rows(users, unknown_users="population")
        with torch.no_grad():
            return model(item_features=item_features, prompt_features=prompt_features, user_ids=rows).logits.squeeze(
                -1
            )

    def pairwise(trainer) -> dict[str, float]:  # after `pal_rewards` has fitted the new users
        return {split: accuracy(trainer, features[split], split) for split in ("test", "unseen_test")}

    results, accuracies = {}, {}
    for name, model in (
        ("PAL-B K=4", lambda: pal_model(feature_dim, "b", 4, preference_dim=64)),
        ("one reward for everyone", lambda: one_reward_model(feature_dim=feature_dim, preference_dim=64)),
    ):
        set_seed(args.seed)
        trainer = train(model(), features, run_args("pal" if name.startswith("PAL") else "bt"))
        results[name] = agreement(questions, pal_rewards(trainer), args.n)
        accuracies[name] = pairwise(trainer)
    scores = {}
    for rank, l2 in LORE_GRID[4:5] if args.smoke else LORE_GRID:  # chosen on the seen users' validation comparisons
        model = LowRankRewardBasis(rank=rank, l2=l2, seed=args.seed).fit(features["train"])
        scores[(rank, l2)] = (model.accuracy(features["validation"]), model)
    (rank, l2), (_, lore) = max(scores.items(), key=lambda item: item[1][0])
    lore.fit_new_users(features["unseen_train"])
    results["LoRe (low-rank basis)"] = agreement(questions, lore.rewards(item_features, users), args.n)
    accuracies["LoRe (low-rank basis)"] = {split: lore.accuracy(features[split]) for split in ("test", "unseen_test")}

    counts = {split: sum(q["split"] == split for q in questions) for split in ("test", "unseen_test")}
    rows = [
        [name, accuracies[name]["test"], values["test"], accuracies[name]["unseen_test"], values["unseen_test"]]
        for name, values in results.items()
    ]
    rows.append([f"chance (1/{args.n})", 0.5, 1 / args.n, 0.5, 1 / args.n])
    print(f"\n## Best-of-{args.n} on the demo data: the model's pick is the user's true best\n")
    header = ["model", "seen: accuracy", f"seen: best-of-{args.n}", "new: accuracy", f"new: best-of-{args.n}"]
    print(markdown_table(header, rows))
    output = {
        "machine": machine(),
        "command": "python examples/benchmarks/downstream.py" + (" --smoke" if args.smoke else ""),
        "config": {k: v for k, v in vars(args).items() if k != "output_dir"},
        "data": {"sizes": {split: len(dataset[split]) for split in dataset}, **data_kwargs},
        "questions": counts,
        "n": args.n,
        "lore": {"rank": rank, "l2": l2},
        "agreement": results,
        "pairwise_accuracy": accuracies,
        "wall_time_seconds": time.perf_counter() - start,
    }
    path = write_json("downstream", output, args.output_dir)
    print(f"\nWrote {path} ({output['wall_time_seconds']:.0f} s).")
    return output


if __name__ == "__main__":
    main()
