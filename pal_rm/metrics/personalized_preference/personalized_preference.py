# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
"""Personalized preference metrics: how well a reward model orders each user's comparisons.

This one file is both an `evaluate` metric (`evaluate.load("<this folder>")`, offline) and the implementation that
pal-rm's trainer and benchmarks import (`pal_rm.metrics.personalized_preference_metrics`), so every reported number
comes from the same code.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Metrics of a (personalized) reward model on preference pairs, from the reward difference of each pair
(`r(chosen) - r(rejected)`, for the pair's user) and, optionally, the user of each pair:

- `accuracy`: pair-weighted accuracy, the fraction of pairs whose chosen response gets the higher reward. A tie (a
  difference of exactly 0) counts as half a correct pair: a coin flip.
- `user_accuracy_mean` / `user_accuracy_min`: the accuracy of each user on their own pairs, averaged over users (every
  user weighs the same) and for the worst user.
- `log_loss`: the mean Bradley-Terry negative log-likelihood, `mean(-log sigmoid(difference))`.
- `calibration_error`: the expected calibration error of the Bradley-Terry probabilities. Each pair's prediction is the
  response with the higher reward, with confidence `max(p, 1 - p)` where `p = sigmoid(difference)`; pairs are put in
  `num_bins` equal-width confidence bins on [0.5, 1], and the error is the pair-weighted mean over bins of
  `|accuracy(bin) - mean confidence(bin)|`.
- `num_pairs`, `num_users`.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[float]`): the reward difference `r(chosen) - r(rejected)` of each pair.
    references (`list[str]`): the user of each pair (give every pair the same id when there are no users).
    num_bins (`int`, *optional*, defaults to 10): the number of confidence bins of `calibration_error`.
Returns:
    `accuracy`, `user_accuracy_mean`, `user_accuracy_min`, `log_loss`, `calibration_error`, `num_pairs`, `num_users`.
Examples:
    >>> metric = evaluate.load("path/to/pal_rm/metrics/personalized_preference")
    >>> metric.compute(predictions=[1.5, -0.2, 0.0], references=["alice", "alice", "bob"])["accuracy"]
    0.5
"""

_CITATION = """@inproceedings{chen2025pal,
  title     = {{PAL}: Sample-Efficient Personalized Reward Modeling for Pluralistic Alignment},
  author    = {Chen, Daiwei and Chen, Yi and Rege, Aniket and Wang, Zhi and Vinayak, Ramya Korlakai},
  booktitle = {The Thirteenth International Conference on Learning Representations (ICLR)},
  year      = {2025}
}"""


def personalized_preference_metrics(reward_differences, user_ids=None, num_bins: int = 10) -> dict:
    """
    The metrics described in this module's docstring, from per-pair reward differences (`r(chosen) - r(rejected)`)
    and optionally the user of each pair (ids or table rows). O(pairs): users are grouped with `np.unique`/`bincount`,
    never looped over.
    """
    differences = np.asarray(reward_differences, dtype=np.float64).reshape(-1)
    if differences.size == 0:
        raise ValueError("No pairs to evaluate: `reward_differences` is empty.")
    if not np.isfinite(differences).all():
        rows = np.flatnonzero(~np.isfinite(differences))
        raise ValueError(f"{rows.size} reward differences are NaN or inf (pairs {rows[:10].tolist()}).")
    if num_bins < 1:
        raise ValueError(f"`num_bins` must be >= 1, got {num_bins}.")
    correct = (differences > 0).astype(np.float64) + 0.5 * (differences == 0)
    results = {
        "accuracy": float(correct.mean()),
        "log_loss": float(np.logaddexp(0.0, -differences).mean()),
        "num_pairs": int(differences.size),
    }
    # Calibration: predicted winner with confidence max(p, 1 - p) in [0.5, 1].
    confidence = 1.0 / (1.0 + np.exp(-np.abs(differences)))
    bins = np.minimum(((confidence - 0.5) * 2 * num_bins).astype(np.int64), num_bins - 1)
    counts = np.bincount(bins, minlength=num_bins)
    bin_accuracy = np.bincount(bins, weights=correct, minlength=num_bins)
    bin_confidence = np.bincount(bins, weights=confidence, minlength=num_bins)
    filled = counts > 0
    results["calibration_error"] = float(
        np.abs(bin_accuracy[filled] - bin_confidence[filled]).sum() / differences.size
    )
    if user_ids is None:
        results.update(user_accuracy_mean=results["accuracy"], user_accuracy_min=results["accuracy"], num_users=1)
        return results
    users = np.asarray(user_ids).reshape(-1)
    if users.size != differences.size:
        raise ValueError(f"Got {users.size} user ids for {differences.size} reward differences; pass one per pair.")
    _, inverse = np.unique(users, return_inverse=True)
    per_user = np.bincount(inverse, weights=correct) / np.bincount(inverse)
    results.update(
        user_accuracy_mean=float(per_user.mean()),
        user_accuracy_min=float(per_user.min()),
        num_users=int(per_user.size),
    )
    return results


def per_user_accuracy(reward_differences, user_ids) -> dict:
    """`{user: accuracy on their pairs}` (ties count half), by `np.unique`/`bincount`."""
    differences = np.asarray(reward_differences, dtype=np.float64).reshape(-1)
    correct = (differences > 0).astype(np.float64) + 0.5 * (differences == 0)
    users, inverse = np.unique(np.asarray(user_ids).reshape(-1), return_inverse=True)
    accuracy = np.bincount(inverse, weights=correct) / np.bincount(inverse)
    return dict(zip(users.tolist(), accuracy.tolist()))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PersonalizedPreference(evaluate.Metric):
    """`evaluate` wrapper of [`personalized_preference_metrics`]."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("float64"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, num_bins: int = 10):
        return personalized_preference_metrics(predictions, references, num_bins=num_bins)
