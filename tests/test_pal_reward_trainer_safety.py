"""PalRewardTrainer refuses what would silently poison training: non-finite values, self-comparisons, ill-typed ids,
and leaves no half-registered user behind when adaptation fails."""

import math

import pytest
import torch
from conftest import make_word_tokenizer, tiny_model
from datasets import Dataset

from pal_rm import PalConfig, PalRewardModel
from pal_rm.cache import FeatureStore
from pal_rm.trainers import PalRewardConfig, PalRewardTrainer

WORDS = "what is this the quick fox a lazy dog hello world yes no"


def make_args(tmp_path, **kwargs):
    defaults = {
        "output_dir": str(tmp_path / "out"),
        "num_train_epochs": 1,
        "per_device_train_batch_size": 8,
        "logging_steps": 1000,
        "disable_tqdm": True,
        "seed": 0,
        "use_cpu": True,
    }
    return PalRewardConfig(**{**defaults, **kwargs})


def feature_rows(n=8, users=("u0", "u1"), scale=1.0, seed=0, dim=4):
    generator = torch.Generator().manual_seed(seed)
    return {
        "user_id": [users[i % len(users)] for i in range(n)],
        "chosen_features": (scale * torch.randn(n, dim, generator=generator)).tolist(),
        "rejected_features": (scale * torch.randn(n, dim, generator=generator)).tolist(),
        "prompt_features": torch.randn(n, dim, generator=generator).tolist(),
    }


def feature_model(variant="b"):
    torch.manual_seed(0)
    return PalRewardModel(PalConfig(feature_dim=4, num_prototypes=2, preference_dim=4, variant=variant))


def text_rows(n=4, users=("alice", "bob")):
    return Dataset.from_dict(
        {
            "user_id": [users[i % len(users)] for i in range(n)],
            "prompt": ["what is this"] * n,
            "chosen": ["the quick fox"] * n,
            "rejected": ["a lazy dog"] * n,
        }
    )


@pytest.mark.parametrize("column", ["chosen_features", "rejected_features", "prompt_features", "margin"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_feature_or_margin_columns_name_the_rows(tmp_path, column, bad):
    data = feature_rows()
    data["margin"] = [0.5] * 8
    if column == "margin":
        data["margin"][5] = bad
    else:
        data[column][5][2] = bad
        data[column][7][0] = bad
    with pytest.raises(ValueError, match=rf"Column '{column}' of the train dataset holds NaN or inf in .*rows \[5"):
        PalRewardTrainer(feature_model(), make_args(tmp_path), train_dataset=Dataset.from_dict(data))


def test_non_finite_loss_stops_training_naming_the_step(tmp_path):
    """Finite but huge features overflow the squared distance: the loss becomes NaN, which is an error."""
    data = Dataset.from_dict(feature_rows(scale=1e20))
    trainer = PalRewardTrainer(feature_model(), make_args(tmp_path), train_dataset=data)
    with pytest.raises(FloatingPointError, match="training loss is nan at step 0"):
        trainer.train()


def test_identical_chosen_and_rejected_are_an_error(tmp_path):
    tokenizer = make_word_tokenizer([WORDS])
    data = text_rows(4).to_dict()
    data["rejected"][2] = data["chosen"][2]
    with pytest.raises(
        ValueError, match=r"1 rows of the train dataset have the same chosen and rejected response \(rows \[2\]"
    ):
        PalRewardTrainer(
            tiny_model(vocab_size=len(tokenizer)),
            make_args(tmp_path),
            train_dataset=Dataset.from_dict(data),
            processing_class=tokenizer,
        )
    features = feature_rows()
    features["rejected_features"][3] = features["chosen_features"][3]
    with pytest.raises(ValueError, match=r"identical `chosen_features` and `rejected_features` \(rows \[3\]"):
        PalRewardTrainer(feature_model(), make_args(tmp_path), train_dataset=Dataset.from_dict(features))


def test_integer_user_ids_must_be_strings(tmp_path):
    data = feature_rows()
    data["user_id"] = [i % 2 for i in range(8)]
    with pytest.raises(ValueError, match=r"User ids must be strings: row 0 .* has 0 \(int\)"):
        PalRewardTrainer(feature_model(), make_args(tmp_path), train_dataset=Dataset.from_dict(data))


def test_user_row_below_minus_one_is_an_error():
    model = feature_model()
    model.add_users(["u0"])
    with pytest.raises(IndexError, match="User row -2 is out of range"):
        model(item_features=torch.randn(2, 4), prompt_features=torch.randn(2, 4), user_ids=torch.tensor([0, -2]))
    assert model(item_features=torch.randn(2, 4), prompt_features=torch.randn(2, 4), user_ids=torch.tensor([0, -1]))


def test_cache_file_with_non_finite_values_is_rebuilt(tmp_path):
    from safetensors.torch import load_file, save_file

    tokenizer = make_word_tokenizer([WORDS])
    model = tiny_model("bert", vocab_size=len(tokenizer))
    texts = ["the quick fox", "a lazy dog"]
    first = FeatureStore(str(tmp_path)).encode(model, tokenizer, texts, show_progress=False)
    (tensor_file,) = tmp_path.glob("*.safetensors")
    stored = load_file(str(tensor_file))["features"]
    stored[1, 0] = math.nan
    save_file({"features": stored}, str(tensor_file))
    cache = FeatureStore(str(tmp_path))
    again = cache.encode(model, tokenizer, texts, show_progress=False)
    assert cache.num_encoded == 2  # rebuilt, not trusted
    torch.testing.assert_close(again, first)
    assert torch.isfinite(load_file(str(tensor_file))["features"]).all()


# ---------------------------------------------------------------- adaptation is all-or-nothing
def trained_feature_trainer(tmp_path):
    model = feature_model()
    trainer = PalRewardTrainer(model, make_args(tmp_path), train_dataset=Dataset.from_dict(feature_rows(16)))
    trainer.train()
    return trainer, model


@pytest.mark.parametrize("failure", ["non_finite_features", "non_finite_loss", "bad_row"])
def test_failed_adaptation_registers_no_user(tmp_path, failure):
    trainer, model = trained_feature_trainer(tmp_path)
    users_before = list(model.config.user_ids)
    table_before = model.user_weights.weight.detach().clone()
    data = feature_rows(8, users=("new0", "new1"), seed=1)
    if failure == "non_finite_features":
        data["chosen_features"][6][1] = math.nan
        error, match = ValueError, "NaN or inf"
    elif failure == "non_finite_loss":
        data = feature_rows(8, users=("new0", "new1"), seed=1, scale=1e20)
        error, match = FloatingPointError, "loss became nan at step 0; no user was registered"
    else:
        data["user_id"][3] = ""
        error, match = ValueError, "missing or empty user id"
    with pytest.raises(error, match=match):
        trainer.adapt_users(Dataset.from_dict(data))
    assert model.config.user_ids == users_before
    assert torch.equal(model.user_weights.weight, table_before)
    # the same users fit fine afterwards, from clean data
    result = trainer.adapt_users(Dataset.from_dict(feature_rows(8, users=("new0", "new1"), seed=1)))
    assert result["users"] == ["new0", "new1"] and model.num_users == len(users_before) + 2


def test_adapt_users_after_training_the_backbone(tmp_path):
    """With `train_backbone=True`, new users are fitted on features of the trained backbone, computed once; the known
    users, the backbone and the heads stay bit-identical."""
    tokenizer = make_word_tokenizer([WORDS])
    model = tiny_model("gpt2", vocab_size=len(tokenizer), variant="b", num_prototypes=2)
    args = make_args(tmp_path, train_backbone=True, backbone_learning_rate=1e-2, max_steps=2, adapt_steps=30)
    trainer = PalRewardTrainer(model, args, train_dataset=text_rows(8), processing_class=tokenizer)
    trainer.train()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    calls = []
    model.backbone.register_forward_hook(lambda module, args, output: calls.append(args))
    new = Dataset.from_dict(
        {
            "user_id": ["carol", "dave", "carol", "dave"],
            "prompt": ["hello world "] * 4,
            "chosen": ["yes", "no", "yes", "no"],
            "rejected": ["no", "yes", "no", "yes"],
        }
    )
    result = trainer.adapt_users(new)
    assert result["users"] == ["carol", "dave"]
    assert len(calls) == 1  # the 3 unique texts go through the trained backbone once, in one batch
    after = model.state_dict()
    for key, value in before.items():
        if key == "users.logits.weight" or key.startswith("users.posterior_"):  # grown by the new users only
            assert torch.equal(after[key][: value.shape[0]], value)
        else:
            assert torch.equal(after[key], value), key
    carol, dave = model.resolve_mixture_weights(["carol", "dave"], None, 2)
    assert not torch.allclose(carol, dave)  # opposite comparisons, different mixtures
