import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import make_word_tokenizer, tiny_model
from test_modeling_pal import REMOTE_CODE_SCRIPT

from pal_rm import PalRewardModel
from pal_rm.hub import create_model_card, push_to_hub, save_upload_folder

RAW_IDS = ["alice.smith@example.com", "bob-the-builder"]


@pytest.fixture()
def model_and_tokenizer():
    tokenizer = make_word_tokenizer(["hello world yes no the quick brown fox jumps over a lazy dog"])
    model = tiny_model("gpt2", vocab_size=len(tokenizer), variant="b").eval()
    model.add_users(RAW_IDS)
    with torch.no_grad():
        model.user_weights.weight.copy_(torch.tensor([[3.0, 0.0, -3.0], [-3.0, 0.0, 3.0]]))
    return model, tokenizer


class FakeHfApi:
    """Replaces the network calls only: records what would be uploaded."""

    uploads = []

    def __init__(self, token=None):
        pass

    def create_repo(self, repo_id, private=None, exist_ok=False):
        return repo_id

    def upload_folder(self, repo_id, folder_path, commit_message):
        files = {}
        for name in os.listdir(folder_path):
            with open(os.path.join(folder_path, name), "rb") as file:
                files[name] = file.read()
        FakeHfApi.uploads.append((repo_id, files))
        return "commit"


def test_model_card_describes_the_model(model_and_tokenizer):
    model, _ = model_and_tokenizer
    card = create_model_card(model, eval_results={"seen_accuracy": 0.91}, dataset_name="demo", repo_id="org/pal")
    for text in (
        "PAL",
        "| prototypes (K) | 3 |",
        "PAL-B",
        "| registered users | 2 |",
        "| seen_accuracy | 0.9100 |",
        'AutoModel.from_pretrained("org/pal", trust_remote_code=True)',
        "adapt_users",
        "apache-2.0",
        "@inproceedings{chen2025pal",
        'users="<user id>"',
        "score_texts(tokenizer, prompts, responses)",
    ):
        assert text in card, text
    assert not any(raw in card for raw in RAW_IDS)  # the usage snippet names no registered user


def test_push_uploads_a_loadable_folder_with_hashed_ids(model_and_tokenizer, monkeypatch, tmp_path):
    model, tokenizer = model_and_tokenizer
    monkeypatch.setattr("huggingface_hub.HfApi", FakeHfApi)
    FakeHfApi.uploads.clear()
    push_to_hub(
        model, tokenizer, "org/pal-test", eval_results={"seen_accuracy": 0.9}, hash_user_ids=True, salt="s3cret"
    )
    ((repo_id, files),) = FakeHfApi.uploads
    assert repo_id == "org/pal-test"
    assert {
        "model.safetensors",
        "config.json",
        "configuration_pal.py",
        "modeling_pal.py",
        "README.md",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= set(files)
    for name, content in files.items():
        for raw in RAW_IDS:
            assert raw.encode() not in content, f"{raw} leaked into {name}"
    config = json.loads(files["config.json"])
    assert config["hashed_user_ids"] is True and len(config["user_ids"]) == 2
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForSequenceClassification"}
    assert model.config.user_ids == RAW_IDS  # the caller's model is untouched

    folder = tmp_path / "upload"
    folder.mkdir()
    for name, content in files.items():
        (folder / name).write_bytes(content)
    loaded = PalRewardModel.from_pretrained(folder).eval()
    prompts, responses = ["hello world"] * 2, ["the quick fox", "a lazy dog"]
    with pytest.raises(KeyError, match="salted hashes.*set_user_id_salt"):
        loaded.score_texts(tokenizer, prompts, responses, users=RAW_IDS[0])
    loaded.set_user_id_salt("s3cret")
    for user in RAW_IDS:
        expected = model.score_texts(tokenizer, prompts, responses, users=user)
        assert torch.allclose(loaded.score_texts(tokenizer, prompts, responses, users=user), expected, atol=1e-6)
    monkeypatch.delenv("PAL_USER_ID_SALT", raising=False)
    with pytest.raises(ValueError, match="needs a salt.*PAL_USER_ID_SALT.*hash_user_ids=False"):
        save_upload_folder(model, tokenizer, str(tmp_path / "x"), hash_user_ids=True)


def test_upload_folder_loads_with_remote_code_without_pal_rm(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    folder = tmp_path / "upload"
    save_upload_folder(model, tokenizer, str(folder), eval_results={"seen_accuracy": 0.9}, salt="s3cret")
    encoded = tokenizer(["hello world the fox", "hello a lazy dog"], padding=True, return_tensors="pt")
    prompts = tokenizer(["hello world", "hello"], padding=True, return_tensors="pt")
    inputs = {
        **encoded,
        "prompt_input_ids": prompts["input_ids"],
        "prompt_attention_mask": prompts["attention_mask"],
        "user_ids": torch.tensor([0, 1]),
    }
    inputs.pop("token_type_ids", None)
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
    for values in json.loads(result.stdout.strip().splitlines()[-1]).values():
        assert values == pytest.approx(expected, abs=1e-6)
