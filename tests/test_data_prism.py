# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
import json
import logging
from collections import defaultdict
from pathlib import Path

import datasets
import pytest

from pal_rm.data import SPLIT_NAMES, load_prism_preferences
from pal_rm.data._common import round_half_up

FIXTURE_DIR = Path(__file__).parent / "fixtures" / "prism_alignment"
ELIGIBLE = {f"user{i}": 6 if i < 8 else 7 for i in range(10)}  # conversations with a comparison
SEEN_SPLITS, UNSEEN_SPLITS = ("train", "validation", "test"), ("unseen_train", "unseen_test")


def _source_rows():
    return [json.loads(line) for line in (FIXTURE_DIR / "conversations.jsonl").read_text().splitlines()]


def _conversations():
    return {row["conversation_id"]: row for row in _source_rows()}


def _users(dataset, splits):
    return {user for split in splits for user in dataset[split]["user_id"]}


def _rows(dataset, splits=SPLIT_NAMES):
    return [row for split in splits for row in dataset[split].to_list()]


@pytest.fixture(scope="module")
def prism():
    return load_prism_preferences(FIXTURE_DIR, seed=0)


def test_splits_columns_and_users(prism):
    assert tuple(prism) == SPLIT_NAMES
    assert prism["train"].column_names == [
        "user_id",
        "prompt",
        "chosen",
        "rejected",
        "group",
        "conversation_id",
        "turn",
        "conversation_type",
        "chosen_score",
        "rejected_score",
    ]
    seen, unseen = _users(prism, SEEN_SPLITS), _users(prism, UNSEEN_SPLITS)
    assert len(seen) == 8 and len(unseen) == 2 and seen | unseen == set(ELIGIBLE)  # 80% of the 10 eligible users
    for split in SEEN_SPLITS:  # every seen user has conversations in train, validation and test
        assert _users(prism, (split,)) == seen
    for split in UNSEEN_SPLITS:
        assert _users(prism, (split,)) == unseen
    row = prism["train"][0]
    assert (
        row["prompt"][-1]["role"] == "user" and row["chosen"][0]["role"] == row["rejected"][0]["role"] == "assistant"
    )
    assert set(prism["test"]["group"]) == {-1}


def test_split_by_conversation_without_leakage(prism):
    conversations = {split: set(prism[split]["conversation_id"]) for split in SPLIT_NAMES}
    for first in SPLIT_NAMES:
        for second in SPLIT_NAMES:
            if first < second:
                assert conversations[first].isdisjoint(conversations[second]), (first, second)
    assert _users(prism, SEEN_SPLITS).isdisjoint(_users(prism, UNSEEN_SPLITS))
    per_user = defaultdict(lambda: defaultdict(set))
    for split in SPLIT_NAMES:
        for row in prism[split].to_list():
            per_user[row["user_id"]][split].add(row["conversation_id"])
    for user, splits in per_user.items():
        count = ELIGIBLE[user]
        if "train" in splits:  # seen: half the conversations for test, 10% for validation (rounded half up)
            assert len(splits["test"]) == round_half_up(count * 0.5)
            assert len(splits["validation"]) == round_half_up(count * 0.1)
            assert len(splits["train"]) == count - len(splits["test"]) - len(splits["validation"])
        else:
            assert len(splits["unseen_test"]) == round_half_up(count * 0.5)
            assert len(splits["unseen_train"]) == count - len(splits["unseen_test"])


def test_comparisons_follow_the_rules(prism):
    conversations = _conversations()
    for row in _rows(prism):
        source = conversations[row["conversation_id"]]
        assert source["user_id"] == row["user_id"] and source["conversation_type"] == row["conversation_type"]
        history = source["conversation_history"]
        by_turn = defaultdict(list)
        for message in history:
            by_turn[message["turn"]].append(message)
        turn = row["turn"]
        chosen = [m for m in by_turn[turn] if m["role"] == "model" and m["if_chosen"]]
        assert len(chosen) == 1 and row["chosen"] == [{"role": "assistant", "content": chosen[0]["content"]}]
        rejected = [m for m in by_turn[turn] if m["role"] == "model" and m["content"] == row["rejected"][0]["content"]]
        assert len(rejected) == 1 and not rejected[0]["if_chosen"]
        assert row["chosen_score"] == chosen[0]["score"] > row["rejected_score"] == rejected[0]["score"]  # no ties
        # the prompt: the user's messages and the earlier turns' chosen responses, ending with this turn's message
        expected = []
        for earlier in range(turn + 1):
            expected.append(
                {"role": "user", "content": next(m for m in by_turn[earlier] if m["role"] == "user")["content"]}
            )
            if earlier < turn:
                best = next(m for m in by_turn[earlier] if m["role"] == "model" and m["if_chosen"])
                expected.append({"role": "assistant", "content": best["content"]})
        assert row["prompt"] == expected


def test_special_turns(prism, caplog):
    rows = _rows(prism)

    def count(conversation_id, turn=0):
        return sum(row["conversation_id"] == conversation_id and row["turn"] == turn for row in rows)

    assert count("c0") == 2  # 4 responses, one tied with the chosen one: dropped
    assert count("c6") == 2  # one response scored above the chosen one: dropped
    assert count("c18") == 2  # one response identical to the chosen one: dropped
    assert count("c12") == 3 and count("c12", 1) == count("c12", 2) == 0  # no chosen response in turn 1
    assert "user10" not in _users(prism, SPLIT_NAMES) and "user11" not in _users(prism, SPLIT_NAMES)
    with caplog.at_level(logging.INFO, logger="pal_rm.data.prism"):
        kept = load_prism_preferences(FIXTURE_DIR, drop_ties=False, seed=0)
    assert "1 responses are scored above the response marked `if_chosen` of their turn: dropped." in caplog.text
    assert "'ties': 4" in caplog.text and "'response identical to the chosen one': 1" in caplog.text
    kept_rows = _rows(kept)
    ties = [row for row in kept_rows if row["chosen_score"] == row["rejected_score"]]
    assert {row["conversation_id"] for row in ties} == {"c0", "c67"} and len(ties) == 4
    assert "user11" in _users(kept, SPLIT_NAMES)  # its only-ties conversation now counts: 6 conversations


def test_unseen_shots_and_fractions():
    capped = load_prism_preferences(FIXTURE_DIR, unseen_shots=2, seed=0)
    full = load_prism_preferences(FIXTURE_DIR, seed=0)
    for user in _users(full, UNSEEN_SPLITS):
        assert capped["unseen_train"]["user_id"].count(user) == 2
    assert capped["unseen_test"].to_dict() == full["unseen_test"].to_dict()
    shot_rows = {
        (row["conversation_id"], row["turn"], row["rejected"][0]["content"]) for row in _rows(full, ("unseen_train",))
    }
    assert {
        (row["conversation_id"], row["turn"], row["rejected"][0]["content"])
        for row in _rows(capped, ("unseen_train",))
    } <= shot_rows
    lore = load_prism_preferences(FIXTURE_DIR, validation_fraction=0.0, seed=0)  # LoRe: no validation split
    assert lore["validation"].num_rows == 0 and lore["test"].to_dict() == full["test"].to_dict()
    everyone = load_prism_preferences(FIXTURE_DIR, seen_fraction=1.0, seed=0)
    assert everyone["unseen_test"].num_rows == 0 and _users(everyone, ("train",)) == set(ELIGIBLE)


def test_deterministic_given_seed(prism):
    again = load_prism_preferences(FIXTURE_DIR, seed=0)
    for split in SPLIT_NAMES:
        assert again[split].to_dict() == prism[split].to_dict()
    other = load_prism_preferences(FIXTURE_DIR, seed=1)
    assert sum(map(len, (other[split]["user_id"] for split in SPLIT_NAMES))) == sum(
        map(len, (prism[split]["user_id"] for split in SPLIT_NAMES))
    )  # the same comparisons, split otherwise
    assert any(other[split].to_dict() != prism[split].to_dict() for split in SPLIT_NAMES)


def test_sources(prism, tmp_path, monkeypatch):
    dataset = datasets.Dataset.from_list(_source_rows())  # missing message keys become None, as on the Hub
    datasets.DatasetDict({"train": dataset}).save_to_disk(tmp_path / "saved")
    dataset.to_parquet(str(tmp_path / "conversations-00000-of-00001.parquet"))
    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name))
        return datasets.DatasetDict({"train": dataset})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    for source in (
        tmp_path / "saved",
        tmp_path,
        FIXTURE_DIR / "conversations.jsonl",
        "HannahRoseKirk/prism-alignment",
    ):
        loaded = load_prism_preferences(source, seed=0)
        for split in SPLIT_NAMES:
            assert loaded[split].to_dict() == prism[split].to_dict(), (source, split)
    assert calls == [("HannahRoseKirk/prism-alignment", "conversations")]


def test_bad_sources(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_prism_preferences("./no/such/folder")
    with pytest.raises(ValueError, match="has no `conversations` data"):
        load_prism_preferences(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not a .jsonl, .json or .parquet file"):
        load_prism_preferences(tmp_path / "notes.txt")
    datasets.Dataset.from_list(_source_rows()).remove_columns("user_id").save_to_disk(tmp_path / "no_user")
    with pytest.raises(ValueError, match=r"no \['user_id'\] column.*`conversations` config"):
        load_prism_preferences(tmp_path / "no_user")

    def write(rows):
        (tmp_path / "conversations.jsonl").write_text("\n".join(json.dumps(row) for row in rows))

    rows = _source_rows()
    del rows[2]["conversation_history"]
    write(rows)
    with pytest.raises(ValueError, match=r"Conversation row 2 of .* has no \['conversation_history'\] column"):
        load_prism_preferences(tmp_path)
    rows = _source_rows()
    rows[4]["conversation_history"][1]["score"] = None
    write(rows)
    with pytest.raises(
        ValueError, match=r"Conversation 'c\d+' \(row 4\), `conversation_history\[1\]`: .* finite `score`"
    ):
        load_prism_preferences(tmp_path)
    rows = _source_rows()
    rows[5]["conversation_history"][0]["role"] = "assistant"
    write(rows)
    with pytest.raises(ValueError, match=r"`role` must be 'user' or 'model', got 'assistant'"):
        load_prism_preferences(tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"seen_fraction": 0}, "seen_fraction"),
        ({"seen_fraction": 0.05}, "10 participants have >= 6 .* leaves no seen user"),
        ({"min_conversations": 8}, "0 participants have >= 8"),
        ({"min_conversations": 0}, "min_conversations.*>= 1"),
        ({"min_conversations": 1}, "`min_conversations`=1 is too small"),
        ({"test_fraction": 0.0}, "test_fraction"),
        ({"test_fraction": 0.6, "validation_fraction": 0.4}, "must be < 1"),
        ({"min_conversations": 2, "validation_fraction": 0.3}, "`min_conversations`=2 is too small"),
        ({"unseen_shots": 0}, "unseen_shots.*>= 1"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_prism_preferences(FIXTURE_DIR, **kwargs)


def test_evaluation_prompts_are_never_training_prompts(tmp_path, caplog):
    rows = _source_rows()
    for row in rows:  # every participant opens with the same message
        row["opening_prompt"] = row["conversation_history"][0]["content"] = "Hello"
    (tmp_path / "conversations.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    with caplog.at_level(logging.INFO, logger="pal_rm.data"):
        dataset = load_prism_preferences(tmp_path, seed=0)
    assert "test comparisons have a training prompt: dropped." in caplog.text
    assert any(turn == 0 for turn in dataset["train"]["turn"])
    for split in ("validation", "test", "unseen_test"):
        assert all(turn > 0 for turn in dataset[split]["turn"]), split
