import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import BACKBONES, tiny_backbone_config, tiny_model
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, pipeline

from pal_rm import PalConfig, PalRewardModel
from pal_rm.modeling_pal import format_preference_texts, pool_hidden_states

VOCAB = 64


def batch(size=4, length=7, seed=0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (size, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, 5:] = 0
    return input_ids, attention_mask


def prompt_inputs(size=4):
    prompt_ids, prompt_mask = batch(size, 4, seed=1)
    return {"prompt_input_ids": prompt_ids, "prompt_attention_mask": prompt_mask}


# ---------------------------------------------------------------- configuration
def test_config_validates_values():
    with pytest.raises(ValueError, match="`num_prototypes` must be an integer >= 1, got 0"):
        PalConfig(feature_dim=8, num_prototypes=0)
    with pytest.raises(ValueError, match="`variant` must be 'a' or 'b'"):
        PalConfig(feature_dim=8, variant="c")
    with pytest.raises(ValueError, match="`similarity` must be one of"):
        PalConfig(feature_dim=8, similarity="l1")
    with pytest.raises(ValueError, match="needs `feature_dim`"):
        PalConfig()
    with pytest.raises(ValueError, match="disagrees with the backbone's hidden_size=32"):
        PalConfig(backbone_config=tiny_backbone_config("bert", VOCAB), feature_dim=16)
    with pytest.raises(ValueError, match="duplicates"):
        PalConfig(feature_dim=8, user_ids=["a", "a"])


@pytest.mark.parametrize("kind, pooling", [("gpt2", "last"), ("bert", "mean")])
def test_config_round_trip_and_default_pooling(kind, pooling):
    config = PalConfig(backbone_config=tiny_backbone_config(kind, VOCAB), variant="b", num_prototypes=3)
    assert config.pooling == pooling
    assert config.num_labels == 1 and config.problem_type == "regression"
    assert config.hidden_size == 32
    assert config.get_text_config() is config.backbone_config
    restored = PalConfig.from_dict(json.loads(config.to_json_string()))
    assert restored.backbone_config.model_type == kind
    assert (restored.variant, restored.num_prototypes, restored.pooling) == ("b", 3, pooling)


# ---------------------------------------------------------------- forward
@pytest.mark.parametrize("kind", BACKBONES)
@pytest.mark.parametrize("variant", ["a", "b"])
def test_forward_shapes_and_features_path(kind, variant):
    model = tiny_model(kind, variant=variant).eval()
    model.add_users(["alice", "bob"])
    input_ids, attention_mask = batch()
    extra = prompt_inputs() if variant == "b" else {}
    output = model(input_ids=input_ids, attention_mask=attention_mask, user_ids=torch.tensor([0, 1, 1, -1]), **extra)
    assert output.logits.shape == (4, 1)
    assert output.prototype_rewards.shape == (4, 3)
    assert output.mixture_weights.shape == (4, 3)
    assert torch.allclose(output.mixture_weights.sum(-1), torch.ones(4))
    # Cached features give the same rewards as token ids.
    features = model.encode(input_ids, attention_mask)
    prompt_features = model.encode(extra["prompt_input_ids"], extra["prompt_attention_mask"]) if extra else None
    from_features = model(
        item_features=features, prompt_features=prompt_features, user_ids=torch.tensor([0, 1, 1, -1])
    )
    assert torch.allclose(output.logits, from_features.logits, atol=1e-5)


@pytest.mark.parametrize("variant", ["a", "b"])
@pytest.mark.parametrize("similarity", ["neg_sq_l2", "neg_l2", "cosine", "dot"])
def test_prototype_rewards_are_rewards_of_one_hot_mixtures(variant, similarity):
    model = tiny_model("bert", variant=variant, similarity=similarity).eval()
    input_ids, attention_mask = batch()
    extra = prompt_inputs() if variant == "b" else {}
    output = model(input_ids=input_ids, attention_mask=attention_mask, **extra)
    for k in range(3):
        one_hot = torch.nn.functional.one_hot(torch.tensor(k), 3).float()
        single = model(input_ids=input_ids, attention_mask=attention_mask, mixture_weights=one_hot, **extra)
        assert torch.allclose(single.logits.squeeze(-1), output.prototype_rewards[:, k], atol=1e-5)


def test_similarity_formulas():
    model = PalRewardModel(PalConfig(feature_dim=4, num_prototypes=2, preference_dim=2, similarity="cosine"))
    items, points = torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 1.0]])
    assert model.similarity(items, points).item() == pytest.approx((1 / 0.07) * 0.8, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)  # exp(10) is clamped at logit_scale_max
    assert model.similarity(items, points).item() == pytest.approx(100 * 0.8, rel=1e-5)
    for kind, expected in [("neg_sq_l2", -(9 + 9)), ("neg_l2", -(18**0.5)), ("dot", 4.0)]:
        model = PalRewardModel(PalConfig(feature_dim=4, num_prototypes=2, preference_dim=2, similarity=kind))
        assert model.similarity(items, points).item() == pytest.approx(expected, rel=1e-5)


def test_population_and_explicit_mixtures():
    model = tiny_model("gpt2").eval()
    model.add_users(["alice"])
    with torch.no_grad():
        model.user_weights.weight[0] = torch.tensor([5.0, 0.0, -5.0])
    model.refresh_population_mixture()
    input_ids, attention_mask = batch()
    population = model(input_ids=input_ids, attention_mask=attention_mask)
    assert torch.allclose(population.mixture_weights[0], model.population_mixture)
    assert torch.allclose(model.population_mixture, model.user_mixture_weights()[0])
    mixture = torch.tensor([0.2, 0.3, 0.5])
    explicit = model(input_ids=input_ids, attention_mask=attention_mask, mixture_weights=mixture)
    assert torch.allclose(explicit.mixture_weights, mixture.expand(4, 3))
    by_name = model(input_ids=input_ids, attention_mask=attention_mask, user_ids=["alice"] * 4)
    by_row = model(input_ids=input_ids, attention_mask=attention_mask, user_ids=torch.zeros(4, dtype=torch.long))
    assert torch.equal(by_name.logits, by_row.logits)
    with pytest.raises(ValueError, match="must lie on the simplex"):
        model(input_ids=input_ids, attention_mask=attention_mask, mixture_weights=torch.tensor([0.5, 0.6, -0.1]))
    with pytest.raises(ValueError, match="must have shape \\(3,\\)"):
        model(input_ids=input_ids, attention_mask=attention_mask, mixture_weights=torch.tensor([0.5, 0.5]))


def test_user_registry_and_unknown_users():
    model = tiny_model("gpt2").eval()
    assert model.add_users(["alice", "bob"]) == [0, 1]
    before = model.user_weights.weight.detach().clone()
    assert model.add_users(["bob", "carol"]) == [1, 2]
    assert model.config.user_ids == ["alice", "bob", "carol"]
    assert torch.equal(model.user_weights.weight[:2], before)
    assert torch.allclose(model.user_mixture_weights()[2], model.population_mixture)
    with pytest.raises(KeyError, match="Unknown user 'dave' \\(row 1\\).*adapt_users"):
        model.user_rows(["alice", "dave"])
    assert model.user_rows(["alice", "dave"], unknown_users="population").tolist() == [0, -1]
    with pytest.raises(ValueError, match="non-empty strings"):
        model.add_users([""])


def test_pal_b_without_prompt_points_to_prompt_aware_api():
    model = tiny_model("gpt2", variant="b").eval()
    input_ids, attention_mask = batch()
    with pytest.raises(ValueError, match="PAL-B model.*score_texts.*PalRewardFunction"):
        model(input_ids=input_ids, attention_mask=attention_mask)


def test_features_of_the_wrong_width():
    model = tiny_model("bert").eval()
    with pytest.raises(ValueError, match="`item_features` must have shape \\(batch_size, 32\\).*got \\(2, 16\\)"):
        model(item_features=torch.randn(2, 16))


def test_last_pooling_handles_left_and_right_padding():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float).view(2, 4, 1)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert pool_hidden_states(hidden, right, "last").squeeze(-1).tolist() == [1.0, 7.0]
    assert pool_hidden_states(hidden, left, "last").squeeze(-1).tolist() == [3.0, 7.0]
    assert pool_hidden_states(hidden, right, "mean").squeeze(-1).tolist() == [0.5, 5.5]
    assert pool_hidden_states(hidden, right, "cls").squeeze(-1).tolist() == [0.0, 4.0]


def test_every_custom_parameter_is_initialised():
    model = tiny_model("bert", variant="a", similarity="cosine")
    model.add_users(["a"])
    assert torch.isfinite(model.prototypes).all() and model.prototypes.abs().sum() > 0
    assert model.logit_scale.item() == pytest.approx(torch.log(torch.tensor(1 / 0.07)).item())
    assert torch.allclose(model.population_mixture, torch.full((3,), 1 / 3))
    model_b = tiny_model("bert", variant="b")
    for name, parameter in model_b.named_parameters():
        assert torch.isfinite(parameter).all(), name


def test_gradient_checkpointing_can_be_enabled():
    model = tiny_model("gpt2")
    model.activation_checkpointing_enable()  # transformers 5's name of `gradient_checkpointing_enable`
    assert model.backbone.is_activation_checkpointing
    input_ids, attention_mask = batch()
    model.train()
    model(input_ids=input_ids, attention_mask=attention_mask).logits.sum().backward()
    assert model.item_head.layers[-1].weight.grad is not None


# ---------------------------------------------------------------- text API
def test_format_preference_texts(word_tokenizer):
    assert format_preference_texts(word_tokenizer, "hello ", "world") == ("hello ", "hello world[EOS]")
    conversation = format_preference_texts(
        word_tokenizer, [{"role": "user", "content": "hello"}], [{"role": "assistant", "content": "world"}]
    )
    # Conversations end with EOS too: one canonical form for every item, whatever its source.
    assert conversation == ("user: hello\n", "user: hello\nassistant: world\n[EOS]")
    with pytest.raises(ValueError, match="Empty response \\(row 3\\)"):
        format_preference_texts(word_tokenizer, "hello", "  ", row=3)
    with pytest.raises(ValueError, match="must be strings or lists of messages \\(row 0\\)"):
        format_preference_texts(word_tokenizer, "hello", 5, row=0)


@pytest.mark.parametrize("kind", BACKBONES)
def test_score_texts(kind, word_tokenizer):
    model = tiny_model(kind, vocab_size=len(word_tokenizer), variant="b").eval()
    model.add_users(["alice", "bob"])
    with torch.no_grad():
        model.user_weights.weight.copy_(torch.tensor([[4.0, 0.0, -4.0], [-4.0, 0.0, 4.0]]))
    prompts, responses = ["hello", "what is this"], ["the quick fox", "a lazy dog"]
    alice = model.score_texts(word_tokenizer, prompts, responses, users="alice")
    assert alice.shape == (2,)
    assert not torch.allclose(alice, model.score_texts(word_tokenizer, prompts, responses, users="bob"))
    mixed, prototypes = model.score_texts(
        word_tokenizer, prompts, responses, users=["alice", None], return_prototype_rewards=True
    )
    assert prototypes.shape == (2, 3)
    assert mixed[0] == pytest.approx(alice[0].item(), abs=1e-5)
    assert mixed[1] == pytest.approx(model.score_texts(word_tokenizer, prompts, responses)[1].item(), abs=1e-5)
    with pytest.raises(KeyError, match="Unknown user 'zoe'"):
        model.score_texts(word_tokenizer, prompts, responses, users=["alice", "zoe"])
    unknown = model.score_texts(word_tokenizer, prompts, responses, users=["alice", "zoe"], unknown_users="population")
    assert unknown[1] == pytest.approx(mixed[1].item(), abs=1e-5)
    with pytest.raises(ValueError, match="Empty response \\(row 1\\)"):
        model.score_texts(word_tokenizer, prompts, ["fine", ""])


def test_mismatched_tokenizer(word_tokenizer):
    model = tiny_model("bert", vocab_size=8)
    with pytest.raises(ValueError, match="does not match the backbone.*Use the tokenizer saved with the model"):
        model.score_texts(word_tokenizer, ["hello"], ["world"])


def test_real_pretrained_backbone(minilm_path):
    from transformers import AutoTokenizer

    model = PalRewardModel.from_backbone(minilm_path, variant="b", num_prototypes=2, preference_dim=8).eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    assert model.config.pooling == "mean" and model.config.hidden_size == 384
    features = model.encode_texts(
        tokenizer, ["A cat sits on the mat.", "A kitten sits on a rug.", "Stock prices fell."]
    )
    similarity = torch.nn.functional.cosine_similarity(features[0:1], features[1:], dim=-1)
    assert similarity[0] > similarity[1] + 0.2  # pretrained weights, not random ones
    rewards = model.score_texts(tokenizer, ["Say something."] * 2, ["Hello there.", "Goodbye."])
    assert rewards.shape == (2,) and torch.isfinite(rewards).all()


# ---------------------------------------------------------------- saving and loading
@pytest.mark.parametrize("kind", BACKBONES)
def test_save_and_load_with_auto_classes(kind, tmp_path):
    model = tiny_model(kind, variant="a", similarity="cosine").eval()
    model.add_users(["alice", "bob"])
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_pal.PalConfig",
        "AutoModel": "modeling_pal.PalRewardModel",
        "AutoModelForSequenceClassification": "modeling_pal.PalRewardModel",
    }
    assert config["user_ids"] == ["alice", "bob"]
    assert (tmp_path / "model.safetensors").exists()
    assert {"configuration_pal.py", "modeling_pal.py"} <= set(os.listdir(tmp_path))
    assert "from pal_rm" not in (tmp_path / "modeling_pal.py").read_text()
    assert isinstance(AutoConfig.from_pretrained(tmp_path), PalConfig)
    input_ids, attention_mask = batch()
    expected = model(input_ids=input_ids, attention_mask=attention_mask, user_ids=torch.tensor([0, 1, 0, -1])).logits
    for auto_class in (AutoModel, AutoModelForSequenceClassification):
        loaded = auto_class.from_pretrained(tmp_path).eval()
        assert isinstance(loaded, PalRewardModel)
        got = loaded(input_ids=input_ids, attention_mask=attention_mask, user_ids=torch.tensor([0, 1, 0, -1])).logits
        assert torch.equal(expected, got)


REMOTE_CODE_SCRIPT = textwrap.dedent(
    """
    import sys, json, torch

    class BlockPalRm:
        def find_spec(self, name, path=None, target=None):
            if name == "pal_rm" or name.startswith("pal_rm."):
                raise ImportError("pal_rm is blocked in this process")

    sys.meta_path.insert(0, BlockPalRm())
    try:
        import pal_rm  # noqa: F401
        raise SystemExit("pal_rm should not be importable here")
    except ImportError:
        pass
    from transformers import AutoModel, AutoModelForSequenceClassification

    folder, ids_path = sys.argv[1], sys.argv[2]
    inputs = torch.load(ids_path)
    out = {}
    for auto_class in (AutoModel, AutoModelForSequenceClassification):
        model = auto_class.from_pretrained(folder, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        with torch.no_grad():
            out[auto_class.__name__] = model(**inputs).logits.squeeze(-1).tolist()
    print(json.dumps(out))
    """
)


def test_remote_code_loads_without_pal_rm(tmp_path):
    model = tiny_model("gpt2", variant="b").eval()
    model.add_users(["alice", "bob"])
    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder)
    input_ids, attention_mask = batch()
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "user_ids": torch.tensor([0, 1, 1, 0])}
    inputs.update(prompt_inputs())
    torch.save(inputs, tmp_path / "inputs.pt")
    with torch.no_grad():
        expected = model(**inputs).logits.squeeze(-1).tolist()
    script = tmp_path / "load.py"
    script.write_text(REMOTE_CODE_SCRIPT)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, str(script), str(folder), str(tmp_path / "inputs.pt")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    for values in got.values():  # the same maths; another process may sum in another order (float32: a few ULPs)
        assert values == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_pipeline_returns_raw_population_rewards_for_pal_a(tmp_path, word_tokenizer):
    model = tiny_model("bert", vocab_size=len(word_tokenizer), variant="a").eval()
    model.add_users(["alice"])
    model.register_tokenizer(word_tokenizer)  # as the trainer, `from_backbone` and `score_texts` do
    model.save_pretrained(tmp_path)
    word_tokenizer.save_pretrained(tmp_path)
    scorer = pipeline("text-classification", model=str(tmp_path), tokenizer=str(tmp_path))
    texts = ["hello world", "the lazy dog"]
    scores = [result["score"] for result in scorer(texts, function_to_apply="none")]
    default_scores = [result["score"] for result in scorer(texts)]
    expected = model.score_texts(word_tokenizer, ["", ""], texts)
    # The pipeline tokenizes without EOS; the model brings the ids to the form `score_texts` uses.
    torch.testing.assert_close(torch.tensor(scores), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(default_scores), expected, rtol=1e-5, atol=1e-5)  # regression: no sigmoid
    assert (expected < 0).any() or (expected > 1).any()


def test_pipeline_on_pal_b_raises(tmp_path, word_tokenizer):
    model = tiny_model("bert", vocab_size=len(word_tokenizer), variant="b")
    model.save_pretrained(tmp_path)
    word_tokenizer.save_pretrained(tmp_path)
    scorer = pipeline("text-classification", model=str(tmp_path), tokenizer=str(tmp_path))
    with pytest.raises(ValueError, match="PAL-B model"):
        scorer("hello world")


def test_truncated_checkpoint_gives_clear_error(tmp_path):
    tiny_model("gpt2").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(OSError, match="corrupt or truncated.*Save the model again"):
        PalRewardModel.from_pretrained(tmp_path)


def test_foreign_checkpoint_gives_clear_error(tmp_path):
    from transformers import BertModel

    BertModel(tiny_backbone_config("bert", VOCAB)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="holds a 'bert' checkpoint, not a PAL reward model.*from_backbone"):
        PalRewardModel.from_pretrained(tmp_path)


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model = tiny_model("gpt2")
    model.add_users(["alice"])
    model.save_pretrained(tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    model.add_users(["bob"])

    def broken_save(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken_save)
    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", broken_save, raising=False)
    with pytest.raises(RuntimeError, match="disk full"):
        model.save_pretrained(tmp_path)
    after = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    assert after == before
    assert json.loads(after["config.json"])["user_ids"] == ["alice"]
