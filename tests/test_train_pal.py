import json
import os
import subprocess
import sys

import pytest
from conftest import SMALL_DEMO as SMALL_DEMO_KWARGS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_DEMO = json.dumps(SMALL_DEMO_KWARGS)


def run_train_pal(tmp_path, output_dir, launcher, extra=()):
    """`train_pal.py` on the small demo data for 2 epochs, offline, on one thread."""
    command = [
        *launcher,
        os.path.join(REPO, "trainers", "train_pal.py"),
        "--config",
        os.path.join(REPO, "hub_configs", "pal-demo.yaml"),
        "--dataset_kwargs",
        SMALL_DEMO,
        "--num_train_epochs",
        "2",
        "--eval_strategy",
        "no",
        *extra,
        "--output_dir",
        str(output_dir),
        "--disable_tqdm",
        "true",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)


def test_parser_reads_the_demo_recipe():
    from pal_rm.trainers.train_pal import make_parser  # trainers/ is installed as pal_rm.trainers

    script_args, model_args, training_args = make_parser().parse_args_and_config(
        ["--config", os.path.join(REPO, "hub_configs", "pal-demo.yaml"), "--num_prototypes", "3"]
    )
    assert script_args.dataset_name == "demo"
    assert model_args.variant == "b" and model_args.num_prototypes == 3  # the command line wins over the recipe
    assert training_args.output_dir == "outputs/pal-demo" and not training_args.train_backbone


@pytest.mark.parametrize("launcher", [["accelerate", "launch", "--num_processes", "1"]])
def test_train_pal_end_to_end_under_accelerate(tmp_path, launcher):
    output_dir = tmp_path / "pal-demo"
    result = run_train_pal(
        tmp_path, output_dir, [os.path.join(os.path.dirname(sys.executable), launcher[0]), *launcher[1:]]
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "PAL-B (K=4)" in result.stdout and "Bradley-Terry (one reward for everyone)" in result.stdout
    assert "AutoModel.from_pretrained(" in result.stdout
    files = set(os.listdir(output_dir))
    assert {"config.json", "model.safetensors", "modeling_pal.py", "configuration_pal.py", "README.md"} <= files
    assert "tokenizer.json" in files
    results = json.loads((output_dir / "results.json").read_text())["results"]
    assert set(results) == {"PAL-B (K=4)", "Bradley-Terry (one reward for everyone)"}
    for row in results.values():
        assert 0.0 <= row["seen_accuracy"] <= 1.0 and 0.0 <= row["unseen_accuracy"] <= 1.0
    card = (output_dir / "README.md").read_text()
    assert "PAL personalized reward model" in card and "| prototypes (K) | 4 |" in card

    from transformers import AutoModel, AutoTokenizer

    import pal_rm  # noqa: F401

    model = AutoModel.from_pretrained(output_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    assert len(model.config.user_ids) == 10  # 2 per group x 4 groups seen + 2 unseen adapted
    rewards = model.score_texts(
        tokenizer, ["Write a note."] * 2, ["Dear team, hello.", "hey!"], users=model.config.user_ids[0]
    )
    assert rewards.shape == (2,)


def test_train_pal_chooses_the_number_of_prototypes_on_validation(tmp_path):
    output_dir = tmp_path / "pal-k"
    extra = ["--choose_num_prototypes", "2", "--compare_baseline", "false", "--sanity_checks", "false"]
    result = run_train_pal(tmp_path, output_dir, [sys.executable], extra)
    assert result.returncode == 0, result.stderr[-4000:]
    choice = json.loads((output_dir / "results.json").read_text())["num_prototypes_choice"]
    accuracy = {int(k): v for k, v in choice["validation_accuracy"].items()}
    assert sorted(accuracy) == [1, 2]
    assert choice["chosen"] == min(k for k, v in accuracy.items() if v == max(accuracy.values()))
    assert f"Chose K={choice['chosen']} on the validation split" in result.stdout
    assert json.loads((output_dir / "config.json").read_text())["num_prototypes"] == choice["chosen"]
