"""Resuming training: by user id (never by row position), and after the training process was killed."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import SMALL_DEMO, make_word_tokenizer, tiny_backbone_config
from datasets import Dataset
from safetensors.torch import load_file
from transformers import GPT2Model

from pal_rm import PalRewardModel
from pal_rm.trainers import PalRewardConfig, PalRewardTrainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "the quick brown fox jumps over a lazy dog hello world yes no what is this"


def comparisons(users, repeat=4):
    rows = {"user_id": [], "prompt": [], "chosen": [], "rejected": []}
    for _ in range(repeat):
        for i, user in enumerate(users):
            rows["user_id"].append(user)
            rows["prompt"].append("what is this" if i % 2 else "hello world")
            rows["chosen"].append("the quick fox" if i % 2 else "yes yes")
            rows["rejected"].append("a lazy dog" if i % 2 else "no")
    return Dataset.from_dict(rows)


def make_args(output_dir, **kwargs):
    defaults = {"output_dir": str(output_dir), "per_device_train_batch_size": 4, "learning_rate": 1e-2}
    defaults.update(report_to=[], disable_tqdm=True, use_cpu=True, save_strategy="steps", save_steps=2)
    return PalRewardConfig(**{**defaults, **kwargs})


def feature_model():
    from pal_rm import PalConfig

    torch.manual_seed(0)
    return PalRewardModel(PalConfig(feature_dim=6, num_prototypes=2, preference_dim=4))


def feature_comparisons(users, seed=0):
    generator = torch.Generator().manual_seed(seed)
    n = 4 * len(users)
    return Dataset.from_dict(
        {
            "user_id": list(users) * 4,
            "chosen_features": torch.randn(n, 6, generator=generator).tolist(),
            "rejected_features": torch.randn(n, 6, generator=generator).tolist(),
            "prompt_features": torch.randn(n, 6, generator=generator).tolist(),
        }
    )


def test_resume_matches_users_by_id_whatever_the_data_order(tmp_path):
    users = ["carol", "alice", "bob"]
    data = feature_comparisons(users)
    model = feature_model()
    PalRewardTrainer(model, make_args(tmp_path, max_steps=2), train_dataset=data).train()
    saved = PalRewardModel.from_pretrained(tmp_path / "checkpoint-2")
    assert saved.config.user_ids == sorted(users)  # registered in sorted order, not in data order

    # The same comparisons in another order (users first seen in another order) resume to the same users' rows.
    shuffled = data.shuffle(seed=3)
    assert list(dict.fromkeys(shuffled["user_id"])) != list(dict.fromkeys(data["user_id"]))
    resumed = feature_model()
    trainer = PalRewardTrainer(resumed, make_args(tmp_path, max_steps=2), train_dataset=shuffled)
    trainer.train(resume_from_checkpoint=True)
    for user in users:
        torch.testing.assert_close(
            resumed.user_weights.weight[resumed.user_rows([user])],
            saved.user_weights.weight[saved.user_rows([user])],
            rtol=0,
            atol=0,
        )


def test_resume_with_other_users_is_an_error(tmp_path):
    PalRewardTrainer(
        feature_model(), make_args(tmp_path, max_steps=2), train_dataset=feature_comparisons(["alice", "bob"])
    ).train()
    other = PalRewardTrainer(
        feature_model(), make_args(tmp_path, max_steps=4), train_dataset=feature_comparisons(["alice", "carol"])
    )
    with pytest.raises(ValueError, match=r"Cannot resume from .*checkpoint-2.*\['bob'\].*\['carol'\]"):
        other.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    # A model that came with its users in other rows: the same set, another order.
    model = feature_model()
    model.add_users(["bob", "alice"])
    reordered = PalRewardTrainer(
        model, make_args(tmp_path, max_steps=4), train_dataset=feature_comparisons(["alice", "bob"])
    )
    with pytest.raises(ValueError, match="the same users in other rows"):
        reordered.train(resume_from_checkpoint=True)


def test_save_total_limit_has_a_default(tmp_path):
    args = make_args(tmp_path, max_steps=8)
    assert args.save_total_limit == 2
    PalRewardTrainer(feature_model(), args, train_dataset=feature_comparisons(["alice", "bob"])).train()
    assert sorted(name for name in os.listdir(tmp_path) if name.startswith("checkpoint-")) == [
        "checkpoint-6",
        "checkpoint-8",
    ]


# ---------------------------------------------------------------- train_pal.py, killed and resumed
@pytest.fixture(scope="module")
def lora_backbone(tmp_path_factory):
    """A tiny random GPT-2 with a word tokenizer over the small demo dataset, saved where train_pal.py can load it."""
    from pal_rm.data import load_demo_preferences

    dataset = load_demo_preferences(seed=0, **SMALL_DEMO)
    texts = [
        text for split in dataset.values() for column in ("prompt", "chosen", "rejected") for text in split[column]
    ]
    tokenizer = make_word_tokenizer(texts)
    path = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    GPT2Model(tiny_backbone_config("gpt2", len(tokenizer))).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def train_pal_command(backbone, output_dir, *extra):
    return [
        sys.executable,
        os.path.join(REPO, "trainers", "train_pal.py"),
        "--config",
        os.path.join(REPO, "hub_configs", "pal-demo.yaml"),
        "--model_name_or_path",
        backbone,
        "--dataset_kwargs",
        json.dumps(SMALL_DEMO),
        "--num_prototypes",
        "2",
        "--train_backbone",
        "true",
        "--use_peft",
        "--lora_r",
        "4",
        "--lora_target_modules",
        "c_attn",
        "--max_steps",
        "160",
        "--per_device_train_batch_size",
        "8",
        "--save_strategy",
        "steps",
        "--save_steps",
        "20",
        "--eval_strategy",
        "no",
        "--compare_baseline",
        "false",
        "--sanity_checks",
        "false",
        "--logging_steps",
        "20",
        "--disable_tqdm",
        "true",
        "--output_dir",
        str(output_dir),
        *extra,
    ]


def complete(path) -> bool:
    try:
        json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return True


def logged_steps(stdout: str) -> int:
    """Training log lines (`{'loss': ...}`, printed every `logging_steps` steps)."""
    return sum("'loss'" in line for line in stdout.splitlines())


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_train_pal_killed_at_a_checkpoint_resumes_to_the_same_model(lora_backbone, tmp_path):
    uninterrupted = tmp_path / "uninterrupted"
    result = subprocess.run(
        train_pal_command(lora_backbone, uninterrupted), capture_output=True, text=True, env=ENV, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Trainable parameters:" in result.stdout and "in the adapter" in result.stdout
    uninterrupted_output = result.stdout

    killed = tmp_path / "killed"
    process = subprocess.Popen(
        train_pal_command(lora_backbone, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV
    )
    checkpoint = killed / "checkpoint-40" / "trainer_state.json"  # written last: the checkpoint is complete
    deadline = time.time() + 600
    while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(
        process.pid, signal.SIGKILL
    )  # possibly while it writes trainer_state.json: resuming skips such a checkpoint
    assert process.wait() == -signal.SIGKILL, "the run ended before it could be killed at its checkpoint"
    assert not (killed / "results.json").exists() and not (killed / "model.safetensors").exists()
    last = max(
        int(name.split("-")[1])
        for name in os.listdir(killed)
        if name.startswith("checkpoint-") and complete(killed / name / "trainer_state.json")
    )
    assert 20 <= last < 160

    result = subprocess.run(
        train_pal_command(lora_backbone, killed, "--resume_from_checkpoint", "true"),
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    # Logged every 20 steps: the resumed run only ran the steps after its checkpoint.
    assert logged_steps(result.stdout) == (160 - last) // 20 and logged_steps(uninterrupted_output) == 8

    expected = json.loads((uninterrupted / "results.json").read_text())["results"]
    assert json.loads((killed / "results.json").read_text())["results"] == expected
    for name in ("model.safetensors", os.path.join("backbone_adapter", "adapter_model.safetensors")):
        a, b = load_file(uninterrupted / name), load_file(killed / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=f"{name}: {key}")


def test_resume_true_skips_a_checkpoint_cut_short(tmp_path, caplog):
    import logging

    data = feature_comparisons(["alice", "bob"])
    PalRewardTrainer(feature_model(), make_args(tmp_path, max_steps=2), train_dataset=data).train()
    cut_short = tmp_path / "checkpoint-3"  # a run killed while it wrote its next checkpoint
    cut_short.mkdir()
    (cut_short / "trainer_state.json").write_text('{"global_st')
    trainer = PalRewardTrainer(feature_model(), make_args(tmp_path, max_steps=4), train_dataset=data)
    with caplog.at_level(logging.WARNING):
        trainer.train(resume_from_checkpoint=True)
    assert "checkpoint-3 was not written to the end" in caplog.text
    assert trainer.state.global_step == 4
    with pytest.raises(ValueError, match="holds no complete checkpoint"):
        PalRewardTrainer(feature_model(), make_args(tmp_path / "empty", max_steps=2), train_dataset=data).train(
            resume_from_checkpoint=True
        )
