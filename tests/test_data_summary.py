# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
import json
import logging
import shutil
from collections import Counter
from pathlib import Path

import datasets
import pytest

from pal_rm.data import SPLIT_NAMES, SUMMARY_GROUPS, load_summary_lore_preferences, load_summary_preferences

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


# ---------------------------------------------------------------------------------------------------------------
# LoRe protocol: the workers' real choices

LORE_DIR = Path(__file__).parent / "fixtures" / "summarize_from_feedback_lore"
LORE_USERS = {"w_alpha", "w_bravo", "w_charlie", "w_delta", "w_echo", "w_foxtrot", "w_golf", "w_hotel"}
# usable comparisons per user: (HF train, HF validation) after dropping identical summaries, CNN/DM rows and
# validation rows on train posts
LORE_COUNTS = {
    "w_alpha": (9, 3),
    "w_bravo": (8, 3),
    "w_charlie": (7, 3),
    "w_delta": (6, 3),
    "w_echo": (6, 3),
    "w_foxtrot": (5, 3),
    "w_golf": (4, 2),
    "w_hotel": (3, 2),
}
LORE_SMALL = {"seen_train_comparisons": 5, "unseen_shots": 3}


def _lore_rows(split):
    return [json.loads(line) for line in (LORE_DIR / f"{split}.jsonl").read_text().splitlines()]


def _users(dataset, splits):
    return {user for split in splits for user in dataset[split]["user_id"]}


@pytest.fixture(scope="module")
def lore():
    return load_summary_lore_preferences(LORE_DIR, **LORE_SMALL, seed=0)


def test_lore_users_and_sizes(lore):
    assert tuple(lore) == SPLIT_NAMES
    assert lore["train"].column_names == ["user_id", "prompt", "chosen", "rejected", "group", "post_id"]
    seen, unseen = _users(lore, ("train", "validation", "test")), _users(lore, ("unseen_train", "unseen_test"))
    assert len(seen) == len(unseen) == 4 and seen | unseen == LORE_USERS  # half of the 8 workers of both splits
    assert _users(lore, ("train",)) == seen and _users(lore, ("unseen_train",)) == unseen
    assert set(lore["train"]["group"]) == {-1}
    for user in seen:  # at most 5 drawn train comparisons (train + validation); every validation comparison in test
        drawn = lore["train"]["user_id"].count(user) + lore["validation"]["user_id"].count(user)
        assert drawn == min(LORE_COUNTS[user][0], 5)
        assert lore["test"]["user_id"].count(user) == LORE_COUNTS[user][1]
    for user in unseen:
        assert 1 <= lore["unseen_train"]["user_id"].count(user) <= 3
        assert lore["unseen_test"]["user_id"].count(user) == LORE_COUNTS[user][1]


def test_lore_labels_are_the_workers_choices(lore):
    sources = {}
    for split in ("train", "validation"):
        for row in _lore_rows(split):
            texts = [s["text"].strip() for s in row["summaries"]]
            if texts[0] != texts[1]:
                sources[(row["worker"], row["info"]["id"])] = (texts, row["choice"])
    for split in SPLIT_NAMES:
        for row in lore[split].to_list():
            texts, choice = sources[(row["user_id"], row["post_id"])]
            assert row["chosen"] == " " + texts[choice] and row["rejected"] == " " + texts[1 - choice]
            assert row["prompt"].startswith("SUBREDDIT: r/") and row["prompt"].endswith("\nTL;DR:")
    # no policy filter: ppo, ref and pretrain summaries are kept
    policies = {s["policy"] for row in _lore_rows("train") for s in row["summaries"]}
    kept = {post_id for split in ("train", "validation") for post_id in lore[split]["post_id"]}
    ppo_posts = {r["info"]["id"] for r in _lore_rows("train") if any("ppo" in s["policy"] for s in r["summaries"])}
    assert {"ref", "ppo_xl_rm4_kl0.05"} <= policies and kept & ppo_posts


def test_lore_no_prompt_or_user_leakage(lore):
    training = {prompt for split in ("train", "unseen_train") for prompt in lore[split]["prompt"]}
    for split in ("validation", "test", "unseen_test"):
        assert training.isdisjoint(lore[split]["prompt"]), split
    assert _users(lore, ("train", "validation", "test")).isdisjoint(_users(lore, ("unseen_train", "unseen_test")))
    train_ids = {row["info"]["id"] for row in _lore_rows("train")}
    assert set(lore["test"]["post_id"]) | set(lore["unseen_test"]["post_id"]) <= {
        row["info"]["id"] for row in _lore_rows("validation")
    }
    assert set(lore["train"]["post_id"]) | set(lore["unseen_train"]["post_id"]) <= train_ids


def test_lore_dropped_rows_are_counted(caplog):
    with caplog.at_level(logging.INFO, logger="pal_rm.data.summary"):
        dataset = load_summary_lore_preferences(LORE_DIR, **LORE_SMALL, seed=0)
    assert "'identical summaries': 1" in caplog.text
    assert "'no post': 3" in caplog.text and "'post also in the train split': 1" in caplog.text
    assert "1 HF-validation comparisons are on posts of the HF train split: dropped." in caplog.text
    assert not _users(dataset, SPLIT_NAMES) & {"t_only", "v_only", "w_cnn"}


def test_lore_validation_split_and_caps():
    exact = load_summary_lore_preferences(LORE_DIR, validation_fraction=0.0, seed=0)  # LoRe's own defaults: 150 / 50
    assert exact["validation"].num_rows == 0
    for user in _users(exact, ("train",)):
        assert exact["train"]["user_id"].count(user) == LORE_COUNTS[user][0]
    for user in _users(exact, ("unseen_train",)):
        assert exact["unseen_train"]["user_id"].count(user) == LORE_COUNTS[user][0]
    # most posts in validation: posts a user cannot do without move back to training
    heavy = load_summary_lore_preferences(LORE_DIR, **LORE_SMALL, validation_fraction=0.9, seed=0)
    assert _users(heavy, ("train",)) == _users(heavy, ("test",))
    assert _users(heavy, ("unseen_train",)) == _users(heavy, ("unseen_test",))
    assert set(heavy["train"]["prompt"]).isdisjoint(heavy["validation"]["prompt"])
    everyone = load_summary_lore_preferences(LORE_DIR, seen_fraction=1.0, seed=0)
    assert everyone["unseen_train"].num_rows == 0 and _users(everyone, ("train",)) == LORE_USERS


def test_lore_deterministic_given_seed(lore):
    again = load_summary_lore_preferences(LORE_DIR, **LORE_SMALL, seed=0)
    for split in SPLIT_NAMES:
        assert again[split].to_dict() == lore[split].to_dict()
    other = load_summary_lore_preferences(LORE_DIR, **LORE_SMALL, seed=1)
    assert any(other[split].to_dict() != lore[split].to_dict() for split in SPLIT_NAMES)


def test_lore_sources(lore, tmp_path, monkeypatch):
    dataset_dict = datasets.DatasetDict(
        {split: datasets.Dataset.from_list(_lore_rows(split)) for split in ("train", "validation")}
    )
    dataset_dict.save_to_disk(tmp_path / "saved")
    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name))
        return dataset_dict

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    for loaded in (
        load_summary_lore_preferences(tmp_path / "saved", **LORE_SMALL, seed=0),
        load_summary_lore_preferences(**LORE_SMALL, seed=0),
    ):
        for split in SPLIT_NAMES:
            assert loaded[split].to_dict() == lore[split].to_dict()
    assert calls == [("openai/summarize_from_feedback", "comparisons")]
    datasets.DatasetDict({split: dataset_dict[split].remove_columns("choice") for split in dataset_dict}).save_to_disk(
        tmp_path / "no_choice"
    )
    with pytest.raises(ValueError, match=r"no \['choice'\] column"):
        load_summary_lore_preferences(tmp_path / "no_choice")
    rows = _lore_rows("train")
    rows[3]["choice"] = 2
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    shutil.copy(LORE_DIR / "validation.jsonl", tmp_path / "validation.jsonl")
    with pytest.raises(ValueError, match=r"Row 3 of the 'train' split: `choice` .* must be 0 or 1, got 2"):
        load_summary_lore_preferences(tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"seen_fraction": 0.0}, "seen_fraction"),
        ({"seen_fraction": 1.5}, "seen_fraction"),
        ({"seen_fraction": 0.1}, "8 workers have .* leaves no seen user"),
        ({"min_test_comparisons": 4}, "0 workers have >= 1 train and >= 4 validation"),
        ({"seen_train_comparisons": 0}, "seen_train_comparisons.*>= 1"),
        ({"unseen_shots": 0}, "unseen_shots.*>= 1"),
        ({"validation_fraction": 1.0}, "validation_fraction"),
        ({"seed": -1}, "seed"),
    ],
)
def test_lore_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_summary_lore_preferences(LORE_DIR, **kwargs)
