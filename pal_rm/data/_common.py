# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
"""Helpers shared by the preference loaders: split names, argument checks, seeded generators and the assembly of
the returned `datasets.DatasetDict`. Private: the public surface is in `pal_rm.data`."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict, Features, Value
from datasets import Sequence as SequenceFeature

SPLIT_NAMES = ("train", "validation", "test", "unseen_train", "unseen_test")
"""Splits of every loader: seen users (`train`, `validation`, `test`) and unseen users (`unseen_train`: the
few-shot comparisons used to fit a new user, `unseen_test`: held-out comparisons of the same new users)."""

TEXT_FEATURES = {
    "user_id": Value("string"),
    "prompt": Value("string"),
    "chosen": Value("string"),
    "rejected": Value("string"),
    "group": Value("int64"),
}
MIXTURE_WEIGHTS_FEATURE = SequenceFeature(Value("float64"))


def check_int(name: str, value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"`seed` must be a non-negative integer, got {seed!r}.")
    return int(seed)


def check_positive_float(name: str, value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.number))
        or not value > 0
        or not math.isfinite(value)
    ):
        raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}.")
    return float(value)


def check_fractions(validation_fraction: Any, test_fraction: Any | None = None) -> None:
    fractions = {"validation_fraction": validation_fraction}
    if test_fraction is not None:
        fractions["test_fraction"] = test_fraction
    for name, value in fractions.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not 0 <= value < 1:
            raise ValueError(f"`{name}` must be a number in [0, 1), got {value!r}.")
    if sum(fractions.values()) >= 1:
        raise ValueError(
            f"`validation_fraction` + `test_fraction` must be < 1 so that some data is left for training, got "
            f"{validation_fraction} + {test_fraction}."
        )


def round_half_up(value: float) -> int:
    """Round to the nearest integer, halves up (Python's `round` rounds halves to even)."""
    return int(math.floor(value + 0.5))


def split_sizes(total: int, validation_fraction: float, test_fraction: float, what: str) -> tuple[int, int, int]:
    """Split `total` comparisons into (train, validation, test) counts; every split with a non-zero fraction gets
    at least one comparison and train keeps at least one."""
    num_validation = round_half_up(total * validation_fraction)
    num_test = round_half_up(total * test_fraction)
    if validation_fraction > 0:
        num_validation = max(num_validation, 1)
    if test_fraction > 0:
        num_test = max(num_test, 1)
    num_train = total - num_validation - num_test
    if num_train < 1:
        raise ValueError(
            f"`{what}`={total} is too small for validation_fraction={validation_fraction} and "
            f"test_fraction={test_fraction}: no comparison is left for training. Increase `{what}` or lower the "
            "fractions."
        )
    return num_train, num_validation, num_test


def rng_for(seed: int, *stream: int) -> np.random.Generator:
    """An independent generator for one named stream of randomness, so that changing one part of a loader's
    configuration (for example the number of unseen users) does not reshuffle the other parts."""
    return np.random.default_rng([seed, *stream])


def mixture_weights(rng: np.random.Generator, num_groups: int, dirichlet_alpha: float) -> np.ndarray:
    return rng.dirichlet(np.full(num_groups, dirichlet_alpha))


def one_hot(index: int, size: int) -> np.ndarray:
    weights = np.zeros(size)
    weights[index] = 1.0
    return weights


def unseen_mixture_count(num_unseen_users: int, num_seen_mixture_users: int, num_seen_users: int) -> int:
    """Unseen users keep the seen users' share of mixture users (rounded half up)."""
    if num_seen_users == 0:
        return 0
    return round_half_up(num_unseen_users * num_seen_mixture_users / num_seen_users)


def build_dataset_dict(rows: Mapping[str, Sequence[Mapping[str, Any]]], features: Features) -> DatasetDict:
    """Assemble the five splits from lists of row dicts; empty splits keep the full schema."""
    splits = {}
    for split in SPLIT_NAMES:
        split_rows = rows.get(split, [])
        columns = {name: [row[name] for row in split_rows] for name in features}
        splits[split] = Dataset.from_dict(columns, features=features, split=split)
    return DatasetDict(splits)
