"""`train_pal.py` on your own data: a Hub id, a local folder or local files with a user column."""

import json
import logging
import os

import datasets
import pytest
import torch
from conftest import make_word_tokenizer, tiny_backbone_config
from transformers import GPT2Model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLITS = ("train", "validation", "test", "unseen_train", "unseen_test")


def train_pal():
    from pal_rm.trainers import train_pal  # trainers/ is installed as pal_rm.trainers

    return train_pal


@pytest.fixture(scope="module")
def preferences():
    """Small demo preferences with the user column renamed to `worker`, as a user's own data would name it."""
    from pal_rm.data import load_demo_preferences

    data = load_demo_preferences(
        num_groups=2,
        users_per_group=2,
        num_mixture_users=0,
        pairs_per_user=20,
        num_unseen_users=2,
        unseen_shots=6,
        unseen_test_pairs=6,
        seed=3,
    )
    columns = ["user_id", "prompt", "chosen", "rejected"]
    return datasets.DatasetDict(
        {name: split.select_columns(columns).rename_column("user_id", "worker") for name, split in data.items()}
    )


@pytest.fixture(scope="module")
def backbone_folder(tmp_path_factory, preferences):
    """A tiny random GPT-2 backbone and its word-level tokenizer, saved as a model folder."""
    folder = tmp_path_factory.mktemp("tiny-backbone")
    texts = [
        text for split in preferences.values() for column in ("prompt", "chosen", "rejected") for text in split[column]
    ]
    tokenizer = make_word_tokenizer(texts)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    GPT2Model(tiny_backbone_config("gpt2", len(tokenizer))).save_pretrained(folder)
    return str(folder)


def write_folder(preferences, folder, extension: str, splits=SPLITS) -> str:
    os.makedirs(folder, exist_ok=True)
    for name in splits:
        path = os.path.join(folder, f"{name}.{extension}")
        {"jsonl": preferences[name].to_json, "parquet": preferences[name].to_parquet, "csv": preferences[name].to_csv}[
            extension
        ](path)
    return str(folder)


def script_args(**overrides):
    return train_pal().PalScriptArguments(**overrides)


# ---------------------------------------------------------------------- loading
@pytest.mark.parametrize("extension", ["jsonl", "parquet", "csv"])
def test_a_local_folder_gives_one_split_per_file(tmp_path, preferences, extension):
    folder = write_folder(preferences, tmp_path / "prefs", extension)
    loaded = train_pal().load_own_dataset(folder)
    # `datasets.load_dataset(folder)` alone would put unseen_train.jsonl into the train split.
    assert set(loaded) == set(SPLITS)
    for name in SPLITS:
        assert loaded[name].num_rows == preferences[name].num_rows
        assert loaded[name]["worker"] == preferences[name]["worker"]


def test_local_files_and_save_to_disk_folders(tmp_path, preferences):
    module = train_pal()
    single = tmp_path / "prefs.parquet"
    preferences["train"].to_parquet(str(single))
    assert dict(module.load_own_dataset(str(single)).num_rows) == {"train": preferences["train"].num_rows}

    folder = write_folder(preferences, tmp_path / "files", "jsonl", splits=("train", "test"))
    several = ",".join(os.path.join(folder, f"{name}.jsonl") for name in ("train", "test"))
    assert set(module.load_own_dataset(several)) == {"train", "test"}

    shards = tmp_path / "shards"
    shards.mkdir()
    for index, shard in enumerate((preferences["train"].select(range(5)), preferences["train"].select(range(5, 9)))):
        shard.to_parquet(str(shards / f"train-{index:05d}-of-00002.parquet"))
    assert dict(module.load_own_dataset(str(shards)).num_rows) == {"train": 9}

    preferences.save_to_disk(str(tmp_path / "saved"))
    assert set(module.load_own_dataset(str(tmp_path / "saved"))) == set(SPLITS)


def test_a_hub_id_goes_to_load_dataset_with_its_config(monkeypatch, preferences):
    calls = []

    def load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        return preferences

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    args = script_args(dataset_name="org/prefs", dataset_config="v2", dataset_kwargs='{"revision": "main"}')
    assert train_pal().load_preference_dataset(args) is preferences
    assert calls == [("org/prefs", "v2", {"revision": "main"})]


def test_loading_errors_name_the_problem(tmp_path, preferences):
    module = train_pal()
    with pytest.raises(FileNotFoundError, match=r"data files that do not exist: \['missing.jsonl'\]"):
        module.load_own_dataset("missing.jsonl")
    mixed = tmp_path / "mixed"
    write_folder(preferences, mixed, "jsonl", splits=("train",))
    preferences["test"].to_parquet(str(mixed / "test.parquet"))
    with pytest.raises(ValueError, match="mix formats"):
        module.load_own_dataset(str(mixed))
    bad = tmp_path / "bad"
    bad.mkdir()
    preferences["train"].to_json(str(bad / "my prefs.jsonl"))
    with pytest.raises(ValueError, match="not a valid split name.*Rename the file"):
        module.load_own_dataset(str(bad))
    with pytest.raises(ValueError, match="may not set `streaming` or `split`"):
        module.load_own_dataset("org/prefs", load_kwargs={"streaming": True})


# ---------------------------------------------------------------------- splits
def test_splits_by_role_with_defaults_and_names(preferences):
    module = train_pal()
    renamed = datasets.DatasetDict(
        {
            "training": preferences["train"],
            "dev": preferences["validation"],
            "new_users_shots": preferences["unseen_train"],
            "new_users_eval": preferences["unseen_test"],
            "test": preferences["test"],
        }
    )
    args = script_args(
        dataset_name="org/prefs",
        dataset_train_split="training",
        dataset_validation_split="dev",
        dataset_unseen_train_split="new_users_shots",
        dataset_unseen_test_split="new_users_eval",
    )
    splits = module.select_splits(renamed, args, "worker", "error")
    assert list(splits) == list(SPLITS)  # test found by its default name
    assert splits["unseen_train"]["worker"] == preferences["unseen_train"]["worker"]

    only_train = module.select_splits(
        datasets.DatasetDict({"train": preferences["train"]}), args.__class__(), "worker", "error"
    )
    assert list(only_train) == ["train"]


def test_split_errors_name_what_the_dataset_has(preferences):
    module = train_pal()
    with pytest.raises(
        ValueError, match=r"no split 'dev' \(`--dataset_validation_split`\); its splits are \['train', "
    ):
        module.select_splits(preferences, script_args(dataset_validation_split="dev"), "worker", "error")
    with pytest.raises(ValueError, match=r"no split 'train' \(`--dataset_train_split`\); its splits are \['test'\]"):
        module.select_splits(datasets.DatasetDict({"test": preferences["test"]}), script_args(), "worker", "error")
    with pytest.raises(ValueError, match=r"has unseen_train \('unseen_train'\) but no unseen_test"):
        module.select_splits(
            datasets.DatasetDict({"train": preferences["train"], "unseen_train": preferences["unseen_train"]}),
            script_args(),
            "worker",
            "error",
        )
    with pytest.raises(
        ValueError, match=r"no user column 'user_id' \(columns: \['worker', 'prompt', .*`--user_column`"
    ):
        module.select_splits(preferences, script_args(), "user_id", "error")
    no_responses = datasets.DatasetDict({"train": preferences["train"].rename_column("chosen", "better")})
    with pytest.raises(ValueError, match=r"no `chosen` and `rejected` columns \(columns: \[.*'better'"):
        module.select_splits(no_responses, script_args(), "worker", "error")
    strangers = datasets.DatasetDict({"train": preferences["train"], "test": preferences["unseen_test"]})
    with pytest.raises(ValueError, match=r"Split 'test' \(test\) has 2 users with no comparison in the train split"):
        module.select_splits(strangers, script_args(), "worker", "error")
    assert list(module.select_splits(strangers, script_args(), "worker", "population")) == ["train", "test"]


# ---------------------------------------------------------------------- end to end
def run_script(arguments: list[str]) -> dict:
    module = train_pal()
    parsed = module.make_parser().parse_args_and_config(arguments)
    module.main(*parsed)
    output_dir = parsed[2].output_dir
    with open(os.path.join(output_dir, "results.json")) as file:
        return json.load(file)


COMMON = [
    "--user_column",
    "worker",
    "--num_train_epochs",
    "2",
    "--per_device_train_batch_size",
    "16",
    "--num_prototypes",
    "2",
    "--preference_dim",
    "8",
    "--disable_tqdm",
    "true",
    "--adapt_steps",
    "20",
]


def test_train_pal_on_a_local_parquet_folder_with_unseen_users(tmp_path, preferences, backbone_folder):
    """The own-data recipe on a parquet folder: trains on train, selects on validation, reports test, adapts the
    unseen users; the saved model reloads with every user."""
    from transformers import AutoModel

    folder = write_folder(preferences, tmp_path / "prefs", "parquet")
    output_dir = tmp_path / "out"
    results = run_script(
        ["--config", os.path.join(REPO, "hub_configs", "pal-own-data.yaml"), "--dataset_name", folder]
        + ["--model_name_or_path", backbone_folder, "--output_dir", str(output_dir)]
        + COMMON
    )["results"]
    pal = results["PAL-B (K=2)"]
    assert pal["seen_accuracy_split"] == "test" and 0 <= pal["seen_accuracy"] <= 1 and 0 <= pal["unseen_accuracy"] <= 1
    assert "Bradley-Terry (one reward for everyone)" in results

    model = AutoModel.from_pretrained(output_dir)
    seen = sorted(set(preferences["train"]["worker"]))  # the trainer registers users in sorted order
    unseen = list(dict.fromkeys(preferences["unseen_train"]["worker"]))
    assert model.config.user_ids == seen + unseen
    card = (output_dir / "README.md").read_text()
    assert "local data (prefs)" in card and str(tmp_path) not in card


def test_train_pal_on_a_local_jsonl_file_without_test_or_unseen_splits(tmp_path, preferences, backbone_folder, caplog):
    """Train and validation files only: seen-user accuracy on validation (said so), no adaptation."""
    folder = write_folder(preferences, tmp_path / "prefs", "jsonl", splits=("train", "validation"))
    files = ",".join(os.path.join(folder, f"{name}.jsonl") for name in ("train", "validation"))
    output_dir = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        results = run_script(
            ["--dataset_name", files, "--model_name_or_path", backbone_folder, "--output_dir", str(output_dir)]
            + ["--compare_baseline", "false", "--eval_strategy", "epoch"]
            + COMMON
        )["results"]
    assert "no test split: seen-user accuracy is reported on the validation split" in caplog.text
    pal = results["PAL-B (K=2)"]
    assert pal["seen_accuracy_split"] == "validation" and "unseen_accuracy" not in pal

    from transformers import AutoModel

    assert AutoModel.from_pretrained(output_dir).config.user_ids == sorted(set(preferences["train"]["worker"]))


def test_train_pal_on_one_file_turns_evaluation_off(tmp_path, preferences, backbone_folder, caplog):
    path = tmp_path / "prefs.jsonl"
    preferences["train"].to_json(str(path))
    with caplog.at_level(logging.WARNING):
        results = run_script(
            ["--dataset_name", str(path), "--model_name_or_path", backbone_folder, "--output_dir", str(tmp_path / "o")]
            + ["--compare_baseline", "false", "--sanity_checks", "false", "--eval_strategy", "epoch"]
            + COMMON
        )["results"]
    assert "no validation split: `eval_strategy='epoch'` is turned off" in caplog.text
    assert "neither a validation nor a test split" in caplog.text
    assert results["PAL-B (K=2)"] == {}
    with pytest.raises(ValueError, match="`load_best_model_at_end` selects a checkpoint on the validation split"):
        run_script(
            ["--dataset_name", str(path), "--model_name_or_path", backbone_folder, "--output_dir", str(tmp_path / "p")]
            + ["--eval_strategy", "epoch", "--save_strategy", "epoch", "--load_best_model_at_end", "true"]
            + COMMON
        )


def test_train_pal_saves_the_trained_model_before_adapting_unseen_users(
    tmp_path, monkeypatch, preferences, backbone_folder
):
    """A failure while fitting the unseen users leaves the trained model saved, with the seen users only."""
    from transformers import AutoModel

    from pal_rm.trainers import PalRewardTrainer

    def failing_adapt_users(self, *args, **kwargs):
        raise RuntimeError("adaptation failed")

    monkeypatch.setattr(PalRewardTrainer, "adapt_users", failing_adapt_users)
    folder = write_folder(preferences, tmp_path / "prefs", "parquet")
    output_dir = tmp_path / "out"
    with pytest.raises(RuntimeError, match="adaptation failed"):
        run_script(
            ["--dataset_name", folder, "--model_name_or_path", backbone_folder, "--output_dir", str(output_dir)]
            + ["--compare_baseline", "false"]
            + COMMON
        )
    model = AutoModel.from_pretrained(output_dir)
    assert model.config.user_ids == sorted(set(preferences["train"]["worker"]))


def test_train_pal_on_precomputed_features(tmp_path):
    """A dataset of feature columns (as a feature loader or `featurize_preferences` writes it) trains PAL's heads
    with no backbone; arguments that need a backbone are an error, not ignored."""
    from transformers import AutoModel

    from pal_rm.data import load_synthetic_preferences

    data = load_synthetic_preferences(
        num_groups=2, feature_dim=6, users_per_group=3, pairs_per_user=30, num_unseen_users=2, unseen_shots=10, seed=0
    )
    data.save_to_disk(str(tmp_path / "features"))
    arguments = ["--dataset_name", str(tmp_path / "features"), "--output_dir", str(tmp_path / "out")]
    arguments += ["--variant", "a", "--num_train_epochs", "5", "--per_device_train_batch_size", "16"]
    arguments += ["--num_prototypes", "2", "--preference_dim", "8", "--disable_tqdm", "true", "--adapt_steps", "20"]
    arguments += ["--report_to", "none", "--save_strategy", "no", "--compare_baseline", "true"]
    results = run_script(arguments)["results"]
    pal = results["PAL-A (K=2)"]
    assert 0 <= pal["seen_accuracy"] <= 1 and 0 <= pal["unseen_accuracy"] <= 1
    assert "Bradley-Terry (one reward for everyone)" in results
    model = AutoModel.from_pretrained(tmp_path / "out")
    assert model.config.feature_dim == 6 and model.backbone is None
    assert model.config.user_ids[:6] == sorted(set(data["train"]["user_id"]))

    module = train_pal()
    for extra, name in (
        (["--use_peft", "true", "--train_backbone", "true"], "--use_peft"),
        (["--model_name_or_path", "gpt2"], "--model_name_or_path"),
    ):
        parsed = module.make_parser().parse_args_and_config(arguments + extra)
        with pytest.raises(ValueError, match=rf"holds precomputed features.*{name}"):
            module.main(*parsed)
