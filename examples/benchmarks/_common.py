# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
"""Shared by the benchmark scripts: training PAL and the baselines on features, few-shot evaluation, outputs."""

import json
import os
import platform
import time
from collections import defaultdict

import torch
from transformers import PrinterCallback, set_seed
from transformers.utils import logging

from pal_rm import PalConfig, PalRewardModel
from pal_rm.baselines import IndependentRewardHeads, LowRankRewardBasis, fix_user_mixtures, one_reward_model
from pal_rm.metrics import per_user_accuracy
from pal_rm.trainers import PalRewardConfig, PalRewardTrainer
from pal_rm.utils import atomic_write

logger = logging.get_logger("pal_rm.benchmarks")

OUTPUT_DIR = "outputs/benchmarks"
PERSONA_DATA_DIR = os.path.join("..", "shared", "data", "anthropic-persona")  # beside the repository, never in it
SHOTS = (1, 2, 5, 10, 20, 50)
INDEPENDENT_L2_GRID = (1e-3, 1e-2, 1e-1, 1.0)
LORE_RANK_GRID = (1, 2, 4, 8)
LORE_L2_GRID = (1e-3, 1e-2, 1e-1)


def machine() -> dict:
    """Where the figures were measured."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as file:
            cpu = next(line.split(":", 1)[1].strip() for line in file if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def write_json(name: str, payload: dict, output_dir: str = OUTPUT_DIR) -> str:
    path = os.path.join(output_dir, f"{name}.json")
    with atomic_write(path) as file:  # creates `output_dir` if needed
        json.dump(payload, file, indent=2)
    return path


def training_args(output_dir: str, epochs: float, seed: int, **overrides) -> PalRewardConfig:
    defaults = {
        "num_train_epochs": epochs,
        "per_device_train_batch_size": 64,
        "per_device_eval_batch_size": 1024,
        "learning_rate": 1e-3,
        "logging_steps": 1000,
        "seed": seed,
        "disable_tqdm": True,
        "unknown_users": "population",
        "use_cpu": True,
    }
    return PalRewardConfig(output_dir=output_dir, **{**defaults, **overrides})


def pal_model(feature_dim: int, variant: str, num_prototypes: int, **head_kwargs) -> PalRewardModel:
    return PalRewardModel(
        PalConfig(feature_dim=feature_dim, variant=variant, num_prototypes=num_prototypes, **head_kwargs)
    )


def train(model, dataset, args, fixed_mixtures: bool = False) -> PalRewardTrainer:
    """
    Trains `model` on `dataset["train"]`; the validation split is the trainer's `eval_dataset`, on which the
    adaptation prior's strength is chosen at the end of training. `fixed_mixtures`: the per-group oracle, true
    mixtures given.
    """
    set_seed(args.seed)
    trainer = PalRewardTrainer(model, args, train_dataset=dataset["train"], eval_dataset=dataset["validation"])
    trainer.remove_callback(PrinterCallback)  # the scripts print their own tables
    if fixed_mixtures:
        users, weights = _true_mixtures(dataset["train"], model.config.num_prototypes)
        fix_user_mixtures(model, users, weights)
    trainer.train()
    return trainer


def _true_mixtures(split, num_groups: int | None = None) -> tuple[list[str], list[list[float]]]:
    """Each user's true mixture: the `mixture_weights` column, or the one-hot of the `group` column."""
    if "mixture_weights" in split.column_names:
        values = split["mixture_weights"]
    else:
        groups = list(split["group"])
        size = num_groups or max(groups) + 1
        values = [[1.0 if g == k else 0.0 for k in range(size)] for g in groups]
    first = {}
    for user, weights in zip(split["user_id"], values):
        first.setdefault(user, list(weights))
    return list(first), list(first.values())


def accuracy(trainer: PalRewardTrainer, split, prefix: str) -> float:
    return trainer.evaluate(split, metric_key_prefix=prefix)[f"{prefix}_accuracy"]


def shot_datasets(unseen_train, unseen_test, shots=SHOTS):
    """
    Few-shot versions of the unseen users: for every `n` in `shots`, user `u` becomes `u@n` with the first `n` of
    `u`'s few-shot comparisons, and the same test comparisons. Fitting all `u@n` at once is the same as fitting each
    shot level on its own (the users' losses are independent).
    """
    seen = defaultdict(int)
    keep, names = [], []
    for row, user in enumerate(unseen_train["user_id"]):
        seen[user] += 1
        for n in shots:
            if seen[user] <= n:
                keep.append(row)
                names.append(f"{user}@{n}")
    train = unseen_train.select(keep).remove_columns("user_id").add_column("user_id", names)
    test_rows = [row for n in shots for row in range(len(unseen_test))]
    test_names = [f"{user}@{n}" for n in shots for user in unseen_test["user_id"]]
    test = unseen_test.select(test_rows).remove_columns("user_id").add_column("user_id", test_names)
    available = min(seen.values()) if seen else 0
    too_many = [n for n in shots if n > available]
    if too_many:
        logger.warning(
            f"Unseen users have only {available} few-shot comparisons; shot levels {too_many} use them all."
        )
    return train, test


def by_shots(per_user: dict[str, float], shots=SHOTS) -> dict[int, float]:
    """Mean per-user accuracy for each shot level, from `{"user@n": accuracy}` (equal test pairs per user)."""
    levels = defaultdict(list)
    for user, value in per_user.items():
        levels[int(user.rsplit("@", 1)[1])].append(value)
    return {n: sum(levels[n]) / len(levels[n]) for n in shots if levels[n]}


def pal_results(trainer, dataset, shots=SHOTS, adapt: bool = True) -> dict:
    """Seen-user validation/test accuracy and unseen-user accuracy per shot level of a trained PAL model."""
    results = {
        "validation_accuracy": accuracy(trainer, dataset["validation"], "validation"),
        "seen_accuracy": accuracy(trainer, dataset["test"], "test"),
    }
    if adapt and trainer.pal_model.config.num_prototypes > 1:
        shot_train, shot_test = shot_datasets(dataset["unseen_train"], dataset["unseen_test"], shots)
        start = time.perf_counter()
        trainer.adapt_users(shot_train)
        results["adapt_seconds"] = time.perf_counter() - start
        accuracy(trainer, shot_test, "unseen")
        results["unseen_accuracy"] = by_shots(trainer.per_user_accuracy["unseen"], shots)
    else:  # one mixture for everyone: new users get it whatever their comparisons
        value = accuracy(trainer, dataset["unseen_test"], "unseen")
        results["unseen_accuracy"] = {n: value for n in shots}
    return results


def one_reward_results(dataset, feature_dim, args, head_kwargs, shots=SHOTS) -> dict:
    set_seed(args.seed)
    trainer = train(one_reward_model(feature_dim=feature_dim, **head_kwargs), dataset, args)
    return pal_results(trainer, dataset, shots, adapt=False)


def oracle_results(dataset, feature_dim, num_groups, args, head_kwargs, variant="b") -> dict:
    """PAL with the true mixtures (group labels) of every user fixed, seen and unseen alike."""
    set_seed(args.seed)
    model = pal_model(feature_dim, variant, num_groups, **head_kwargs)
    trainer = train(model, dataset, args, fixed_mixtures=True)
    users, weights = _true_mixtures(dataset["unseen_test"], num_groups)
    fix_user_mixtures(model, users, weights)
    return {
        "validation_accuracy": accuracy(trainer, dataset["validation"], "validation"),
        "seen_accuracy": accuracy(trainer, dataset["test"], "test"),
        "unseen_accuracy_true_mixture": accuracy(trainer, dataset["unseen_test"], "unseen"),
    }


def independent_results(dataset, shots=SHOTS, l2_grid=INDEPENDENT_L2_GRID) -> dict:
    """One head per user; the L2 strength is chosen on the seen users' validation split."""
    scores = {
        l2: IndependentRewardHeads(l2=l2).fit(dataset["train"]).accuracy(dataset["validation"]) for l2 in l2_grid
    }
    l2 = max(scores, key=scores.get)
    heads = IndependentRewardHeads(l2=l2).fit(dataset["train"])
    shot_train, shot_test = shot_datasets(dataset["unseen_train"], dataset["unseen_test"], shots)
    unseen = IndependentRewardHeads(l2=l2).fit(shot_train)
    differences, users = unseen.reward_differences(shot_test)
    return {
        "l2": l2,
        "validation_accuracy": scores[l2],
        "seen_accuracy": heads.accuracy(dataset["test"]),
        "unseen_accuracy": by_shots(per_user_accuracy(differences.numpy(), users), shots),
    }


def feature_models(features, arguments, head_kwargs, shots, seed, num_prototypes=2, num_groups=None) -> dict:
    """
    The rows of the public-benchmark tables (Reddit TL;DR, PRISM), all trained on the same frozen-backbone features:
    one reward for everyone, one independent head per user, the per-group oracle (only when the users belong to
    `num_groups` known groups) and PAL-A / PAL-B with `num_prototypes` prototypes. `arguments(name)` gives each run's
    `PalRewardConfig`.
    """
    feature_dim = len(features["train"][0]["chosen_features"])
    models = {
        "one reward for everyone": one_reward_results(features, feature_dim, arguments("bt"), head_kwargs, shots),
        "independent head per user": independent_results(features, shots),
    }
    if num_groups:
        models["per-group oracle"] = oracle_results(
            features, feature_dim, num_groups, arguments("oracle"), head_kwargs
        )
    for variant in ("a", "b"):
        set_seed(seed)
        model = pal_model(feature_dim, variant, num_prototypes, **head_kwargs)
        trainer = train(model, features, arguments(f"pal-{variant}"))
        models[f"PAL-{variant.upper()} K={num_prototypes}"] = pal_results(trainer, features, shots)
    return models


def lore_results(dataset, shots=SHOTS, ranks=LORE_RANK_GRID, l2_grid=LORE_L2_GRID, seed: int = 0) -> dict:
    """LoRe (`LowRankRewardBasis`): rank and penalty chosen on the seen users' validation split; new users fitted on
    the frozen basis from their first n comparisons, for each shot level."""
    scores = {}
    for rank in ranks:
        for l2 in l2_grid:
            model = LowRankRewardBasis(rank=rank, l2=l2, seed=seed).fit(dataset["train"])
            scores[(rank, l2)] = (model.accuracy(dataset["validation"]), model)
    (rank, l2), (validation, model) = max(scores.items(), key=lambda item: item[1][0])
    shot_train, shot_test = shot_datasets(dataset["unseen_train"], dataset["unseen_test"], shots)
    model.fit_new_users(shot_train)
    differences, users = model.reward_differences(shot_test)
    return {
        "rank": rank,
        "l2": l2,
        "validation_accuracy": validation,
        "seen_accuracy": model.accuracy(dataset["test"]),
        "unseen_accuracy": by_shots(per_user_accuracy(differences.numpy(), users), shots),
    }


def select_by_validation(models: dict[str, dict]) -> str:
    """The name of the model with the best seen-user validation accuracy (first one on ties)."""
    return max(models, key=lambda name: models[name]["validation_accuracy"])


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(value):
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)
