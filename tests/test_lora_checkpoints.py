"""LoRA on the backbone (PEFT) and the checkpoint format: adapter + reference, reference only, merged, full."""

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import make_word_tokenizer, tiny_backbone_config, tiny_model
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from test_modeling_pal import REMOTE_CODE_SCRIPT
from transformers import AutoModel, GPT2Model, LlamaModel

from pal_rm import PalConfig, PalRewardModel
from pal_rm.hub import create_model_card, save_upload_folder
from pal_rm.losses import btl_loss

WORDS = "the quick brown fox jumps over a lazy dog hello world yes no what is this"
TARGETS = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}


@pytest.fixture(scope="module")
def tokenizer():
    return make_word_tokenizer([WORDS])


@pytest.fixture(scope="module")
def backbones(tmp_path_factory, tokenizer):
    """Tiny random GPT-2 and Llama backbones saved to folders, so that a checkpoint's reference resolves offline."""
    root = tmp_path_factory.mktemp("backbones")
    torch.manual_seed(0)
    paths = {}
    for kind, backbone in (
        ("gpt2", GPT2Model(tiny_backbone_config("gpt2", len(tokenizer)))),
        ("llama", LlamaModel(tiny_backbone_config("llama", len(tokenizer)))),
    ):
        paths[kind] = str(root / kind)
        backbone.save_pretrained(paths[kind])
        tokenizer.save_pretrained(paths[kind])
    return paths


def build(backbones, kind, **kwargs):
    torch.manual_seed(1)
    defaults = {"variant": "b", "num_prototypes": 3, "preference_dim": 8}
    model = PalRewardModel.from_backbone(backbones[kind], **{**defaults, **kwargs})
    model.add_users(["alice", "bob"])
    return model


def lora(kind, **kwargs):
    return LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[kind], **kwargs)


def batch(tokenizer, left_padding=False):
    """Two pairs (chosen rows first, then rejected rows, TRL's layout) for alice and bob, with their prompts."""
    tokenizer.padding_side = "left" if left_padding else "right"
    prompts = ["what is this", "hello world"]
    items = ["what is this the quick fox", "hello world yes", "what is this a lazy dog", "hello world no no no"]
    encoded = tokenizer(items, padding=True, return_tensors="pt")
    encoded_prompts = tokenizer(prompts, padding=True, return_tensors="pt")
    tokenizer.padding_side = "right"
    return {
        "input_ids": encoded["input_ids"],
        "attention_mask": encoded["attention_mask"],
        "prompt_input_ids": encoded_prompts["input_ids"],
        "prompt_attention_mask": encoded_prompts["attention_mask"],
        "user_ids": torch.tensor([0, 1]),
    }


def rewards(model, inputs):
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits.squeeze(-1)


def train_steps(model, tokenizer, steps=3):
    """A few optimizer steps on the PAL loss, over every trainable parameter (a plain torch loop)."""
    model.train()
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    before = [parameter.detach().clone() for parameter in parameters]
    optimizer = torch.optim.Adam(parameters, lr=1e-2)
    inputs = batch(tokenizer)
    for _ in range(steps):
        chosen, rejected = model(**inputs).logits.squeeze(-1).chunk(2)
        loss = btl_loss(chosen, rejected)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    changed = [not torch.equal(old, new.detach()) for old, new in zip(before, parameters)]
    assert all(changed), "every trainable parameter must change"
    return model.eval()


def saved_keys(folder):
    return set(load_file(os.path.join(folder, "model.safetensors")))


# ---------------------------------------------------------------- attaching
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_adapter_goes_on_the_backbone_only(kind, backbones, caplog):
    model = build(backbones, kind, similarity="cosine")
    with caplog.at_level(logging.INFO, logger="pal_rm.modeling_pal"):
        model.add_backbone_adapter(lora(kind, task_type="SEQ_CLS"))
    assert isinstance(model.backbone, PeftModel) and model.has_backbone_adapter
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    frozen = {name for name, parameter in model.named_parameters() if not parameter.requires_grad}
    assert all(name.startswith("backbone.") and ".lora_" not in name for name in frozen)  # the base weights
    assert {name for name in trainable if name.startswith("backbone.")} == {
        name for name, _ in model.named_parameters() if ".lora_" in name
    }
    for part in ("item_head.", "prototype_head.", "users.", "similarity.logit_scale"):  # PAL-B with cosine similarity
        assert any(name.startswith(part) for name in trainable), part
    adapter = model.config.backbone_adapter
    assert adapter["peft_type"] == "LORA" and sorted(adapter["target_modules"]) == sorted(TARGETS[kind])
    assert adapter["task_type"] is None  # the task head is PAL's
    json.dumps(model.config.to_dict())  # the recorded config is JSON
    assert "Trainable parameters:" in caplog.text and "base backbone weights are frozen" in caplog.text


def test_adapter_twice_or_put_elsewhere_is_an_error(backbones, tmp_path):
    model = build(backbones, "gpt2")
    model.add_backbone_adapter(lora("gpt2"))
    with pytest.raises(ValueError, match="already carries an adapter.*merge_backbone_adapter"):
        model.add_backbone_adapter(lora("gpt2"))

    whole = build(backbones, "gpt2")
    get_peft_model(whole, lora("gpt2"))  # the whole PAL model wrapped by PEFT
    with pytest.raises(ValueError, match="adapter layers that `add_backbone_adapter` did not attach.*whole PAL model"):
        whole.add_backbone_adapter(lora("gpt2"))

    stray = build(backbones, "gpt2")
    get_peft_model(stray.backbone, lora("gpt2"))  # injected into model.backbone, result not put back
    with pytest.raises(ValueError, match="did not attach.*add_backbone_adapter\\(peft_config\\)"):
        stray.save_pretrained(tmp_path / "stray")
    assert os.listdir(tmp_path) == []  # nothing written, no staging folder left
    with pytest.raises(TypeError, match="must be a PEFT config"):
        build(backbones, "gpt2").add_backbone_adapter({"r": 4}.items())
    with pytest.raises(ValueError, match="no backbone"):
        PalRewardModel(PalConfig(feature_dim=8)).add_backbone_adapter(lora("gpt2"))


def test_a_config_with_an_adapter_builds_it(backbones):
    model = build(backbones, "gpt2")
    model.add_backbone_adapter(lora("gpt2"))
    rebuilt = PalRewardModel(PalConfig.from_dict(model.config.to_dict()))
    assert rebuilt.has_backbone_adapter
    lora_b = [parameter for name, parameter in rebuilt.named_parameters() if ".lora_B." in name]
    assert lora_b and all(torch.count_nonzero(parameter) == 0 for parameter in lora_b)  # PEFT's init, kept


def test_left_padding_gives_the_same_rewards_with_an_adapter(backbones, tokenizer):
    # GPT-2's learned absolute positions need position ids counted from each row's first token, which the `PeftModel`
    # wrapper (`forward(*args, **kwargs)`) must not hide.
    model = build(backbones, "gpt2")
    model.register_tokenizer(tokenizer)
    model.add_backbone_adapter(lora("gpt2", init_lora_weights=False))
    right = rewards(model, batch(tokenizer))
    left = rewards(model, batch(tokenizer, left_padding=True))
    torch.testing.assert_close(left, right, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- adapter + reference
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_lora_checkpoint_reloads_bit_identical(kind, backbones, tokenizer, tmp_path):
    model = build(backbones, kind)
    model.register_tokenizer(tokenizer)
    model.add_backbone_adapter(lora(kind))
    train_steps(model, tokenizer)
    inputs = batch(tokenizer)
    expected = rewards(model, inputs)
    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder)

    # One folder: PAL's weights, the adapter in PEFT's format, a reference to the base backbone; no base weights.
    assert not any(key.startswith("backbone.") for key in saved_keys(folder))
    config = json.loads((folder / "config.json").read_text())
    assert config["backbone_weights"] == "reference" and config["backbone_name_or_path"] == backbones[kind]
    assert config["backbone_adapter"]["peft_type"] == "LORA"
    adapter_config = json.loads((folder / "backbone_adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == backbones[kind]
    assert all(".lora_" in key for key in load_file(folder / "backbone_adapter" / "adapter_model.safetensors"))
    assert model.has_backbone_adapter  # saving leaves the model as it was

    for loaded in (PalRewardModel.from_pretrained(folder), AutoModel.from_pretrained(folder)):
        assert loaded.has_backbone_adapter
        torch.testing.assert_close(rewards(loaded, inputs), expected, rtol=0, atol=0)
    assert all(parameter.requires_grad for name, parameter in loaded.named_parameters() if ".lora_" in name)


def test_lora_checkpoint_loads_with_remote_code_without_pal_rm(backbones, tokenizer, tmp_path):
    model = build(backbones, "llama")
    model.register_tokenizer(tokenizer)
    model.add_backbone_adapter(lora("llama"))
    train_steps(model, tokenizer)
    inputs = batch(tokenizer)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the child process: the thread count changes how sums are rounded
    try:
        expected = rewards(model, inputs).tolist()
    finally:
        torch.set_num_threads(threads)
    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder)
    torch.save(inputs, tmp_path / "inputs.pt")
    script = tmp_path / "load.py"
    script.write_text(REMOTE_CODE_SCRIPT)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
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
    assert got == {"AutoModel": expected, "AutoModelForSequenceClassification": expected}  # bit-identical


def test_adapter_without_reference_saves_the_base_weights(tokenizer, tmp_path):
    model = tiny_model("gpt2", vocab_size=len(tokenizer), variant="b")  # built from a config: no reference
    model.add_users(["alice", "bob"])
    model.add_backbone_adapter(lora("gpt2", init_lora_weights=False))
    inputs = batch(tokenizer)
    expected = rewards(model, inputs)
    model.save_pretrained(tmp_path)
    keys = saved_keys(tmp_path)
    assert "backbone.h.0.attn.c_attn.weight" in keys  # the base weights under their plain names
    assert not any("lora_" in key or "base_layer" in key for key in keys)
    assert json.loads((tmp_path / "config.json").read_text())["backbone_weights"] == "included"
    torch.testing.assert_close(rewards(PalRewardModel.from_pretrained(tmp_path), inputs), expected, rtol=0, atol=0)


def test_merged_save_reloads_to_the_merged_rewards(backbones, tokenizer, tmp_path):
    model = build(backbones, "gpt2")
    model.add_backbone_adapter(lora("gpt2"))
    train_steps(model, tokenizer)
    inputs = batch(tokenizer)
    expected = rewards(model, inputs)
    model.save_pretrained(tmp_path, merge_adapter=True)
    assert model.has_backbone_adapter  # the model keeps its adapter
    assert not (tmp_path / "backbone_adapter").exists()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["backbone_adapter"] is None and config["backbone_weights"] == "included"
    loaded = PalRewardModel.from_pretrained(tmp_path)
    assert not loaded.has_backbone_adapter
    torch.testing.assert_close(rewards(loaded, inputs), expected, rtol=1e-5, atol=1e-5)  # merging rounds

    model.merge_backbone_adapter()
    assert not model.has_backbone_adapter and model.config.backbone_adapter is None
    torch.testing.assert_close(rewards(loaded, inputs), rewards(model, inputs), rtol=0, atol=0)
    with pytest.raises(ValueError, match="no longer those of .*trained or merged.*include_backbone=True"):
        model.save_pretrained(tmp_path / "by-reference", include_backbone=False)
    with pytest.raises(ValueError, match="no backbone adapter"):
        model.merge_backbone_adapter()
    with pytest.raises(ValueError, match="nothing to merge"):
        model.save_pretrained(tmp_path / "merged-again", merge_adapter=True)


def test_save_over_an_adapter_checkpoint_drops_the_stale_adapter(backbones, tmp_path):
    model = build(backbones, "gpt2")
    model.add_backbone_adapter(lora("gpt2"))
    model.save_pretrained(tmp_path)
    model.merge_backbone_adapter()
    model.save_pretrained(tmp_path)
    assert not (tmp_path / "backbone_adapter").exists()
    assert not PalRewardModel.from_pretrained(tmp_path).has_backbone_adapter


# ---------------------------------------------------------------- reference only (frozen backbone)
def test_frozen_backbone_saves_as_a_reference(backbones, tokenizer, tmp_path):
    model = build(backbones, "llama")
    model.register_tokenizer(tokenizer)
    inputs = batch(tokenizer)
    expected = rewards(model, inputs)
    model.save_pretrained(tmp_path, include_backbone=False)
    assert not any(key.startswith("backbone.") for key in saved_keys(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["backbone_weights"] == "reference"
    torch.testing.assert_close(rewards(PalRewardModel.from_pretrained(tmp_path), inputs), expected, rtol=0, atol=0)

    # Loading arguments reach the backbone; PAL's own parts stay float32.
    loaded = PalRewardModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.backbone.dtype == torch.bfloat16
    assert {parameter.dtype for name, parameter in loaded.named_parameters() if not name.startswith("backbone.")} == {
        torch.float32
    }


def test_reference_save_needs_a_reference_and_unchanged_weights(backbones, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="records no reference to its backbone.*from_backbone"):
        tiny_model("gpt2").save_pretrained(tmp_path / "no-reference", include_backbone=False)
    model = build(backbones, "gpt2")
    assert model.can_refer_to_backbone()
    with torch.no_grad():
        model.backbone.h[0].mlp.c_fc.weight.add_(0.01)  # as training the backbone would
    assert not model.can_refer_to_backbone()
    with pytest.raises(ValueError, match="no longer those of"):
        model.save_pretrained(tmp_path / "trained", include_backbone=False)
    assert not (tmp_path / "trained").exists()
    model.to(torch.bfloat16)  # a cast is not a change of weights
    model.backbone.load_state_dict(GPT2Model.from_pretrained(backbones["gpt2"]).state_dict())
    assert model.can_refer_to_backbone()


def test_a_reference_whose_weights_changed_is_an_error(backbones, tokenizer, tmp_path):
    reference = tmp_path / "backbone"
    shutil.copytree(backbones["gpt2"], reference)
    model = PalRewardModel.from_backbone(str(reference), variant="b", num_prototypes=3, preference_dim=8)
    model.save_pretrained(tmp_path / "checkpoint", include_backbone=False)
    torch.manual_seed(5)
    GPT2Model(tiny_backbone_config("gpt2", len(tokenizer))).save_pretrained(reference)  # the backbone moved on
    with pytest.raises(ValueError, match="is not the one this PAL checkpoint was trained on.*backbone_revision"):
        PalRewardModel.from_pretrained(tmp_path / "checkpoint")
    shutil.rmtree(reference)
    with pytest.raises(OSError, match="refers to the backbone .*could not be loaded.*include_backbone=True"):
        PalRewardModel.from_pretrained(tmp_path / "checkpoint")


# ---------------------------------------------------------------- missing and unexpected weights
def test_missing_backbone_weights_are_an_error(backbones, tmp_path):
    """Transformers initialises missing weights at random; a PAL checkpoint refuses to load instead."""
    model = build(backbones, "gpt2")
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["backbone.h.0.attn.c_attn.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lack 1 weight\\(s\\) of the model: backbone.h.0.attn.c_attn.weight.*random"):
        PalRewardModel.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="lack 1 weight"):
        AutoModel.from_pretrained(tmp_path)


def test_a_checkpoint_without_backbone_weights_is_an_error(tokenizer, tmp_path):
    model = tiny_model("gpt2", vocab_size=len(tokenizer))
    model.save_pretrained(tmp_path)
    weights = {key: value for key, value in load_file(tmp_path / "model.safetensors").items()}
    save_file(
        {key: value for key, value in weights.items() if not key.startswith("backbone.")},
        tmp_path / "model.safetensors",
        metadata={"format": "pt"},
    )
    with pytest.raises(ValueError, match="holds no backbone weights at all.*names no backbone to load them from"):
        PalRewardModel.from_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["backbone_weights"] = "reference"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="nothing to load the backbone from.*backbone_name_or_path"):
        PalRewardModel.from_pretrained(tmp_path)


def test_unexpected_weights_are_an_error(backbones, tmp_path):
    model = build(backbones, "gpt2")
    model.save_pretrained(tmp_path / "plain")
    weights = load_file(tmp_path / "plain" / "model.safetensors")
    weights["backbone.base_model.model.h.0.attn.c_attn.lora_A.default.weight"] = torch.zeros(4, 32)
    save_file(weights, tmp_path / "plain" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="has no place for.*lora_A.*PEFT adapter saved without its config"):
        PalRewardModel.from_pretrained(tmp_path / "plain")

    model.add_backbone_adapter(lora("gpt2"))
    model.save_pretrained(tmp_path / "adapter")
    config_file = tmp_path / "adapter" / "config.json"
    config = json.loads(config_file.read_text())
    adapter_config = config.pop("backbone_adapter")
    config_file.write_text(json.dumps(config))  # adapter weights, no adapter config
    with pytest.raises(ValueError, match="weights of a backbone adapter .* config records no adapter"):
        PalRewardModel.from_pretrained(tmp_path / "adapter")

    config["backbone_adapter"] = adapter_config
    config_file.write_text(json.dumps(config))
    os.remove(tmp_path / "adapter" / "backbone_adapter" / "adapter_model.safetensors")
    with pytest.raises(
        OSError,
        match="LORA adapter on its backbone, but the adapter weights .*could not be read.*never initialised at random",
    ):
        PalRewardModel.from_pretrained(tmp_path / "adapter")


# ---------------------------------------------------------------- trainer and Hub
def test_trainer_checkpoints_refer_to_a_frozen_backbone(backbones, tokenizer, tmp_path):
    from datasets import Dataset

    from pal_rm.trainers import PalRewardConfig, PalRewardTrainer

    data = Dataset.from_dict(
        {
            "user_id": ["alice", "bob"] * 4,
            "prompt": ["what is this", "hello world"] * 4,
            "chosen": ["the quick fox", "yes"] * 4,
            "rejected": ["a lazy dog", "no"] * 4,
        }
    )
    args = PalRewardConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=4,
        save_strategy="steps",
        save_steps=1,
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
    )
    model = build(backbones, "gpt2")
    trainer = PalRewardTrainer(model, args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    trainer.save_model()
    for folder in (tmp_path / "out" / "checkpoint-2", tmp_path / "out"):
        assert not any(key.startswith("backbone.") for key in saved_keys(folder))
        assert json.loads((folder / "config.json").read_text())["backbone_weights"] == "reference"
    inputs = batch(tokenizer)
    torch.testing.assert_close(
        rewards(PalRewardModel.from_pretrained(tmp_path / "out"), inputs), rewards(model, inputs), rtol=0, atol=0
    )
    trainer.args.push_to_hub = True  # a reference to a local folder means nothing on the Hub: the weights are saved
    trainer._save(str(tmp_path / "pushed"))
    trainer.args.push_to_hub = False
    assert "backbone.h.0.attn.c_attn.weight" in saved_keys(tmp_path / "pushed")

    # The trainer restores the adapter weights of a checkpoint, which `Trainer` does not read.
    adapted = build(backbones, "gpt2")
    adapted.add_backbone_adapter(lora("gpt2"))
    train_steps(adapted, tokenizer)
    adapted.save_pretrained(tmp_path / "adapter-checkpoint")
    trainer = PalRewardTrainer(adapted, args, train_dataset=data, processing_class=tokenizer)
    expected = rewards(adapted, inputs)
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if ".lora_" in name:
                parameter.zero_()
    trainer._load_from_checkpoint(str(tmp_path / "adapter-checkpoint"))
    torch.testing.assert_close(rewards(adapted, inputs), expected, rtol=0, atol=0)


def test_model_card_and_upload_of_a_lora_model(backbones, tokenizer, tmp_path):
    model = build(backbones, "gpt2")
    model.add_backbone_adapter(lora("gpt2"))
    model.config.backbone_name_or_path = "my-org/tiny-gpt2"  # as if built on a Hub backbone
    card = create_model_card(model)
    assert "base_model: my-org/tiny-gpt2" in card and "- lora" in card
    assert "LORA adapter (rank 4, target modules `c_attn`)" in card and "base backbone `my-org/tiny-gpt2`" in card

    save_upload_folder(model, tokenizer, tmp_path / "hub", hash_user_ids=False)
    assert not any(key.startswith("backbone.") for key in saved_keys(tmp_path / "hub"))
    assert (tmp_path / "hub" / "backbone_adapter" / "adapter_model.safetensors").exists()
    assert (
        "base backbone `my-org/tiny-gpt2`, whose weights are not in this checkpoint"
        in (tmp_path / "hub" / "README.md").read_text()
    )

    # A reference to a local folder means nothing on the Hub: the upload holds the base weights.
    model.config.backbone_name_or_path = backbones["gpt2"]
    save_upload_folder(model, tokenizer, tmp_path / "local", hash_user_ids=False)
    assert "backbone.h.0.attn.c_attn.weight" in saved_keys(tmp_path / "local")
    readme = (tmp_path / "local" / "README.md").read_text()
    assert "The base backbone weights (in `model.safetensors`) and a LORA adapter" in readme
    assert "base_model:" not in readme
    with pytest.raises(ValueError, match="local folder .* does not exist on the Hub"):
        save_upload_folder(model, tokenizer, tmp_path / "refused", hash_user_ids=False, include_backbone=False)

    save_upload_folder(model, tokenizer, tmp_path / "merged", hash_user_ids=False, merge_adapter=True)
    assert not (tmp_path / "merged" / "backbone_adapter").exists() and model.has_backbone_adapter
    assert (
        "with a LORA adapter (rank 4, target modules `c_attn`) merged into the base backbone"
        in (tmp_path / "merged" / "README.md").read_text()
    )

    frozen = build(backbones, "gpt2")
    frozen.save_pretrained(tmp_path / "frozen", include_backbone=False)
    from pal_rm.hub import save_model_card

    save_model_card(frozen, tmp_path / "frozen")
    assert "Not in this checkpoint: the backbone is loaded from" in (tmp_path / "frozen" / "README.md").read_text()
    assert "The full backbone weights are in this checkpoint" in create_model_card(frozen)


def test_in_place_save_replaces_and_drops_the_adapter_folder(backbones, tokenizer, tmp_path, monkeypatch):
    folder = tmp_path / "mounted"
    real_ismount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda path: path == os.path.realpath(folder) or real_ismount(path))
    model = build(backbones, "gpt2")
    model.add_backbone_adapter(lora("gpt2"))
    model.save_pretrained(folder)
    train_steps(model, tokenizer)
    inputs = batch(tokenizer)
    model.save_pretrained(folder)  # over the previous adapter folder
    torch.testing.assert_close(
        rewards(PalRewardModel.from_pretrained(folder), inputs), rewards(model, inputs), rtol=0, atol=0
    )
    model.merge_backbone_adapter()
    model.save_pretrained(folder)
    assert not (folder / "backbone_adapter").exists()
