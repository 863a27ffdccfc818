# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
"""Helpers shared by the preference loaders: split names, argument checks, seeded generators, the simulation of seen
and unseen users, reading local copies of Hub datasets, and the assembly of the returned `datasets.DatasetDict`.
Private: the public surface is in `pal_rm.data`."""

from __future__ import annotations

import glob
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict, Features, Value
from datasets import Sequence as SequenceFeature
from transformers.utils import logging

logger = logging.get_logger(__name__)

SPLIT_NAMES = ("train", "validation", "test", "unseen_train", "unseen_test")
"""Splits of every loader: seen users (`train`, `validation`, `test`) and unseen users (`unseen_train`: the
few-shot comparisons used to fit a new user, `unseen_test`: held-out comparisons of the same new users)."""
SEEN_SPLIT_NAMES = SPLIT_NAMES[:3]
"""The seen users' splits: `train`, `validation`, `test`."""

SEEN_USER_ID_FORMAT = "user_{:03d}"
UNSEEN_USER_ID_FORMAT = "unseen_user_{:03d}"
"""Ids of simulated users, from their 0-based index: `user_000`, `user_001`, ... and `unseen_user_000`, ... (an index
of 1,000 or more gets more digits)."""

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


def check_share(name: str, value: Any) -> float:
    """A share in (0, 1], such as the fraction of users drawn as seen users."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not 0 < value <= 1:
        raise ValueError(f"`{name}` must be a number in (0, 1], got {value!r}.")
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


@dataclass(frozen=True)
class SimulatedUser:
    """One simulated user of a loader.

    Attributes:
        user_id (`str`): `user_000`, ... for seen users, `unseen_user_000`, ... for unseen users.
        group (`int`): the user's group, or -1 for a mixture user.
        weights (`np.ndarray`): the user's true weights over the groups, shape `(num_groups,)`: one-hot for a group
            member, a Dirichlet draw for a mixture user.
        rng (`np.random.Generator`): the user's own stream of randomness, already past the draw of `weights`; the
            loader draws the user's comparisons from it.
    """

    user_id: str
    group: int
    weights: np.ndarray
    rng: np.random.Generator


def simulate_users(
    num_groups: int,
    users_per_group: int,
    num_mixture_users: int,
    num_unseen_users: int,
    dirichlet_alpha: float,
    seed: int,
    seen_stream: int,
    unseen_stream: int,
) -> tuple[list[SimulatedUser], list[SimulatedUser]]:
    """The seen and unseen users of a simulated dataset.

    Seen users: `users_per_group` members of each group in turn (group 0 first), then `num_mixture_users` mixture
    users. Unseen users keep the seen users' share of mixture users (`unseen_mixture_count`): the group members first,
    assigned to groups in turn (0, 1, 2, ...), then the mixture users. A mixture user's weights are drawn from
    `Dirichlet(dirichlet_alpha)` over the `num_groups` groups.

    Every user has its own generator, `rng_for(seed, seen_stream, index)` or `rng_for(seed, unseen_stream, index)`
    (index: the user's position among the seen, or unseen, users), which draws the mixture weights first and is then
    handed to the loader for the user's comparisons; so the number of users of one kind never reshuffles another
    user's data.

    Returns:
        `(seen_users, unseen_users)`: two lists of `SimulatedUser`, in index order.
    """
    num_seen_users = num_groups * users_per_group + num_mixture_users
    num_unseen_mixture = unseen_mixture_count(num_unseen_users, num_mixture_users, num_seen_users)
    seen_groups = [group for group in range(num_groups) for _ in range(users_per_group)] + [-1] * num_mixture_users
    unseen_groups = [index % num_groups for index in range(num_unseen_users - num_unseen_mixture)]
    unseen_groups += [-1] * num_unseen_mixture

    def user(id_format: str, stream: int, index: int, group: int) -> SimulatedUser:
        rng = rng_for(seed, stream, index)
        weights = one_hot(group, num_groups) if group >= 0 else mixture_weights(rng, num_groups, dirichlet_alpha)
        return SimulatedUser(id_format.format(index), group, weights, rng)

    seen = [user(SEEN_USER_ID_FORMAT, seen_stream, index, group) for index, group in enumerate(seen_groups)]
    unseen = [user(UNSEEN_USER_ID_FORMAT, unseen_stream, index, group) for index, group in enumerate(unseen_groups)]
    return seen, unseen


DATA_FILE_EXTENSIONS = ("jsonl", "json", "parquet")
"""Local data files the Hub-dataset loaders read, in order of preference."""


def looks_like_local_path(source: str) -> bool:
    """Whether `source` is meant as a local path (and not a Hub id) even if nothing exists there."""
    return source.startswith(("/", "./", "../", "~", "\\")) or os.path.splitdrive(source)[0] != ""


def data_files(folder: str, name: str) -> list[str]:
    """The files of `folder` that hold the data called `name` (a split or a configuration): `name.jsonl`,
    `name-*.parquet`, `name/*.parquet`, ... for the first extension of `DATA_FILE_EXTENSIONS` that has any, sorted."""
    for extension in DATA_FILE_EXTENSIONS:
        patterns = (f"{name}.{extension}", f"{name}-*.{extension}", os.path.join(name, f"*.{extension}"))
        files = sorted(path for pattern in patterns for path in glob.glob(os.path.join(folder, pattern)))
        if files:
            return files
    return []


def read_json_records(path: str) -> list[dict]:
    """The records of a JSON array file or a JSON-lines file; invalid JSON is an error naming the file and line."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error.msg}).") from None
    rows = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {line_number}: not valid JSON ({error.msg}).") from None
    return rows


def read_data_files(files: Sequence[str]) -> list[dict]:
    """The records of parquet files (read with `datasets`) or of json/jsonl files, in file order."""
    if files and files[0].endswith(".parquet"):
        return Dataset.from_parquet(list(files)).to_list()
    return [row for path in files for row in read_json_records(path)]


def empty_rows() -> dict[str, list[dict]]:
    """`{split: []}` for every split of `SPLIT_NAMES`: the lists a loader fills before `build_dataset_dict`."""
    return {split: [] for split in SPLIT_NAMES}


def build_dataset_dict(rows: Mapping[str, Sequence[Mapping[str, Any]]], features: Features) -> DatasetDict:
    """Assemble the five splits from lists of row dicts; empty splits keep the full schema."""
    unknown = sorted(set(rows) - set(SPLIT_NAMES))
    if unknown:  # a misspelt split would otherwise drop its rows silently
        raise ValueError(f"Unknown split(s) {unknown}: the splits are {SPLIT_NAMES}.")
    splits = {}
    for split in SPLIT_NAMES:
        split_rows = rows.get(split, [])
        columns = {name: [row[name] for row in split_rows] for name in features}
        splits[split] = Dataset.from_dict(columns, features=features, split=split)
    return DatasetDict(splits)


def draw_seen_users(
    eligible: Sequence[str], seen_fraction: float, seed: int, stream: int, eligibility: str, threshold: str, noun: str
) -> set[str]:
    """
    The seen users of a Hub loader: a seeded `seen_fraction` (rounded down) of the `eligible` users (sorted ids),
    drawn with `rng_for(seed, stream)`; the others are its unseen users. No seen user is an error that says why
    (`"{n} {noun}s have {eligibility}"`) and what to lower (`threshold`); no unseen user is a warning.
    """
    num_seen = int(len(eligible) * seen_fraction)
    if num_seen == 0:
        raise ValueError(
            f"{len(eligible)} {noun}s have {eligibility}, so seen_fraction={seen_fraction} leaves no seen user: lower "
            f"{threshold}, raise `seen_fraction` or check `source`."
        )
    if num_seen == len(eligible):
        logger.warning(
            f"seen_fraction={seen_fraction} makes every eligible {noun} a seen user: the unseen splits are empty."
        )
    order = rng_for(seed, stream).permutation(len(eligible))
    return {eligible[i] for i in order[:num_seen]}


def split_user_units(
    units: Mapping[str, Sequence[Sequence[Any]]],
    eligible: Sequence[str],
    seen: set[str],
    validation_fraction: float,
    test_fraction: float,
    unseen_shots: int | None,
    seed: int,
    streams: tuple[int, int, int],
    threshold: str,
) -> dict[str, list]:
    """
    The five splits of a Hub loader whose split unit is one user's group of comparisons (a PRISM conversation, a
    Pick-a-Pic user's prompt), so that one unit never spans two splits. `units` maps each user to their units (lists
    of comparisons); users go in `eligible` order, each with its own streams (`streams`: seen, unseen, shots; `seed`
    and the user's position among `eligible`).

    A seen user's units are shuffled and split into `test` (`test_fraction`), `validation` (`validation_fraction`)
    and `train` (the rest), each share of the user's unit count rounded half up (at least one unit for a non-zero
    share; `threshold` names the argument to raise when a user has too few). An unseen user's units are shuffled:
    `test_fraction` of them (at least one) give `unseen_test`, the others the few-shot `unseen_train`, whose
    comparisons are shuffled and, with `unseen_shots`, cut to that many.
    """
    seen_stream, unseen_stream, shots_stream = streams
    rows = empty_rows()
    for position, user in enumerate(eligible):
        user_units = units[user]
        count = len(user_units)
        if user in seen:
            _, num_validation, num_test = split_sizes(count, validation_fraction, test_fraction, threshold)
            shuffled = [user_units[i] for i in rng_for(seed, seen_stream, position).permutation(count)]
            rows["test"] += [row for unit in shuffled[:num_test] for row in unit]
            rows["validation"] += [row for unit in shuffled[num_test : num_test + num_validation] for row in unit]
            rows["train"] += [row for unit in shuffled[num_test + num_validation :] for row in unit]
        else:
            num_test = max(1, round_half_up(count * test_fraction))
            shuffled = [user_units[i] for i in rng_for(seed, unseen_stream, position).permutation(count)]
            rows["unseen_test"] += [row for unit in shuffled[:num_test] for row in unit]
            shots = [row for unit in shuffled[num_test:] for row in unit]
            draw = rng_for(seed, shots_stream, position).permutation(len(shots))[:unseen_shots]
            rows["unseen_train"] += [shots[i] for i in draw]
    return rows


def drop_training_prompts(rows: dict[str, list], key: Callable[[Any], Any], what: str = "prompt") -> None:
    """Drops (in place, logged) the evaluation comparisons (`validation`, `test`, `unseen_test`) whose prompt, by
    `key(row)`, is also the prompt of a training comparison (`train`, `unseen_train`) of any user: different users
    may write the same prompt."""
    training = {key(row) for split in ("train", "unseen_train") for row in rows[split]}
    for split in ("validation", "test", "unseen_test"):
        kept = [row for row in rows[split] if key(row) not in training]
        if len(kept) < len(rows[split]):
            logger.info(f"{len(rows[split]) - len(kept)} {split} comparisons have a training {what}: dropped.")
        rows[split] = kept
