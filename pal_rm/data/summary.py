# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
"""Reddit TL;DR summary preferences, with two protocols: the semi-synthetic protocol of Li et al. (2024) used by PAL
(`load_summary_preferences`: labels from a length rule) and the protocol of LoRe (Bose et al. 2025,
`load_summary_lore_preferences`: labels are the workers' real choices).

Source: `openai/summarize_from_feedback`, config `"comparisons"` (splits `train` and `validation`; each row has
`info` {id, post, title, subreddit, site, article}, `summaries` [{text, policy, note}, {text, policy, note}],
`choice`, `worker`, `batch`, `split`, `extra`). It is read from the Hub, from a folder written by
`DatasetDict.save_to_disk`, or from a folder of per-split files (`train.jsonl`, `validation.jsonl`, `.json` or
`.parquet`, also sharded as `train-*.parquet` or `train/*.parquet`).

Li et al. protocol (`load_summary_preferences`; the rules as implemented):

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

Leakage, as in the paper's protocol: `validation` is a per-comparison draw from the seen users' HF-train comparisons,
and `unseen_train` / `unseen_test` a per-comparison split of each unseen user's comparisons, so one Reddit post (with a
different pair of summaries) can occur on both sides. `test` comes from the HF validation split, whose posts are not
those of the HF train split. `load_summary_lore_preferences` splits by post instead.

Output text: `prompt` is `"SUBREDDIT: r/{subreddit}\\nTITLE: {title}\\nPOST: {post}\\nTL;DR:"` (lines with no value
are left out); `chosen` / `rejected` are the stripped summaries with one leading space, so that `prompt + chosen`
reads as the TL;DR format.

Expected sizes on the full data: the PAL paper reports 20,969 `train` / 2,330 `validation` / 4,921 `test` seen-user
comparisons, which the PAL reference code gets with ties kept (`drop_ties=False`); the default `drop_ties=True`
gives slightly fewer. The unseen users are the validation-split workers outside the top 10 with >= 100 comparisons
(a few dozen workers).

LoRe protocol (`load_summary_lore_preferences`). Bose, Xiong, Chi, Du, Xiao, Fazel, "LoRe: Personalizing LLMs via
Low-Rank Reward Modeling" (2025). Verified in the authors' reference code (facebookresearch/LoRe, commit b5cf508,
files `RedditTLDR/prepare.py`, `train_basis.py`, `vary_fewshot.py`; unchanged at the newest commit 6f93990); the
paper's own text could not be read here:

- [LoRe] every comparison of both HF splits is used, without policy filter; the label is the worker's own `choice`:
  `chosen = summaries[choice]`, `rejected` the other summary.
- [LoRe] users are the workers with comparisons in both HF splits; a seeded random half of them (rounded down) are the
  seen users, the rest the unseen users (`seen_fraction`).
- [LoRe] a seen user trains on at most 150 of their HF-train comparisons, drawn at random
  (`seen_train_comparisons`), and is tested on all of their HF-validation comparisons (`test`).
- [LoRe] an unseen user is fitted on at most 50 of their HF-train comparisons, drawn at random (`unseen_shots`;
  `vary_fewshot.py` draws 5, 10, ..., 50 shots from a pool of 100), and tested on all of their HF-validation
  comparisons (`unseen_test`).

Our choices, where LoRe's code has no rule or one that cannot be reproduced:

- Comparisons without a Reddit post (the CNN/DM rows of the HF validation split) or with an empty summary are dropped
  and counted, as in the Li protocol, and so are pairs of identical summaries; LoRe's code keeps them (with a `None`
  post). The prompt and response texts are formatted as in the Li protocol.
- Eligibility thresholds `min_train_comparisons` and `min_test_comparisons` on the comparisons kept (default 1: the
  worker appears in both splits, as in LoRe). LoRe's code also drops, in each HF split, the two workers with the fewest comparisons before
  matching the splits; that is not reproduced.
- The seen/unseen draw is a seeded permutation of the eligible workers sorted by id (LoRe shuffles a Python `set`,
  whose order depends on `PYTHONHASHSEED`, so its partition cannot be reproduced exactly).
- LoRe has no validation split. Here a seeded `validation_fraction` (0.1) of the distinct HF-train posts are
  validation posts: a seen user's drawn comparisons on them form `validation`, the others `train`, so no post is in
  both (0 gives LoRe's training data). Validation posts are moved back to training where a user would otherwise have
  no training comparison. The unseen users' few-shot comparisons are drawn among their comparisons on the other
  posts. HF-validation comparisons on a post that also occurs in the HF train split are dropped and counted (none
  are expected: the HF splits hold different TL;DR posts), so test posts never occur in training.

Expected sizes on the full data: not computed here (no network). The source has 92,858 train and 86,086 validation
comparisons (about 2.3k of the latter are CNN/DM articles, dropped); `train` + `validation` hold at most 150
comparisons per seen user and `unseen_train` at most 50 per unseen user.
"""

from __future__ import annotations

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
    check_share,
    data_files,
    draw_seen_users,
    empty_rows,
    looks_like_local_path,
    read_data_files,
    rng_for,
    round_half_up,
)

logger = logging.get_logger(__name__)

SUMMARY_SOURCE = "openai/summarize_from_feedback"
SUMMARY_GROUPS = {0: "prefers the longer summary (majority)", 1: "prefers the shorter summary (minority)"}
LENGTH_UNITS = ("characters", "words")
_SOURCE_SPLITS = ("train", "validation")
_LI_COLUMNS = ("info", "summaries", "worker")
_LORE_COLUMNS = ("info", "summaries", "worker", "choice")

# randomness streams
_VALIDATION_STREAM, _UNSEEN_ASSIGNMENT_STREAM, _UNSEEN_SHOTS_STREAM = 0, 1, 2
_LORE_USER_STREAM, _LORE_VALIDATION_STREAM, _LORE_SEEN_STREAM, _LORE_UNSEEN_STREAM = 3, 4, 5, 6


# ---------------------------------------------------------------------------------------------------------------
# reading


def _read_local_files(folder: str) -> dict[str, list[dict]]:
    rows = {}
    for split in _SOURCE_SPLITS:
        files = data_files(folder, split)
        if not files:
            raise ValueError(
                f"{folder!r} has no files for the {split!r} split. Expected a folder written by "
                f"`DatasetDict.save_to_disk`, or per-split files such as `{split}.jsonl`, `{split}.parquet`, "
                f"`{split}-*.parquet` or `{split}/*.parquet`."
            )
        rows[split] = read_data_files(files)
    return rows


def _rows_from_dataset_dict(dataset_dict: Any, where: str, columns: Sequence[str]) -> dict[str, list[dict]]:
    if not isinstance(dataset_dict, DatasetDict):
        raise ValueError(f"{where} is not a DatasetDict with `train` and `validation` splits.")
    missing = [split for split in _SOURCE_SPLITS if split not in dataset_dict]
    if missing:
        raise ValueError(f"{where} has no {missing} split(s); found {list(dataset_dict)}.")
    rows = {}
    for split in _SOURCE_SPLITS:
        absent = [name for name in columns if name not in dataset_dict[split].column_names]
        if absent:
            raise ValueError(
                f"The {split!r} split of {where} has no {absent} column(s): is it the `comparisons` config of "
                f"{SUMMARY_SOURCE}?"
            )
        rows[split] = dataset_dict[split].select_columns(list(columns)).to_list()
    return rows


def _read_source(source: str | os.PathLike, columns: Sequence[str] = _LI_COLUMNS) -> dict[str, list[dict]]:
    """The rows of the `train` and `validation` splits; from a Hub dataset or a `save_to_disk` folder only `columns`
    are read."""
    source = os.fspath(source)
    if os.path.isdir(source):
        if os.path.isfile(os.path.join(source, "dataset_dict.json")):
            return _rows_from_dataset_dict(datasets.load_from_disk(source), repr(source), columns)
        return _read_local_files(source)
    if os.path.exists(source) or looks_like_local_path(source):
        raise ValueError(
            f"`source` {source!r} is not a directory: pass a Hub dataset id (default {SUMMARY_SOURCE!r}), a folder "
            "written by `DatasetDict.save_to_disk`, or a folder of per-split json/jsonl/parquet files."
        )
    logger.info(f"Loading {source!r} (config 'comparisons') with datasets.load_dataset.")
    return _rows_from_dataset_dict(datasets.load_dataset(source, "comparisons"), repr(source), columns)


# ---------------------------------------------------------------------------------------------------------------
# row checks and protocol


def _checked(row: Any, split: str, index: int, with_choice: bool = False) -> tuple[dict, list[dict], str, int | None]:
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
    choice = None
    if with_choice:
        choice = row.get("choice")
        if isinstance(choice, bool) or choice not in (0, 1):
            raise ValueError(
                f"{where}: `choice` (the index of the summary the worker preferred) must be 0 or 1, got {choice!r}."
            )
    return info, summaries, worker, choice


def _keeps_policy(summaries: Sequence[dict]) -> bool:
    return all("sup" in s["policy"] and "ppo" not in s["policy"] for s in summaries)


def _usable(split: str, rows: list[dict], policy_filter: bool = True, real_choices: bool = False):
    """The comparisons kept, as dicts with `worker`, `prompt`, `texts`, `post_id` (and `choice` with
    `real_choices`), and the counts of those dropped, by reason. `policy_filter`: the Li et al. policy filter (rule 1);
    `real_choices`: read the worker's `choice` and drop pairs of identical summaries (which no choice can order)."""
    kept, dropped = [], Counter()
    for index, row in enumerate(rows):
        info, summaries, worker, choice = _checked(row, split, index, with_choice=real_choices)
        if policy_filter and not _keeps_policy(summaries):
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
        if real_choices and texts[0] == texts[1]:
            dropped["identical summaries"] += 1
            continue
        prompt_lines = []
        if info.get("subreddit"):
            prompt_lines.append(f"SUBREDDIT: r/{info['subreddit']}")
        if info.get("title"):
            prompt_lines.append(f"TITLE: {info['title'].strip()}")
        prompt_lines += [f"POST: {post.strip()}", "TL;DR:"]
        usable = {
            "worker": worker,
            "prompt": "\n".join(prompt_lines),
            "texts": texts,
            "post_id": str(info.get("id") or ""),
        }
        if real_choices:
            usable["choice"] = choice
        kept.append(usable)
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


def _lore_features() -> Features:
    features = dict(TEXT_FEATURES)
    features["post_id"] = Value("string")
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


def _lore_row(row: dict) -> dict:
    """A comparison as the preference row of its worker, labelled by the worker's own `choice`."""
    chosen = row["choice"]
    return {
        "user_id": row["worker"],
        "prompt": row["prompt"],
        "chosen": " " + row["texts"][chosen],
        "rejected": " " + row["texts"][1 - chosen],
        "group": -1,
        "post_id": row["post_id"],
    }


def load_summary_lore_preferences(
    source: str | os.PathLike = SUMMARY_SOURCE,
    seen_fraction: float = 0.5,
    seen_train_comparisons: int = 150,
    unseen_shots: int = 50,
    min_train_comparisons: int = 1,
    min_test_comparisons: int = 1,
    validation_fraction: float = 0.1,
    seed: int = 0,
) -> DatasetDict:
    """Build the Reddit TL;DR personalized preference dataset with the LoRe protocol: the workers' real choices
    (rules in the module docstring, section "LoRe protocol").

    Args:
        source (`str` or `os.PathLike`, defaults to `"openai/summarize_from_feedback"`): as for
            `load_summary_preferences` (the rows also need `choice`).
        seen_fraction (`float`, defaults to 0.5): share of the eligible workers drawn (seeded) as seen users, rounded
            down (LoRe: half).
        seen_train_comparisons (`int`, defaults to 150): most comparisons drawn (seeded) per seen user from the HF
            `train` split (LoRe: 150); the validation comparisons come out of these.
        unseen_shots (`int`, defaults to 50): most few-shot comparisons per unseen user in `unseen_train`, drawn from
            the HF `train` split (LoRe: 50; its few-shot study draws 5 to 50 from 100).
        min_train_comparisons (`int`, defaults to 1): fewest usable HF-train comparisons of an eligible worker.
        min_test_comparisons (`int`, defaults to 1): fewest usable HF-validation comparisons of an eligible worker.
        validation_fraction (`float`, defaults to 0.1): share of the HF-train posts whose comparisons go to
            `validation` (seen users) instead of `train`; 0 gives LoRe's training data exactly (LoRe has no
            validation split).
        seed (`int`, defaults to 0): the output is a deterministic function of the arguments and the source.

    Returns:
        `datasets.DatasetDict` with splits `train`, `validation`, `test`, `unseen_train`, `unseen_test` and columns
        `user_id` (the worker id), `prompt`, `chosen`, `rejected` (the worker's choice first), `group` (-1: no groups)
        and `post_id` (`info.id`).

    Example:

    ```python
    >>> from pal_rm.data import load_summary_lore_preferences
    >>> dataset = load_summary_lore_preferences()  # doctest: +SKIP
    ```
    """
    check_share("seen_fraction", seen_fraction)
    seen_train_comparisons = check_int("seen_train_comparisons", seen_train_comparisons, minimum=1)
    unseen_shots = check_int("unseen_shots", unseen_shots, minimum=1)
    min_train_comparisons = check_int("min_train_comparisons", min_train_comparisons, minimum=1)
    min_test_comparisons = check_int("min_test_comparisons", min_test_comparisons, minimum=1)
    check_fractions(validation_fraction)
    seed = check_seed(seed)

    source_rows = _read_source(source, _LORE_COLUMNS)
    usable, dropped = {}, {}
    for split in _SOURCE_SPLITS:
        usable[split], dropped[split] = _usable(split, source_rows[split], policy_filter=False, real_choices=True)
    # keep test posts out of training (none expected: the two HF splits hold different posts)
    train_prompts = {row["prompt"] for row in usable["train"]}
    shared = sum(row["prompt"] in train_prompts for row in usable["validation"])
    if shared:
        dropped["validation"]["post also in the train split"] += shared
        logger.warning(f"{shared} HF-validation comparisons are on posts of the HF train split: dropped.")
        usable["validation"] = [row for row in usable["validation"] if row["prompt"] not in train_prompts]
    for split in _SOURCE_SPLITS:
        logger.info(
            f"summarize_from_feedback {split!r}: kept {len(usable[split])} of {len(source_rows[split])} comparisons "
            f"(dropped: {dict(dropped[split]) or 'none'})."
        )
    by_worker = {split: _by_worker(usable[split]) for split in _SOURCE_SPLITS}

    # users: the workers of both splits, half of them (seeded) seen
    eligible = sorted(
        worker
        for worker, rows in by_worker["train"].items()
        if len(rows) >= min_train_comparisons and len(by_worker["validation"].get(worker, ())) >= min_test_comparisons
    )
    drawn = draw_seen_users(
        eligible,
        seen_fraction,
        seed,
        _LORE_USER_STREAM,
        eligibility=f">= {min_train_comparisons} train and >= {min_test_comparisons} validation comparisons",
        threshold="the thresholds",
        noun="worker",
    )
    seen = sorted(drawn)
    unseen = sorted(set(eligible) - drawn)
    index = {worker: position for position, worker in enumerate(eligible)}  # each worker's own random stream

    # validation posts: a seeded share of the HF-train posts, except those a user cannot do without
    prompts = sorted(train_prompts)
    permutation = rng_for(seed, _LORE_VALIDATION_STREAM).permutation(len(prompts))
    validation_prompts = {prompts[i] for i in permutation[: round_half_up(len(prompts) * validation_fraction)]}
    selected = {}
    for worker in seen:
        rows = by_worker["train"][worker]
        draw = rng_for(seed, _LORE_SEEN_STREAM, index[worker]).permutation(len(rows))[:seen_train_comparisons]
        selected[worker] = [rows[i] for i in draw]
    rescued = set()
    for rows in [*selected.values(), *(by_worker["train"][worker] for worker in unseen)]:
        if all(row["prompt"] in validation_prompts for row in rows):
            rescued |= {row["prompt"] for row in rows}
    if rescued:
        logger.info(f"{len(rescued)} validation posts moved back to training: some user had no other training post.")
    validation_prompts -= rescued

    rows = empty_rows()
    for worker in seen:
        for row in selected[worker]:
            rows["validation" if row["prompt"] in validation_prompts else "train"].append(_lore_row(row))
        rows["test"] += [_lore_row(row) for row in by_worker["validation"][worker]]
    for worker in unseen:
        candidates = [row for row in by_worker["train"][worker] if row["prompt"] not in validation_prompts]
        draw = rng_for(seed, _LORE_UNSEEN_STREAM, index[worker]).permutation(len(candidates))[:unseen_shots]
        rows["unseen_train"] += [_lore_row(candidates[i]) for i in draw]
        rows["unseen_test"] += [_lore_row(row) for row in by_worker["validation"][worker]]

    logger.info(
        f"Summary preferences (LoRe protocol): {len(eligible)} eligible workers, {len(seen)} seen, {len(unseen)} "
        f"unseen; {len(validation_prompts)} of {len(prompts)} train posts in validation; sizes "
        + ", ".join(f"{split} {len(split_rows)}" for split, split_rows in rows.items())
        + "."
    )
    return build_dataset_dict(rows, _lore_features())
