# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
"""Reddit TL;DR summary preferences with the semi-synthetic protocol of Li et al. (2024) used by PAL.

Source: `openai/summarize_from_feedback`, config `"comparisons"` (splits `train` and `validation`; each row has
`info` {id, post, title, subreddit, site, article}, `summaries` [{text, policy, note}, {text, policy, note}],
`choice`, `worker`, `batch`, `split`, `extra`). It is read from the Hub, from a folder written by
`DatasetDict.save_to_disk`, or from a folder of per-split files (`train.jsonl`, `validation.jsonl`, `.json` or
`.parquet`, also sharded as `train-*.parquet` or `train/*.parquet`).

Protocol (the rules as implemented):

1. Policy filter: keep a comparison iff both summaries' `policy` strings contain `"sup"` and neither contains
   `"ppo"` (case-sensitive substrings, as in the PAL reference code). So `"sup4_6b_t0.7"` vs `"sup2"` is kept;
   `"ref"` (human reference), `"pretrain_*"`, `"ppo_*"` and `"sup4_ppo_*"` drop the pair.
2. Comparisons without a Reddit post (`info.post` empty, e.g. the CNN/DM rows of the validation split) or with an
   empty summary are dropped and counted.
3. Seen users: the `num_seen_users` (10) workers with the most comparisons left in the HF `train` split after steps
   1-2, ties in count broken by worker id. The workers at the 0-based ranks `minority_ranks` (3, 4, 5) prefer the
   shorter summary (`group` 1, the minority), the others the longer one (`group` 0, the majority). The label comes
   from this rule, not from the worker's own `choice`: the data is semi-synthetic.
4. Length is the character count of the stripped summary (`length_unit="characters"`, as in the PAL reference code)
   or its whitespace word count (`"words"`). Pairs of equal length have no label: with `drop_ties=True` (the
   default) they are dropped and counted; `drop_ties=False` keeps them with the second summary as chosen, which is
   what the PAL reference code does.
5. The seen users' HF-train comparisons are split per user into `train` and `validation` (`validation_fraction`,
   seeded); their comparisons in the HF `validation` split are the `test` split.
6. Unseen users: workers of the HF `validation` split outside the seen users with at least `min_unseen_comparisons`
   comparisons after steps 1-2 (counted before ties are dropped, as in the PAL reference code). Each unseen user's
   comparisons are split (seeded) into `unseen_shots` few-shot comparisons (`unseen_train`) and the rest
   (`unseen_test`). Which unseen users belong to the minority: `unseen_minority_workers` if given, otherwise a
   seeded random `unseen_minority_fraction` (default 0.3, the seen users' 3-in-10 share, rounded half up) of them.
   (The PAL reference code hard-codes its own list of majority unseen workers.)

Output text: `prompt` is `"SUBREDDIT: r/{subreddit}\\nTITLE: {title}\\nPOST: {post}\\nTL;DR:"` (lines with no value
are left out); `chosen` / `rejected` are the stripped summaries with one leading space, so that `prompt + chosen`
reads as the TL;DR format.

Expected sizes on the full data: the PAL paper reports 20,969 `train` / 2,330 `validation` / 4,921 `test` seen-user
comparisons, which the PAL reference code gets with ties kept (`drop_ties=False`); the default `drop_ties=True`
gives slightly fewer. The unseen users are the validation-split workers outside the top 10 with >= 100 comparisons
(a few dozen workers).
"""

from __future__ import annotations

import glob
import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import datasets
import numpy as np
from datasets import DatasetDict, Features, Value
from transformers.utils import logging

from ._common import (
    TEXT_FEATURES,
    build_dataset_dict,
    check_fractions,
    check_int,
    check_seed,
    empty_rows,
    rng_for,
    round_half_up,
)

logger = logging.get_logger(__name__)

SUMMARY_SOURCE = "openai/summarize_from_feedback"
SUMMARY_GROUPS = {0: "prefers the longer summary (majority)", 1: "prefers the shorter summary (minority)"}
LENGTH_UNITS = ("characters", "words")
_SOURCE_SPLITS = ("train", "validation")
_FILE_EXTENSIONS = ("jsonl", "json", "parquet")

# randomness streams
_VALIDATION_STREAM, _UNSEEN_ASSIGNMENT_STREAM, _UNSEEN_SHOTS_STREAM = 0, 1, 2


# ---------------------------------------------------------------------------------------------------------------
# reading


def _looks_like_local_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~", "\\")) or os.path.splitdrive(source)[0] != ""


def _split_files(folder: str, split: str) -> list[str]:
    for extension in _FILE_EXTENSIONS:
        patterns = (f"{split}.{extension}", f"{split}-*.{extension}", os.path.join(split, f"*.{extension}"))
        files = sorted(path for pattern in patterns for path in glob.glob(os.path.join(folder, pattern)))
        if files:
            return files
    return []


def _read_json_file(path: str) -> list[dict]:
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


def _read_local_files(folder: str) -> dict[str, list[dict]]:
    rows = {}
    for split in _SOURCE_SPLITS:
        files = _split_files(folder, split)
        if not files:
            raise ValueError(
                f"{folder!r} has no files for the {split!r} split. Expected a folder written by "
                f"`DatasetDict.save_to_disk`, or per-split files such as `{split}.jsonl`, `{split}.parquet`, "
                f"`{split}-*.parquet` or `{split}/*.parquet`."
            )
        if files[0].endswith(".parquet"):
            rows[split] = datasets.Dataset.from_parquet(files).to_list()
        else:
            rows[split] = [row for path in files for row in _read_json_file(path)]
    return rows


def _rows_from_dataset_dict(dataset_dict: Any, where: str) -> dict[str, list[dict]]:
    if not isinstance(dataset_dict, DatasetDict):
        raise ValueError(f"{where} is not a DatasetDict with `train` and `validation` splits.")
    missing = [split for split in _SOURCE_SPLITS if split not in dataset_dict]
    if missing:
        raise ValueError(f"{where} has no {missing} split(s); found {list(dataset_dict)}.")
    columns = ["info", "summaries", "worker"]
    rows = {}
    for split in _SOURCE_SPLITS:
        absent = [name for name in columns if name not in dataset_dict[split].column_names]
        if absent:
            raise ValueError(
                f"The {split!r} split of {where} has no {absent} column(s): is it the `comparisons` config of "
                f"{SUMMARY_SOURCE}?"
            )
        rows[split] = dataset_dict[split].select_columns(columns).to_list()
    return rows


def _read_source(source: str | os.PathLike) -> dict[str, list[dict]]:
    source = os.fspath(source)
    if os.path.isdir(source):
        if os.path.isfile(os.path.join(source, "dataset_dict.json")):
            return _rows_from_dataset_dict(datasets.load_from_disk(source), repr(source))
        return _read_local_files(source)
    if os.path.exists(source) or _looks_like_local_path(source):
        raise ValueError(
            f"`source` {source!r} is not a directory: pass a Hub dataset id (default {SUMMARY_SOURCE!r}), a folder "
            "written by `DatasetDict.save_to_disk`, or a folder of per-split json/jsonl/parquet files."
        )
    logger.info(f"Loading {source!r} (config 'comparisons') with datasets.load_dataset.")
    return _rows_from_dataset_dict(datasets.load_dataset(source, "comparisons"), repr(source))


# ---------------------------------------------------------------------------------------------------------------
# row checks and protocol


def _checked(row: Any, split: str, index: int) -> tuple[dict, list[dict], str]:
    where = f"Row {index} of the {split!r} split"
    if not isinstance(row, dict):
        raise ValueError(f"{where} is a {type(row).__name__}, expected a dict with `info`, `summaries` and `worker`.")
    info, summaries, worker = row.get("info"), row.get("summaries"), row.get("worker")
    if not isinstance(info, dict):
        raise ValueError(f"{where} has no `info` dict (with `post`, `title`, `subreddit`), got {info!r}.")
    if not isinstance(summaries, list) or len(summaries) != 2 or not all(isinstance(s, dict) for s in summaries):
        raise ValueError(
            f"{where}: `summaries` must be a list of two dicts with `text` and `policy`, got {summaries!r}."
        )
    for position, summary in enumerate(summaries):
        if not isinstance(summary.get("policy"), str):
            raise ValueError(
                f"{where}: `summaries[{position}]['policy']` must be a string, got {summary.get('policy')!r}."
            )
        if summary.get("text") is not None and not isinstance(summary["text"], str):
            raise ValueError(f"{where}: `summaries[{position}]['text']` must be a string, got {summary['text']!r}.")
    if not isinstance(worker, str) or not worker:
        raise ValueError(f"{where} has no `worker` id (a non-empty string), got {worker!r}.")
    return info, summaries, worker


def _keeps_policy(summaries: Sequence[dict]) -> bool:
    return all("sup" in s["policy"] and "ppo" not in s["policy"] for s in summaries)


def _usable(split: str, rows: list[dict]) -> tuple[list[dict], Counter]:
    """Apply the policy filter and drop comparisons without post or summary text; return the kept rows."""
    kept, dropped = [], Counter()
    for index, row in enumerate(rows):
        info, summaries, worker = _checked(row, split, index)
        if not _keeps_policy(summaries):
            dropped["policy"] += 1
            continue
        post = info.get("post")
        if not isinstance(post, str) or not post.strip():
            dropped["no post"] += 1
            continue
        texts = [(s.get("text") or "").strip() for s in summaries]
        if not all(texts):
            dropped["empty summary"] += 1
            continue
        prompt_lines = []
        if info.get("subreddit"):
            prompt_lines.append(f"SUBREDDIT: r/{info['subreddit']}")
        if info.get("title"):
            prompt_lines.append(f"TITLE: {info['title'].strip()}")
        prompt_lines += [f"POST: {post.strip()}", "TL;DR:"]
        kept.append(
            {"worker": worker, "prompt": "\n".join(prompt_lines), "texts": texts, "post_id": str(info.get("id") or "")}
        )
    return kept, dropped


def _length(text: str, length_unit: str) -> int:
    return len(text) if length_unit == "characters" else len(text.split())


def _label(row: dict, group: int, length_unit: str) -> dict:
    """The comparison as a preference row for a user of `group` (0: prefers longer, 1: prefers shorter)."""
    lengths = [_length(text, length_unit) for text in row["texts"]]
    if lengths[0] == lengths[1]:
        winner = 1  # the PAL reference code's outcome on ties
    else:
        longer = 0 if lengths[0] > lengths[1] else 1
        winner = longer if group == 0 else 1 - longer
    return {
        "user_id": row["worker"],
        "prompt": row["prompt"],
        "chosen": " " + row["texts"][winner],
        "rejected": " " + row["texts"][1 - winner],
        "group": group,
        "post_id": row["post_id"],
        "chosen_length": lengths[winner],
        "rejected_length": lengths[1 - winner],
    }


def _labelled(rows: Iterable[dict], group: int, length_unit: str, drop_ties: bool, ties: Counter, split: str) -> list:
    out = []
    for row in rows:
        labelled = _label(row, group, length_unit)
        if labelled["chosen_length"] == labelled["rejected_length"]:
            ties[split] += 1
            if drop_ties:
                continue
        out.append(labelled)
    return out


def _by_worker(rows: Iterable[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for row in rows:
        grouped.setdefault(row["worker"], []).append(row)
    return grouped


def _features() -> Features:
    features = dict(TEXT_FEATURES)
    features["post_id"] = Value("string")
    features["chosen_length"] = Value("int64")
    features["rejected_length"] = Value("int64")
    return Features(features)


def load_summary_preferences(
    source: str | os.PathLike = SUMMARY_SOURCE,
    num_seen_users: int = 10,
    minority_ranks: Sequence[int] = (3, 4, 5),
    min_unseen_comparisons: int = 100,
    unseen_shots: int = 10,
    unseen_minority_fraction: float = 0.3,
    unseen_minority_workers: Sequence[str] | None = None,
    length_unit: str = "characters",
    drop_ties: bool = True,
    validation_fraction: float = 0.1,
    seed: int = 0,
) -> DatasetDict:
    """Build the Reddit TL;DR personalized preference dataset (protocol in the module docstring).

    Args:
        source (`str` or `os.PathLike`, defaults to `"openai/summarize_from_feedback"`): a Hub dataset id (loaded
            with `datasets.load_dataset(source, "comparisons")`), a folder written by `DatasetDict.save_to_disk`, or
            a folder of per-split json/jsonl/parquet files (`train.*` and `validation.*`).
        num_seen_users (`int`, defaults to 10): number of top workers (by filtered train comparisons) kept as seen
            users.
        minority_ranks (`Sequence[int]`, defaults to `(3, 4, 5)`): 0-based ranks of the seen users that prefer the
            shorter summary.
        min_unseen_comparisons (`int`, defaults to 100): fewest filtered validation-split comparisons of an unseen
            user.
        unseen_shots (`int`, defaults to 10): few-shot comparisons per unseen user in `unseen_train`; the rest of the
            user's comparisons go to `unseen_test` (the PAL configs use 1 to 100).
        unseen_minority_fraction (`float`, defaults to 0.3): share of unseen users assigned (seeded) to the minority.
        unseen_minority_workers (`Sequence[str]`, *optional*): the unseen workers in the minority, replacing the
            seeded assignment; each must be an unseen user.
        length_unit (`str`, defaults to `"characters"`): `"characters"` or `"words"`.
        drop_ties (`bool`, defaults to `True`): drop equal-length pairs (`True`) or keep them with the second summary
            chosen as the PAL reference code does (`False`).
        validation_fraction (`float`, defaults to 0.1): share of each seen user's train comparisons in `validation`.
        seed (`int`, defaults to 0): the output is a deterministic function of the arguments and the source.

    Returns:
        `datasets.DatasetDict` with splits `train`, `validation`, `test`, `unseen_train`, `unseen_test` and columns
        `user_id` (the worker id), `prompt`, `chosen`, `rejected`, `group` (0: prefers longer, 1: prefers shorter;
        `SUMMARY_GROUPS`), `post_id` (`info.id`), `chosen_length` and `rejected_length` (in `length_unit`).

    Example:

    ```python
    >>> from pal_rm.data import load_summary_preferences
    >>> dataset = load_summary_preferences()  # doctest: +SKIP
    ```
    """
    num_seen_users = check_int("num_seen_users", num_seen_users, minimum=1)
    if isinstance(minority_ranks, (str, bytes)) or not isinstance(minority_ranks, Sequence):
        raise ValueError(f"`minority_ranks` must be a sequence of 0-based ranks, got {minority_ranks!r}.")
    minority_ranks = [check_int("minority_ranks[]", rank) for rank in minority_ranks]
    if len(set(minority_ranks)) != len(minority_ranks) or any(rank >= num_seen_users for rank in minority_ranks):
        raise ValueError(
            f"`minority_ranks` must be distinct 0-based ranks below num_seen_users={num_seen_users}, got "
            f"{minority_ranks}."
        )
    min_unseen_comparisons = check_int("min_unseen_comparisons", min_unseen_comparisons, minimum=1)
    unseen_shots = check_int("unseen_shots", unseen_shots)
    if (
        isinstance(unseen_minority_fraction, bool)
        or not isinstance(unseen_minority_fraction, (int, float))
        or not (0 <= unseen_minority_fraction <= 1)
    ):
        raise ValueError(f"`unseen_minority_fraction` must be a number in [0, 1], got {unseen_minority_fraction!r}.")
    if length_unit not in LENGTH_UNITS:
        raise ValueError(f"`length_unit` must be one of {LENGTH_UNITS}, got {length_unit!r}.")
    check_fractions(validation_fraction)
    seed = check_seed(seed)
    if isinstance(unseen_minority_workers, str):
        raise ValueError("`unseen_minority_workers` must be a collection of worker ids, not a single string.")

    source_rows = _read_source(source)
    usable, dropped = {}, {}
    for split in _SOURCE_SPLITS:
        usable[split], dropped[split] = _usable(split, source_rows[split])
        logger.info(
            f"summarize_from_feedback {split!r}: kept {len(usable[split])} of {len(source_rows[split])} comparisons "
            f"(dropped: {dict(dropped[split]) or 'none'})."
        )

    # seen users: the top workers of the filtered train split
    train_counts = Counter(row["worker"] for row in usable["train"])
    if len(train_counts) < num_seen_users:
        raise ValueError(
            f"Only {len(train_counts)} workers are left in the train split after the policy filter, fewer than "
            f"num_seen_users={num_seen_users}: lower `num_seen_users` or check `source`."
        )
    ranked = sorted(train_counts, key=lambda worker: (-train_counts[worker], worker))[:num_seen_users]
    seen_group = {worker: int(rank in minority_ranks) for rank, worker in enumerate(ranked)}
    logger.info(
        "Seen workers by rank: "
        + ", ".join(f"{worker} ({train_counts[worker]}, group {seen_group[worker]})" for worker in ranked)
    )

    ties = Counter()
    train_by_worker, validation_by_worker = _by_worker(usable["train"]), _by_worker(usable["validation"])
    rows = empty_rows()
    for rank, worker in enumerate(ranked):
        labelled = _labelled(train_by_worker[worker], seen_group[worker], length_unit, drop_ties, ties, "train")
        num_validation = round_half_up(len(labelled) * validation_fraction)
        in_validation = np.zeros(len(labelled), dtype=bool)
        in_validation[rng_for(seed, _VALIDATION_STREAM, rank).permutation(len(labelled))[:num_validation]] = True
        rows["train"] += [row for row, flag in zip(labelled, in_validation) if not flag]
        rows["validation"] += [row for row, flag in zip(labelled, in_validation) if flag]
    for row in usable["validation"]:
        if row["worker"] in seen_group:
            rows["test"] += _labelled([row], seen_group[row["worker"]], length_unit, drop_ties, ties, "test")

    # unseen users: other workers of the validation split with enough comparisons
    unseen_counts = {
        worker: len(worker_rows) for worker, worker_rows in validation_by_worker.items() if worker not in seen_group
    }
    unseen = sorted(
        (worker for worker, count in unseen_counts.items() if count >= min_unseen_comparisons),
        key=lambda worker: (-unseen_counts[worker], worker),
    )
    if not unseen:
        logger.warning(
            f"No validation-split worker outside the seen users has >= {min_unseen_comparisons} comparisons: the "
            "unseen splits are empty."
        )
    if unseen_minority_workers is not None:
        unknown = sorted(set(unseen_minority_workers) - set(unseen))
        if unknown:
            raise ValueError(
                f"`unseen_minority_workers` names {unknown[:5]}, which are not unseen users (validation-split workers "
                f"outside the seen users with >= {min_unseen_comparisons} comparisons)."
            )
        minority = set(unseen_minority_workers)
    else:
        order = rng_for(seed, _UNSEEN_ASSIGNMENT_STREAM).permutation(len(unseen))
        minority = {unseen[i] for i in order[: round_half_up(len(unseen) * unseen_minority_fraction)]}
    for index, worker in enumerate(unseen):
        labelled = _labelled(
            validation_by_worker[worker], int(worker in minority), length_unit, drop_ties, ties, "unseen"
        )
        if len(labelled) <= unseen_shots:
            raise ValueError(
                f"Unseen worker {worker!r} has {len(labelled)} labelled comparisons (after dropping ties), not more "
                f"than unseen_shots={unseen_shots}, so none would be left for `unseen_test`: lower `unseen_shots` or "
                "raise `min_unseen_comparisons`."
            )
        in_shots = np.zeros(len(labelled), dtype=bool)
        in_shots[rng_for(seed, _UNSEEN_SHOTS_STREAM, index).permutation(len(labelled))[:unseen_shots]] = True
        rows["unseen_train"] += [row for row, flag in zip(labelled, in_shots) if flag]
        rows["unseen_test"] += [row for row, flag in zip(labelled, in_shots) if not flag]

    logger.info(
        f"Summary preferences: {len(ranked)} seen users, {len(unseen)} unseen users ({len(minority)} in the minority); "
        f"equal-length pairs ({'dropped' if drop_ties else 'kept, second summary chosen'}): {dict(ties) or 'none'}; sizes "
        + ", ".join(f"{split} {len(split_rows)}" for split, split_rows in rows.items())
        + "."
    )
    return build_dataset_dict(rows, _features())
