# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
"""Pick-a-Filter: Pick-a-Pic's real text-to-image preferences with a warm or cool colour filter that one group of
users prefers and the other does not (the PAL paper's image benchmark, Chen et al., ICLR 2025).

Source: Pick-a-Pic v1, `yuvalkirstain/pickapic_v1` (Kirstain et al. 2023). One row per comparison of two images
generated for one prompt: `caption` (the prompt), `jpg_0` and `jpg_1` (the two images, JPEG bytes), `label_0` and
`label_1` (1 / 0 for a preference, 0.5 / 0.5 for a tie), `has_label`, `are_different`, `user_id` (int64),
`ranking_id` (int64), `best_image_uid`, `image_0_uid`, `image_1_uid`, `image_0_url`, `image_1_url`, `model_0`,
`model_1`, `created_at`, `num_example_per_prompt`. Splits `train` (583,747 rows), `validation` (17,439), `test`
(14,073), `validation_unique` and `test_unique` (500 each); about 193 GB for `train` and 5.6 GB for `validation`.
Verified in the dataset card's `dataset_info`. The data is read from the Hub (`datasets.load_dataset(source,
split=source_split)`), from a `save_to_disk` folder, from parquet files (`{source_split}-*.parquet`, also under
`data/`, or one `.parquet` file) or from a `datasets.Dataset` you built (for example a shard or a streamed slice).

Pick-a-Filter's construction, as its dataset card (`ramya-ml/pick-a-filter-embeds`, MIT) states it: users are
assigned at random to G1, who prefer blue, cooler tones, or G2, who prefer red, warmer tones; a share beta of the
comparisons (the *mixture ratio*) is shortlisted for filtering; half of the shortlisted comparisons get the group's
winning filter on the winning image only (blue for G1, red for G2), the other half the losing filter on the losing
image only; the rest keep Pick-a-Pic's images. The labels stay the users' own. So the filter is a real signal of the
user's group, but not one that gives every label away.

The authors release this data only as OpenCLIP ViT-H/14 embeddings in zip archives (one per beta, for example
`paf_0.4_mix_ratio.zip`) whose inner layout is not documented on the card or in any code we could read, and which
hold pickles (unsafe to load from the Hub). So this loader rebuilds Pick-a-Filter from Pick-a-Pic v1 by the card's
rules. The group draw and the filtering draws are ours (seeded), and so is the filter itself
([`apply_color_filter`], the same warm and cool filters as `load_color_filter_preferences`, at `filter_strength`):
the authors' filter code is not published. Numbers on this data are comparable in protocol with the paper's, not
identical. To train on CLIP features as the released embeddings are, encode the rows once with
[`~pal_rm.cache.featurize_image_preferences`] (or let `PalRewardTrainer` cache them: an image model's backbone
stays frozen).

Comparisons (the rules as implemented, on the rows of `source_split`):

1. Dropped and counted: rows with `has_label` false, rows with `are_different` false, ties (`label_0 == label_1`)
   and rows with an empty caption. A row with a label that is not a number in [0, 1], no `user_id` or no image bytes
   is an error naming the row.
2. Groups: the users of the kept rows (ids sorted, then a seeded permutation) alternate between G1 (`group` 0, the
   winning filter is `"cool"`) and G2 (`group` 1, `"warm"`), so the groups differ in size by at most one.
3. Filters: a seeded permutation of the kept rows; its first `round(mix_ratio * n)` rows are shortlisted (so the
   shortlist of a smaller beta is part of a larger beta's), the first half of those (rounded up) get the winning
   filter on the chosen image, the others the losing filter on the rejected image. `filtered` says which image
   (`"none"`, `"chosen"`, `"rejected"`) and `filter` which filter (`""`, `"cool"`, `"warm"`). A filtered image is
   stored as PNG (no second JPEG compression); an unfiltered one keeps Pick-a-Pic's JPEG bytes.

Users and splits (the split unit is one user's prompt, so the comparisons of one prompt, which share images, never
span two splits):

4. Eligible users: at least `min_prompts` (5) prompts with a kept comparison.
5. Seen users: a seeded `seen_fraction` (0.8, rounded down) of the eligible users; the others are unseen users.
6. A seen user's prompts are shuffled (seeded) and split into `test` (`test_fraction`, 0.2), `validation`
   (`validation_fraction`, 0.1) and `train` (the rest), each share of the user's prompt count rounded half up (at
   least one prompt for a non-zero share).
7. An unseen user's prompts are shuffled (seeded): `test_fraction` of them (at least one) give `unseen_test`, the
   others the few-shot `unseen_train`, whose comparisons are shuffled (seeded) and, with `unseen_shots`, cut to that
   many.
8. Evaluation comparisons (`validation`, `test`, `unseen_test`) whose caption is also the caption of a training
   comparison (`train`, `unseen_train`) of any user are dropped and counted: different users may type the same
   prompt.

Expected sizes on the full data: not computed here (no network; the images alone are 193 GB for `train`). At most
583,747 comparisons before rule 1 from `train` and 17,439 from `validation`; the loader logs what each rule drops
and the size of every split.
"""

from __future__ import annotations

import io
import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import datasets
import numpy as np
from datasets import Dataset, DatasetDict, Features, Image, Value
from datasets.fingerprint import Hasher
from PIL import Image as PILImage
from transformers.utils import logging

from ._common import (
    check_fractions,
    check_int,
    check_positive_float,
    check_seed,
    check_share,
    data_files,
    draw_seen_users,
    drop_training_prompts,
    looks_like_local_path,
    rng_for,
    round_half_up,
    split_sizes,
    split_user_units,
)
from .color_filter import apply_color_filter

logger = logging.get_logger(__name__)

PICKAPIC_V1_SOURCE = "yuvalkirstain/pickapic_v1"
PICK_A_FILTER_GROUPS = {
    0: "G1: prefers blue, cooler tones (the winning filter is cool)",
    1: "G2: prefers red, warmer tones (the winning filter is warm)",
}
"""Pick-a-Filter's two groups of users, by the `group` column's value."""
_WINNING_FILTER = {0: "cool", 1: "warm"}
_LOSING_FILTER = {0: "warm", 1: "cool"}
_REQUIRED_COLUMNS = ("caption", "user_id", "label_0", "label_1", "jpg_0", "jpg_1")
_METADATA_COLUMNS = ("caption", "user_id", "label_0", "label_1", "has_label", "are_different", "ranking_id")

# Part of the fingerprint of the built splits, which `datasets` caches next to the source's files: bump it whenever the
# rows this module builds from the same arguments change, so that no cache of an older build is reused.
_BUILD_VERSION = 2

# randomness streams
_GROUP_STREAM, _FILTER_STREAM, _USER_STREAM, _SEEN_STREAM, _UNSEEN_STREAM, _SHOTS_STREAM = range(6)


# ---------------------------------------------------------------------------------------------------------------
# reading


def _checked_dataset(dataset: Any, source_split: str, where: str) -> Dataset:
    if isinstance(dataset, DatasetDict):
        if source_split not in dataset:
            raise ValueError(f"{where} has no split {source_split!r} (splits: {list(dataset)}): set `source_split`.")
        dataset = dataset[source_split]
    if not isinstance(dataset, Dataset):
        raise ValueError(f"{where} is a {type(dataset).__name__}, not a Dataset or DatasetDict.")
    absent = [name for name in _REQUIRED_COLUMNS if name not in dataset.column_names]
    if absent:
        raise ValueError(
            f"{where} has no {absent} column(s): is it Pick-a-Pic v1 ({PICKAPIC_V1_SOURCE}), with its images? The "
            f"`_no_images` variant has URLs only. Found {dataset.column_names}."
        )
    return dataset


def _read_source(source: Any, source_split: str) -> Dataset:
    if isinstance(source, (Dataset, DatasetDict)):
        return _checked_dataset(source, source_split, "`source`")
    source = os.fspath(source)
    where = repr(source)
    if os.path.isfile(source):
        if not source.endswith(".parquet"):
            raise ValueError(f"`source` {source!r} is not a .parquet file (Pick-a-Pic's images are binary columns).")
        return _checked_dataset(Dataset.from_parquet(source), source_split, where)
    if os.path.isdir(source):
        if any(os.path.isfile(os.path.join(source, name)) for name in ("dataset_dict.json", "dataset_info.json")):
            return _checked_dataset(datasets.load_from_disk(source), source_split, where)
        files = next(
            (
                found
                for folder in (source, os.path.join(source, "data"))
                if (found := data_files(folder, source_split))
            ),
            [],
        )
        if not files or not all(path.endswith(".parquet") for path in files):
            raise ValueError(
                f"{source!r} has no parquet data for the split {source_split!r}. Expected a folder written by "
                f"`save_to_disk`, or `{source_split}-*.parquet` / `{source_split}/*.parquet` (also under `data/`)."
            )
        return _checked_dataset(Dataset.from_parquet(files), source_split, where)
    if looks_like_local_path(source):
        raise ValueError(
            f"`source` {source!r} does not exist: pass a Hub dataset id (default {PICKAPIC_V1_SOURCE!r}), a folder, a "
            "parquet file or a `datasets.Dataset`."
        )
    logger.info(f"Loading {source!r} (split {source_split!r}) with datasets.load_dataset.")
    return _checked_dataset(datasets.load_dataset(source, split=source_split), source_split, where)


# ---------------------------------------------------------------------------------------------------------------
# comparisons


@dataclass(frozen=True)
class _Comparison:
    row: int  # in the source split
    user_id: str
    caption: str
    winner: int  # 0 or 1: which of jpg_0 / jpg_1 the user chose
    ranking_id: int
    group: int = -1  # rules 2 and 3, set once every comparison is known
    filtered: str = "none"
    filter: str = ""


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float, np.number)) and math.isfinite(value)


def _comparisons(metadata: dict[str, list], counts: Counter) -> list[_Comparison]:
    """The kept comparisons of the source rows (rule 1 of the module docstring)."""
    comparisons = []
    num_rows = len(metadata["caption"])
    for row in range(num_rows):
        user_id = metadata["user_id"][row]
        if isinstance(user_id, bool) or not isinstance(user_id, (int, np.integer, str)) or user_id == "":
            raise ValueError(f"Row {row} of the source has the `user_id` {user_id!r}; Pick-a-Pic's ids are integers.")
        label_0, label_1 = metadata["label_0"][row], metadata["label_1"][row]
        if "has_label" in metadata and not metadata["has_label"][row]:
            counts["rows without a label (has_label false)"] += 1
            continue
        if not all(_is_number(label) and 0 <= label <= 1 for label in (label_0, label_1)):
            raise ValueError(
                f"Row {row} of the source has the labels ({label_0!r}, {label_1!r}); Pick-a-Pic's `label_0` and "
                "`label_1` are numbers in [0, 1] (1 / 0 for a preference, 0.5 / 0.5 for a tie)."
            )
        if "are_different" in metadata and not metadata["are_different"][row]:
            counts["rows whose two images are the same (are_different false)"] += 1
            continue
        if label_0 == label_1:
            counts["ties"] += 1
            continue
        caption = metadata["caption"][row]
        if not isinstance(caption, str) or not caption.strip():
            counts["rows with an empty caption"] += 1
            continue
        ranking_id = metadata["ranking_id"][row] if "ranking_id" in metadata else None
        comparisons.append(
            _Comparison(
                row=row,
                user_id=str(user_id),
                caption=caption.strip(),
                winner=0 if label_0 > label_1 else 1,
                ranking_id=-1 if ranking_id is None else int(ranking_id),
            )
        )
    return comparisons


def _groups(users: Sequence[str], seed: int) -> dict[str, int]:
    """Rule 2: the sorted users, permuted (seeded), alternate between G1 (0) and G2 (1)."""
    order = rng_for(seed, _GROUP_STREAM).permutation(len(users))
    return {users[index]: position % 2 for position, index in enumerate(order)}


def _filters(num_comparisons: int, mix_ratio: float, seed: int) -> list[str]:
    """Rule 3: which image of each comparison is filtered (`"none"`, `"chosen"`, `"rejected"`)."""
    order = rng_for(seed, _FILTER_STREAM).permutation(num_comparisons)
    num_shortlisted = round_half_up(mix_ratio * num_comparisons)
    num_chosen = round_half_up(num_shortlisted / 2)
    filtered = ["none"] * num_comparisons
    for position, index in enumerate(order[:num_shortlisted]):
        filtered[index] = "chosen" if position < num_chosen else "rejected"
    return filtered


# ---------------------------------------------------------------------------------------------------------------
# images


def _features() -> Features:
    return Features(
        {
            "user_id": Value("string"),
            "prompt": Value("string"),
            "chosen_image": Image(),
            "rejected_image": Image(),
            "group": Value("int64"),
            "filtered": Value("string"),
            "filter": Value("string"),
            "ranking_id": Value("int64"),
            "source_row": Value("int64"),
        }
    )


def _image_bytes(value: Any, row: int, column: str) -> bytes:
    if isinstance(value, dict):  # an `Image` feature read without decoding
        value = value.get("bytes")
    elif isinstance(value, PILImage.Image):  # a decoded `Image` feature: stored losslessly
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        value = buffer.getvalue()
    if not isinstance(value, (bytes, bytearray)) or not value:
        raise ValueError(f"Row {row} of the source has no image bytes in `{column}` (got {type(value).__name__}).")
    return bytes(value)


def _filtered_png(data: bytes, kind: str, strength: float, row: int, column: str) -> bytes:
    try:
        with PILImage.open(io.BytesIO(data)) as image:
            image.load()
            filtered = apply_color_filter(image.convert("RGB"), kind, strength)
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"Row {row} of the source: `{column}` is not a readable image ({error}).") from None
    buffer = io.BytesIO()
    filtered.save(buffer, format="PNG", compress_level=1)  # lossless; level 1 is 2.5x faster than the default 6
    return buffer.getvalue()


def _split_dataset(
    source: Dataset,
    comparisons: list[_Comparison],
    strength: float,
    fingerprint: str,
    num_proc: int | None,
) -> Dataset:
    """The rows of one split, images filtered, written through `Dataset.map` (so a large split goes to disk)."""
    features = _features()
    if not comparisons:
        return Dataset.from_dict({name: [] for name in features}, features=features)

    def build(example: dict, position: int) -> dict:
        comparison = comparisons[position]
        images = {}
        for role, index in (("chosen", comparison.winner), ("rejected", 1 - comparison.winner)):
            column = f"jpg_{index}"
            data = _image_bytes(example[column], comparison.row, column)
            if comparison.filtered == role:
                data = _filtered_png(data, comparison.filter, strength, comparison.row, column)
            images[f"{role}_image"] = {"bytes": data, "path": None}
        return {
            "user_id": comparison.user_id,
            "prompt": comparison.caption,
            **images,
            "group": comparison.group,
            "filtered": comparison.filtered,
            "filter": comparison.filter,
            "ranking_id": comparison.ranking_id,
            "source_row": comparison.row,
        }

    selected = source.select_columns(["jpg_0", "jpg_1"]).select([comparison.row for comparison in comparisons])
    return selected.map(
        build,
        with_indices=True,
        remove_columns=["jpg_0", "jpg_1"],
        features=features,
        new_fingerprint=fingerprint,
        num_proc=num_proc if num_proc is not None and num_proc > 1 and len(comparisons) > 1 else None,
        desc="Pick-a-Filter images",
    )


# ---------------------------------------------------------------------------------------------------------------
# the loader


def load_pick_a_filter_preferences(
    source: str | os.PathLike | Dataset | DatasetDict = PICKAPIC_V1_SOURCE,
    source_split: str = "train",
    mix_ratio: float = 0.4,
    filter_strength: float = 0.5,
    seen_fraction: float = 0.8,
    min_prompts: int = 5,
    test_fraction: float = 0.2,
    validation_fraction: float = 0.1,
    unseen_shots: int | None = None,
    seed: int = 0,
    num_proc: int | None = None,
) -> DatasetDict:
    """Build Pick-a-Filter from Pick-a-Pic v1 (rules in the module docstring).

    Args:
        source (`str`, `os.PathLike`, `Dataset` or `DatasetDict`, defaults to `"yuvalkirstain/pickapic_v1"`): a Hub
            dataset id, a folder written by `save_to_disk`, a folder of parquet files, one parquet file, or a
            dataset in Pick-a-Pic v1's schema (with the images).
        source_split (`str`, defaults to `"train"`): the split of `source` to read. `"validation"` (17,439 rows,
            5.6 GB) is a much smaller download than `"train"` (583,747 rows, 193 GB).
        mix_ratio (`float`, defaults to 0.4): beta, the share of comparisons with a filtered image, in [0, 1]. The
            paper's released archives go from 0.0 to 1.0; 0.4 is the one its card names.
        filter_strength (`float`, defaults to 0.5): strength of the warm and cool filters, in (0, 1]
            ([`apply_color_filter`]).
        seen_fraction (`float`, defaults to 0.8): share of the eligible users drawn (seeded) as seen users.
        min_prompts (`int`, defaults to 5): fewest prompts with a kept comparison of an eligible user.
        test_fraction (`float`, defaults to 0.2): share of each user's prompts held out for `test` (seen users) or
            `unseen_test` (unseen users).
        validation_fraction (`float`, defaults to 0.1): share of each seen user's prompts in `validation`.
        unseen_shots (`int`, *optional*): most few-shot comparisons per unseen user; by default all comparisons of
            their few-shot prompts.
        seed (`int`, defaults to 0): the output is a deterministic function of the arguments and the source.
        num_proc (`int`, *optional*): processes that decode, filter and re-encode the images (`Dataset.map`); it
            does not change the output. On invented 512x512 JPEGs at beta 0.4 one process builds about 70
            comparisons a second and two about 110 (`python examples/benchmarks/pick_a_filter.py --build_rows 2000`,
            2 CPU cores), so the whole `train` split takes hours in one process. `datasets` caches the result next to
            the source's files (or keep it with `save_to_disk`).

    Returns:
        `datasets.DatasetDict` with splits `train`, `validation`, `test`, `unseen_train`, `unseen_test` and columns
        `user_id` (Pick-a-Pic's user id, as a string), `prompt` (the caption), `chosen_image` and `rejected_image`
        (`datasets.Image`), `group` (0: G1, prefers cool; 1: G2, prefers warm; see `PICK_A_FILTER_GROUPS`),
        `filtered` (`"none"`, `"chosen"` or `"rejected"`), `filter` (`""`, `"cool"` or `"warm"`), `ranking_id` and
        `source_row` (the row of `source_split` the comparison comes from).

    Example:

    ```python
    >>> from pal_rm.data import load_pick_a_filter_preferences
    >>> dataset = load_pick_a_filter_preferences(source_split="validation", mix_ratio=0.4)  # doctest: +SKIP
    ```
    """
    if not isinstance(source_split, str) or not source_split:
        raise ValueError(f"`source_split` must be a split name such as 'train', got {source_split!r}.")
    if isinstance(mix_ratio, bool) or not isinstance(mix_ratio, (int, float, np.number)) or not 0 <= mix_ratio <= 1:
        raise ValueError(f"`mix_ratio` (beta) must be a number in [0, 1], got {mix_ratio!r}.")
    filter_strength = check_positive_float("filter_strength", filter_strength)
    if filter_strength > 1:
        raise ValueError(f"`filter_strength` must be in (0, 1], got {filter_strength!r}.")
    check_share("seen_fraction", seen_fraction)
    min_prompts = check_int("min_prompts", min_prompts, minimum=1)
    check_fractions(validation_fraction, test_fraction)
    if test_fraction == 0:
        raise ValueError("`test_fraction` must be > 0: seen and unseen users need held-out prompts.")
    split_sizes(min_prompts, validation_fraction, test_fraction, "min_prompts")  # every eligible user can be split
    if unseen_shots is not None:
        unseen_shots = check_int("unseen_shots", unseen_shots, minimum=1)
    seed = check_seed(seed)
    if num_proc is not None:
        num_proc = check_int("num_proc", num_proc, minimum=1)

    source = _read_source(source, source_split)
    columns = [name for name in _METADATA_COLUMNS if name in source.column_names]
    counts = Counter()
    comparisons = _comparisons(source.select_columns(columns).to_dict(), counts)
    logger.info(
        f"Pick-a-Pic ({source_split}): {len(source)} rows, {len(comparisons)} comparisons kept; dropped: "
        f"{dict(counts) or 'none'}."
    )
    if not comparisons:
        raise ValueError(
            f"No comparison of `source` split {source_split!r} survives rule 1 (dropped: {dict(counts)})."
        )
    groups = _groups(sorted({comparison.user_id for comparison in comparisons}), seed)
    filtered = _filters(len(comparisons), float(mix_ratio), seed)
    for position, (comparison, which) in enumerate(zip(comparisons, filtered)):
        group = groups[comparison.user_id]
        kind = "" if which == "none" else (_WINNING_FILTER if which == "chosen" else _LOSING_FILTER)[group]
        comparisons[position] = replace(comparison, group=group, filtered=which, filter=kind)

    prompts: dict[str, dict[str, list[_Comparison]]] = {}
    for comparison in comparisons:
        prompts.setdefault(comparison.user_id, {}).setdefault(comparison.caption, []).append(comparison)
    eligible = sorted(user for user, user_prompts in prompts.items() if len(user_prompts) >= min_prompts)
    seen = draw_seen_users(
        eligible,
        seen_fraction,
        seed,
        _USER_STREAM,
        eligibility=f">= {min_prompts} prompts with a comparison",
        threshold="`min_prompts`",
        noun="user",
    )
    rows = split_user_units(
        {user: list(prompts[user].values()) for user in eligible},
        eligible,
        seen,
        validation_fraction,
        test_fraction,
        unseen_shots,
        seed,
        streams=(_SEEN_STREAM, _UNSEEN_STREAM, _SHOTS_STREAM),
        threshold="min_prompts",
    )
    # rule 8: an evaluation caption is never a training caption (different users may type the same prompt)
    drop_training_prompts(rows, lambda row: row.caption, what="caption")

    logger.info(
        f"Pick-a-Filter (beta {mix_ratio}): {len(eligible)} eligible users ({len(seen)} seen, "
        f"{len(eligible) - len(seen)} unseen); sizes "
        + ", ".join(f"{split} {len(split_rows)}" for split, split_rows in rows.items())
        + "."
    )
    settings = (source._fingerprint, source_split, float(mix_ratio), filter_strength, seen_fraction, min_prompts)
    settings += (test_fraction, validation_fraction, unseen_shots, seed)
    return DatasetDict(
        {
            split: _split_dataset(
                source,
                split_rows,
                filter_strength,
                Hasher.hash(("pick-a-filter", _BUILD_VERSION, *settings, split)),
                num_proc,
            )
            for split, split_rows in rows.items()
        }
    )


__all__ = ["PICKAPIC_V1_SOURCE", "PICK_A_FILTER_GROUPS", "load_pick_a_filter_preferences"]
