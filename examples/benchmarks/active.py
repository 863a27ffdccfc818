# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
"""
Onboarding benchmark: how many comparisons a new user must answer before PAL serves it as well as a seen user, when
the comparisons are chosen by `pal_rm.adaptation.select_comparisons` (mutual information between the answer and the
user's mixture, given the answers so far) rather than at random.

For each setting (persona standard and mixture, PAL-B on the packaged MiniLM frozen; synthetic K* = 3, PAL-A): K is
chosen on the seen users' validation split (`pal_rm.trainers.choose_num_prototypes`), the adaptation prior is learned
on the same split, then each unseen user has a pool of 50 comparisons. "Random" asks the first n of the pool (the pool
is in random order); "active" asks one comparison at a time, each chosen from what is left given the answers so far.
After n = 1..10 answers the users are fitted (`pal_rm.adaptation.fit_users`, all at once) and scored on their own test
comparisons (mean per-user accuracy). Nothing is chosen on test: the answers are the dataset's labels, revealed only
for the comparisons asked.

```bash
python examples/benchmarks/active.py            # ~10 minutes on 2 cores
python examples/benchmarks/active.py --smoke    # seconds
```

Writes `outputs/benchmarks/active.json`.
"""

import argparse
import os
import time

import torch
from _common import OUTPUT_DIR, PERSONA_DATA_DIR, machine, markdown_table, training_args, write_json
from transformers import AutoTokenizer, PrinterCallback

from pal_rm import PalConfig, PalRewardModel
from pal_rm.adaptation import (
    embed_pairs,
    fit_users,
    particle_log_likelihoods,
    prior_particles,
    select_by_mutual_information,
)
from pal_rm.cache import FeatureStore, featurize_preferences
from pal_rm.data import available_personas, load_persona_preferences, load_synthetic_preferences
from pal_rm.metrics import per_user_accuracy
from pal_rm.trainers import choose_num_prototypes
from pal_rm.utils import MINILM, resolve_model_path


def pair_embeddings(model, split):
    prompts = torch.tensor(split["prompt_features"]) if model.needs_prompt else None
    pairs = embed_pairs(
        model, torch.tensor(split["chosen_features"]), torch.tensor(split["rejected_features"]), prompts
    )
    return pairs


def onboarding_curves(model, dataset, max_questions: int) -> dict:
    """Unseen-user test accuracy after n = 1..max_questions answers, for random and active choices."""
    pool, test = dataset["unseen_train"], dataset["unseen_test"]
    users = list(dict.fromkeys(pool["user_id"]))
    local = {user: i for i, user in enumerate(users)}
    pool_pairs, test_pairs = pair_embeddings(model, pool), pair_embeddings(model, test)
    pool_users = torch.tensor([local[u] for u in pool["user_id"]])
    test_users = torch.tensor([local[u] for u in test["user_id"]])
    per_user_pool = [(pool_users == i).nonzero().flatten().tolist() for i in range(len(users))]
    prior_rows = model.trained_user_rows()
    prior = model.adaptation_prior()
    particles = prior_particles(model, prior, rows=prior_rows)

    def accuracy(selected: list[list[int]]) -> float:
        index = torch.tensor([j for picks in selected for j in picks])
        owners = torch.tensor([i for i, picks in enumerate(selected) for _ in picks])
        fit = fit_users(model, pool_pairs.select(index), owners, len(users), prior, prior_rows=prior_rows)
        weights = torch.softmax(fit.logits / model.config.mixture_temperature, dim=-1)[test_users]
        with torch.no_grad():
            differences = test_pairs.differences(model, weights)
        values = per_user_accuracy(differences.numpy(), test_users.numpy())
        return float(sum(values.values()) / len(values))

    random_curve = {n: accuracy([picks[:n] for picks in per_user_pool]) for n in range(1, max_questions + 1)}
    answered: list[list[int]] = [[] for _ in users]
    active_curve = {}
    for n in range(1, max_questions + 1):
        for i, picks in enumerate(per_user_pool):
            log_weights = torch.full((particles.shape[0],), 0.0)
            if answered[i]:
                log_weights = particle_log_likelihoods(
                    model,
                    pool_pairs.select(torch.tensor(answered[i])),
                    torch.zeros(len(answered[i]), dtype=torch.long),
                    1,
                    particles,
                )[0]
            remaining = [j for j in picks if j not in answered[i]]
            choice = select_by_mutual_information(
                model, pool_pairs.select(torch.tensor(remaining)), particles, torch.log_softmax(log_weights, -1), 1
            )[0]
            answered[i].append(remaining[choice])
        active_curve[n] = accuracy(answered)
    return {"random": random_curve, "active": active_curve, "users": len(users)}


def questions_to_reach(curve: dict, level: float):
    reached = [n for n, value in sorted(curve.items()) if value >= level]
    return reached[0] if reached else None


def run_setting(name, dataset, make_model, args, max_k: int, epochs: float, **training_overrides) -> dict:
    start = time.perf_counter()
    train_args = training_args(
        os.path.join(args.output_dir, "runs", f"active-{name}"), epochs, args.seed, **training_overrides
    )
    choice = choose_num_prototypes(make_model, train_args, dataset["train"], dataset["validation"], max_k)
    trainer = choice.trainer
    trainer.remove_callback(PrinterCallback)
    seen = trainer.evaluate(dataset["test"], metric_key_prefix="test")["test_user_accuracy_mean"]
    curves = onboarding_curves(trainer.model, dataset, args.questions)
    level = seen - 0.03
    ten = max(curves["random"])
    result = {
        "K": choice.num_prototypes,
        "validation_accuracy_by_K": choice.validation_accuracy,
        "adaptation_prior": {
            k: v for k, v in (trainer.model.config.adaptation_prior or {}).items() if k != "selection"
        },
        "seen_accuracy": seen,
        **curves,
        "questions_to_seen_minus_3_points": {
            "random": questions_to_reach(curves["random"], level),
            "active": questions_to_reach(curves["active"], level),
        },
        "active_questions_to_random_at_10": questions_to_reach(curves["active"], curves["random"][ten]),
        "seconds": time.perf_counter() - start,
    }
    result["met"] = {
        f"active reaches random@{ten} with at most 6 questions": (result["active_questions_to_random_at_10"] or 99)
        <= 6
    }
    return result


def table(results: dict) -> str:
    shots = (1, 2, 3, 4, 5, 6, 8, 10)
    header = ["setting", "K", "seen (test)", "choice"] + [f"{n} answers" for n in shots] + ["answers to seen - 3 pts"]
    rows = []
    for name, result in results["settings"].items():
        for kind in ("random", "active"):
            curve = result[kind]
            reach = result["questions_to_seen_minus_3_points"][kind]
            cells = [curve.get(n, curve.get(str(n))) for n in shots if n in curve or str(n) in curve]
            rows.append(
                [name, result["K"], result["seen_accuracy"], kind, *cells, reach if reach is not None else "> 10"]
            )
    return markdown_table(header, rows)


parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--data_dir", default=PERSONA_DATA_DIR)
parser.add_argument("--backbone", default=MINILM)
parser.add_argument("--settings", nargs="+", default=["persona-standard", "persona-mixture", "synthetic"])
parser.add_argument("--questions", type=int, default=10)
parser.add_argument("--max_k", type=int, default=6)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--cache_dir", default="outputs/cache")
parser.add_argument("--output_dir", default=OUTPUT_DIR)
parser.add_argument("--smoke", action="store_true", help="A tiny run (seconds).")


def main(argv=None):
    args = parser.parse_args(argv)
    start = time.perf_counter()
    results = {
        "machine": machine(),
        "command": "python examples/benchmarks/active.py" + (" --smoke" if args.smoke else ""),
        "questions": args.questions,
        "settings": {},
    }
    if args.smoke:
        args.questions, args.max_k = 3, 2
    for setting in args.settings:
        if setting.startswith("persona"):
            backbone = resolve_model_path(args.backbone)
            tokenizer = AutoTokenizer.from_pretrained(backbone)
            encoder = PalRewardModel.from_backbone(backbone, variant="b", num_prototypes=1).eval()
            data_kwargs = {"num_groups": 4, "users_per_group": 10, "pairs_per_user": 50, "num_unseen_users": 20}
            data_kwargs.update(unseen_shots=50, unseen_test_pairs=50)
            epochs = 60
            if args.smoke:
                epochs = 2
                data_kwargs.update(
                    num_groups=2, users_per_group=3, pairs_per_user=10, num_unseen_users=4, unseen_shots=6
                )
                data_kwargs.update(unseen_test_pairs=5, personas=available_personas(args.data_dir))
            dataset = load_persona_preferences(
                args.data_dir, mixture_users=setting.endswith("mixture"), seed=args.seed, **data_kwargs
            )
            dataset = featurize_preferences(dataset, encoder, tokenizer, cache=FeatureStore(args.cache_dir))
            dim = len(dataset["train"][0]["chosen_features"])

            def make_model(k, dim=dim):
                return PalRewardModel(
                    PalConfig(
                        feature_dim=dim, variant="b", num_prototypes=k, preference_dim=128, head_hidden_dims=[512]
                    )
                )

            overrides = {"learning_rate": 3e-3, "per_device_train_batch_size": 128, "user_learning_rate": 0.1}
        else:
            dim = 16
            sizes = {"users_per_group": 50, "pairs_per_user": 50, "num_unseen_users": 30, "unseen_shots": 50}
            epochs = 60
            if args.smoke:
                epochs = 2
                sizes = {"users_per_group": 5, "pairs_per_user": 20, "num_unseen_users": 4, "unseen_shots": 6}
            dataset = load_synthetic_preferences(feature_dim=dim, num_groups=3, seed=args.seed, **sizes)

            def make_model(k, dim=dim):
                return PalRewardModel(PalConfig(feature_dim=dim, variant="a", num_prototypes=k, preference_dim=dim))

            overrides = {
                "learning_rate": 3e-3,
                "per_device_train_batch_size": 256,
                "user_learning_rate": 3e-2,
                "prototype_learning_rate": 3e-2,
            }
        result = run_setting(setting, dataset, make_model, args, args.max_k, epochs, **overrides)
        results["settings"][setting] = result
        print(f"\n## {setting}: K={result['K']}, seen {result['seen_accuracy']:.3f}")
        for target, met in result["met"].items():
            print(f"- {target}: {'met' if met else 'MISSED'}")
    results["wall_time_seconds"] = time.perf_counter() - start
    path = write_json("active", results, args.output_dir)
    print(f"\n{table(results)}\n\nWrote {path} ({results['wall_time_seconds']:.0f} s).")


if __name__ == "__main__":
    main()
