"""
Several processes on the CPU: two gloo processes started by `accelerate launch` train like one process with twice the
batch, encode every unique text once in the whole job, and end with identical user tables (DDP; DeepSpeed ZeRO-2 when
installed; FSDP2 applied by hand). The feature table is held once, optionally in half precision.

Why one process with batches of 2B and two with batches of B agree, but not bit for bit: accelerate gives process p the
batches p, p + 2, ... of the same seeded order, so a step of the two processes covers exactly the pairs of one step of
the single process (the training set is a multiple of 2B, so no process pads its last batch), and DDP averages the two
half-batch gradients, which is the full-batch gradient. Only the order of the floating-point sums differs, so the
parameters agree to about 1e-6 and the predictions, hence the accuracies, agree unless a pair sits on a tie.
"""

import json
import logging
import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import make_word_tokenizer, tiny_model
from datasets import Dataset

from pal_rm.cache import FeatureStore
from pal_rm.trainers import DataCollatorForPersonalizedPreference, PalRewardConfig, PalRewardTrainer

TESTS = os.path.dirname(os.path.abspath(__file__))
ACCELERATE = os.path.join(os.path.dirname(sys.executable), "accelerate")
EPOCHS = "10"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(script: str, output_dir, *arguments: str) -> list[dict]:
    """Runs `script` in 2 gloo processes: `accelerate launch --multi_gpu` starts them (torchrun), and the script's
    `use_cpu=True` (`--use_cpu true` for `train_pal.py`) makes them join one gloo group on a machine without GPUs."""
    command = [
        ACCELERATE,
        "launch",
        "--multi_gpu",
        "--num_processes=2",
        "--num_machines=1",
        "--mixed_precision=no",
        "--dynamo_backend=no",
        f"--main_process_port={free_port()}",
        os.path.join(TESTS, script),
        *arguments,
    ]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-6000:]
    return [json.load(open(os.path.join(output_dir, f"rank{rank}.json"))) for rank in (0, 1)]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: the same training in this process, with batches of 32 pairs."""
    sys.path.insert(0, TESTS)
    try:
        from multiprocess_worker import run
    finally:
        sys.path.remove(TESTS)
    return run(str(tmp_path_factory.mktemp("one")), batch_size=32, epochs=int(EPOCHS))


def assert_trained_like_one_process(ranks: list[dict], one_process: dict) -> None:
    for rank in ranks:
        assert rank["num_processes"] == 2 and rank["train_steps"] == one_process["train_steps"]
        assert rank["user_ids"] == one_process["user_ids"]
        torch.testing.assert_close(
            torch.tensor(rank["user_table"]), torch.tensor(one_process["user_table"]), atol=1e-5, rtol=0
        )
        # Accuracies over 48 seen-user and 160 unseen-user test pairs: equal but for a pair on a tie.
        assert rank["seen_accuracy"] == pytest.approx(one_process["seen_accuracy"], abs=1 / 48 + 1e-6)
        assert rank["unseen_accuracy"] == pytest.approx(one_process["unseen_accuracy"], abs=1 / 160 + 1e-6)
    assert one_process["seen_accuracy"] > 0.65 and one_process["unseen_accuracy"] > 0.65  # it learned something
    # Every process ends with the same user table and population mixture, bit for bit.
    assert ranks[0]["user_table"] == ranks[1]["user_table"]
    assert ranks[0]["population_mixture"] == ranks[1]["population_mixture"]


def test_two_processes_train_like_one_and_encode_each_text_once(tmp_path, one_process):
    output_dir = tmp_path / "two"
    ranks = launch(
        "multiprocess_worker.py",
        output_dir,
        f"--output_dir={output_dir}",
        "--batch_size=16",
        f"--epochs={EPOCHS}",
        f"--cache_dir={tmp_path / 'cache'}",
    )
    assert all(rank["distributed_type"] == "DistributedType.MULTI_CPU" for rank in ranks)
    assert_trained_like_one_process(ranks, one_process)
    assert all(rank["mixture_entropy_logged"] for rank in ranks)

    # Each unique text went through the backbone in exactly one process, and the work was split in halves.
    first, second = (set(rank["encoded"]) for rank in ranks)
    assert len(first) == len(ranks[0]["encoded"]) and len(second) == len(ranks[1]["encoded"])  # no text twice
    assert not first & second
    assert first | second == set(one_process["encoded"])
    assert len(first | second) == ranks[0]["feature_rows"] == one_process["feature_rows"]
    assert abs(len(first) - len(second)) <= 5  # one split per encoding call, each within one text
    assert [rank["num_encoded"] for rank in ranks] == [len(first), len(second)]
    # Every process holds the whole table once; the model saved after adapt_users holds the grown table.
    assert ranks[0]["feature_bytes"] == ranks[1]["feature_bytes"] == one_process["feature_bytes"]
    assert ranks[0]["saved_user_table_matches"] and one_process["saved_user_table_matches"]

    # The main process alone wrote the cache; a new cache on that folder reads every text back in both processes.
    assert ranks[0]["cache_writes"] >= 1 and ranks[1]["cache_writes"] == 0
    assert [rank["reread_encoded"] for rank in ranks] == [0, 0]
    assert all(rank["reread_matches"] and rank["reread_rows"] == rank["feature_rows"] for rank in ranks)
    assert not [name for name in os.listdir(tmp_path / "cache") if not name.endswith(".safetensors")]

    # A failure or a disagreement on one process is an error on every process, not a hang.
    for rank in ranks:
        assert "disagree on the texts to encode" in rank["disagreement_error"]
    assert ranks[1]["failure_error"] == "ValueError: the backbone failed here"
    assert ranks[0]["failure_error"].startswith("RuntimeError: Encoding the texts failed on process 1")
    # Lockstep (for sharded backbones): 3 texts on 2 processes, both run 2 batches of 1; the features are right.
    assert [rank["lockstep_encoded"] for rank in ranks] == [2, 2]
    assert all(rank["lockstep_matches"] for rank in ranks)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_trains_like_one_process(tmp_path, one_process, stage):
    """ZeRO-2, and ZeRO-3 (parameters partitioned: PAL gathers its own for the steps outside `forward`, encodes new
    texts in lockstep, and saves the user table grown by `adapt_users`). The first run compiles DeepSpeed's CPU
    communication op (minutes, cached in ~/.cache/torch_extensions)."""
    pytest.importorskip(
        "deepspeed", reason="DeepSpeed is optional: `DS_BUILD_OPS=0 pip install deepspeed` installs it without CUDA"
    )
    config = tmp_path / "zero.json"
    config.write_text(
        json.dumps(
            {
                "zero_optimization": {"stage": stage, "stage3_gather_16bit_weights_on_model_save": True},
                "train_micro_batch_size_per_gpu": "auto",
                "train_batch_size": "auto",
                "gradient_accumulation_steps": "auto",
                "gradient_clipping": "auto",
                "zero_allow_untested_optimizer": True,  # PAL's own parameter groups, not a DeepSpeed optimizer
            }
        )
    )
    output_dir = tmp_path / "zero"
    ranks = launch(
        "multiprocess_worker.py",
        output_dir,
        f"--output_dir={output_dir}",
        "--batch_size=16",
        f"--epochs={EPOCHS}",
        f"--deepspeed={config}",
    )
    assert all(rank["distributed_type"] == "DistributedType.DEEPSPEED" for rank in ranks)
    assert_trained_like_one_process(ranks, one_process)
    first, second = (set(rank["encoded"]) for rank in ranks)
    assert not first & second and first | second == set(one_process["encoded"])
    assert ranks[0]["saved_user_table_matches"]  # saved after adapt_users, the grown table included


def test_fsdp2_sharded_pal_steps_and_replicated_user_table(tmp_path):
    ranks = launch("fsdp2_worker.py", tmp_path, str(tmp_path))
    for rank in ranks:
        assert rank["table_sharded"]  # the worst case: a sharded user table
        assert rank["refresh_matches"]  # population refresh reads the whole table
        assert rank["adapted_rows"] == [4, 5] and rank["old_rows_kept"]  # adapt_users grows it
        assert rank["num_users_after_truncate"] == 4
        assert rank["replicated_is_plain"]
    assert ranks[0]["user_table"] == ranks[1]["user_table"]
    assert ranks[0]["new_user_rewards"] == ranks[1]["new_user_rewards"]
    # Different data on each process, one averaged gradient for the replicated table.
    assert ranks[0]["replicated_gradient"] == ranks[1]["replicated_gradient"]
    assert torch.tensor(ranks[0]["replicated_gradient"]).abs().sum() > 0


def test_two_processes_encode_an_image_column_in_chunks_once(tmp_path):
    """An image column read a chunk at a time by two processes: each distinct image goes through one backbone once,
    and both processes end with the one-process rows and table."""
    ranks = launch("image_store_worker.py", tmp_path, str(tmp_path))
    sys.path.insert(0, TESTS)
    try:
        from image_store_worker import encode
    finally:
        sys.path.remove(TESTS)
    one = encode(str(tmp_path / "one"), distributed=False)
    assert one["num_encoded"] == one["distinct"] == 7
    for rank in ranks:
        assert rank["num_processes"] == 2 and rank["rows"] == one["rows"]
        torch.testing.assert_close(torch.tensor(rank["table"]), torch.tensor(one["table"]), atol=1e-5, rtol=0)
    assert ranks[0]["table"] == ranks[1]["table"]
    assert ranks[0]["num_encoded"] + ranks[1]["num_encoded"] == 7  # split between the processes, none twice
    assert os.path.exists(tmp_path / "cache")


# ---------------------------------------------------------------- in this process
def test_processes_without_a_process_group_are_an_error(tmp_path, monkeypatch, word_tokenizer):
    args = PalRewardConfig(str(tmp_path), use_cpu=True)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it, but this process joined no group
    model = tiny_model(vocab_size=len(word_tokenizer))
    with pytest.raises(RuntimeError, match=r"WORLD_SIZE=2.*pass `--use_cpu true`"):
        FeatureStore().encode_rows(model, word_tokenizer, ["the quick fox"], distributed=True)
    with pytest.raises(RuntimeError, match=r"one of 2 \(WORLD_SIZE=2\) but is not part of a process group"):
        PalRewardTrainer(model, args, train_dataset=texts_dataset())


def test_feature_table_in_half_precision():
    features = torch.randn(3, 8)
    full, half = FeatureStore(), FeatureStore(dtype="float16")
    assert full.add(["a", "b", "c"], features) == half.add(["a", "b", "c"], features) == [0, 1, 2]
    assert half.table.dtype == torch.float16 and half.nbytes * 2 == full.nbytes == 3 * 8 * 4
    torch.testing.assert_close(half.table.float(), features, atol=2e-3, rtol=1e-3)
    with pytest.raises(ValueError, match="exceed the range of torch.float16; use `feature_dtype='bfloat16'`"):
        half.add(["big"], torch.full((1, 8), 1e6))
    assert half.missing(["big"]) == ["big"]  # nothing half-added
    with pytest.raises(ValueError, match="width 4 cannot join a feature table of width 8"):
        full.add(["narrow"], torch.randn(1, 4))
    collator = DataCollatorForPersonalizedPreference(features=half)
    batch = collator([{"chosen_index": 0, "rejected_index": 1, "prompt_index": 2, "user_index": 0}])
    assert batch["item_features"].dtype == batch["prompt_features"].dtype == torch.float32


def texts_dataset(num_rows: int = 8) -> Dataset:
    return Dataset.from_dict(
        {
            "user_id": [("alice", "bob")[row % 2] for row in range(num_rows)],
            "prompt": [f"what is this {row}" for row in range(num_rows)],
            "chosen": ["the quick fox"] * num_rows,
            "rejected": ["a lazy dog"] * num_rows,
        }
    )


def test_trainer_holds_features_once_and_shares_them_with_its_cache(tmp_path):
    tokenizer = make_word_tokenizer(["what is this the quick fox a lazy dog 0 1 2 3 4 5 6 7"])
    args = PalRewardConfig(
        str(tmp_path / "out"), use_cpu=True, disable_tqdm=True, max_steps=2, per_device_train_batch_size=4
    )
    model = tiny_model(vocab_size=len(tokenizer), variant="b")
    trainer = PalRewardTrainer(model, args, train_dataset=texts_dataset(), processing_class=tokenizer)
    table = trainer.feature_store
    assert len(table) == 24  # 8 prompts and 16 prompt + response texts, once each
    assert table is trainer.embedding_cache and table.fingerprint == trainer._backbone_fingerprint  # one store
    assert trainer.data_collator.features is table
    # Another trainer on the same backbone and cache (the script's baseline) uses that table and encodes nothing.
    baseline = tiny_model(vocab_size=len(tokenizer), variant="a", num_prototypes=1)
    baseline.backbone.load_state_dict(model.backbone.state_dict())
    second = PalRewardTrainer(
        baseline,
        args,
        train_dataset=texts_dataset(),
        processing_class=tokenizer,
        embedding_cache=trainer.embedding_cache,
    )
    assert second.feature_store is table and trainer.embedding_cache.num_encoded == 24
    trainer.train()
    trainer.evaluate(texts_dataset())  # training changed the backbone's config (token ids), not its table
    assert trainer.embedding_cache.fingerprint == trainer._backbone_fingerprint and len(table) == 24


def test_feature_dtype_float16_trains_on_half_the_memory(tmp_path):
    tokenizer = make_word_tokenizer(["what is this the quick fox a lazy dog 0 1 2 3 4 5 6 7"])
    cache_dir = tmp_path / "cache"
    tables = {}
    for dtype in ("float32", "float16"):
        args = PalRewardConfig(
            str(tmp_path / dtype),
            use_cpu=True,
            disable_tqdm=True,
            max_steps=2,
            per_device_train_batch_size=4,
            feature_dtype=dtype,
            embedding_cache_dir=str(cache_dir),
        )
        model = tiny_model(vocab_size=len(tokenizer), variant="b")
        trainer = PalRewardTrainer(model, args, train_dataset=texts_dataset(), processing_class=tokenizer)
        trainer.train()
        tables[dtype] = trainer.feature_store
    assert tables["float16"].table.dtype == torch.float16
    assert tables["float16"].nbytes * 2 == tables["float32"].nbytes
    torch.testing.assert_close(tables["float16"].table.float(), tables["float32"].table, atol=2e-3, rtol=1e-3)
    # One file per dtype, each holding features and text keys together (one atomic write).
    names = sorted(os.listdir(cache_dir))
    assert len(names) == 2 and sum(name.endswith(".float16.safetensors") for name in names) == 1
    reread = FeatureStore(str(cache_dir), dtype="float16", fingerprint=trainer._backbone_fingerprint)
    assert torch.equal(reread.table, tables["float16"].table)


def test_feature_dtype_is_checked(tmp_path, word_tokenizer):
    with pytest.raises(ValueError, match="`feature_dtype` must be 'float32', 'float16' or 'bfloat16', got 'int8'"):
        PalRewardConfig(str(tmp_path), feature_dtype="int8")
    args = PalRewardConfig(str(tmp_path), use_cpu=True)
    with pytest.raises(ValueError, match=r"cache stores torch.float16 features but `feature_dtype` is 'float32'"):
        PalRewardTrainer(
            tiny_model(vocab_size=len(word_tokenizer)),
            args,
            train_dataset=texts_dataset(),
            processing_class=word_tokenizer,
            embedding_cache=FeatureStore(dtype="float16"),
        )


def test_fsdp2_trainer_keeps_the_user_table_out_of_sharding(tmp_path, word_tokenizer):
    """The wiring of `_replicate_user_table` (what `fully_shard` does with it is checked in the FSDP2 test)."""
    args = PalRewardConfig(str(tmp_path), use_cpu=True)
    model = tiny_model(vocab_size=len(word_tokenizer))
    trainer = PalRewardTrainer(model, args, train_dataset=texts_dataset(), processing_class=word_tokenizer)

    class Plugin:
        fsdp_version = 2
        ignored_modules = r"item_head"

    plugin = Plugin()
    state = trainer.accelerator.state
    original = getattr(state, "fsdp_plugin", None)
    trainer.is_fsdp_enabled = True
    state.fsdp_plugin = plugin
    try:
        trainer._replicate_user_table()
        trainer._replicate_user_table()  # once only
    finally:
        state.fsdp_plugin = original
    assert plugin.ignored_modules == [model.item_head, model.user_weights]
    assert model.user_weights.weight._pal_replicated
    assert len(model.user_weights.weight._backward_hooks) == 1


# ---------------------------------------------------------------- accelerate configs
ACCELERATE_CONFIGS = {
    "cpu_2proc.yaml": {"distributed_type": "MULTI_GPU", "multi_gpu": True, "use_cpu": True, "num_processes": 2},
    "multi_gpu.yaml": {"distributed_type": "MULTI_GPU", "multi_gpu": True, "use_cpu": False},
    "deepspeed_zero2.yaml": {"distributed_type": "DEEPSPEED", "use_deepspeed": True, "zero_stage": 2},
    "deepspeed_zero3.yaml": {
        "distributed_type": "DEEPSPEED",
        "use_deepspeed": True,
        "zero_stage": 3,
        "zero3_save_16bit_model": True,
    },
    "fsdp2.yaml": {
        "distributed_type": "FSDP",
        "use_fsdp": True,
        "fsdp_version": 2,
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_cpu_ram_efficient_loading": False,
    },
}


@pytest.mark.parametrize("name", sorted(ACCELERATE_CONFIGS))
def test_accelerate_config_is_read_by_accelerate_launch(name):
    """Each shipped config goes through accelerate's own loader and `accelerate launch`'s validation."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    path = os.path.join(os.path.dirname(TESTS), "hub_configs", "accelerate", name)
    config = load_config_from_file(path)
    args = launch_command_parser().parse_args(["--config_file", path, "trainers/train_pal.py"])
    args, _, _ = _validate_launch_command(args)
    for key, value in ACCELERATE_CONFIGS[name].items():
        actual = str(config.distributed_type).split(".")[-1] if key == "distributed_type" else getattr(args, key)
        assert actual == value, (key, actual)
    assert args.mixed_precision == "no"  # precision comes from the recipe (`bf16`), never silently from here


def test_every_accelerate_config_is_tested():
    folder = os.path.join(os.path.dirname(TESTS), "hub_configs", "accelerate")
    assert sorted(os.listdir(folder)) == sorted(ACCELERATE_CONFIGS)


def test_fsdp_cpu_ram_efficient_loading_is_refused(tmp_path, monkeypatch, word_tokenizer):
    args = PalRewardConfig(str(tmp_path), use_cpu=True)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")
    with pytest.raises(ValueError, match="set `fsdp_cpu_ram_efficient_loading: false`"):
        PalRewardTrainer(
            tiny_model(vocab_size=len(word_tokenizer)),
            args,
            train_dataset=texts_dataset(),
            processing_class=word_tokenizer,
        )


def test_cache_write_failure_is_a_warning(tmp_path, caplog, word_tokenizer):
    """The main process failing to write the cache must not leave the others waiting: a warning, features kept."""
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    model = tiny_model(vocab_size=len(word_tokenizer))
    cache = FeatureStore(str(blocked))
    with caplog.at_level(logging.WARNING, logger="pal_rm.cache"):
        features = cache.encode(model, word_tokenizer, ["the quick fox", "a lazy dog"], show_progress=False)
    assert "Could not write the embedding cache" in caplog.text
    assert features.shape == (2, 32) and cache.num_encoded == 2
