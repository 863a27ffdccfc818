# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
import json
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from pal_rm.data import DEFAULT_PERSONAS, SPLIT_NAMES, available_personas, load_persona_preferences

FIXTURE_DIR = Path(__file__).parent / "fixtures" / "persona"
PERSONAS = ["enjoys-cooking", "night-owl", "early-bird", "loves-dogs"]
REAL_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "anthropic-persona"
SMALL = {"personas": PERSONAS, "num_groups": 3, "users_per_group": 3, "pairs_per_user": 20}
UNSEEN = {"num_unseen_users": 4, "unseen_shots": 10, "unseen_test_pairs": 10}


def _matching_answers():
    answers = {}
    for persona in PERSONAS:
        for line in (FIXTURE_DIR / f"{persona}.jsonl").read_text().splitlines():
            record = json.loads(line)
            answers[persona, record["statement"]] = record["answer_matching_behavior"]
    return answers


@pytest.fixture(scope="module")
def persona():
    return load_persona_preferences(FIXTURE_DIR, **SMALL, **UNSEEN, seed=0)


def test_splits_columns_and_sizes(persona):
    assert tuple(persona) == SPLIT_NAMES
    sizes = {split: persona[split].num_rows for split in SPLIT_NAMES}
    # 9 seen users x (14 / 2 / 4); 4 unseen users x (10 / 10)
    assert sizes == {"train": 126, "validation": 18, "test": 36, "unseen_train": 40, "unseen_test": 40}
    for split in SPLIT_NAMES:
        assert {"user_id", "prompt", "chosen", "rejected", "group", "persona", "statement"} <= set(
            persona[split].column_names
        )
    row = persona["train"][0]
    assert {row["chosen"], row["rejected"]} == {" Yes", " No"}
    assert row["prompt"].startswith("Is the following statement something you would say?")
    assert row["statement"] in row["prompt"]


def test_deterministic_given_seed(persona):
    again = load_persona_preferences(FIXTURE_DIR, **SMALL, **UNSEEN, seed=0)
    for split in SPLIT_NAMES:
        assert again[split].to_dict() == persona[split].to_dict()
    other = load_persona_preferences(FIXTURE_DIR, **SMALL, **UNSEEN, seed=1)
    assert other["train"]["statement"] != persona["train"]["statement"]


def test_no_statement_leaks_between_pools(persona):
    train = set(persona["train"]["statement"]) | set(persona["unseen_train"]["statement"])
    validation = set(persona["validation"]["statement"])
    test = set(persona["test"]["statement"]) | set(persona["unseen_test"]["statement"])
    assert train and validation and test
    assert train.isdisjoint(test)
    assert train.isdisjoint(validation)
    assert validation.isdisjoint(test)


def test_each_users_comparisons_are_distinct_statements(persona):
    for split in SPLIT_NAMES:
        seen = defaultdict(set)
        for row in persona[split].to_list():
            key = (row["persona"], row["statement"])
            assert key not in seen[row["user_id"]]
            seen[row["user_id"]].add(key)


def test_pure_groups_prefer_matching_answers_for_the_personas_they_hold(persona):
    answers = _matching_answers()
    holds = {}
    for row in (row for split in SPLIT_NAMES for row in persona[split].to_list()):
        matching = answers[row["persona"], row["statement"]]
        assert row["chosen_matches_behavior"] == (row["chosen"] == matching)
        assert row["rejected"] != row["chosen"]
        # one rule per (group, persona)
        assert (
            holds.setdefault((row["group"], row["persona"]), row["chosen_matches_behavior"])
            == row["chosen_matches_behavior"]
        )
    groups = {group: frozenset(p for (g, p), held in holds.items() if g == group and held) for group in range(3)}
    assert all(len(held) == 2 for held in groups.values())  # a distinct half of the four personas each
    assert len(set(groups.values())) == 3


def test_explicit_group_personas_and_weighted_mixtures():
    group_personas = [["enjoys-cooking", "night-owl"], ["early-bird"], ["loves-dogs", "night-owl", "early-bird"]]
    dataset = load_persona_preferences(
        FIXTURE_DIR, **SMALL, **UNSEEN, group_personas=group_personas, mixture_users=True, seed=5
    )
    for split in SPLIT_NAMES:
        for row in dataset[split].to_list():
            assert row["group"] == -1
            weights = np.asarray(row["mixture_weights"])
            assert np.isclose(weights.sum(), 1.0)
            holding = sum(w for w, held in zip(weights, group_personas) if row["persona"] in held)
            assert row["chosen_matches_behavior"] == (holding >= 0.5)


def test_sampled_mixtures_follow_one_group_per_comparison():
    def agreement_with_weighted_rule(dirichlet_alpha):
        group_personas = [["enjoys-cooking", "night-owl"], ["early-bird", "loves-dogs"], ["night-owl", "loves-dogs"]]
        dataset = load_persona_preferences(
            FIXTURE_DIR,
            **SMALL,
            group_personas=group_personas,
            mixture_users=True,
            mixture_rule="sampled",
            dirichlet_alpha=dirichlet_alpha,
            num_unseen_users=0,
            seed=0,
        )
        rows = dataset["train"].to_list()
        weighted = [
            sum(w for w, held in zip(row["mixture_weights"], group_personas) if row["persona"] in held) >= 0.5
            for row in rows
        ]
        return np.mean([row["chosen_matches_behavior"] == label for row, label in zip(rows, weighted)])

    # near one-hot weights: sampling a group almost always gives the dominant group's answer
    assert agreement_with_weighted_rule(0.05) > 0.9
    # spread weights: sampling often disagrees with the weighted majority
    assert agreement_with_weighted_rule(5.0) < 0.9


def test_statement_shared_by_two_personas_stays_in_one_pool():
    dataset = load_persona_preferences(
        FIXTURE_DIR, **SMALL, num_unseen_users=2, unseen_shots=40, unseen_test_pairs=20, seed=0
    )
    pool_of = {}
    for split, pool in (("train", "train"), ("unseen_train", "train"), ("test", "test"), ("unseen_test", "test")):
        for statement in dataset[split]["statement"]:
            assert pool_of.setdefault(statement, pool) == pool
    shared = {"I do my best work after midnight on weekdays", "I go to bed before ten most of the time"}
    assert shared & set(pool_of)


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        load_persona_preferences(tmp_path / "missing")
    with pytest.raises(ValueError, match="no `.jsonl` files"):
        load_persona_preferences(tmp_path)
    with pytest.raises(ValueError, match=r"does-not-exist.*Available personas include \['early-bird'"):
        load_persona_preferences(FIXTURE_DIR, personas=["night-owl", "does-not-exist"])
    with pytest.raises(ValueError, match="agreeableness"):  # the default personas are not in the fixture
        load_persona_preferences(FIXTURE_DIR)
    with pytest.raises(ValueError, match="non-empty list"):
        load_persona_preferences(FIXTURE_DIR, personas="night-owl")
    with pytest.raises(ValueError, match="twice"):
        load_persona_preferences(FIXTURE_DIR, personas=["night-owl", "night-owl"])
    with pytest.raises(ValueError, match="6 distinct halves, too few for num_groups=7"):
        load_persona_preferences(FIXTURE_DIR, personas=PERSONAS, num_groups=7)
    with pytest.raises(ValueError, match="same personas"):
        load_persona_preferences(FIXTURE_DIR, personas=PERSONAS, num_groups=2, group_personas=[["night-owl"]] * 2)
    with pytest.raises(ValueError, match="one collection of persona names per group"):
        load_persona_preferences(FIXTURE_DIR, personas=PERSONAS, num_groups=2, group_personas=[["night-owl"]])
    with pytest.raises(ValueError, match=r"names \['cats'\]"):
        load_persona_preferences(FIXTURE_DIR, personas=PERSONAS, num_groups=1, group_personas=[["cats"]])
    with pytest.raises(ValueError, match="train statement pool holds .* fewer than the 140"):
        load_persona_preferences(FIXTURE_DIR, personas=PERSONAS, pairs_per_user=200)
    with pytest.raises(ValueError, match="mixture_rule"):
        load_persona_preferences(FIXTURE_DIR, personas=PERSONAS, mixture_rule="random")
    with pytest.raises(ValueError, match="users_per_group"):
        load_persona_preferences(FIXTURE_DIR, personas=PERSONAS, users_per_group=0)


def test_malformed_files(tmp_path):
    shutil.copy(FIXTURE_DIR / "night-owl.jsonl", tmp_path / "night-owl.jsonl")
    lines = (FIXTURE_DIR / "loves-dogs.jsonl").read_text().splitlines()
    (tmp_path / "loves-dogs.jsonl").write_text("\n".join([lines[0], "{not json", *lines[2:]]) + "\n")
    with pytest.raises(ValueError, match=r"loves-dogs.jsonl, line 2: not valid JSON"):
        load_persona_preferences(tmp_path, personas=["night-owl", "loves-dogs"], num_groups=2)
    record = json.loads(lines[0])
    del record["statement"]
    (tmp_path / "loves-dogs.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=r"line 1: `statement` must be a non-empty string"):
        load_persona_preferences(tmp_path, personas=["night-owl", "loves-dogs"], num_groups=2)


@pytest.mark.skipif(not REAL_DATA_DIR.is_dir(), reason="the Anthropic persona files are not beside the project")
def test_real_persona_files():
    dataset = load_persona_preferences(REAL_DATA_DIR, seed=0)
    sizes = {split: dataset[split].num_rows for split in SPLIT_NAMES}
    assert sizes == {"train": 1400, "validation": 200, "test": 400, "unseen_train": 1000, "unseen_test": 1000}
    assert set(dataset["train"]["persona"]) == set(DEFAULT_PERSONAS)
    train = set(dataset["train"]["statement"]) | set(dataset["unseen_train"]["statement"])
    assert train.isdisjoint(set(dataset["test"]["statement"]) | set(dataset["unseen_test"]["statement"]))


def test_available_personas_lists_the_folder():
    assert available_personas(FIXTURE_DIR) == ["early-bird", "enjoys-cooking", "loves-dogs", "night-owl"]
