import pytest
import torch
from datasets import Dataset

from pal_rm import PalConfig, PalRewardModel
from pal_rm.sanity import label_flip_check, user_swap_check
from pal_rm.trainers import PalRewardConfig, PalRewardTrainer


def two_taste_features(num_users, pairs, seed, prefix):
    """Even users prefer a large first feature, odd users a small one."""
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randn(num_users * pairs, 4, generator=generator)
    rejected = torch.randn(num_users * pairs, 4, generator=generator)
    users = [f"{prefix}{i % num_users}" for i in range(num_users * pairs)]
    for i, user in enumerate(users):
        if (chosen[i, 0] < rejected[i, 0]) == (int(user[len(prefix) :]) % 2 == 0):
            chosen[i], rejected[i] = rejected[i].clone(), chosen[i].clone()
    return Dataset.from_dict(
        {"user_id": users, "chosen_features": chosen.tolist(), "rejected_features": rejected.tolist()}
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.manual_seed(0)
    model = PalRewardModel(PalConfig(feature_dim=4, num_prototypes=2, preference_dim=4))
    args = PalRewardConfig(
        output_dir=str(tmp_path_factory.mktemp("out")),
        num_train_epochs=30,
        per_device_train_batch_size=32,
        learning_rate=2e-2,
        prototype_learning_rate=5e-2,
        user_learning_rate=5e-2,
        disable_tqdm=True,
        use_cpu=True,
        logging_steps=1000,
    )
    trainer = PalRewardTrainer(model, args, train_dataset=two_taste_features(4, 40, seed=0, prefix="seen"))
    trainer.train()
    return trainer, model


def test_user_swap_check_on_a_personalised_model(trained):
    trainer, model = trained
    result = user_swap_check(model, None, two_taste_features(4, 30, seed=3, prefix="seen"))
    assert result["num_users"] == 4
    assert result["accuracy"] > 0.8 and result["swapped_accuracy"] < 0.6
    assert result["accuracy_drop"] == pytest.approx(result["accuracy"] - result["swapped_accuracy"])
    assert not result["interchangeable"]


def test_user_swap_check_flags_interchangeable_users(trained, caplog):
    _, model = trained
    clone = PalRewardModel(model.config)
    clone.load_state_dict(model.state_dict())
    with torch.no_grad():
        clone.user_weights.weight.copy_(clone.user_weights.weight[:1].expand_as(clone.user_weights.weight))
    from transformers.utils import logging

    logging.enable_propagation()
    try:
        result = user_swap_check(clone, None, two_taste_features(4, 30, seed=3, prefix="seen"))
    finally:
        logging.disable_propagation()
    assert result["interchangeable"] and result["accuracy_drop"] == pytest.approx(0.0)
    assert "treats these users as interchangeable" in caplog.text
    with pytest.raises(ValueError, match="at least 2 users"):
        user_swap_check(model, None, two_taste_features(1, 5, seed=3, prefix="seen"))


def test_label_flip_check_moves_the_mixture_and_leaves_the_model_unchanged(trained):
    trainer, model = trained
    users, table = list(model.config.user_ids), model.user_weights.weight.detach().clone()
    result = label_flip_check(trainer, two_taste_features(4, 10, seed=5, prefix="new"))
    assert result["num_users"] == 4
    assert result["flipped_predictions"] > 0.7 and result["mixture_shift"] > 0.3
    assert not result["insensitive"]
    assert model.config.user_ids == users and torch.equal(model.user_weights.weight, table)


def test_label_flip_check_flags_a_model_that_cannot_move_users(trained):
    trainer, model = trained
    saved = model.prototypes.detach().clone()
    try:
        with torch.no_grad():
            model.prototypes.copy_(model.prototypes[:1].expand_as(model.prototypes))  # every prototype the same
        result = label_flip_check(trainer, two_taste_features(4, 10, seed=5, prefix="new"))
    finally:
        with torch.no_grad():
            model.prototypes.copy_(saved)
    assert result["insensitive"] and result["flipped_predictions"] == 0.0
