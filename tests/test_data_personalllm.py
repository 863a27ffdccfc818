# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
import logging
from pathlib import Path

import datasets
import numpy as np
import pytest

from pal_rm.data import PERSONALLLM_REWARD_MODELS, SPLIT_NAMES, load_personalllm_preferences

FIXTURE_DIR = Path(__file__).parent / "fixtures" / "personalllm"
SMALL = {
    "num_users": 6,
    "num_unseen_users": 3,
    "pairs_per_user": 8,
    "validation_pairs_per_user": 2,
    "test_pairs_per_user": 4,
    "unseen_shots": 3,
    "unseen_test_pairs": 4,
}


def _source():
    return datasets.load_dataset("parquet", data_dir=str(FIXTURE_DIR / "data"))


def _responses(standardize=True):
    """{prompt_id: {response text: standardised (or raw) score vector}} of the fixture's usable responses."""
    source = _source()
    table = {}
    for split in ("train", "test"):
        for row in source[split]:
            table[row["prompt_id"]] = {}
            for i in range(1, 9):
                scores = [row[f"response_{i}_{rm}"] for rm in PERSONALLLM_REWARD_MODELS]
                if row[f"response_{i}"] and None not in scores:
                    table[row["prompt_id"]][row[f"response_{i}"]] = np.array(scores)
    if standardize:
        train_ids = set(source["train"]["prompt_id"])
        stacked = np.stack([s for pid, responses in table.items() if pid in train_ids for s in responses.values()])
        mean, std = stacked.mean(0), stacked.std(0)
        table = {pid: {text: (s - mean) / std for text, s in responses.items()} for pid, responses in table.items()}
    return table


@pytest.fixture(scope="module")
def personalllm():
    return load_personalllm_preferences(FIXTURE_DIR, **SMALL)


def test_splits_columns_users_and_sizes(personalllm):
    assert tuple(personalllm) == SPLIT_NAMES
    assert personalllm["train"].column_names == [
        "user_id",
        "prompt",
        "chosen",
        "rejected",
        "group",
        "mixture_weights",
        "prompt_id",
        "subset",
        "chosen_model",
        "rejected_model",
        "utility_margin",
    ]
    seen = {f"user_{i:03d}" for i in range(6)}
    unseen = {f"unseen_user_{i:03d}" for i in range(3)}
    for split in ("train", "validation", "test"):
        assert set(personalllm[split]["user_id"]) == seen
    for split in ("unseen_train", "unseen_test"):
        assert set(personalllm[split]["user_id"]) == unseen
    # one comparison per (user, prompt); the fixture's scores have no ties, so only rule 7 removes rows
    assert len(personalllm["train"]) == 6 * 8 and len(personalllm["validation"]) == 6 * 2
    assert len(personalllm["unseen_train"]) == 3 * 3
    assert len(personalllm["test"]) <= 6 * 4 and len(personalllm["unseen_test"]) <= 3 * 4
    for split in SPLIT_NAMES:
        keys = list(zip(personalllm[split]["user_id"], personalllm[split]["prompt_id"]))
        assert len(keys) == len(set(keys))
    weights = np.array(personalllm["train"]["mixture_weights"])
    assert weights.shape[1] == len(PERSONALLLM_REWARD_MODELS) and np.allclose(weights.sum(1), 1)
    assert set(personalllm["train"]["group"]) == {-1}


def test_comparisons_are_each_users_best_and_worst_response(personalllm):
    table = _responses()
    for split in SPLIT_NAMES:
        for row in personalllm[split]:
            responses = table[row["prompt_id"]]
            utility = {text: float(scores @ np.array(row["mixture_weights"])) for text, scores in responses.items()}
            assert row["chosen"] == max(utility, key=utility.get)
            assert row["rejected"] == min(utility, key=utility.get)
            assert row["utility_margin"] == pytest.approx(utility[row["chosen"]] - utility[row["rejected"]])


def test_random_pairs_and_raw_scores():
    dataset = load_personalllm_preferences(FIXTURE_DIR, pairs="random", normalize_scores=False, **SMALL)
    table = _responses(standardize=False)
    for row in dataset["train"]:
        scores = table[row["prompt_id"]]
        weights = np.array(row["mixture_weights"])
        margin = float(scores[row["chosen"]] @ weights - scores[row["rejected"]] @ weights)
        assert margin > 0 and row["utility_margin"] == pytest.approx(margin)
    # random pairs are not all best-vs-worst
    best_worst = load_personalllm_preferences(FIXTURE_DIR, normalize_scores=False, **SMALL)
    assert dataset["train"]["chosen"] != best_worst["train"]["chosen"]


def test_no_prompt_shared_by_training_and_evaluation(personalllm):
    training = set(personalllm["train"]["prompt"]) | set(personalllm["unseen_train"]["prompt"])
    for split in ("validation", "test", "unseen_test"):
        assert not training & set(personalllm[split]["prompt"])
    assert not set(personalllm["validation"]["prompt_id"]) & set(personalllm["train"]["prompt_id"])
    assert set(personalllm["test"]["prompt_id"]) <= set(range(100, 108))  # the Hub `test` split's prompts
    # the fixture's last test prompt repeats a training prompt's text: rule 7 drops it wherever a training split has it
    duplicate = _source()["train"][0]["prompt"]
    if duplicate in training:
        assert 107 not in set(personalllm["test"]["prompt_id"]) | set(personalllm["unseen_test"]["prompt_id"])


def test_unusable_responses_are_left_out_with_a_warning(caplog):
    source = _source()["train"]
    empty, unscored = source[3]["response_5"], source[4]["response_2"]
    assert empty == ""
    with caplog.at_level(logging.WARNING, logger="pal_rm.data.personalllm"):
        dataset = load_personalllm_preferences(FIXTURE_DIR, pairs="random", **{**SMALL, "pairs_per_user": None})
    assert "1 responses with an empty text" in caplog.text
    assert "1 responses with a missing or non-finite score" in caplog.text
    texts = {text for split in SPLIT_NAMES for key in ("chosen", "rejected") for text in dataset[split][key]}
    assert "" not in texts and unscored not in texts
    assert len(dataset["train"]) == 6 * 22  # pairs_per_user=None: every prompt of the training pool (24 - 2)


def test_deterministic_and_seeded(personalllm):
    again = load_personalllm_preferences(FIXTURE_DIR, **SMALL)
    assert all(again[split].to_list() == personalllm[split].to_list() for split in SPLIT_NAMES)
    other = load_personalllm_preferences(FIXTURE_DIR, **SMALL, seed=1)
    assert other["train"].to_list() != personalllm["train"].to_list()


def test_hub_and_save_to_disk_sources_read_the_same(personalllm, tmp_path, monkeypatch):
    _source().save_to_disk(str(tmp_path / "saved"))
    saved = load_personalllm_preferences(tmp_path / "saved", **SMALL)
    calls, source = [], _source()

    def fake_load_dataset(name, *args, **kwargs):
        calls.append(name)
        return source

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    hub = load_personalllm_preferences("namkoong-lab/PersonalLLM", **SMALL)
    assert calls == ["namkoong-lab/PersonalLLM"]
    for split in SPLIT_NAMES:
        assert saved[split].to_list() == personalllm[split].to_list() == hub[split].to_list()


def test_fewer_reward_models():
    dataset = load_personalllm_preferences(FIXTURE_DIR, reward_models=["gemma_2b", "beaver_7b"], **SMALL)
    assert len(dataset["train"][0]["mixture_weights"]) == 2


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="does not exist: pass a Hub dataset id"):
        load_personalllm_preferences(tmp_path / "absent", **SMALL)
    with pytest.raises(ValueError, match="is a file, not a folder"):
        load_personalllm_preferences(FIXTURE_DIR / "README.md", **SMALL)
    with pytest.raises(ValueError, match="no data for the split"):
        load_personalllm_preferences(tmp_path, **SMALL)
    broken = tmp_path / "broken"
    broken.mkdir()
    for split, dataset in _source().items():
        dataset.remove_columns(["response_3_beaver_7b"]).to_json(str(broken / f"{split}.jsonl"))
    with pytest.raises(ValueError, match=r"no \['response_3_beaver_7b'\] column"):
        load_personalllm_preferences(broken, **SMALL)
    with pytest.raises(ValueError, match="`reward_models` must be distinct names"):
        load_personalllm_preferences(FIXTURE_DIR, reward_models=["gpt_judge"], **SMALL)
    with pytest.raises(ValueError, match="`normalize_scores` must be True or False"):
        load_personalllm_preferences(FIXTURE_DIR, normalize_scores="false", **SMALL)
    with pytest.raises(ValueError, match="`pairs` must be one of"):
        load_personalllm_preferences(FIXTURE_DIR, pairs="all", **SMALL)
    with pytest.raises(ValueError, match="`test_pairs_per_user`=9 is more than the 8 prompts"):
        load_personalllm_preferences(FIXTURE_DIR, **{**SMALL, "test_pairs_per_user": 9})
    with pytest.raises(ValueError, match="`dirichlet_alpha` must be a finite number > 0"):
        load_personalllm_preferences(FIXTURE_DIR, dirichlet_alpha=0, **SMALL)
