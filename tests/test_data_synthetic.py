# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
import math

import numpy as np
import pytest

from pal_rm.data import SPLIT_NAMES, bayes_optimal_accuracy, load_synthetic_preferences


@pytest.fixture(scope="module")
def synthetic():
    return load_synthetic_preferences(seed=0)


def _arrays(dataset):
    """Columns as numpy arrays, keeping float64 (the numpy format of datasets casts floats to float32)."""
    arrays = {name: np.asarray(values) for name, values in dataset.to_dict().items()}
    for name in ("chosen_features", "rejected_features"):
        arrays[name] = arrays[name].astype(np.float32).reshape(len(dataset), -1)
    return arrays


def test_splits_columns_and_default_sizes(synthetic):
    assert tuple(synthetic) == SPLIT_NAMES
    sizes = {split: synthetic[split].num_rows for split in SPLIT_NAMES}
    # 150 seen users x (35 / 5 / 10); 30 unseen users x (20 / 50)
    assert sizes == {"train": 5250, "validation": 750, "test": 1500, "unseen_train": 600, "unseen_test": 1500}
    expected = {"user_id", "chosen_features", "rejected_features", "group", "mixture_weights", "true_margin"}
    assert expected <= set(synthetic["train"].column_names)
    arrays = _arrays(synthetic["test"])
    assert arrays["chosen_features"].shape == (1500, 16)
    assert synthetic["test"].with_format("numpy")[:2]["chosen_features"].shape == (2, 16)
    assert set(np.unique(arrays["group"])) == {0, 1, 2}
    assert len(set(synthetic["unseen_train"]["user_id"]) & set(synthetic["train"]["user_id"])) == 0


def test_user_ids_have_the_loaders_shared_format(synthetic):
    """Simulated users are `user_000`, ... and `unseen_user_000`, ..., as in the demo and persona loaders."""
    assert list(dict.fromkeys(synthetic["train"]["user_id"])) == [f"user_{index:03d}" for index in range(150)]
    assert list(dict.fromkeys(synthetic["unseen_test"]["user_id"])) == [
        f"unseen_user_{index:03d}" for index in range(30)
    ]


def test_deterministic_given_seed(synthetic):
    again = load_synthetic_preferences(seed=0)
    for split in SPLIT_NAMES:
        np.testing.assert_array_equal(
            _arrays(again[split])["chosen_features"], _arrays(synthetic[split])["chosen_features"]
        )
        assert again[split]["true_margin"] == synthetic[split]["true_margin"]
    other = load_synthetic_preferences(seed=1, num_unseen_users=0)
    assert not np.array_equal(
        _arrays(other["train"])["chosen_features"], _arrays(synthetic["train"])["chosen_features"]
    )
    # the unseen users do not change the seen users' data
    np.testing.assert_array_equal(
        _arrays(load_synthetic_preferences(seed=0, num_unseen_users=0)["train"])["true_margin"],
        _arrays(synthetic["train"])["true_margin"],
    )


def test_margins_come_from_one_ideal_point_per_group(synthetic):
    """r(x) = -||x - a||^2 / T: the margins of a group are linear in the features with one shared ideal point."""
    temperature = math.sqrt(16)
    arrays = _arrays(synthetic["train"])
    chosen = arrays["chosen_features"].astype(np.float64)
    rejected = arrays["rejected_features"].astype(np.float64)
    ideal_points = []
    for group in range(3):
        rows = arrays["group"] == group
        # T * margin + ||c||^2 - ||r||^2 = 2 <c - r, a>
        target = temperature * arrays["true_margin"][rows] + (chosen[rows] ** 2).sum(1) - (rejected[rows] ** 2).sum(1)
        design = 2 * (chosen[rows] - rejected[rows])
        ideal_point, *_ = np.linalg.lstsq(design, target, rcond=None)
        np.testing.assert_allclose(design @ ideal_point, target, atol=1e-6)
        ideal_points.append(ideal_point)
    # distinct groups have distinct ideal points
    assert min(np.linalg.norm(ideal_points[i] - ideal_points[j]) for i, j in ((0, 1), (0, 2), (1, 2))) > 1.0


def test_bayes_accuracy_is_sensible(synthetic):
    for split in ("train", "test", "unseen_test"):
        accuracy = bayes_optimal_accuracy(synthetic[split])
        assert set(accuracy) == {"expected", "realized"}
        assert 0.78 < accuracy["expected"] < 0.92
        # the labels are sampled from the true model: the realized accuracy matches the expectation
        assert abs(accuracy["realized"] - accuracy["expected"]) < 0.03
    arrays = _arrays(synthetic["train"])
    np.testing.assert_allclose(arrays["label_probability"], 1 / (1 + np.exp(-arrays["true_margin"])))
    # some labels go against the true reward (BTL noise), most follow it
    assert 0.05 < (arrays["true_margin"] < 0).mean() < 0.25


def test_noiseless_labels():
    dataset = load_synthetic_preferences(users_per_group=4, num_unseen_users=3, label_noise="none", seed=2)
    assert bayes_optimal_accuracy(dataset["train"]) == {"expected": 1.0, "realized": 1.0}
    assert min(dataset["test"]["true_margin"]) > 0


def test_mixture_users():
    dataset = load_synthetic_preferences(
        feature_dim=8, num_groups=4, users_per_group=5, mixture_users=True, num_unseen_users=6, seed=0
    )
    for split in SPLIT_NAMES:
        arrays = _arrays(dataset[split])
        assert (arrays["group"] == -1).all()
        weights = arrays["mixture_weights"]
        assert weights.shape[1] == 4
        np.testing.assert_allclose(weights.sum(1), 1.0)
        assert (weights > 0).all() and (weights.max(1) < 1).all()
    assert dataset["train"].num_rows == 20 * 35
    assert 0.7 < bayes_optimal_accuracy(dataset["test"])["expected"] < 0.95
    assert len(set(dataset["unseen_test"]["user_id"])) == 6


def test_bayes_accuracy_accepts_a_mapping_and_rejects_bad_input(synthetic):
    margins = {"true_margin": [2.0, -1.0], "label_probability": [1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(1.0))]}
    accuracy = bayes_optimal_accuracy(margins)
    assert accuracy["realized"] == 0.5
    assert accuracy["expected"] == pytest.approx((1 / (1 + math.exp(-2.0)) + 1 / (1 + math.exp(-1.0))) / 2)
    with pytest.raises(ValueError, match="one split"):
        bayes_optimal_accuracy(synthetic)
    with pytest.raises(ValueError, match="load_synthetic_preferences"):
        bayes_optimal_accuracy(synthetic["test"].remove_columns("true_margin"))
    with pytest.raises(ValueError, match="empty"):
        bayes_optimal_accuracy(synthetic["test"].select([]))
    with pytest.raises(ValueError, match="mapping of columns"):
        bayes_optimal_accuracy([1.0, 2.0])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"feature_dim": 0}, "feature_dim.*>= 1"),
        ({"num_groups": 0}, "num_groups.*>= 1"),
        ({"users_per_group": 0}, "users_per_group.*>= 1"),
        ({"unseen_shots": -1}, "unseen_shots.*>= 0"),
        ({"label_noise": "gaussian"}, "label_noise.*'btl'"),
        ({"temperature": -1.0}, "temperature.*> 0"),
        ({"dirichlet_alpha": float("nan")}, "dirichlet_alpha"),
        ({"validation_fraction": 0.7, "test_fraction": 0.4}, "must be < 1"),
        ({"seed": "0"}, "seed"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_synthetic_preferences(**kwargs)
