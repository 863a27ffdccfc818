"""
`PalRewardTrainer` honours TRL's `RewardTrainer` contract: every `RewardConfig` field is honoured or refused, the
trainer takes every `RewardTrainer.__init__` argument, `peft_config` puts LoRA on the backbone only. A TRL upgrade that
adds a field or an argument fails here, not silently.
"""

import contextlib
import dataclasses
import inspect
import logging

import pytest
import torch
from conftest import make_word_tokenizer, tiny_backbone_config
from datasets import Dataset, IterableDataset
from peft import LoraConfig
from transformers import GPT2Model, TrainingArguments
from trl import RewardConfig, RewardTrainer

from pal_rm import PalConfig, PalRewardModel
from pal_rm.trainers import PalRewardConfig, PalRewardTrainer

WORDS = "the quick brown fox jumps over a lazy dog hello world yes no what is this"

# Every field RewardConfig adds to TrainingArguments, and how PalRewardTrainer treats it (each is tested below).
REWARD_CONFIG_FIELDS = {
    "model_init_kwargs": "honoured: keyword arguments of `PalRewardModel.from_pretrained` when `model` is a path",
    "trust_remote_code": "honoured: passed to `AutoTokenizer.from_pretrained` when no tokenizer is given",
    "chat_template_path": "honoured for a .jinja/.j2 file (set on the tokenizer); another tokenizer's id is refused",
    "disable_dropout": "honoured: every dropout of the model (backbone, adapter, heads) set to 0",
    "dataset_num_proc": "honoured: processes that format the rows",
    "eos_token": "honoured: set on the tokenizer before the model registers its text form",
    "max_length": "honoured: truncation length (from the left; PAL's default None is the backbone's limit)",
    "pad_to_multiple_of": "honoured: the collator pads token batches to a multiple of it",
    "center_rewards_coefficient": "honoured: adds the reward-centering term to the loss",
    "activation_offloading": "honoured: RewardTrainer's offloading context wraps every training step",
    "pad_token": "honoured: the tokenizer's pad token",
}


def trl_fields() -> set[str]:
    base = {field.name for field in dataclasses.fields(TrainingArguments)}
    return {field.name for field in dataclasses.fields(RewardConfig)} - base


def test_every_reward_config_field_is_accounted_for():
    assert trl_fields() == set(REWARD_CONFIG_FIELDS), (
        "RewardConfig's fields changed: decide for each new one whether PalRewardTrainer honours or refuses it."
    )
    assert issubclass(PalRewardConfig, RewardConfig)


def test_the_trainer_takes_every_reward_trainer_argument():
    ours = inspect.signature(PalRewardTrainer.__init__).parameters
    assert set(inspect.signature(RewardTrainer.__init__).parameters) <= set(ours)
    assert inspect.getmro(PalRewardTrainer)[1] is RewardTrainer


@pytest.fixture(scope="module")
def tokenizer():
    return make_word_tokenizer([WORDS])


@pytest.fixture(scope="module")
def backbone_path(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    config = tiny_backbone_config("gpt2", len(tokenizer))
    config.resid_pdrop = config.attn_pdrop = config.embd_pdrop = 0.1
    GPT2Model(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def data(n=8):
    return Dataset.from_dict(
        {
            "user_id": ["alice", "bob"] * (n // 2),
            "prompt": ["what is this", "hello world"] * (n // 2),
            "chosen": ["the quick fox", "yes yes"] * (n // 2),
            "rejected": ["a lazy dog", "no"] * (n // 2),
        }
    )


def make_args(tmp_path, **kwargs):
    defaults = {"output_dir": str(tmp_path / "out"), "max_steps": 2, "per_device_train_batch_size": 4}
    defaults.update(report_to=[], disable_tqdm=True, use_cpu=True)
    return PalRewardConfig(**{**defaults, **kwargs})


def build(backbone_path, **kwargs):
    torch.manual_seed(1)
    return PalRewardModel.from_backbone(
        backbone_path, **{"variant": "b", "num_prototypes": 2, "preference_dim": 8, "head_dropout": 0.1, **kwargs}
    )


def dropouts(model):
    return [module.p for module in model.modules() if isinstance(module, torch.nn.Dropout)]


def test_disable_dropout(backbone_path, tokenizer, tmp_path, caplog):
    model = build(backbone_path)
    assert dropouts(model) and all(p > 0 for p in dropouts(model))
    with caplog.at_level(logging.WARNING):
        PalRewardTrainer(model, make_args(tmp_path), train_dataset=data(), processing_class=tokenizer)
    assert all(p == 0 for p in dropouts(model))
    assert "turns off the heads' dropout" in caplog.text
    kept = build(backbone_path)
    PalRewardTrainer(
        kept, make_args(tmp_path, disable_dropout=False), train_dataset=data(), processing_class=tokenizer
    )
    assert all(p > 0 for p in dropouts(kept))


def test_eos_and_pad_tokens_reach_the_text_form(backbone_path, tmp_path):
    tokenizer = make_word_tokenizer([WORDS])
    model = build(backbone_path)
    args = make_args(tmp_path, eos_token="[UNK]", pad_token="[EOS]")
    PalRewardTrainer(model, args, train_dataset=data(), processing_class=tokenizer)
    assert tokenizer.eos_token == "[UNK]" and tokenizer.pad_token == "[EOS]"
    assert model.config.sequence_framing["eos_token_id"] == tokenizer.convert_tokens_to_ids("[UNK]")
    with pytest.raises(ValueError, match="not in the vocabulary"):
        PalRewardTrainer(
            build(backbone_path),
            make_args(tmp_path, eos_token="<nope>"),
            train_dataset=data(),
            processing_class=tokenizer,
        )


def test_chat_template_file_is_used_and_a_tokenizer_id_refused(backbone_path, tokenizer, tmp_path):
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }} {% endfor %}")
    own = make_word_tokenizer([WORDS])
    PalRewardTrainer(
        build(backbone_path),
        make_args(tmp_path, chat_template_path=str(template)),
        train_dataset=data(),
        processing_class=own,
    )
    assert own.chat_template == template.read_text()
    with pytest.raises(ValueError, match=r"\.jinja"):
        PalRewardTrainer(
            build(backbone_path),
            make_args(tmp_path, chat_template_path="Qwen/Qwen3-0.6B"),
            train_dataset=data(),
            processing_class=tokenizer,
        )


def test_model_init_kwargs_and_trust_remote_code(backbone_path, tokenizer, tmp_path, monkeypatch, caplog):
    saved = tmp_path / "saved"
    build(backbone_path).save_pretrained(saved)
    seen = {}
    original = PalRewardModel.from_pretrained.__func__

    def recording(cls, path, *args, **kwargs):
        seen.update(kwargs)
        return original(cls, path, *args, **kwargs)

    monkeypatch.setattr(PalRewardModel, "from_pretrained", classmethod(recording))
    args = make_args(tmp_path, model_init_kwargs={"dtype": "float32"})
    with caplog.at_level(logging.WARNING):
        trainer = PalRewardTrainer(str(saved), args, train_dataset=data(), processing_class=tokenizer)
    assert seen == {"dtype": "float32"} and "will be ignored" not in caplog.text
    assert args.model_init_kwargs == {"dtype": "float32"}  # the caller's arguments are left as they were
    assert isinstance(trainer.model, PalRewardModel)

    loaded = {}
    import transformers

    original_tokenizer = transformers.AutoTokenizer.from_pretrained.__func__

    def recording_tokenizer(cls, path, *args, **kwargs):
        loaded.update(kwargs)
        return original_tokenizer(cls, path, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", classmethod(recording_tokenizer))
    PalRewardTrainer(build(backbone_path), make_args(tmp_path, trust_remote_code=True), train_dataset=data())
    assert loaded.get("trust_remote_code") is True


def test_dataset_num_proc_formats_the_same_rows(backbone_path, tokenizer, tmp_path):
    single = PalRewardTrainer(
        build(backbone_path), make_args(tmp_path), train_dataset=data(), processing_class=tokenizer
    )
    several = PalRewardTrainer(
        build(backbone_path), make_args(tmp_path, dataset_num_proc=2), train_dataset=data(), processing_class=tokenizer
    )
    assert several.train_dataset.to_dict() == single.train_dataset.to_dict()
    bad = data().to_dict()
    bad["chosen"][5] = "  "
    with pytest.raises(ValueError, match=r"row 5"):
        PalRewardTrainer(
            build(backbone_path),
            make_args(tmp_path, dataset_num_proc=2),
            train_dataset=Dataset.from_dict(bad),
            processing_class=tokenizer,
        )


def test_max_length_and_pad_to_multiple_of_on_tokens(backbone_path, tokenizer, tmp_path):
    args = make_args(tmp_path, train_backbone=True, max_length=3, pad_to_multiple_of=8)
    trainer = PalRewardTrainer(build(backbone_path), args, train_dataset=data(), processing_class=tokenizer)
    assert max(len(ids) for ids in trainer.train_dataset["chosen_ids"]) <= 3
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert batch["input_ids"].shape[1] == 8


def test_center_rewards_coefficient_enters_the_loss(backbone_path, tokenizer, tmp_path):
    losses = []
    for coefficient in (None, 10.0):
        trainer = PalRewardTrainer(
            build(backbone_path),
            make_args(tmp_path, center_rewards_coefficient=coefficient),
            train_dataset=data(),
            processing_class=tokenizer,
        )
        inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        with torch.no_grad():
            losses.append(trainer.compute_loss(trainer.model, inputs).item())
    assert losses[1] > losses[0]


def test_activation_offloading_wraps_training_steps(backbone_path, tokenizer, tmp_path, monkeypatch):
    # TRL's offloading needs an accelerator (CUDA, XPU, ...); here its context manager is replaced by one that counts.
    import trl.trainer.reward_trainer

    entered = []

    class Counting:
        def __enter__(self):
            entered.append(1)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(trl.trainer.reward_trainer, "get_act_offloading_ctx_manager", lambda model: Counting())
    plain = PalRewardTrainer(
        build(backbone_path), make_args(tmp_path), train_dataset=data(), processing_class=tokenizer
    )
    assert isinstance(plain.maybe_activation_offload_context, contextlib.nullcontext)
    offloading = PalRewardTrainer(
        build(backbone_path),
        make_args(tmp_path, activation_offloading=True, train_backbone=True),
        train_dataset=data(),
        processing_class=tokenizer,
    )
    offloading.train()
    assert len(entered) == 2  # each of the 2 training steps runs inside it


def test_feature_models_follow_the_same_contract(tmp_path):
    """A model without backbone has no tokenizer (RewardTrainer's own set-up needs one): the same steps apply."""
    torch.manual_seed(0)
    model = PalRewardModel(PalConfig(feature_dim=6, num_prototypes=2, preference_dim=4, head_dropout=0.2))
    features = Dataset.from_dict(
        {
            "user_id": ["alice", "bob"] * 4,
            "chosen_features": torch.randn(8, 6).tolist(),
            "rejected_features": torch.randn(8, 6).tolist(),
            "prompt_features": torch.randn(8, 6).tolist(),
        }
    )
    trainer = PalRewardTrainer(model, make_args(tmp_path), train_dataset=features)
    assert all(p == 0 for p in dropouts(model)) and trainer.label_names == []
    assert "pal-rm" in model.model_tags
    with pytest.raises(ValueError, match="`eos_token` applies to a tokenizer"):
        PalRewardTrainer(model, make_args(tmp_path, eos_token="[EOS]"), train_dataset=features)


def test_iterable_and_foreign_datasets_are_refused(backbone_path, tokenizer, tmp_path):
    streamed = IterableDataset.from_generator(lambda: iter(data().to_list()))
    with pytest.raises(ValueError, match="IterableDataset.*without `streaming=True`.*Dataset.from_generator"):
        PalRewardTrainer(build(backbone_path), make_args(tmp_path), train_dataset=streamed, processing_class=tokenizer)
    with pytest.raises(ValueError, match="eval dataset is an `IterableDataset`"):
        PalRewardTrainer(
            build(backbone_path),
            make_args(tmp_path),
            train_dataset=data(),
            eval_dataset=streamed,
            processing_class=tokenizer,
        )
    with pytest.raises(TypeError, match="must be a `datasets.Dataset`"):
        PalRewardTrainer(
            build(backbone_path), make_args(tmp_path), train_dataset=data().to_list(), processing_class=tokenizer
        )


def test_quantization_config_goes_to_from_backbone(backbone_path, tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"from_backbone\(name, quantization_config=...\)"):
        PalRewardTrainer(
            build(backbone_path),
            make_args(tmp_path),
            train_dataset=data(),
            processing_class=tokenizer,
            quantization_config=object(),
        )


# ---------------------------------------------------------------- PEFT
def test_peft_config_puts_lora_on_the_backbone_only(backbone_path, tokenizer, tmp_path, caplog):
    model = build(backbone_path, head_dropout=0.0)
    base = {name: p.detach().clone() for name, p in model.backbone.named_parameters()}
    pal = {name: p.detach().clone() for name, p in model.named_parameters() if not name.startswith("backbone.")}
    args = make_args(tmp_path, train_backbone=True, max_steps=3, adapter_learning_rate=1e-2)
    with caplog.at_level(logging.INFO):
        trainer = PalRewardTrainer(
            model,
            args,
            train_dataset=data(),
            processing_class=tokenizer,
            peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"]),
        )
    assert "Trainable parameters:" in caplog.text and "in the adapter" in caplog.text
    assert model.has_backbone_adapter and not hasattr(trainer.model, "peft_config")  # PEFT wraps the backbone only
    groups = {group["name"]: group for group in trainer.parameter_groups()}
    assert groups["adapter"]["lr"] == 1e-2 and "backbone" not in groups
    assert all(".lora_" in name for name, p in model.backbone.named_parameters() if p.requires_grad)
    trainer.train()
    for name, parameter in model.backbone.named_parameters():
        if ".lora_B" in name:
            assert parameter.abs().sum() > 0, name  # LoRA B starts at 0: it trained
        elif ".lora_" not in name:
            plain = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(parameter, base[plain]), name  # base weights frozen
    assert all(
        not torch.equal(p, pal[name])
        for name, p in model.named_parameters()
        if name in pal and name != "similarity.logit_scale"
    )

    # New users are fitted on features of the LoRA-trained backbone; the known users' rewards do not move.
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    model.eval()
    with torch.no_grad():
        known = model(**inputs).logits
    newcomers = data().map(lambda row: {"user_id": {"alice": "carol", "bob": "dave"}[row["user_id"]]})
    result = trainer.adapt_users(newcomers, steps=20)
    assert result["users"] == ["carol", "dave"] and model.num_users == 4
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, known, rtol=0, atol=0)

    trainer.save_model(str(tmp_path / "lora"))
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    model.eval()
    reloaded = PalRewardModel.from_pretrained(tmp_path / "lora").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)

    # Further training of the reloaded model trains its adapter, not the base weights.
    again = PalRewardTrainer(
        reloaded, make_args(tmp_path, train_backbone=True), train_dataset=data(), processing_class=tokenizer
    )
    trainable = [name for name, p in again.model.backbone.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in name for name in trainable)


def test_peft_config_needs_token_training(backbone_path, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="needs `train_backbone=True`"):
        PalRewardTrainer(
            build(backbone_path),
            make_args(tmp_path),
            train_dataset=data(),
            processing_class=tokenizer,
            peft_config=LoraConfig(r=4, target_modules=["c_attn"]),
        )
