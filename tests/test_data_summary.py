# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
import json
import logging
import shutil
from collections import Counter
from pathlib import Path

import datasets
import pytest

from pal_rm.data import SPLIT_NAMES, SUMMARY_GROUPS, load_summary_preferences

FIXTURE_DIR = Path(__file__).parent / "fixtures" / "summarize_from_feedback"
SEEN_BY_RANK = [
    "w_mike",
    "w_alpha",
    "w_zulu",
    "w_echo",
    "w_tango",
    "w_bravo",
    "w_yankee",
    "w_delta",
    "w_oscar",
    "w_golf",
]
MINORITY = {"w_echo", "w_tango", "w_bravo"}  # ranks 3, 4, 5
UNSEEN = {"u_india", "u_juliet", "u_kilo", "u_lima", "w_hotel"}  # >= 6 validation comparisons, outside the top 10
SMALL = {"min_unseen_comparisons": 6, "unseen_shots": 3}


def _source_rows(split):
    return [json.loads(line) for line in (FIXTURE_DIR / f"{split}.jsonl").read_text().splitlines()]


def _as_dataset_dict():
    return datasets.DatasetDict(
        {split: datasets.Dataset.from_list(_source_rows(split)) for split in ("train", "validation")}
    )


@pytest.fixture(scope="module")
def summary():
    return load_summary_preferences(FIXTURE_DIR, **SMALL, seed=0)


def test_splits_columns_and_sizes(summary):
    assert tuple(summary) == SPLIT_NAMES
    for split in SPLIT_NAMES:
        assert {"user_id", "prompt", "chosen", "rejected", "group", "post_id"} <= set(summary[split].column_names)
    # seen: 75 filtered train comparisons minus 2 ties, 10% per user to validation; 20 test comparisons minus 1 tie
    assert summary["train"].num_rows + summary["validation"].num_rows == 73
    assert summary["validation"].num_rows == 8  # per user: round(0.1 * n) with n = 11, 11, 10, 8, 8, 6, 6, 5, 4, 3
    assert summary["test"].num_rows == 19
    # unseen: 9 + 7 + 7 + 6 + 6 = 35 comparisons after ties, 3 shots each
    assert summary["unseen_train"].num_rows == 15
    assert summary["unseen_test"].num_rows == 20
    row = summary["train"][0]
    assert row["prompt"].startswith("SUBREDDIT: r/") and "\nTITLE: " in row["prompt"] and "\nPOST: " in row["prompt"]
    assert row["prompt"].endswith("\nTL;DR:")
    assert row["chosen"].startswith(" ") and not row["chosen"].startswith("  ")


def test_seen_users_are_the_top_workers_after_the_policy_filter(summary):
    groups = {
        row["user_id"]: row["group"] for split in ("train", "validation", "test") for row in summary[split].to_list()
    }
    assert set(groups) == set(SEEN_BY_RANK)  # w_papa has the most raw rows but 1 after the filter
    assert {worker for worker, group in groups.items() if group == 1} == MINORITY
    assert set(SUMMARY_GROUPS) == {0, 1}


def test_labels_follow_the_length_rule(summary):
    for split in SPLIT_NAMES:
        for row in summary[split].to_list():
            assert row["chosen_length"] == len(row["chosen"].strip())
            assert row["rejected_length"] == len(row["rejected"].strip())
            if row["group"] == 0:
                assert row["chosen_length"] > row["rejected_length"]
            else:
                assert row["chosen_length"] < row["rejected_length"]


def test_policy_filter_and_missing_posts(summary):
    dropped = set()
    for split in ("train", "validation"):
        for row in _source_rows(split):
            policies = [s["policy"] for s in row["summaries"]]
            if not all("sup" in p and "ppo" not in p for p in policies) or row["info"]["post"] is None:
                dropped.add(row["info"]["id"])
    assert len(dropped) == 16 + 4
    kept = {post_id for split in SPLIT_NAMES for post_id in summary[split]["post_id"]}
    assert kept.isdisjoint(dropped)


def test_splits_come_from_the_right_source_split(summary):
    train_ids = {row["info"]["id"] for row in _source_rows("train")}
    validation_ids = {row["info"]["id"] for row in _source_rows("validation")}
    assert set(summary["train"]["post_id"]) | set(summary["validation"]["post_id"]) <= train_ids
    assert set(summary["train"]["post_id"]).isdisjoint(summary["validation"]["post_id"])
    for split in ("test", "unseen_train", "unseen_test"):
        assert set(summary[split]["post_id"]) <= validation_ids
    assert set(summary["validation"]["user_id"]) <= set(SEEN_BY_RANK)


def test_unseen_users(summary):
    unseen_train, unseen_test = summary["unseen_train"].to_list(), summary["unseen_test"].to_list()
    assert {row["user_id"] for row in unseen_train} == UNSEEN  # u_november has only 3 comparisons
    assert Counter(row["user_id"] for row in unseen_train) == {user: 3 for user in UNSEEN}
    assert Counter(row["user_id"] for row in unseen_test) == {
        "u_india": 6,
        "u_juliet": 4,
        "u_kilo": 4,
        "u_lima": 3,
        "w_hotel": 3,
    }
    assert {row["post_id"] for row in unseen_train}.isdisjoint(row["post_id"] for row in unseen_test)
    groups = {row["user_id"]: row["group"] for row in unseen_train + unseen_test}
    assert len(groups) == 5 and sum(groups.values()) == 2  # 30% of 5, rounded half up
    chosen = load_summary_preferences(FIXTURE_DIR, **SMALL, unseen_minority_workers=["u_lima"], seed=0)
    assert {row["user_id"] for row in chosen["unseen_test"].to_list() if row["group"] == 1} == {"u_lima"}


def test_no_unseen_users_gives_empty_unseen_splits(caplog):
    with caplog.at_level(logging.WARNING, logger="pal_rm.data.summary"):
        dataset = load_summary_preferences(FIXTURE_DIR, min_unseen_comparisons=50, seed=0)
    assert "unseen splits are empty" in caplog.text
    assert dataset["unseen_train"].num_rows == dataset["unseen_test"].num_rows == 0
    assert dataset["unseen_test"].column_names == dataset["train"].column_names


def test_ties_are_dropped_and_logged_or_kept(caplog):
    with caplog.at_level(logging.INFO, logger="pal_rm.data.summary"):
        load_summary_preferences(FIXTURE_DIR, **SMALL, seed=0)
    assert "equal-length pairs (dropped): {'train': 2, 'test': 1, 'unseen': 1}" in caplog.text
    kept = load_summary_preferences(FIXTURE_DIR, **SMALL, drop_ties=False, seed=0)
    assert kept["train"].num_rows + kept["validation"].num_rows == 75
    assert kept["test"].num_rows == 20
    ties = [
        row for split in SPLIT_NAMES for row in kept[split].to_list() if row["chosen_length"] == row["rejected_length"]
    ]
    assert len(ties) == 4
    sources = {row["info"]["id"]: row for split in ("train", "validation") for row in _source_rows(split)}
    for row in ties:  # the PAL reference code's choice: the second summary
        assert row["chosen"] == " " + sources[row["post_id"]]["summaries"][1]["text"].strip()


def test_length_in_words(summary):
    words = load_summary_preferences(FIXTURE_DIR, **SMALL, length_unit="words", seed=0)
    by_characters = {row["post_id"]: row for split in ("train", "validation") for row in summary[split].to_list()}
    by_words = {row["post_id"]: row for split in ("train", "validation") for row in words[split].to_list()}
    flipped = [post_id for post_id in by_words if by_words[post_id]["chosen"] != by_characters[post_id]["chosen"]]
    assert len(flipped) == 2  # the two rows whose longer summary in characters is shorter in words
    for post_id in flipped:
        assert by_characters[post_id]["user_id"] in {"w_alpha", "w_tango"}
        row = by_words[post_id]
        assert row["chosen_length"] == len(row["chosen"].split())


def test_deterministic_given_seed(summary):
    again = load_summary_preferences(FIXTURE_DIR, **SMALL, seed=0)
    for split in SPLIT_NAMES:
        assert again[split].to_dict() == summary[split].to_dict()
    other = load_summary_preferences(FIXTURE_DIR, **SMALL, seed=1)
    assert set(other["train"]["user_id"]) == set(summary["train"]["user_id"])
    assert other["validation"]["post_id"] != summary["validation"]["post_id"]


def test_save_to_disk_parquet_and_hub_sources(summary, tmp_path, monkeypatch):
    dataset_dict = _as_dataset_dict()
    dataset_dict.save_to_disk(tmp_path / "saved")
    from_disk = load_summary_preferences(tmp_path / "saved", **SMALL, seed=0)
    (tmp_path / "parquet").mkdir()
    for split in ("train", "validation"):
        dataset_dict[split].to_parquet(str(tmp_path / "parquet" / f"{split}-00000-of-00001.parquet"))
    from_parquet = load_summary_preferences(str(tmp_path / "parquet"), **SMALL, seed=0)

    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name))
        return dataset_dict

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    from_hub = load_summary_preferences(**SMALL, seed=0)
    assert calls == [("openai/summarize_from_feedback", "comparisons")]
    for loaded in (from_disk, from_parquet, from_hub):
        for split in SPLIT_NAMES:
            assert loaded[split].to_dict() == summary[split].to_dict()


def test_bad_sources(tmp_path):
    with pytest.raises(ValueError, match="is not a directory"):
        load_summary_preferences(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="is not a directory"):
        load_summary_preferences("./no/such/folder")
    shutil.copy(FIXTURE_DIR / "train.jsonl", tmp_path / "train.jsonl")
    with pytest.raises(ValueError, match="no files for the 'validation' split"):
        load_summary_preferences(tmp_path)
    datasets.DatasetDict({"train": _as_dataset_dict()["train"]}).save_to_disk(tmp_path / "saved")
    with pytest.raises(ValueError, match=r"no \['validation'\] split"):
        load_summary_preferences(tmp_path / "saved")
    rows = _source_rows("validation")
    rows[4]["summaries"] = rows[4]["summaries"][:1]
    (tmp_path / "validation.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    with pytest.raises(ValueError, match="Row 4 of the 'validation' split: `summaries` must be a list of two"):
        load_summary_preferences(tmp_path, **SMALL)
    rows[4] = {"info": {}, "summaries": _source_rows("validation")[4]["summaries"], "worker": None}
    (tmp_path / "validation.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    with pytest.raises(ValueError, match="Row 4 of the 'validation' split has no `worker`"):
        load_summary_preferences(tmp_path, **SMALL)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_seen_users": 13}, "Only 12 workers .* num_seen_users=13"),
        ({"minority_ranks": (3, 10)}, "minority_ranks.*below num_seen_users=10"),
        ({"minority_ranks": (3, 3)}, "minority_ranks.*distinct"),
        ({"minority_ranks": 3}, "minority_ranks.*sequence"),
        ({"unseen_shots": 6}, "Unseen worker 'u_lima' has 6 labelled comparisons"),
        ({"unseen_minority_workers": ["w_mike"]}, r"unseen_minority_workers.*\['w_mike'\]"),
        ({"unseen_minority_fraction": 1.5}, "unseen_minority_fraction"),
        ({"length_unit": "tokens"}, "length_unit"),
        ({"validation_fraction": 1.0}, "validation_fraction"),
        ({"min_unseen_comparisons": 0}, "min_unseen_comparisons.*>= 1"),
    ],
)
def test_bad_arguments(kwargs, match):
    arguments = {**SMALL, **kwargs}
    with pytest.raises(ValueError, match=match):
        load_summary_preferences(FIXTURE_DIR, **arguments)
