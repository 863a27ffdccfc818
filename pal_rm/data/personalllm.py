# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
"""PersonalLLM personalized preferences: simulated users as weightings of ten public reward models.

Source: `namkoong-lab/PersonalLLM` (Zollo et al. 2025, "PersonalLLM: Tailoring LLMs to Individual Preferences";
CC-BY-4.0), splits `train` and `test` (parquet, about 10.4K prompts in all). Each row is one prompt: `prompt`,
`subset` (the prompt's source dataset), `prompt_id` (int), eight responses `response_1` ... `response_8` with the
generating model in `response_{i}_model`, and each response's score by ten reward models in `response_{i}_{rm}`
(floats), `rm` one of `PERSONALLLM_REWARD_MODELS`. Verified in the dataset card's `dataset_info` and in the code that
reads it (namkoong-lab/PersonalLLM, `PersonalLLM/data/gen_reward_interaction_database.py`; facebookresearch/LoRe,
`PersonalLLM/train_basis.py`). The data is read from the Hub, from a `save_to_disk` folder, or from a folder holding
`train` and `test` data files (`train.jsonl`, `train-*.parquet`, `train/*.parquet`, also under `data/` as in the Hub
repository).

Users (the rules as implemented):

1. A user is a weighting `w` of the reward models, drawn from `Dirichlet(dirichlet_alpha)` (PersonalLLM's persona
   simulation; LoRe's PersonalLLM setup uses alpha = 0.1, the default). The user's utility of a response is
   `w . s`, `s` the response's reward-model scores, each model's scores standardised (mean 0, standard deviation 1
   over the `train` split's responses) as PersonalLLM's own simulation does; `normalize_scores=False` keeps the raw
   scores, as LoRe's code does. `mixture_weights` holds `w`; `group` is -1 (no groups).
2. Seen and unseen users come from the shared simulation (`num_users` seen, `num_unseen_users` unseen), each with
   its own seeded stream.

Comparisons:

3. One comparison per (user, prompt): `pairs="best_worst"` (default, LoRe's rule) compares the response the user
   rates highest with the one they rate lowest among the prompt's responses; `pairs="random"` draws two distinct
   responses and the one with the higher utility is chosen. A comparison whose two utilities are equal is dropped and
   counted.
4. A response with an empty text or a missing or non-finite score of a used reward model is left out of its prompt's
   candidates (counted, with a warning); a prompt with fewer than two candidates gives no comparison.

Splits (the split unit is the prompt, so no evaluation prompt is a training prompt):

5. The `train` split's prompts are shuffled (seeded); `validation_fraction` of them (rounded half up, at least one)
   form the validation pool, the rest the training pool. The `test` split's prompts form the test pool.
6. A seen user gets `pairs_per_user` distinct prompts of the training pool (`train`), `validation_pairs_per_user` of
   the validation pool (`validation`) and `test_pairs_per_user` of the test pool (`test`); an unseen user
   `unseen_shots` prompts of the training pool (`unseen_train`, the few-shot comparisons) and `unseen_test_pairs` of
   the test pool (`unseen_test`). `None` takes the whole pool. Draws are without replacement within a user.
7. An evaluation comparison (`validation`, `test`, `unseen_test`) whose prompt text is also the text of a training
   prompt is dropped and counted (the Hub splits are disjoint by `prompt_id`, not necessarily by text).

What follows LoRe's PersonalLLM code (facebookresearch/LoRe, `PersonalLLM/train_basis.py`, commit b5cf508): users
as Dirichlet(0.1) weightings of the ten reward models, best-vs-worst comparisons, training and few-shot prompts from
the `train` split and evaluation on the `test` split, 1,000 seen and 500 unseen users, and the training sizes
(LoRe samples 0.5% of the 9K-odd training prompts per seen user, about 47, and 0.1%, about 9, per unseen user: the
defaults). Our choices: standardised scores (PersonalLLM's rule), a validation pool, 50 test prompts per user
(LoRe evaluates every user on every test prompt: `test_pairs_per_user=None`), and rules 4 and 7.

Expected sizes with the defaults: at most `num_users * pairs_per_user` = 47,000 `train`, 10,000 `validation`,
50,000 `test`, 4,500 `unseen_train` and 25,000 `unseen_test` comparisons (fewer only by dropped ties and rule 7),
from 1,000 seen and 500 unseen users. Not run on the full data here (no network).
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Sequence
from typing import Any

import datasets
import numpy as np
from datasets import Dataset, DatasetDict, Features, Value
from transformers.utils import logging

from ._common import (
    MIXTURE_WEIGHTS_FEATURE,
    build_dataset_dict,
    check_fractions,
    check_int,
    check_positive_float,
    check_seed,
    data_files,
    empty_rows,
    looks_like_local_path,
    read_data_files,
    rng_for,
    round_half_up,
    simulate_users,
)

logger = logging.get_logger(__name__)

PERSONALLLM_SOURCE = "namkoong-lab/PersonalLLM"
PERSONALLLM_REWARD_MODELS = (
    "gemma_2b",
    "gemma_7b",
    "mistral_raft",
    "mistral_ray",
    "mistral_weqweasdas",
    "llama3_sfairx",
    "oasst_deberta_v3",
    "beaver_7b",
    "oasst_pythia_7b",
    "oasst_pythia_1b",
)
"""The ten reward models whose scores PersonalLLM ships, as the suffixes of its `response_{i}_{rm}` columns."""
NUM_RESPONSES = 8
_SOURCE_SPLITS = ("train", "test")
PAIR_RULES = ("best_worst", "random")

# randomness streams
_POOL_STREAM, _SEEN_STREAM, _UNSEEN_STREAM = 0, 1, 2


# ---------------------------------------------------------------------------------------------------------------
# reading


def _required_columns(reward_models: Sequence[str]) -> list[str]:
    columns = ["prompt"]
    for i in range(1, NUM_RESPONSES + 1):
        columns += [f"response_{i}"] + [f"response_{i}_{rm}" for rm in reward_models]
    return columns


def _check_columns(columns: Sequence[str], reward_models: Sequence[str], where: str) -> None:
    absent = [name for name in _required_columns(reward_models) if name not in columns]
    if absent:
        raise ValueError(
            f"{where} has no {absent[:4]}{' ...' if len(absent) > 4 else ''} column(s): is it {PERSONALLLM_SOURCE}? "
            f"Found {list(columns)[:8]}{' ...' if len(columns) > 8 else ''}."
        )


def _split_rows(dataset: Any, split: str, reward_models: Sequence[str], where: str) -> list[dict]:
    if not isinstance(dataset, Dataset):
        raise ValueError(f"{where} split {split!r} is a {type(dataset).__name__}, not a Dataset.")
    _check_columns(dataset.column_names, reward_models, f"{where} split {split!r}")
    keep = [
        name for name in (*_required_columns(reward_models), "prompt_id", "subset") if name in dataset.column_names
    ]
    keep += [
        f"response_{i}_model" for i in range(1, NUM_RESPONSES + 1) if f"response_{i}_model" in dataset.column_names
    ]
    return dataset.select_columns(keep).to_list()


def _read_source(source: str | os.PathLike, reward_models: Sequence[str]) -> dict[str, list[dict]]:
    source = os.fspath(source)
    if os.path.isdir(source):
        if os.path.isfile(os.path.join(source, "dataset_dict.json")):
            loaded = datasets.load_from_disk(source)
        else:
            folders = [source, os.path.join(source, "data")]
            files = {
                split: next((f for f in (data_files(d, split) for d in folders) if f), []) for split in _SOURCE_SPLITS
            }
            absent = [split for split, split_files in files.items() if not split_files]
            if absent:
                raise ValueError(
                    f"{source!r} has no data for the split(s) {absent}. Expected a folder written by `save_to_disk`, "
                    "or `train` and `test` data files (`train.jsonl`, `train-*.parquet`, `train/*.parquet`; also "
                    "under `data/`, as in the Hub repository)."
                )
            rows = {split: read_data_files(split_files) for split, split_files in files.items()}
            for split, split_rows in rows.items():
                for index, row in enumerate(split_rows):
                    if not isinstance(row, dict):
                        raise ValueError(f"Row {index} of the {split!r} data of {source!r} is not a dict.")
                    _check_columns(list(row), reward_models, f"Row {index} of the {split!r} data of {source!r}")
            return rows
    elif looks_like_local_path(source) or os.path.isfile(source):
        problem = "is a file, not a folder" if os.path.isfile(source) else "does not exist"
        raise ValueError(
            f"`source` {source!r} {problem}: pass a Hub dataset id (default {PERSONALLLM_SOURCE!r}) or a folder "
            "holding its `train` and `test` splits."
        )
    else:
        logger.info(f"Loading {source!r} with datasets.load_dataset.")
        loaded = datasets.load_dataset(source)
    if not isinstance(loaded, DatasetDict) or any(split not in loaded for split in _SOURCE_SPLITS):
        found = list(loaded) if isinstance(loaded, DatasetDict) else type(loaded).__name__
        raise ValueError(
            f"{source!r} must have the splits {list(_SOURCE_SPLITS)} of {PERSONALLLM_SOURCE}; found {found}."
        )
    return {split: _split_rows(loaded[split], split, reward_models, repr(source)) for split in _SOURCE_SPLITS}


# ---------------------------------------------------------------------------------------------------------------
# prompts


def _is_score(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float, np.number)) and math.isfinite(value)


def _prompts(rows: list[dict], split: str, reward_models: Sequence[str], counts: Counter) -> list[dict]:
    """Each usable prompt of a source split: its text, id, subset, candidate responses and their score matrix."""
    prompts = []
    for index, row in enumerate(rows):
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            counts["prompts with an empty text"] += 1
            continue
        texts, models, scores = [], [], []
        for i in range(1, NUM_RESPONSES + 1):
            text = row.get(f"response_{i}")
            values = [row.get(f"response_{i}_{rm}") for rm in reward_models]
            if not isinstance(text, str) or not text.strip():
                counts["responses with an empty text"] += 1
                continue
            if not all(_is_score(value) for value in values):
                counts["responses with a missing or non-finite score"] += 1
                continue
            texts.append(text.strip())
            models.append(str(row.get(f"response_{i}_model") or ""))
            scores.append([float(value) for value in values])
        if len(texts) < 2:
            counts["prompts with fewer than two usable responses"] += 1
            continue
        prompt_id = row.get("prompt_id")
        prompts.append(
            {
                "prompt": prompt.strip(),
                "prompt_id": int(prompt_id) if _is_score(prompt_id) else index,
                "subset": str(row.get("subset") or ""),
                "texts": texts,
                "models": models,
                "scores": np.array(scores),
                "split": split,
            }
        )
    return prompts


def _standardize(prompts: dict[str, list[dict]], reward_models: Sequence[str]) -> None:
    """Scale every reward model's scores to mean 0, standard deviation 1 over the `train` split's responses."""
    scores = np.concatenate([prompt["scores"] for prompt in prompts["train"]])
    mean, std = scores.mean(0), scores.std(0)
    constant = [rm for rm, value in zip(reward_models, std) if not value > 0]
    if constant:
        raise ValueError(
            f"The reward model(s) {constant} score every training response the same: they cannot be standardised. "
            "Leave them out with `reward_models=` or pass `normalize_scores=False`."
        )
    for split_prompts in prompts.values():
        for prompt in split_prompts:
            prompt["scores"] = (prompt["scores"] - mean) / std


def _comparison(prompt: dict, user, pairs: str, counts: Counter) -> dict | None:
    utility = prompt["scores"] @ user.weights
    if pairs == "best_worst":
        first, second = int(np.argmax(utility)), int(np.argmin(utility))
    else:
        first, second = (int(i) for i in user.rng.choice(len(utility), size=2, replace=False))
    if utility[first] == utility[second]:
        counts["ties"] += 1
        return None
    winner, loser = (first, second) if utility[first] > utility[second] else (second, first)
    return {
        "user_id": user.user_id,
        "prompt": prompt["prompt"],
        "chosen": prompt["texts"][winner],
        "rejected": prompt["texts"][loser],
        "group": -1,
        "mixture_weights": user.weights.tolist(),
        "prompt_id": prompt["prompt_id"],
        "subset": prompt["subset"],
        "chosen_model": prompt["models"][winner],
        "rejected_model": prompt["models"][loser],
        "utility_margin": float(utility[winner] - utility[loser]),
    }


def _draw(user, pool: list[dict], count: int | None, what: str) -> list[dict]:
    if count is None:
        return list(pool)
    if count > len(pool):
        raise ValueError(
            f"`{what}`={count} is more than the {len(pool)} prompts of its pool: lower it, or pass None for all."
        )
    return [pool[i] for i in user.rng.choice(len(pool), size=count, replace=False)]


def _features() -> Features:
    return Features(
        {
            "user_id": Value("string"),
            "prompt": Value("string"),
            "chosen": Value("string"),
            "rejected": Value("string"),
            "group": Value("int64"),
            "mixture_weights": MIXTURE_WEIGHTS_FEATURE,
            "prompt_id": Value("int64"),
            "subset": Value("string"),
            "chosen_model": Value("string"),
            "rejected_model": Value("string"),
            "utility_margin": Value("float64"),
        }
    )


def _optional_count(name: str, value: Any) -> int | None:
    return None if value is None else check_int(name, value, minimum=1)


def load_personalllm_preferences(
    source: str | os.PathLike = PERSONALLLM_SOURCE,
    num_users: int = 1000,
    num_unseen_users: int = 500,
    dirichlet_alpha: float = 0.1,
    pairs_per_user: int | None = 47,
    validation_pairs_per_user: int | None = 10,
    test_pairs_per_user: int | None = 50,
    unseen_shots: int | None = 9,
    unseen_test_pairs: int | None = 50,
    validation_fraction: float = 0.1,
    pairs: str = "best_worst",
    normalize_scores: bool = True,
    reward_models: Sequence[str] = PERSONALLLM_REWARD_MODELS,
    seed: int = 0,
) -> DatasetDict:
    """Build the PersonalLLM personalized preference dataset (rules in the module docstring).

    Args:
        source (`str` or `os.PathLike`, defaults to `"namkoong-lab/PersonalLLM"`): a Hub dataset id (loaded with
            `datasets.load_dataset`), a folder written by `save_to_disk`, or a folder of `train` and `test` files.
        num_users (`int`, defaults to 1000): seen users.
        num_unseen_users (`int`, defaults to 500): unseen users.
        dirichlet_alpha (`float`, defaults to 0.1): concentration of the users' reward-model weights (small: most
            users follow one or two reward models).
        pairs_per_user (`int`, *optional*, defaults to 47): `train` comparisons (distinct prompts) per seen user.
        validation_pairs_per_user (`int`, *optional*, defaults to 10): `validation` comparisons per seen user.
        test_pairs_per_user (`int`, *optional*, defaults to 50): `test` comparisons per seen user.
        unseen_shots (`int`, *optional*, defaults to 9): `unseen_train` (few-shot) comparisons per unseen user.
        unseen_test_pairs (`int`, *optional*, defaults to 50): `unseen_test` comparisons per unseen user.
            For the five counts, `None` takes every prompt of the pool.
        validation_fraction (`float`, defaults to 0.1): share of the `train` split's prompts kept for validation.
        pairs (`str`, defaults to `"best_worst"`): `"best_worst"` (the user's best vs worst response of the prompt)
            or `"random"` (two responses at random).
        normalize_scores (`bool`, defaults to `True`): standardise each reward model's scores on the training
            responses (PersonalLLM) or keep them raw (`False`, LoRe).
        reward_models (`Sequence[str]`, defaults to all ten): the reward models users weigh.
        seed (`int`, defaults to 0): the output is a deterministic function of the arguments and the source.

    Returns:
        `datasets.DatasetDict` with splits `train`, `validation`, `test`, `unseen_train`, `unseen_test` and columns
        `user_id`, `prompt`, `chosen`, `rejected`, `group` (-1), `mixture_weights` (the user's true reward-model
        weights, in the order of `reward_models`), `prompt_id`, `subset`, `chosen_model`, `rejected_model` and
        `utility_margin` (the user's utility gap, > 0).

    Example:

    ```python
    >>> from pal_rm.data import load_personalllm_preferences
    >>> dataset = load_personalllm_preferences()  # doctest: +SKIP
    ```
    """
    num_users = check_int("num_users", num_users, minimum=1)
    num_unseen_users = check_int("num_unseen_users", num_unseen_users)
    dirichlet_alpha = check_positive_float("dirichlet_alpha", dirichlet_alpha)
    counts_per_user = {
        "pairs_per_user": _optional_count("pairs_per_user", pairs_per_user),
        "validation_pairs_per_user": _optional_count("validation_pairs_per_user", validation_pairs_per_user),
        "test_pairs_per_user": _optional_count("test_pairs_per_user", test_pairs_per_user),
        "unseen_shots": _optional_count("unseen_shots", unseen_shots),
        "unseen_test_pairs": _optional_count("unseen_test_pairs", unseen_test_pairs),
    }
    check_fractions(validation_fraction)
    if validation_fraction == 0:
        raise ValueError("`validation_fraction` must be > 0: the seen users need validation prompts.")
    if not isinstance(normalize_scores, (bool, np.bool_)):
        raise ValueError(f"`normalize_scores` must be True or False, got {normalize_scores!r}.")
    if pairs not in PAIR_RULES:
        raise ValueError(f"`pairs` must be one of {PAIR_RULES}, got {pairs!r}.")
    if isinstance(reward_models, str) or not reward_models:
        raise ValueError(f"`reward_models` must be a non-empty list of names from {PERSONALLLM_REWARD_MODELS}.")
    reward_models = tuple(reward_models)
    unknown = [rm for rm in reward_models if rm not in PERSONALLLM_REWARD_MODELS]
    if unknown or len(set(reward_models)) != len(reward_models):
        raise ValueError(
            f"`reward_models` must be distinct names from {PERSONALLLM_REWARD_MODELS}; got {list(reward_models)}."
        )
    seed = check_seed(seed)

    counts = Counter()
    source_rows = _read_source(source, reward_models)
    prompts = {split: _prompts(source_rows[split], split, reward_models, counts) for split in _SOURCE_SPLITS}
    for what in ("responses with an empty text", "responses with a missing or non-finite score"):
        if counts[what]:
            logger.warning(f"PersonalLLM: {counts[what]} {what}, left out of their prompt's candidates.")
    if normalize_scores:
        _standardize(prompts, reward_models)
    order = rng_for(seed, _POOL_STREAM).permutation(len(prompts["train"]))
    num_validation = max(1, round_half_up(len(order) * validation_fraction))
    if num_validation >= len(order):
        raise ValueError(
            f"The `train` split has {len(order)} usable prompts: too few for validation_fraction={validation_fraction}."
        )
    pools = {
        "validation": [prompts["train"][i] for i in order[:num_validation]],
        "train": [prompts["train"][i] for i in order[num_validation:]],
        "test": prompts["test"],
    }
    if not pools["test"]:
        raise ValueError(f"The `test` split of {source!r} has no usable prompt.")

    seen_users, unseen_users = simulate_users(
        num_groups=len(reward_models),
        users_per_group=0,
        num_mixture_users=num_users,
        num_unseen_users=num_unseen_users,
        dirichlet_alpha=dirichlet_alpha,
        seed=seed,
        seen_stream=_SEEN_STREAM,
        unseen_stream=_UNSEEN_STREAM,
    )
    plan = {
        "seen": (
            seen_users,
            (
                ("train", "train", "pairs_per_user"),
                ("validation", "validation", "validation_pairs_per_user"),
                ("test", "test", "test_pairs_per_user"),
            ),
        ),
        "unseen": (
            unseen_users,
            (("unseen_train", "train", "unseen_shots"), ("unseen_test", "test", "unseen_test_pairs")),
        ),
    }
    rows = empty_rows()
    for users, splits in plan.values():
        for user in users:
            for split, pool, what in splits:
                for prompt in _draw(user, pools[pool], counts_per_user[what], what):
                    comparison = _comparison(prompt, user, pairs, counts)
                    if comparison is not None:
                        rows[split].append(comparison)

    # rule 7: an evaluation prompt is never the text of a training prompt
    training_prompts = {prompt["prompt"] for prompt in pools["train"]}
    for split in ("validation", "test", "unseen_test"):
        kept = [row for row in rows[split] if row["prompt"] not in training_prompts]
        counts[f"{split} comparisons with a training prompt"] += len(rows[split]) - len(kept)
        rows[split] = kept
    logger.info(
        f"PersonalLLM preferences: {len(seen_users)} seen and {len(unseen_users)} unseen users over "
        f"{len(reward_models)} reward models; prompt pools: train {len(pools['train'])}, validation "
        f"{len(pools['validation'])}, test {len(pools['test'])}; sizes "
        + ", ".join(f"{split} {len(split_rows)}" for split, split_rows in rows.items())
        + f"; dropped: {dict(counts) or 'none'}."
    )
    return build_dataset_dict(rows, _features())


__all__ = ["PERSONALLLM_REWARD_MODELS", "PERSONALLLM_SOURCE", "load_personalllm_preferences"]
