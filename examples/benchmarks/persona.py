# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
"""
Persona benchmark: PAL against its baselines on the Anthropic persona statements, with the all-MiniLM-L6-v2 backbone
frozen (the packaged copy; offline).

Standard setting: 8 personas, K* = 4 groups, pure-group users (10 per group), 50 comparisons per seen user (35 train /
5 validation / 10 test), 20 unseen users; also the same with Dirichlet-mixture users. For each setting: seen-user
accuracy of one reward for everyone, one independent head per user, the per-group oracle and PAL-A / PAL-B for
K = 1..6; unseen-user accuracy after fitting each new user on 1, 2, 5, 10, 20 and 50 of its comparisons. "PAL" in the
summary is the PAL model with the best seen-user *validation* accuracy (never the test split).

```bash
python examples/benchmarks/persona.py                                   # both settings, ~30 minutes on 2 cores
python examples/benchmarks/persona.py --smoke --data_dir tests/fixtures/persona   # seconds
```

Writes `outputs/benchmarks/persona.json` and `outputs/benchmarks/persona.png`.
"""

import argparse
import os
import time

from _common import (
    OUTPUT_DIR,
    PERSONA_DATA_DIR,
    SHOTS,
    independent_results,
    lore_results,
    machine,
    markdown_table,
    one_reward_results,
    oracle_results,
    pal_model,
    pal_results,
    select_by_validation,
    train,
    training_args,
    write_json,
)
from transformers import AutoTokenizer, set_seed

from pal_rm import PalRewardModel
from pal_rm.cache import FeatureStore, featurize_preferences
from pal_rm.data import available_personas, load_persona_preferences
from pal_rm.utils import MINILM, resolve_model_path


def run_setting(dataset, num_groups, ks, args, shots):
    head_kwargs = {"preference_dim": args.preference_dim, "head_hidden_dims": args.head_hidden_dims}
    feature_dim = len(dataset["train"][0]["chosen_features"])

    def arguments(name):
        return training_args(
            os.path.join(args.output_dir, "runs", name),
            args.epochs,
            args.seed,
            learning_rate=args.learning_rate,
            per_device_train_batch_size=args.batch_size,
            user_learning_rate=args.user_learning_rate,
        )

    models = {}
    start = time.perf_counter()
    models["one reward for everyone"] = one_reward_results(dataset, feature_dim, arguments("bt"), head_kwargs, shots)
    models["independent head per user"] = independent_results(dataset, shots)
    models["LoRe (low-rank basis)"] = lore_results(dataset, shots, seed=args.seed)
    models["per-group oracle"] = oracle_results(dataset, feature_dim, num_groups, arguments("oracle"), head_kwargs)
    for variant in ("a", "b"):
        for k in ks:
            set_seed(args.seed)
            model = pal_model(feature_dim, variant, k, **head_kwargs)
            trainer = train(model, dataset, arguments(f"pal-{variant}-{k}"))
            models[f"PAL-{variant.upper()} K={k}"] = {
                "variant": variant,
                "K": k,
                **pal_results(trainer, dataset, shots),
            }
    pal_names = [name for name in models if name.startswith("PAL-")]
    selected = select_by_validation({name: models[name] for name in pal_names})
    return {
        "models": models,
        "selected_pal": selected,
        "seconds": time.perf_counter() - start,
        "sizes": {split: len(dataset[split]) for split in dataset},
        "users": {split: len(set(dataset[split]["user_id"])) for split in dataset},
    }


def targets(setting: dict, shots) -> dict:
    models = setting["models"]
    pal = models[setting["selected_pal"]]
    ten = 10 if 10 in shots else max(shots)
    five = 5 if 5 in shots else min(shots)
    return {
        "pal_minus_oracle_seen": pal["seen_accuracy"] - models["per-group oracle"]["seen_accuracy"],
        "pal_minus_one_reward_seen": pal["seen_accuracy"] - models["one reward for everyone"]["seen_accuracy"],
        f"unseen_{five}_shots_minus_seen": pal["unseen_accuracy"][five] - pal["seen_accuracy"],
        f"unseen_{ten}_shots_minus_seen": pal["unseen_accuracy"][ten] - pal["seen_accuracy"],
        "met": {
            "within 3 points of the oracle": pal["seen_accuracy"]
            >= models["per-group oracle"]["seen_accuracy"] - 0.03,
            "25 points above one reward": pal["seen_accuracy"]
            >= models["one reward for everyone"]["seen_accuracy"] + 0.25,
            f"unseen ({five} comparisons) within 4 points of seen": pal["unseen_accuracy"][five]
            >= pal["seen_accuracy"] - 0.04,
            f"unseen ({ten} comparisons) within 2 points of seen": pal["unseen_accuracy"][ten]
            >= pal["seen_accuracy"] - 0.02,
        },
    }


def summary_table(setting: dict, shots) -> str:
    header = ["model", "seen (test)", "validation"] + [f"unseen, {n} shots" for n in shots]
    rows = []
    for name, result in setting["models"].items():
        label = f"**{name}** (selected)" if name == setting["selected_pal"] else name
        unseen = result.get("unseen_accuracy")
        if unseen is None:  # the oracle knows the new users' true mixtures: no shots needed
            cells = [result["unseen_accuracy_true_mixture"]] * len(shots)
        else:
            cells = [unseen[n] for n in shots]
        rows.append([label, result["seen_accuracy"], result["validation_accuracy"], *cells])
    return markdown_table(header, rows)


def plot(results: dict, path: str, shots) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = results["settings"]
    figure, axes = plt.subplots(len(settings), 2, figsize=(11, 4 * len(settings)), squeeze=False)
    for row, (name, setting) in enumerate(settings.items()):
        models = setting["models"]
        axis = axes[row][0]
        for variant, marker in (("a", "o"), ("b", "s")):
            points = sorted((m["K"], m["seen_accuracy"]) for m in models.values() if m.get("variant") == variant)
            axis.plot(*zip(*points), marker=marker, label=f"PAL-{variant.upper()}")
        for baseline, style in (
            ("per-group oracle", "--"),
            ("one reward for everyone", ":"),
            ("independent head per user", "-."),
        ):
            axis.axhline(models[baseline]["seen_accuracy"], linestyle=style, color="gray", label=baseline)
        axis.set(title=f"{name}: seen users", xlabel="K (prototypes)", ylabel="test accuracy")
        axis.legend(fontsize=8)
        axis = axes[row][1]
        selected = setting["selected_pal"]
        for label in (selected, "independent head per user", "one reward for everyone"):
            values = models[label]["unseen_accuracy"]
            axis.plot(shots, [values[n] for n in shots], marker="o", label=label)
        axis.axhline(models[selected]["seen_accuracy"], linestyle="--", color="gray", label=f"{selected}, seen users")
        axis.set(
            title=f"{name}: unseen users", xlabel="comparisons per new user", ylabel="test accuracy", xscale="log"
        )
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=PERSONA_DATA_DIR, help="Folder of the Anthropic persona jsonl files.")
    parser.add_argument("--backbone", default=MINILM)
    parser.add_argument("--settings", nargs="+", default=["standard", "mixture"], choices=["standard", "mixture"])
    # Head size and optimisation were chosen on the seen users' validation accuracy (never the test splits).
    parser.add_argument("--epochs", type=float, default=60)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--user_learning_rate", type=float, default=0.1)
    parser.add_argument("--preference_dim", type=int, default=128)
    parser.add_argument("--head_hidden_dims", type=int, nargs="*", default=[512])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache_dir", default="outputs/cache", help="Embedding cache (reused between runs).")
    parser.add_argument("--output_dir", default=OUTPUT_DIR)
    parser.add_argument("--smoke", action="store_true", help="A tiny run (seconds): few users, K in {1, 2}, 2 epochs.")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    shots, ks = (SHOTS, range(1, 7)) if not args.smoke else ((1, 2, 5), (1, 2))
    num_groups = 4 if not args.smoke else 2
    data_kwargs = {"num_groups": num_groups, "users_per_group": 10, "pairs_per_user": 50, "num_unseen_users": 20}
    data_kwargs["unseen_shots"], data_kwargs["unseen_test_pairs"] = max(shots), 50
    if args.smoke:
        args.epochs = 2
        data_kwargs.update(users_per_group=3, pairs_per_user=10, num_unseen_users=4, unseen_test_pairs=5)
        data_kwargs["personas"] = available_personas(args.data_dir)

    backbone = resolve_model_path(args.backbone)
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    encoder = PalRewardModel.from_backbone(backbone, variant="b", num_prototypes=1).eval()
    cache = FeatureStore(args.cache_dir)
    results = {
        "machine": machine(),
        "command": "python examples/benchmarks/persona.py" + (" --smoke" if args.smoke else ""),
    }
    results["config"] = {k: v for k, v in vars(args).items() if k not in ("output_dir", "cache_dir", "data_dir")}
    results.update({"backbone": args.backbone, "epochs": args.epochs, "shots": list(shots), "settings": {}})
    for setting in args.settings:
        dataset = load_persona_preferences(
            args.data_dir, mixture_users=setting == "mixture", seed=args.seed, **data_kwargs
        )
        features = featurize_preferences(dataset, encoder, tokenizer, cache=cache)
        outcome = run_setting(features, num_groups, ks, args, shots)
        outcome["data"] = {
            **{k: v for k, v in data_kwargs.items() if k != "personas"},
            "mixture_users": setting == "mixture",
        }
        outcome["targets"] = targets(outcome, shots)
        results["settings"][setting] = outcome
        print(f"\n## Persona, {setting} setting\n\n{summary_table(outcome, shots)}\n")
        for target, met in outcome["targets"]["met"].items():
            print(f"- {target}: {'met' if met else 'MISSED'}")
    results["wall_time_seconds"] = time.perf_counter() - start
    path = write_json("persona", results, args.output_dir)
    plot(results, os.path.join(args.output_dir, "persona.png"), shots)
    print(f"\nWrote {path} and persona.png ({results['wall_time_seconds']:.0f} s).")


if __name__ == "__main__":
    main()
