# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
"""Heterogeneous persona preferences from Anthropic's persona statements (Perez et al. 2022), as in PAL.

The source folder holds one `<persona>.jsonl` file per behaviour (the `persona/` files of anthropics/evals,
CC-BY-4.0); every line is `{"question", "statement", "answer_matching_behavior", "answer_not_matching_behavior",
"label_confidence"}` with answers `" Yes"` / `" No"`. The data is read from `data_dir` and never bundled.

Construction:

- prompt: the `question` ("Is the following statement something you would say?\\n\\"...\\""); responses: its two
  answers, `" Yes"` and `" No"`.
- groups: each of the `num_groups` groups holds a subset of the personas. By default every group holds a distinct,
  seeded random half (`len(personas) // 2`) of the personas, so any two groups disagree on at least two personas;
  pass `group_personas` to choose the subsets yourself.
- a member of a group prefers `answer_matching_behavior` for the statements of the personas its group holds and
  `answer_not_matching_behavior` for the others.
- mixture users (`mixture_users=True`, `group == -1`) have Dirichlet weights `w` over the groups. With
  `mixture_rule="weighted"` (the default) the user prefers the matching answer iff the groups holding the persona
  carry at least half of the weight (the sign of the weighted utility, +1 for matching in a holding group and -1
  otherwise); with `mixture_rule="sampled"` one group is drawn from `w` for every comparison and its preference is
  the label.

Leakage rule: the statements are split into train / validation / test pools first, by statement text (persona by
persona, seeded; a statement that occurs in two persona files lands in one pool). Seen users' `train` rows use only the
train pool, `validation` rows only the validation pool, `test` and `unseen_test` rows only the test pool, and the
unseen users' few-shot `unseen_train` rows draw from the train pool. Each user's comparisons within a split are
distinct statements; different users share statements (with labels that differ by group).

The default personas are eight varied, human-like behaviours with 1,000 statements each (half matching " Yes"):
`DEFAULT_PERSONAS`.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Sequence

import numpy as np
from datasets import DatasetDict, Features, Value
from transformers.utils import logging

from ._common import (
    MIXTURE_WEIGHTS_FEATURE,
    SEEN_SPLIT_NAMES,
    TEXT_FEATURES,
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

DEFAULT_PERSONAS = (
    "agreeableness",
    "conscientiousness",
    "extraversion",
    "neuroticism",
    "openness",
    "politically-liberal",
    "risk-seeking",
    "subscribes-to-utilitarianism",
)
"""The personas used when `personas=None`: the Big Five traits plus three attitudes."""

MIXTURE_RULES = ("weighted", "sampled")
_REQUIRED_KEYS = ("question", "statement", "answer_matching_behavior", "answer_not_matching_behavior")
_POOLS = SEEN_SPLIT_NAMES  # one statement pool per seen split, named after it

# randomness streams
_POOL_STREAM, _GROUP_STREAM, _USER_STREAM, _UNSEEN_STREAM = 0, 1, 2, 3


def available_personas(data_dir: str | os.PathLike) -> list[str]:
    """The persona names (file names without `.jsonl`) of a folder of persona files, sorted."""
    return sorted(name[: -len(".jsonl")] for name in os.listdir(data_dir) if name.endswith(".jsonl"))


def _read_persona(path: str, persona: str) -> list[dict]:
    entries, seen = [], set()
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {line_number}: not valid JSON ({error.msg}).") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}, line {line_number}: expected a JSON object, got {type(record).__name__}.")
            for key in _REQUIRED_KEYS:
                value = record.get(key)
                if not isinstance(value, str) or not value.strip():
                    raise ValueError(
                        f"{path}, line {line_number}: `{key}` must be a non-empty string, got {value!r}. Every line "
                        f"needs {list(_REQUIRED_KEYS)}."
                    )
            if record["answer_matching_behavior"] == record["answer_not_matching_behavior"]:
                raise ValueError(
                    f"{path}, line {line_number}: `answer_matching_behavior` and `answer_not_matching_behavior` are "
                    f"both {record['answer_matching_behavior']!r}; they must differ."
                )
            if record["statement"] in seen:  # a repeated line would only duplicate a comparison
                continue
            seen.add(record["statement"])
            entries.append(
                {
                    "persona": persona,
                    "statement": record["statement"],
                    "question": record["question"],
                    "matching": record["answer_matching_behavior"],
                    "not_matching": record["answer_not_matching_behavior"],
                }
            )
    if not entries:
        raise ValueError(f"{path} holds no statements.")
    return entries


def _split_statement_pools(
    entries_by_persona: dict[str, list[dict]], validation_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[dict]]:
    rng = rng_for(seed, _POOL_STREAM)
    pool_of_statement: dict[str, str] = {}
    for persona, entries in entries_by_persona.items():
        new = [entry["statement"] for entry in entries if entry["statement"] not in pool_of_statement]
        order = rng.permutation(len(new))
        num_validation = math.floor(len(new) * validation_fraction + 0.5)
        num_test = math.floor(len(new) * test_fraction + 0.5)
        for rank, index in enumerate(order):
            pool = "test" if rank < num_test else "validation" if rank < num_test + num_validation else "train"
            pool_of_statement[new[index]] = pool
    pools = {pool: [] for pool in _POOLS}
    for entries in entries_by_persona.values():
        for entry in entries:
            pools[pool_of_statement[entry["statement"]]].append(entry)
    return pools


def _group_holdings(
    personas: Sequence[str], num_groups: int, group_personas: Sequence[Sequence[str]] | None, seed: int
) -> np.ndarray:
    """Boolean matrix (num_groups, num_personas): does group k hold persona j."""
    if group_personas is not None:
        if isinstance(group_personas, str) or len(group_personas) != num_groups:
            raise ValueError(
                f"`group_personas` must list one collection of persona names per group ({num_groups} groups), got "
                f"{group_personas!r}."
            )
        holdings = np.zeros((num_groups, len(personas)), dtype=bool)
        for group, held in enumerate(group_personas):
            if isinstance(held, str):
                raise ValueError(
                    f"`group_personas[{group}]` must be a collection of persona names, got the string {held!r}."
                )
            unknown = sorted(set(held) - set(personas))
            if unknown:
                raise ValueError(
                    f"`group_personas[{group}]` names {unknown}, which are not among the selected personas "
                    f"{list(personas)}."
                )
            holdings[group] = [persona in set(held) for persona in personas]
        if len({row.tobytes() for row in holdings}) < num_groups:
            raise ValueError(
                "Two groups in `group_personas` hold the same personas, so their users cannot be told apart."
            )
        return holdings

    half = len(personas) // 2
    if half == 0 or math.comb(len(personas), half) < num_groups:
        raise ValueError(
            f"{len(personas)} personas give {math.comb(len(personas), half) if half else 0} distinct halves, too few for "
            f"num_groups={num_groups}: select more personas or fewer groups (or pass `group_personas`)."
        )
    rng = rng_for(seed, _GROUP_STREAM)
    chosen: list[tuple[int, ...]] = []
    if math.comb(len(personas), half) <= 10_000:
        candidates = list(itertools.combinations(range(len(personas)), half))
        chosen = [candidates[i] for i in rng.choice(len(candidates), size=num_groups, replace=False)]
    else:
        while len(chosen) < num_groups:
            subset = tuple(sorted(rng.choice(len(personas), size=half, replace=False).tolist()))
            if subset not in chosen:
                chosen.append(subset)
    holdings = np.zeros((num_groups, len(personas)), dtype=bool)
    for group, subset in enumerate(chosen):
        holdings[group, list(subset)] = True
    return holdings


def _user_rows(
    user: SimulatedUser,
    holdings: np.ndarray,
    persona_index: dict[str, int],
    pool: list[dict],
    pool_name: str,
    count: int,
    mixture_rule: str,
) -> list[dict]:
    if count > len(pool):
        raise ValueError(
            f"The {pool_name} statement pool holds {len(pool)} statements, fewer than the {count} distinct comparisons "
            f"asked per user: lower the per-user counts, or select more personas."
        )
    rng, group, weights = user.rng, user.group, user.weights
    rows = []
    for entry_id in rng.choice(len(pool), size=count, replace=False):
        entry = pool[entry_id]
        held = holdings[:, persona_index[entry["persona"]]]
        if group >= 0:
            prefers_matching = bool(held[group])
        elif mixture_rule == "weighted":
            prefers_matching = bool(weights[held].sum() >= 0.5)
        else:
            prefers_matching = bool(held[rng.choice(len(weights), p=weights)])
        chosen, rejected = (entry["matching"], entry["not_matching"])
        if not prefers_matching:
            chosen, rejected = rejected, chosen
        rows.append(
            {
                "user_id": user.user_id,
                "prompt": entry["question"],
                "chosen": chosen,
                "rejected": rejected,
                "group": group,
                "mixture_weights": weights.tolist(),
                "persona": entry["persona"],
                "statement": entry["statement"],
                "chosen_matches_behavior": prefers_matching,
            }
        )
    return rows


def _features() -> Features:
    features = dict(TEXT_FEATURES)
    features["mixture_weights"] = MIXTURE_WEIGHTS_FEATURE
    features["persona"] = Value("string")
    features["statement"] = Value("string")
    features["chosen_matches_behavior"] = Value("bool")
    return Features(features)


def load_persona_preferences(
    data_dir: str | os.PathLike,
    personas: Sequence[str] | None = None,
    num_groups: int = 4,
    group_personas: Sequence[Sequence[str]] | None = None,
    mixture_users: bool = False,
    dirichlet_alpha: float = 1.0,
    mixture_rule: str = "weighted",
    users_per_group: int = 10,
    pairs_per_user: int = 50,
    num_unseen_users: int = 20,
    unseen_shots: int = 50,
    unseen_test_pairs: int = 50,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> DatasetDict:
    """Build the persona preference dataset (construction and leakage rule in the module docstring).

    Args:
        data_dir (`str` or `os.PathLike`): folder of `<persona>.jsonl` files, for example a copy of anthropics/evals
            `persona/`.
        personas (`Sequence[str]`, *optional*): persona file names without `.jsonl`; defaults to `DEFAULT_PERSONAS`.
        num_groups (`int`, defaults to 4): number `K*` of groups.
        group_personas (`Sequence[Sequence[str]]`, *optional*): the personas each group holds, one collection per
            group; defaults to a distinct seeded random half of the personas per group.
        mixture_users (`bool`, defaults to `False`): pure group members (`False`) or Dirichlet mixtures of the groups
            (`True`, `group == -1`). Either way there are `num_groups * users_per_group` seen users.
        dirichlet_alpha (`float`, defaults to 1.0): Dirichlet concentration of the mixture weights.
        mixture_rule (`str`, defaults to `"weighted"`): how a mixture user labels, `"weighted"` or `"sampled"`.
        users_per_group (`int`, defaults to 10): seen users per group.
        pairs_per_user (`int`, defaults to 50): comparisons per seen user, split into `train` / `validation` / `test`
            by `validation_fraction` and `test_fraction` (35 / 5 / 10 with the defaults).
        num_unseen_users (`int`, defaults to 20): new users, drawn like the seen ones (pure members assigned to groups
            in turn, or mixtures when `mixture_users=True`).
        unseen_shots (`int`, defaults to 50): comparisons per unseen user in `unseen_train` (train pool).
        unseen_test_pairs (`int`, defaults to 50): comparisons per unseen user in `unseen_test` (test pool).
        validation_fraction (`float`, defaults to 0.1), test_fraction (`float`, defaults to 0.2): shares of each
            seen user's comparisons, and of each persona's statements, in the validation and test splits / pools.
        seed (`int`, defaults to 0): the output is a deterministic function of the arguments and the files.

    Returns:
        `datasets.DatasetDict` with splits `train`, `validation`, `test`, `unseen_train`, `unseen_test` and columns
        `user_id` (`user_000`, `user_001`, ... for seen users, `unseen_user_000`, ... for unseen users), `prompt`
        (the question), `chosen` and `rejected` (`" Yes"` / `" No"`), `group` (-1 for mixture users),
        `mixture_weights`, `persona`, `statement` and `chosen_matches_behavior`. The defaults give 40 seen users
        (1,400 / 200 / 400 comparisons) and 20 unseen users (1,000 / 1,000).

    Example:

    ```python
    >>> from pal_rm.data import load_persona_preferences
    >>> dataset = load_persona_preferences("path/to/anthropic-persona")  # doctest: +SKIP
    >>> dataset["train"][0]["chosen"]  # doctest: +SKIP
    ' Yes'
    ```
    """
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise ValueError(
            f"`data_dir` {data_dir!r} is not a directory: pass the folder of Anthropic persona `<persona>.jsonl` files."
        )
    available = available_personas(data_dir)
    if not available:
        raise ValueError(f"`data_dir` {data_dir!r} holds no `.jsonl` files: pass the folder of persona files.")
    if isinstance(personas, str) or (personas is not None and len(personas) == 0):
        raise ValueError(f"`personas` must be a non-empty list of persona names, got {personas!r}.")
    personas = list(DEFAULT_PERSONAS if personas is None else personas)
    if len(set(personas)) != len(personas):
        raise ValueError(f"`personas` lists a persona twice: {personas}.")
    missing = [persona for persona in personas if persona not in available]
    if missing:
        raise ValueError(
            f"No file for persona(s) {missing} in {data_dir!r} (expected `<persona>.jsonl`). Available personas "
            f"include {available[:5]}{' ...' if len(available) > 5 else ''} ({len(available)} in all)."
        )
    num_groups = check_int("num_groups", num_groups, minimum=1)
    users_per_group = check_int("users_per_group", users_per_group, minimum=1)
    pairs_per_user = check_int("pairs_per_user", pairs_per_user, minimum=1)
    num_unseen_users = check_int("num_unseen_users", num_unseen_users)
    unseen_shots = check_int("unseen_shots", unseen_shots)
    unseen_test_pairs = check_int("unseen_test_pairs", unseen_test_pairs)
    dirichlet_alpha = check_positive_float("dirichlet_alpha", dirichlet_alpha)
    if mixture_rule not in MIXTURE_RULES:
        raise ValueError(f"`mixture_rule` must be one of {MIXTURE_RULES}, got {mixture_rule!r}.")
    seed = check_seed(seed)
    check_fractions(validation_fraction, test_fraction)
    sizes = split_sizes(pairs_per_user, validation_fraction, test_fraction, "pairs_per_user")

    entries = {persona: _read_persona(os.path.join(data_dir, f"{persona}.jsonl"), persona) for persona in personas}
    pools = _split_statement_pools(entries, validation_fraction, test_fraction, seed)
    holdings = _group_holdings(personas, num_groups, group_personas, seed)
    persona_index = {persona: index for index, persona in enumerate(personas)}
    for group in range(num_groups):
        logger.info(f"Persona group {group} holds {[p for p, held in zip(personas, holdings[group]) if held]}.")

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
    arguments = (holdings, persona_index)
    rows = empty_rows()
    for user in seen_users:
        for split, pool, count in zip(SEEN_SPLIT_NAMES, _POOLS, sizes):
            rows[split] += _user_rows(user, *arguments, pools[pool], pool, count, mixture_rule)
    for user in unseen_users:
        for split, pool, count in (
            ("unseen_train", "train", unseen_shots),
            ("unseen_test", "test", unseen_test_pairs),
        ):
            rows[split] += _user_rows(user, *arguments, pools[pool], pool, count, mixture_rule)
    logger.info(
        f"Persona preferences: {len(personas)} personas, statement pools "
        f"{len(pools['train'])} / {len(pools['validation'])} / {len(pools['test'])}."
    )
    return build_dataset_dict(rows, _features())
