"""PAL's parts as modules: registries (a similarity registered here only), checkpoints of the older layout."""

import json
import os

import pytest
import torch
from conftest import tiny_model
from datasets import Dataset
from safetensors.torch import load_file
from torch import nn

from pal_rm import PalConfig, PalRewardModel
from pal_rm.hub import create_model_card
from pal_rm.modeling_pal import (
    PROTOTYPE_CLASSES,
    SIMILARITY_CLASSES,
    PalMLP,
    PalPrototypeMaps,
    PalPrototypePoints,
    PalSimilarity,
    PalUsers,
    register_similarity,
)
from pal_rm.trainers import PalRewardConfig, PalRewardTrainer

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "checkpoints")


# ---------------------------------------------------------------- a similarity defined in this file only
@register_similarity("test_scaled_neg_l1")
class ScaledNegL1Similarity(PalSimilarity):
    """`-s * ||e - a||_1` with a learned scale `s` (a parameter, to check it gets a learning rate)."""

    description = "minus a learned multiple of the L1 distance to the user's ideal point"

    def __init__(self, config):
        super().__init__(config)
        self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, item_embeddings, ideal_points):
        return -self.scale * (item_embeddings - ideal_points).abs().sum(-1)


def test_a_similarity_registered_outside_the_library_is_a_config_value(tmp_path):
    config = PalConfig(feature_dim=4, num_prototypes=2, preference_dim=3, similarity="test_scaled_neg_l1")
    model = PalRewardModel(config).eval()
    assert isinstance(model.similarity, ScaledNegL1Similarity)
    model.add_users(["alice"])
    features = torch.randn(3, 4)
    output = model(item_features=features, user_ids=["alice"] * 3)
    expected = -2.0 * (output.item_embeddings - output.ideal_points).abs().sum(-1)
    torch.testing.assert_close(output.logits.squeeze(-1), expected)
    # Not linear in the ideal point: adaptation takes the general path.
    assert model.prototype_reward_differences(features[:1], features[1:2], torch.randn(1, 2, 3)) is None
    # The model card describes it, with no list of known similarities to keep in sync.
    assert "minus a learned multiple of the L1 distance" in create_model_card(model)
    # Saved and loaded like the built-in ones.
    model.save_pretrained(tmp_path / "ckpt")
    reloaded = PalRewardModel.from_pretrained(tmp_path / "ckpt")
    torch.testing.assert_close(reloaded(item_features=features, user_ids=["alice"] * 3).logits, output.logits)


def test_the_registered_similarity_trains_with_its_parameter_group(tmp_path):
    model = PalRewardModel(
        PalConfig(feature_dim=4, num_prototypes=2, preference_dim=3, similarity="test_scaled_neg_l1")
    )
    torch.manual_seed(0)
    data = Dataset.from_dict(
        {
            "user_id": ["alice", "bob"] * 8,
            "chosen_features": torch.randn(16, 4).tolist(),
            "rejected_features": torch.randn(16, 4).tolist(),
        }
    )
    args = PalRewardConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=8,
        logit_scale_learning_rate=0.05,
        head_learning_rate=1e-3,
        disable_tqdm=True,
        use_cpu=True,
        report_to=[],
        fit_adaptation_prior=False,
    )
    trainer = PalRewardTrainer(model, args, train_dataset=data)
    groups = {group["name"]: group for group in trainer.parameter_groups()}
    assert [id(p) for p in groups["logit_scale"]["params"]] == [id(model.similarity.scale)]
    assert groups["logit_scale"]["lr"] == 0.05
    before = model.similarity.scale.detach().clone()
    trainer.train()
    assert not torch.equal(before, model.similarity.scale.detach())


def test_parts_declare_what_the_rest_of_the_code_needs():
    assert PROTOTYPE_CLASSES == {"a": PalPrototypePoints, "b": PalPrototypeMaps}
    assert {"neg_sq_l2", "neg_l2", "cosine", "dot"} <= set(SIMILARITY_CLASSES)
    assert [name for name, cls in SIMILARITY_CLASSES.items() if cls.linear_in_ideal_point] == ["neg_sq_l2", "dot"]
    assert (PalPrototypePoints.needs_prompt, PalPrototypeMaps.needs_prompt) == (False, True)
    for variant, similarity in (("a", "cosine"), ("b", "dot")):
        model = tiny_model("bert", variant=variant, similarity=similarity)
        assert isinstance(model.item_head, PalMLP) and isinstance(model.users, PalUsers)
        assert isinstance(model.prototype_head, PROTOTYPE_CLASSES[variant])
        assert isinstance(model.similarity, SIMILARITY_CLASSES[similarity])
        assert model.needs_prompt == (variant == "b")
        pal_keys = {key.split(".")[0] for key in model.state_dict() if not key.startswith("backbone.")}
        assert pal_keys == {"item_head", "prototype_head", "users"} | (
            {"similarity"} if similarity == "cosine" else set()
        )


def test_unknown_similarity_or_variant_is_an_error():
    with pytest.raises(ValueError, match="`similarity` must be one of"):
        PalConfig(feature_dim=4, similarity="no_such_similarity")
    with pytest.raises(ValueError, match="`variant` must be 'a' or 'b'"):
        PalConfig(feature_dim=4, variant="z")
    with pytest.raises(TypeError, match="subclass of PalSimilarity"):
        register_similarity("not_a_similarity")(object)


def test_parts_are_initialised_by_type():
    model = PalRewardModel(PalConfig(feature_dim=4, num_prototypes=3, preference_dim=16, similarity="cosine"))
    assert model.prototypes.std().item() == pytest.approx(0.25, rel=0.5)  # 1 / sqrt(d)
    assert model.logit_scale.item() == pytest.approx(torch.log(torch.tensor(1 / 0.07)).item())
    torch.testing.assert_close(model.population_mixture, torch.full((3,), 1 / 3))
    assert model.users.posterior_rows.numel() == 0


def test_a_part_with_a_group_without_learning_rate_is_an_error(tmp_path):
    model = PalRewardModel(PalConfig(feature_dim=4, num_prototypes=2, preference_dim=3))
    model.item_head.parameter_group = "no_such_group"
    data = Dataset.from_dict(
        {"user_id": ["a"] * 4, "chosen_features": [[1.0] * 4] * 4, "rejected_features": [[0.0] * 4] * 4}
    )
    args = PalRewardConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], disable_tqdm=True)
    trainer = PalRewardTrainer(model, args, train_dataset=data)
    with pytest.raises(ValueError, match="'item_head' \\(PalMLP\\) declares `parameter_group='no_such_group'`"):
        trainer.parameter_groups()


# ---------------------------------------------------------------- checkpoints saved before the parts
@pytest.mark.parametrize("name", ["pal_a_cosine", "pal_b_bert"])
def test_checkpoints_of_the_older_layout_load_with_the_same_rewards(tmp_path, name):
    folder = os.path.join(FIXTURES, name)
    saved_keys = set(load_file(os.path.join(folder, "model.safetensors")))
    assert "user_weights.weight" in saved_keys  # the fixture really is in the older layout
    with open(os.path.join(FIXTURES, "expected.json")) as file:
        expected = json.load(file)[name]
    model = PalRewardModel.from_pretrained(folder)
    if name == "pal_a_cosine":
        rewards = model(item_features=torch.tensor(expected["item_features"]), user_ids=expected["users"]).logits
        confidence = model.user_confidence(["carol", "alice"])
        assert confidence.num_comparisons.tolist() == [7, -1]
        torch.testing.assert_close(confidence.logit_covariance[0], torch.eye(3) * 0.5)
        assert model.adaptation_prior().method == "empirical"
    else:
        prompts = torch.tensor(expected["prompt_input_ids"])
        rewards = model(
            input_ids=torch.tensor(expected["input_ids"]),
            attention_mask=torch.tensor(expected["attention_mask"]),
            prompt_input_ids=prompts,
            prompt_attention_mask=torch.ones_like(prompts),
            user_ids=expected["users"],
        ).logits
    torch.testing.assert_close(rewards.squeeze(-1), torch.tensor(expected["rewards"]))

    # Saved again, it uses today's names only, and loads to the same model.
    model.save_pretrained(tmp_path / "resaved")
    keys = set(load_file(tmp_path / "resaved" / "model.safetensors"))
    assert "users.logits.weight" in keys
    assert not [key for key in saved_keys if key in keys and not key.startswith(("item_head.", "backbone."))]
    # `load_state_dict` (the trainer's resume) also reads the older names.
    fresh = PalRewardModel(model.config)
    result = fresh.load_state_dict(load_file(os.path.join(folder, "model.safetensors")), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for key, value in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value)


def test_legacy_key_mapping_covers_every_key_of_the_older_layout():
    from pal_rm.modeling_pal import rename_legacy_keys

    for name in ("pal_a_cosine", "pal_b_bert"):
        folder = os.path.join(FIXTURES, name)
        older = set(load_file(os.path.join(folder, "model.safetensors")))
        today = set(PalRewardModel(PalConfig.from_pretrained(folder)).state_dict())
        assert older != today
        assert set(rename_legacy_keys(dict.fromkeys(older))) == today
