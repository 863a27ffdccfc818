import math

import evaluate
import numpy as np
import pytest

from pal_rm.metrics import PERSONALIZED_PREFERENCE_METRIC_PATH, per_user_accuracy, personalized_preference_metrics


def test_hand_computed_toy_case():
    differences = [1.5, -0.2, 0.0, 3.0]
    users = ["alice", "alice", "bob", "carol"]
    results = personalized_preference_metrics(differences, users)
    assert results["accuracy"] == pytest.approx((1 + 0 + 0.5 + 1) / 4)  # a tie counts half
    assert results["user_accuracy_mean"] == pytest.approx((0.5 + 0.5 + 1) / 3)
    assert results["user_accuracy_min"] == pytest.approx(0.5)
    assert results["num_pairs"] == 4 and results["num_users"] == 3
    expected_log_loss = np.mean([math.log1p(math.exp(-d)) for d in differences])
    assert results["log_loss"] == pytest.approx(expected_log_loss)
    # confidences max(p, 1-p): 0.8176 (bin 6, right), 0.5498 (bin 0, wrong), 0.5 (bin 0, half), 0.9526 (bin 9, right)
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    bin0 = abs((0 + 0.5) - (sigmoid(0.2) + 0.5))
    bin6 = abs(1 - sigmoid(1.5))
    bin9 = abs(1 - sigmoid(3.0))
    assert results["calibration_error"] == pytest.approx((bin0 + bin6 + bin9) / 4)
    assert per_user_accuracy(differences, users) == {"alice": 0.5, "bob": 0.5, "carol": 1.0}


def test_one_user_and_no_users():
    results = personalized_preference_metrics([2.0, -1.0])
    assert results["accuracy"] == results["user_accuracy_mean"] == results["user_accuracy_min"] == 0.5
    assert results["num_users"] == 1
    assert personalized_preference_metrics([2.0, -1.0], ["u", "u"])["user_accuracy_min"] == 0.5


def test_many_users_are_grouped_without_a_loop():
    rng = np.random.default_rng(0)
    users = rng.integers(0, 100_000, size=300_000)
    differences = rng.normal(size=users.size)
    results = personalized_preference_metrics(differences, users)
    assert results["num_users"] == np.unique(users).size
    assert results["accuracy"] == pytest.approx((differences > 0).mean())


def test_perfectly_calibrated_predictions_have_small_error():
    rng = np.random.default_rng(0)
    differences = rng.normal(scale=2.0, size=200_000)
    # each pair's label drawn from the model's own Bradley-Terry probability: flip the sign when the label disagrees
    keep = rng.random(differences.size) < 1 / (1 + np.exp(-differences))
    observed = np.where(keep, differences, -differences)
    assert personalized_preference_metrics(observed)["calibration_error"] < 0.01
    assert personalized_preference_metrics(observed * 5)["calibration_error"] > 0.1  # over-confident


def test_bad_input():
    with pytest.raises(ValueError, match="empty"):
        personalized_preference_metrics([])
    with pytest.raises(ValueError, match="NaN or inf \\(pairs \\[1\\]"):
        personalized_preference_metrics([1.0, float("nan")])
    with pytest.raises(ValueError, match="2 user ids for 3 reward differences"):
        personalized_preference_metrics([1.0, 2.0, 3.0], ["a", "b"])


def test_evaluate_load_of_the_path_offline(monkeypatch):
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    metric = evaluate.load(PERSONALIZED_PREFERENCE_METRIC_PATH)
    differences, users = [1.5, -0.2, 0.0, 3.0], ["alice", "alice", "bob", "carol"]
    assert metric.compute(predictions=differences, references=users) == personalized_preference_metrics(
        differences, users
    )
