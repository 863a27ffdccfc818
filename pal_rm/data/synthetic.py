# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
"""The PAL paper's ideal-point simulation on features (no backbone, no text).

True model, with `D = feature_dim` and `K* = num_groups`:

- prototypes `p_k ~ N(0, I_D)`, `k = 1..K*`;
- items `x ~ N(0, I_D)`, a fresh pair for every comparison (so no item is shared between splits);
- user `i` has weights `w_i` on the simplex: one-hot for a pure group member, `Dirichlet(dirichlet_alpha)` for a
  mixture user; ideal point `a_i = sum_k w_ik p_k`;
- reward `r_i(x) = -||x - a_i||^2 / temperature`;
- label (Bradley-Terry-Luce): `P(x1 preferred over x2) = sigmoid(r_i(x1) - r_i(x2))` with `label_noise="btl"`, or
  the higher reward always wins with `label_noise="none"`.

Prototypes and items share one scale, so the user-specific part of the margin, `2 <x1 - x2, a_i> / temperature`, is
comparable to the part common to all users, `(||x2||^2 - ||x1||^2) / temperature`. The margin's spread grows like
`sqrt(D)`; the default `temperature = sqrt(D)` keeps it near 3.5 for every `D`, which puts the Bayes-optimal expected
accuracy of pure users around 0.85 (a little lower for mixture users, whose ideal points sit nearer the centre).

PAL-A with an identity-like item map recovers the true model exactly: `f(x) = x / sqrt(temperature)` and prototypes
`p_k / sqrt(temperature)` give the true rewards, so a learner of `f: R^D -> R^d` with `d >= D` can reach the Bayes
accuracy reported by `bayes_optimal_accuracy`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict, Features, Value
from datasets import Sequence as SequenceFeature
from transformers.utils import logging

from ._common import (
    MIXTURE_WEIGHTS_FEATURE,
    SEEN_SPLIT_NAMES,
    SimulatedUser,
    build_dataset_dict,
    check_fractions,
    check_int,
    check_positive_float,
    check_seed,
    empty_rows,
    rng_for,
    simulate_users,
    split_sizes,
)

logger = logging.get_logger(__name__)

LABEL_NOISE_OPTIONS = ("btl", "none")

# randomness streams
_PROTOTYPE_STREAM, _USER_STREAM, _UNSEEN_STREAM = 0, 1, 2


def _features(feature_dim: int) -> Features:
    return Features(
        {
            "user_id": Value("string"),
            "chosen_features": SequenceFeature(Value("float32"), length=feature_dim),
            "rejected_features": SequenceFeature(Value("float32"), length=feature_dim),
            "group": Value("int64"),
            "mixture_weights": MIXTURE_WEIGHTS_FEATURE,
            "true_margin": Value("float64"),
            "label_probability": Value("float64"),
        }
    )


def _user_rows(
    user: SimulatedUser, prototypes: np.ndarray, temperature: float, label_noise: str, num_pairs: int
) -> list[dict]:
    """`num_pairs` fresh item pairs labelled by `user` under the true model, drawn from the user's generator."""
    rng = user.rng
    feature_dim = prototypes.shape[1]
    ideal_point = user.weights @ prototypes
    # round the items to float32 first so that the stored features give exactly the stored margins
    items = rng.standard_normal((num_pairs, 2, feature_dim)).astype(np.float32).astype(np.float64)
    rewards = -((items - ideal_point) ** 2).sum(axis=-1) / temperature  # (num_pairs, 2)
    margin = rewards[:, 0] - rewards[:, 1]
    if label_noise == "btl":
        first_wins = rng.random(num_pairs) < 1.0 / (1.0 + np.exp(-margin))
    else:
        first_wins = margin > 0
    rows = []
    for pair, wins, pair_margin in zip(items, first_wins, margin):
        chosen, rejected = (pair[0], pair[1]) if wins else (pair[1], pair[0])
        true_margin = float(pair_margin if wins else -pair_margin)
        if label_noise == "btl":
            label_probability = 1.0 / (1.0 + math.exp(-true_margin))
        else:
            label_probability = 1.0
        rows.append(
            {
                "user_id": user.user_id,
                "chosen_features": chosen.tolist(),
                "rejected_features": rejected.tolist(),
                "group": user.group,
                "mixture_weights": user.weights.tolist(),
                "true_margin": true_margin,
                "label_probability": label_probability,
            }
        )
    return rows


def load_synthetic_preferences(
    feature_dim: int = 16,
    num_groups: int = 3,
    users_per_group: int = 50,
    pairs_per_user: int = 50,
    num_unseen_users: int = 30,
    unseen_shots: int = 20,
    unseen_test_pairs: int = 50,
    mixture_users: bool = False,
    dirichlet_alpha: float = 1.0,
    label_noise: str = "btl",
    temperature: float | None = None,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> DatasetDict:
    """Simulate preferences from the ideal-point model with `num_groups` true prototypes (module docstring).

    Args:
        feature_dim (`int`, defaults to 16): dimension `D` of the item features.
        num_groups (`int`, defaults to 3): number `K*` of true prototypes.
        users_per_group (`int`, defaults to 50): seen users per group; there are `num_groups * users_per_group`
            seen users in both modes of `mixture_users`.
        pairs_per_user (`int`, defaults to 50): comparisons per seen user, split into `train` / `validation` /
            `test` by `validation_fraction` and `test_fraction` (35 / 5 / 10 with the defaults).
        num_unseen_users (`int`, defaults to 30): new users, drawn like the seen ones (pure members assigned to groups
            in turn, or Dirichlet mixtures when `mixture_users=True`).
        unseen_shots (`int`, defaults to 20): comparisons per unseen user in `unseen_train`.
        unseen_test_pairs (`int`, defaults to 50): comparisons per unseen user in `unseen_test`.
        mixture_users (`bool`, defaults to `False`): pure group members (`False`) or Dirichlet mixtures of the
            prototypes (`True`, `group == -1`).
        dirichlet_alpha (`float`, defaults to 1.0): Dirichlet concentration of the mixture weights.
        label_noise (`str`, defaults to `"btl"`): `"btl"` samples each label from the true BTL model; `"none"` always
            labels the higher-reward item as chosen.
        temperature (`float`, *optional*): reward temperature; defaults to `sqrt(feature_dim)`.
        validation_fraction (`float`, defaults to 0.1), test_fraction (`float`, defaults to 0.2): shares of each seen
            user's comparisons in the validation and test splits.
        seed (`int`, defaults to 0): the output is a deterministic function of the arguments.

    Returns:
        `datasets.DatasetDict` with splits `train`, `validation`, `test`, `unseen_train`, `unseen_test` and columns
        `user_id` (`user_000`, `user_001`, ... for seen users, `unseen_user_000`, ... for unseen users),
        `chosen_features` and `rejected_features` (float32 lists of length `feature_dim`), `group` (-1 for mixture
        users), `mixture_weights` (the true weights), `true_margin` (`r_i(chosen) - r_i(rejected)` under the
        true model; negative where the sampled label went against the true reward) and `label_probability` (the
        probability that the true model labels the pair as it is stored: `sigmoid(true_margin)` under `"btl"`, 1
        under `"none"`). The defaults give 150 seen users (5,250 / 750 / 1,500 comparisons) and 30 unseen users
        (600 / 1,500). Use `bayes_optimal_accuracy` on a split for the accuracy ceiling.

    Example:

    ```python
    >>> from pal_rm.data import bayes_optimal_accuracy, load_synthetic_preferences
    >>> dataset = load_synthetic_preferences(seed=0)
    >>> bayes_optimal_accuracy(dataset["test"])  # doctest: +SKIP
    {'expected': 0.85..., 'realized': 0.85...}
    ```
    """
    feature_dim = check_int("feature_dim", feature_dim, minimum=1)
    num_groups = check_int("num_groups", num_groups, minimum=1)
    users_per_group = check_int("users_per_group", users_per_group, minimum=1)
    pairs_per_user = check_int("pairs_per_user", pairs_per_user, minimum=1)
    num_unseen_users = check_int("num_unseen_users", num_unseen_users)
    unseen_shots = check_int("unseen_shots", unseen_shots)
    unseen_test_pairs = check_int("unseen_test_pairs", unseen_test_pairs)
    dirichlet_alpha = check_positive_float("dirichlet_alpha", dirichlet_alpha)
    if label_noise not in LABEL_NOISE_OPTIONS:
        raise ValueError(f"`label_noise` must be one of {LABEL_NOISE_OPTIONS}, got {label_noise!r}.")
    temperature = math.sqrt(feature_dim) if temperature is None else check_positive_float("temperature", temperature)
    seed = check_seed(seed)
    check_fractions(validation_fraction, test_fraction)
    sizes = split_sizes(pairs_per_user, validation_fraction, test_fraction, "pairs_per_user")

    prototypes = rng_for(seed, _PROTOTYPE_STREAM).standard_normal((num_groups, feature_dim))
    arguments = (prototypes, temperature, label_noise)
    seen_users, unseen_users = simulate_users(
        num_groups=num_groups,
        users_per_group=0 if mixture_users else users_per_group,  # all seen users are members, or all are mixtures
        num_mixture_users=num_groups * users_per_group if mixture_users else 0,
        num_unseen_users=num_unseen_users,
        dirichlet_alpha=dirichlet_alpha,
        seed=seed,
        seen_stream=_USER_STREAM,
        unseen_stream=_UNSEEN_STREAM,
    )
    rows = empty_rows()
    for user in seen_users:
        for split, count in zip(SEEN_SPLIT_NAMES, sizes):
            rows[split] += _user_rows(user, *arguments, count)
    for user in unseen_users:
        rows["unseen_train"] += _user_rows(user, *arguments, unseen_shots)
        rows["unseen_test"] += _user_rows(user, *arguments, unseen_test_pairs)

    dataset_dict = build_dataset_dict(rows, _features(feature_dim))
    if dataset_dict["test"].num_rows:
        accuracy = bayes_optimal_accuracy(dataset_dict["test"])
        logger.info(
            f"Synthetic preferences: Bayes-optimal test accuracy {accuracy['expected']:.3f} expected, "
            f"{accuracy['realized']:.3f} realized."
        )
    return dataset_dict


def bayes_optimal_accuracy(dataset: Dataset | Mapping[str, Any]) -> dict[str, float]:
    """Accuracy of the true model on one split of `load_synthetic_preferences`.

    The Bayes-optimal predictor knows the true rewards and predicts `chosen` iff `true_margin > 0`.

    Args:
        dataset (`datasets.Dataset` or a mapping of columns): one split, with the `true_margin` and
            `label_probability` columns.

    Returns:
        `dict` with `"expected"`: its accuracy in expectation over the label noise, the mean of
        `max(q, 1 - q)` where `q` is `label_probability` (`mean(sigmoid(|true_margin|))` under BTL noise); and
        `"realized"`: its accuracy on the labels actually sampled, `mean(true_margin > 0)`.
    """
    if isinstance(dataset, DatasetDict):
        raise ValueError(
            "`bayes_optimal_accuracy` takes one split, not a DatasetDict: pass for example `dataset['test']`."
        )
    missing = [name for name in ("true_margin", "label_probability") if name not in _column_names(dataset)]
    if missing:
        raise ValueError(
            f"The dataset has no {missing} column: pass a split produced by `load_synthetic_preferences`."
        )
    margin = np.asarray(dataset["true_margin"], dtype=np.float64)
    probability = np.asarray(dataset["label_probability"], dtype=np.float64)
    if margin.size == 0:
        raise ValueError("The split is empty: the Bayes-optimal accuracy of zero comparisons is undefined.")
    return {
        "expected": float(np.maximum(probability, 1.0 - probability).mean()),
        "realized": float((margin > 0).mean()),
    }


def _column_names(dataset: Dataset | Mapping[str, Any]) -> list[str]:
    if isinstance(dataset, Dataset):
        return dataset.column_names
    if isinstance(dataset, Mapping):
        return list(dataset)
    raise ValueError(f"Expected a datasets.Dataset or a mapping of columns, got {type(dataset).__name__}.")
