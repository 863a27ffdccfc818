# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
import numpy as np
import pytest

from pal_rm.data import DEMO_GROUP_PREFERENCES, DEMO_PROPERTIES, SPLIT_NAMES, load_demo_preferences

TEXT_COLUMNS = ("user_id", "prompt", "chosen", "rejected", "group")


@pytest.fixture(scope="module")
def demo():
    return load_demo_preferences(seed=0)


def _rows(dataset_dict, *splits):
    return [row for split in splits for row in dataset_dict[split].to_list()]


def test_splits_columns_and_default_sizes(demo):
    assert tuple(demo) == SPLIT_NAMES
    sizes = {split: demo[split].num_rows for split in SPLIT_NAMES}
    # 28 seen users x (42 / 6 / 12) comparisons; 8 unseen users x (20 / 40)
    assert sizes == {"train": 1176, "validation": 168, "test": 336, "unseen_train": 160, "unseen_test": 320}
    for split in SPLIT_NAMES:
        assert set(TEXT_COLUMNS) <= set(demo[split].column_names)
    assert len(set(demo["train"]["user_id"])) == 28
    row = demo["train"][0]
    assert isinstance(row["user_id"], str) and isinstance(row["group"], int)
    assert all(isinstance(row[name], str) and row[name] for name in ("prompt", "chosen", "rejected"))


def test_deterministic_given_seed(demo):
    again = load_demo_preferences(seed=0)
    other = load_demo_preferences(seed=1)
    for split in SPLIT_NAMES:
        assert again[split].to_dict() == demo[split].to_dict()
    assert other["train"]["chosen"] != demo["train"]["chosen"]


def test_unseen_users_do_not_change_seen_data(demo):
    fewer_unseen = load_demo_preferences(seed=0, num_unseen_users=2)
    assert fewer_unseen["train"].to_dict() == demo["train"].to_dict()
    assert fewer_unseen["unseen_train"].num_rows == 2 * 20


def test_topic_pools_and_texts_do_not_leak(demo):
    train_topics = set(demo["train"]["topic"]) | set(demo["unseen_train"]["topic"])
    validation_topics = set(demo["validation"]["topic"])
    test_topics = set(demo["test"]["topic"]) | set(demo["unseen_test"]["topic"])
    assert train_topics.isdisjoint(test_topics)
    assert train_topics.isdisjoint(validation_topics)
    assert validation_topics.isdisjoint(test_topics)
    train_texts = {text for row in _rows(demo, "train", "unseen_train") for text in (row["prompt"], row["chosen"])}
    for row in _rows(demo, "validation", "test", "unseen_test"):
        assert row["prompt"] not in train_texts and row["chosen"] not in train_texts


def test_responses_come_from_a_shared_pool(demo):
    rows = _rows(demo, *SPLIT_NAMES)
    responses = {text for row in rows for text in (row["chosen"], row["rejected"])}
    assert len(responses) <= 48 * 16 * 3
    users_of = {}
    for row in rows:
        for text in (row["chosen"], row["rejected"]):
            users_of.setdefault(text, set()).add(row["user_id"])
    # notes recur across users, so different users judge the same responses
    assert sum(len(users) > 1 for users in users_of.values()) > len(responses) // 2


def test_pure_groups_follow_their_key_property_and_disagree(demo):
    rows = _rows(demo, *SPLIT_NAMES)
    by_group = {group: [row for row in rows if row["group"] == group] for group in range(4)}
    assert all(by_group[group] for group in range(4))
    # every pair a pure member sees differs in the key property, and the member picks the preferred side
    assert all(row["chosen_formal"] and not row["rejected_formal"] for row in by_group[0])
    assert all(not row["chosen_formal"] and row["rejected_formal"] for row in by_group[1])
    assert all(row["chosen_bulleted"] and not row["rejected_bulleted"] for row in by_group[2])
    assert all(not row["chosen_long"] and row["rejected_long"] for row in by_group[3])
    # one reward for everyone cannot fit: the same kind of pair (formal vs casual, other properties equal) is
    # decided in opposite ways by groups 0 and 1
    same_rest = [name for name in DEMO_PROPERTIES if name != "formal"]

    def formal_vs_casual(row):
        return row["chosen_formal"] != row["rejected_formal"] and all(
            row[f"chosen_{n}"] == row[f"rejected_{n}"] for n in same_rest
        )

    assert {row["chosen_formal"] for row in by_group[0] if formal_vs_casual(row)} == {True}
    assert {row["chosen_formal"] for row in by_group[1] if formal_vs_casual(row)} == {False}


def test_property_flags_are_measurable_in_the_text(demo):
    for row in _rows(demo, "train", "test"):
        for side in ("chosen", "rejected"):
            text = row[side]
            assert ("\n- " in text) == row[f"{side}_bulleted"]
            assert ("!" in text) == row[f"{side}_enthusiastic"]
            assert text[0].isupper() == row[f"{side}_formal"]
            # length is measurable on its own: short notes have at most 23 words, long ones 24 to 45
            words = len(text.split())
            assert 24 <= words <= 45 if row[f"{side}_long"] else words <= 23
        if row["chosen_long"] != row["rejected_long"]:
            longer, shorter = ("chosen", "rejected") if row["chosen_long"] else ("rejected", "chosen")
            assert len(row[longer].split()) > len(row[shorter].split())
        assert row["chosen"] != row["rejected"]


def test_labels_follow_the_users_utility(demo):
    weight_matrix = np.array(
        [[DEMO_GROUP_PREFERENCES[group]["weights"][name] for name in DEMO_PROPERTIES] for group in range(4)]
    )
    mixture_rows = 0
    for row in _rows(demo, *SPLIT_NAMES):
        weights = np.asarray(row["mixture_weights"])
        assert weights.shape == (4,) and np.isclose(weights.sum(), 1.0) and (weights >= 0).all()
        if row["group"] >= 0:
            assert weights[row["group"]] == 1.0
        else:
            mixture_rows += 1
        utility = weights @ weight_matrix
        chosen = np.array([1.0 if row[f"chosen_{name}"] else -1.0 for name in DEMO_PROPERTIES])
        rejected = np.array([1.0 if row[f"rejected_{name}"] else -1.0 for name in DEMO_PROPERTIES])
        margin = (chosen - rejected) @ utility
        assert margin > 0
        assert np.isclose(margin, row["utility_margin"])
    assert mixture_rows == 4 * 60 + 60  # 4 seen mixture users, 1 unseen mixture user (20 + 40)


def test_unseen_users(demo):
    seen = set(demo["train"]["user_id"])
    unseen_train, unseen_test = demo["unseen_train"].to_list(), demo["unseen_test"].to_list()
    users = {row["user_id"] for row in unseen_train}
    assert len(users) == 8 and users.isdisjoint(seen)
    assert users == {row["user_id"] for row in unseen_test}
    for user in users:
        assert sum(row["user_id"] == user for row in unseen_train) == 20
        assert sum(row["user_id"] == user for row in unseen_test) == 40
    groups = {row["user_id"]: row["group"] for row in unseen_train}
    # the seen share of mixture users (4 / 28) gives 1 of 8; the pure ones cycle through the groups
    assert sorted(groups.values()) == [-1, 0, 0, 1, 1, 2, 2, 3]


def test_fewer_groups_and_empty_unseen_splits():
    dataset = load_demo_preferences(num_groups=2, users_per_group=2, num_mixture_users=1, num_unseen_users=0, seed=3)
    assert set(dataset["train"]["group"]) == {-1, 0, 1}
    assert all(len(weights) == 2 for weights in dataset["train"]["mixture_weights"])
    assert dataset["unseen_train"].num_rows == 0 and dataset["unseen_test"].num_rows == 0
    assert dataset["unseen_test"].column_names == dataset["train"].column_names


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_groups": 5}, "num_groups.*at most 4"),
        ({"num_groups": 0}, "num_groups.*>= 1"),
        ({"pairs_per_user": 0}, "pairs_per_user.*>= 1"),
        ({"users_per_group": 0, "num_mixture_users": 0}, "no seen users"),
        ({"validation_fraction": 0.5, "test_fraction": 0.5}, "must be < 1"),
        ({"test_fraction": 1.5}, r"test_fraction.*\[0, 1\)"),
        ({"pairs_per_user": 2}, "pairs_per_user.*too small"),
        ({"test_fraction": 0.0}, "test_fraction"),
        ({"dirichlet_alpha": 0}, "dirichlet_alpha.*> 0"),
        ({"variants_per_style": 0}, "variants_per_style.*>= 1"),
        ({"seed": -1}, "seed.*non-negative"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_demo_preferences(**kwargs)
