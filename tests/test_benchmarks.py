"""Every benchmark script in its smoke mode (tiny data, seconds), and the README's generated Results section."""

import importlib.util
import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(REPO, "examples", "benchmarks")
PERSONA_FIXTURE = os.path.join(REPO, "tests", "fixtures", "persona")


@pytest.fixture(autouse=True)
def benchmarks_on_sys_path(monkeypatch):
    """The scripts import their helpers (`from _common import ...`, also inside functions) as
    `python examples/benchmarks/<name>.py` finds them: with the script's folder first on sys.path."""
    monkeypatch.syspath_prepend(BENCHMARKS)


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", os.path.join(BENCHMARKS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read(output_dir, name):
    with open(os.path.join(output_dir, f"{name}.json")) as file:
        return json.load(file)


def in_unit_interval(value):
    return isinstance(value, float) and 0.0 <= value <= 1.0


def test_persona_smoke(tmp_path):
    load_script("persona").main(
        [
            "--smoke",
            "--data_dir",
            PERSONA_FIXTURE,
            "--settings",
            "standard",
            "--output_dir",
            str(tmp_path),
            "--cache_dir",
            str(tmp_path / "cache"),
        ]
    )
    result = read(tmp_path, "persona")
    setting = result["settings"]["standard"]
    models = setting["models"]
    assert set(models) == {
        "one reward for everyone",
        "independent head per user",
        "LoRe (low-rank basis)",
        "per-group oracle",
        "PAL-A K=1",
        "PAL-A K=2",
        "PAL-B K=1",
        "PAL-B K=2",
    }
    assert models["LoRe (low-rank basis)"]["rank"] in (1, 2, 4, 8)  # chosen on validation
    assert setting["selected_pal"].startswith("PAL-")
    selected = models[setting["selected_pal"]]
    assert selected["validation_accuracy"] == max(
        m["validation_accuracy"] for n, m in models.items() if n.startswith("PAL-")
    )
    for name, values in models.items():
        assert in_unit_interval(values["seen_accuracy"]), name
        if "unseen_accuracy" in values:
            assert sorted(values["unseen_accuracy"], key=int) == ["1", "2", "5"]
            assert all(in_unit_interval(v) for v in values["unseen_accuracy"].values())
    assert set(setting["targets"]["met"]) and (tmp_path / "persona.png").stat().st_size > 0
    assert setting["users"]["train"] == 6 and setting["users"]["unseen_test"] == 4


def test_synthetic_smoke(tmp_path):
    load_script("synthetic").main(["--smoke", "--output_dir", str(tmp_path)])
    result = read(tmp_path, "synthetic")
    run = result["runs"]["2/10"]
    assert run["true_k"] == 2 and run["pairs_per_user"] == 10
    assert in_unit_interval(run["bayes_optimal"]["test"]["realized"])
    assert set(run["models"]) == {
        "one reward for everyone",
        "per-group oracle",
        "LoRe (low-rank basis)",
        "PAL-A K=1",
        "PAL-A K=2",
    }
    assert in_unit_interval(run["models"]["LoRe (low-rank basis)"]["unseen_accuracy"])
    assert set(run["gap_to_bayes_when_k_at_least_true_k"]) == {"PAL-A K=2"}
    assert isinstance(result["met_within_1_point"], bool) and (tmp_path / "synthetic.png").exists()


def test_active_smoke(tmp_path):
    load_script("active").main(
        [
            "--smoke",
            "--data_dir",
            PERSONA_FIXTURE,
            "--settings",
            "persona-standard",
            "synthetic",
            "--output_dir",
            str(tmp_path),
            "--cache_dir",
            str(tmp_path / "cache"),
        ]
    )
    result = read(tmp_path, "active")
    for name in ("persona-standard", "synthetic"):
        setting = result["settings"][name]
        accuracies = setting["validation_accuracy_by_K"]
        assert sorted(accuracies, key=int) == ["1", "2"]
        best = max(accuracies.values())
        assert setting["K"] == min(int(k) for k, v in accuracies.items() if v == best)  # ties: the smaller K
        for kind in ("random", "active"):
            assert sorted(setting[kind], key=int) == ["1", "2", "3"]
            assert all(in_unit_interval(v) for v in setting[kind].values())
        assert isinstance(next(iter(setting["met"].values())), bool)


def test_summary_smoke(tmp_path):
    load_script("summary").main(["--smoke", "--output_dir", str(tmp_path), "--cache_dir", str(tmp_path / "cache")])
    result = read(tmp_path, "summary")
    assert result["source"] == "fixture" and result["sizes"]["train"] > 0 and result["sizes"]["unseen_test"] > 0
    assert set(result["models"]) == {
        "one reward for everyone",
        "independent head per user",
        "per-group oracle",
        "PAL-A K=2",
        "PAL-B K=2",
    }
    assert all(in_unit_interval(m["seen_accuracy"]) for m in result["models"].values())


def test_images_smoke(tmp_path):
    result = load_script("images").main(["--smoke", "--output_dir", str(tmp_path)])
    assert read(tmp_path, "images")["models"] == json.loads(json.dumps(result["models"]))
    assert set(result["models"]) == {"one reward for everyone", "PAL-A K=2", "PAL-B K=2"}
    assert result["selected_pal"] in ("PAL-A K=2", "PAL-B K=2")
    assert all(in_unit_interval(m["seen_accuracy"]) for m in result["models"].values())
    assert all(in_unit_interval(v) for m in result["models"].values() for v in m["unseen_accuracy"].values())
    sizes = result["data"]["sizes"]
    # every image once and each distinct caption once, shared by the three models
    assert 0 < result["images_and_captions_encoded"] <= 2 * sum(sizes.values()) + sum(sizes.values())


def test_summary_lore_smoke(tmp_path, capsys):
    script = load_script("summary")
    with pytest.raises(SystemExit):  # argparse names the choices
        script.main(["--protocol", "length"])
    error = capsys.readouterr().err
    assert "argument --protocol: invalid choice: 'length'" in error and "lore" in error
    script.main(
        ["--protocol", "lore", "--smoke", "--output_dir", str(tmp_path), "--cache_dir", str(tmp_path / "cache")]
    )
    result = read(tmp_path, "summary-lore")
    assert result["protocol"] == "lore" and result["source"] == "fixture" and result["sizes"]["unseen_test"] > 0
    assert result["command"] == "python examples/benchmarks/summary.py --protocol lore --smoke"
    assert set(result["models"]) == {"one reward for everyone", "independent head per user", "PAL-A K=2", "PAL-B K=2"}
    assert all(in_unit_interval(m["seen_accuracy"]) for m in result["models"].values())
    assert all(in_unit_interval(m["unseen_accuracy"]["3"]) for m in result["models"].values())


def test_prism_smoke(tmp_path):
    load_script("prism").main(["--smoke", "--output_dir", str(tmp_path), "--cache_dir", str(tmp_path / "cache")])
    result = read(tmp_path, "prism")
    assert result["source"] == "fixture" and result["users"] == {
        "train": 8,
        "validation": 8,
        "test": 8,
        "unseen_train": 2,
        "unseen_test": 2,
    }
    assert result["sizes"]["unseen_train"] == 6  # 3 shots for each of the 2 unseen users
    assert set(result["models"]) == {"one reward for everyone", "independent head per user", "PAL-A K=2", "PAL-B K=2"}
    for values in result["models"].values():
        assert in_unit_interval(values["validation_accuracy"]) and in_unit_interval(values["seen_accuracy"])
        assert in_unit_interval(values["unseen_accuracy"]["3"])


def test_personalllm_smoke(tmp_path):
    load_script("personalllm").main(["--smoke", "--output_dir", str(tmp_path), "--cache_dir", str(tmp_path / "cache")])
    result = read(tmp_path, "personalllm")
    assert result["source"] == "fixture"
    assert result["users"] == {"train": 8, "validation": 8, "test": 8, "unseen_train": 4, "unseen_test": 4}
    assert result["sizes"]["train"] == 8 * 16 and result["sizes"]["unseen_train"] == 4 * 4  # one per (user, prompt)
    assert set(result["models"]) == {
        "one reward for everyone",
        "independent head per user",
        "LoRe (low-rank basis)",
        "PAL-A K=2",
        "PAL-B K=2",
    }
    for values in result["models"].values():
        assert in_unit_interval(values["validation_accuracy"]) and in_unit_interval(values["seen_accuracy"])
        assert in_unit_interval(values["unseen_accuracy"]["4"])


def test_downstream_best_of_n_smoke(tmp_path):
    result = load_script("downstream").main(["--smoke", "--output_dir", str(tmp_path)])
    assert read(tmp_path, "downstream")["agreement"] == json.loads(json.dumps(result["agreement"]))
    assert set(result["agreement"]) == {"PAL-B K=4", "one reward for everyone", "LoRe (low-rank basis)"}
    assert all(set(values) == {"test", "unseen_test"} for values in result["agreement"].values())
    assert all(in_unit_interval(v) for values in result["agreement"].values() for v in values.values())
    assert result["pairwise_accuracy"].keys() == result["agreement"].keys()
    assert all(in_unit_interval(v) for values in result["pairwise_accuracy"].values() for v in values.values())
    assert result["questions"]["test"] > 0 and result["questions"]["unseen_test"] > 0


def test_candidate_sets_have_a_unique_true_best():
    from pal_rm.data import load_demo_preferences

    script = load_script("downstream")
    data = load_demo_preferences(users_per_group=1, num_mixture_users=2, pairs_per_user=8, num_unseen_users=1)
    questions = script.candidate_sets(data, ("test",), n=5, seed=0)
    assert len(questions) == len(data["test"])
    for question, row in zip(questions, data["test"]):
        assert question["texts"][:2] == [row["chosen"], row["rejected"]] and len(set(question["texts"])) == 5
        assert len(set(question["utilities"])) == 5
        assert question["utilities"][0] > question["utilities"][1]  # the user's label agrees with the true utilities


def test_speed_smoke(tmp_path):
    load_script("speed").main(["--smoke", "--data_dir", PERSONA_FIXTURE, "--output_dir", str(tmp_path)])
    result = read(tmp_path, "speed")
    assert result["cached"]["texts_encoded"] < result["naive"]["texts_encoded"]
    assert result["training_speedup"] > 0 and result["adapt"]["users"] == 20
    assert set(result["adapt"]["fits"]) == {"learned", "empirical", "gaussian"}
    assert result["users"]["registered_users"] == 10_000 and result["users"]["reward_is_finite"]
    assert result["users"]["rows_found"] == [9_999, 5_000]
    assert set(result["scoring"]["median_seconds"]) == {"backbone", "pal_a", "pal_b", "backbone_items_and_prompts"}
    scale = result["many_users"]
    assert scale["many_users"]["users"] == 2_000 and scale["many_users"]["sparse"]
    assert scale["many_users"]["evaluated_users"] == 2_000 and not scale["many_users_dense"]["sparse"]
    assert scale["step_ratio_many_over_few"] > 0 and scale["few_users"]["steps_timed"] == 3
    assert (tmp_path / "speed.png").exists()


def test_big_backbone_smoke(tmp_path):
    result = load_script("big_backbone").main(["--smoke", "--output_dir", str(tmp_path)])
    assert read(tmp_path, "big_backbone") == result
    assert set(result["results"]) == {"automodel", "from_backbone", "rebuild"}
    assert result["results"]["from_backbone"]["backbone_dtype"] == "torch.bfloat16"
    assert result["results"]["from_backbone"]["pal_parameter_dtypes"] == ["torch.float32"]
    assert result["peak_rss_ratio"] > 0


def test_checkpoints_smoke(tmp_path):
    load_script("checkpoints").main(["--smoke", "--output_dir", str(tmp_path)])
    rows = {row["layout"]: row for row in read(tmp_path, "checkpoints")["results"]}
    assert list(rows) == ["full", "reference", "lora_adapter", "lora_merged"]
    assert all(row["bit_identical"] for row in rows.values())
    assert rows["reference"]["size_mb"] < rows["lora_adapter"]["size_mb"] < rows["full"]["size_mb"]


def test_lora_smoke(tmp_path):
    """The LoRA benchmark's three systems on a tiny random Llama (the real run uses SmolLM2-135M)."""
    import torch
    from conftest import make_word_tokenizer, tiny_backbone_config
    from transformers import LlamaModel

    script = load_script("lora")
    data = script.load_data(script.parse_args(["--smoke", "--data_dir", PERSONA_FIXTURE]))
    texts = [row[column] for split in data.values() for row in split for column in ("prompt", "chosen", "rejected")]
    tokenizer = make_word_tokenizer(texts)
    torch.manual_seed(0)
    backbone = tmp_path / "llama"
    LlamaModel(tiny_backbone_config("llama", len(tokenizer), num_layers=2)).save_pretrained(backbone)
    tokenizer.save_pretrained(backbone)
    result = script.main(
        ["--smoke", "--data_dir", PERSONA_FIXTURE, "--backbone", str(backbone), "--output_dir", str(tmp_path)]
    )
    assert read(tmp_path, "lora-smoke")["results"] == result["results"]
    rows = result["results"]
    assert list(rows) == ["PAL-B frozen", "PAL-B + LoRA", "TRL RewardTrainer + LoRA"]
    for row in rows.values():
        assert in_unit_interval(row["test_accuracy"]) and row["steps"] > 0 and row["peak_rss_mb"] > 0
    # LoRA adds its matrices to PAL's trainable parameters; TRL trains LoRA and its score head only.
    assert rows["PAL-B + LoRA"]["trainable_parameters"] > rows["PAL-B frozen"]["trainable_parameters"]
    assert set(result["targets"]) and all(isinstance(t["met"], bool) for t in result["targets"].values())


def test_multi_process_smoke(tmp_path):
    result = load_script("multi_process").main(["--smoke", "--repeats", "1", "--output_dir", str(tmp_path)])
    assert read(tmp_path, "multi_process")["two_over_one"] == result["two_over_one"] > 0
    assert result["texts_encoded_in_total"] == result["unique_texts"]  # each text once in the 2-process job
    assert len(result["texts_encoded_per_process"]) == 2 and min(result["texts_encoded_per_process"]) > 0
    two = result["feature_megabytes_per_process"]["2_processes"]
    assert two[0] == two[1] == result["feature_megabytes_per_process"]["1_process"][0] > 0


def test_render_results_from_json(tmp_path):
    render = load_script("render_results")
    results_dir = tmp_path / "results"
    results_dir.mkdir()
    synthetic = {
        "machine": {"cpu": "test cpu", "cpu_count": 2, "torch": "x"},
        "wall_time_seconds": 60.0,
        "command": "python examples/benchmarks/synthetic.py",
        "config": {"dim": 16, "unseen_shots": 20},
        "met_within_1_point": False,
        "runs": {
            "2/50": {
                "true_k": 2,
                "pairs_per_user": 50,
                "bayes_optimal": {"test": {"realized": 0.8520}, "unseen_test": {"realized": 0.84}},
                "models": {"PAL-A K=2": {"K": 2, "seen_accuracy": 0.8437, "unseen_accuracy": 0.8123}},
            }
        },
    }
    (results_dir / "synthetic.json").write_text(json.dumps(synthetic))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:start -->\nold\n<!-- results:end -->\nrest\n")
    assert render.main(["--results_dir", str(results_dir), "--readme", str(readme), "--check"]) == 1
    assert render.main(["--results_dir", str(results_dir), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n<!-- results:start -->\n") and text.endswith("<!-- results:end -->\nrest\n")
    assert "| 2 | 50 | PAL-A K=2 | 0.844 | 0.852 | -0.8 | 0.812 | 0.840 |" in text
    assert "K*=2, 50 pairs/user: -2.8. Within 1.5 points everywhere: **missed**" in text
    assert "Not run yet: `python examples/benchmarks/persona.py`" in text and "old" not in text
    assert render.main(["--results_dir", str(results_dir), "--readme", str(readme), "--check"]) == 0
    with pytest.raises(ValueError, match="markers"):
        render.update_readme("no markers", "body")


def test_readme_results_are_generated_from_the_committed_json():
    render = load_script("render_results")
    assert render.main(["--check"]) == 0, (
        "README.md's Results section is stale: run examples/benchmarks/render_results.py"
    )


def test_pick_a_filter_smoke(tmp_path):
    arguments = ["--smoke", "--output_dir", str(tmp_path), "--build_rows", "40", "--memory_images", "6"]
    load_script("pick_a_filter").main(arguments)
    result = read(tmp_path, "pick_a_filter")
    memory = result["encoding_memory"]
    assert set(memory) == {"chunks of 6", "chunks of 512", "chunks of 2048"}
    assert all(run["encoded"] == 6 and run["peak_gib"] >= run["before_gib"] > 0 for run in memory.values())
    build = result["build_throughput"]
    assert set(build) == {"1 process", "2 processes"}
    assert build["1 process"]["comparisons"] == build["2 processes"]["comparisons"] > 0
    assert result["source"] == "fixture" and result["shots"] == 4
    assert set(result["filtered_images"]) == {"none", "chosen", "rejected"}
    assert sum(result["sizes"].values()) == sum(result["filtered_images"].values())
    assert set(result["models"]) == {
        "one reward for everyone",
        "independent head per user",
        "per-group oracle",
        "LoRe (low-rank basis)",
        "PAL-A K=2",
        "PAL-B K=2",
    }
    for name, values in result["models"].items():
        assert in_unit_interval(values["validation_accuracy"]) and in_unit_interval(values["seen_accuracy"])
        unseen = (
            values["unseen_accuracy_true_mixture"] if name == "per-group oracle" else values["unseen_accuracy"]["4"]
        )
        assert in_unit_interval(unseen)
