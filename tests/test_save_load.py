"""All-or-nothing checkpoints: saves that fail or are killed at any step, files kept across saves, registry checks."""

import errno
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
import transformers.modeling_utils
from safetensors.torch import load_file, save_file

from pal_rm import PalConfig, PalRewardModel, modeling_pal

FEATURE_DIM = 16
FEATURES = torch.randn(5, FEATURE_DIM, generator=torch.Generator().manual_seed(0))
# Files that a Trainer or a user adds to a checkpoint folder, which a save must keep.
EXTRA_FILES = {
    "checkpoint-5/optimizer.pt": b"optimizer state",
    "checkpoint-5/nested/rng_state.pth": b"rng state",
    "training_args.bin": b"training arguments",
    "tokenizer.json": b'{"model": {}}',
    "tokenizer_config.json": b"{}",
    "README.md": b"# My reward model\n",
}


def feature_model(user_ids, seed: int, num_prototypes: int = 3, preference_dim: int = 8) -> PalRewardModel:
    torch.manual_seed(seed)
    config = PalConfig(feature_dim=FEATURE_DIM, num_prototypes=num_prototypes, preference_dim=preference_dim)
    model = PalRewardModel(config).eval()
    model.add_users(user_ids)
    return model


def rewards(model: PalRewardModel) -> torch.Tensor:
    """The rewards of FEATURES for the population and for alice and bob (registered in every model here)."""
    with torch.no_grad():
        return torch.stack(
            [model(item_features=FEATURES, user_ids=users).logits for users in (None, ["alice"] * 5, ["bob"] * 5)]
        )


@pytest.fixture(scope="module")
def model_a():
    return feature_model(["alice", "bob"], seed=1)


@pytest.fixture(scope="module")
def model_b():
    return feature_model(["alice", "bob", "carol"], seed=2)


def add_extra_files(folder) -> None:
    for name, content in EXTRA_FILES.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


def assert_extra_files(folder) -> None:
    for name, content in EXTRA_FILES.items():
        assert (folder / name).read_bytes() == content, name


def saved_as(folder, model_a, model_b) -> str:
    """'A' or 'B': whose checkpoint `folder` holds, asserting that it loads and gives exactly that model's rewards."""
    got = rewards(PalRewardModel.from_pretrained(folder).eval())
    if got.shape == rewards(model_a).shape and torch.equal(got, rewards(model_a)):
        return "A"
    assert got.shape == rewards(model_b).shape and torch.equal(got, rewards(model_b)), "neither A's nor B's rewards"
    return "B"


def use_two_renames(monkeypatch) -> None:
    """The swap's fallback, as on systems without renameat2(RENAME_EXCHANGE)."""
    monkeypatch.setattr(modeling_pal, "_exchange_folders", lambda first, second: False)


def ended_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# ---------------------------------------------------------------- what a save keeps and drops
def test_save_keeps_extra_files_as_hard_links_and_drops_stale_weights(tmp_path, model_a, model_b):
    folder = tmp_path / "checkpoint"
    model_a.save_pretrained(folder)
    add_extra_files(folder)
    (folder / "link-to-readme").symlink_to("README.md")
    # A previous sharded save, and a staging folder that an older pal-rm left inside the checkpoint.
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"stale shard")
    (folder / "model.safetensors.index.json").write_text("{}")
    (folder / ".pal-save-1234abcd").mkdir()
    # What a killed save of a checkpoint inside this folder left (the Trainer saves `checkpoint-*` folders there).
    (folder / f"_checkpoint-5.pal-staging-{modeling_pal._host_tag()}-{ended_pid()}-00aa").mkdir()
    inodes = {name: os.stat(folder / name).st_ino for name in EXTRA_FILES}

    model_b.save_pretrained(folder)

    assert saved_as(folder, model_a, model_b) == "B"
    assert_extra_files(folder)
    assert {name: os.stat(folder / name).st_ino for name in EXTRA_FILES} == inodes  # linked, not copied
    assert os.readlink(folder / "link-to-readme") == "README.md"
    assert not (folder / "model-00001-of-00002.safetensors").exists()
    assert not (folder / "model.safetensors.index.json").exists()
    assert not (folder / ".pal-save-1234abcd").exists()
    assert not [name for name in os.listdir(folder) if name.startswith("_")]
    assert json.loads((folder / "config.json").read_text())["user_ids"] == ["alice", "bob", "carol"]
    assert os.listdir(tmp_path) == ["checkpoint"]


def test_files_are_copied_where_hard_links_fail(tmp_path, model_a, model_b, monkeypatch, caplog):
    folder = tmp_path / "checkpoint"
    model_a.save_pretrained(folder)
    add_extra_files(folder)
    inodes = {name: os.stat(folder / name).st_ino for name in EXTRA_FILES}

    def no_hard_links(*args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_hard_links)
    with caplog.at_level(logging.WARNING, logger="pal_rm.modeling_pal"):
        model_b.save_pretrained(folder)
    assert "Could not hard-link files of the previous checkpoint" in caplog.text
    assert saved_as(folder, model_a, model_b) == "B"
    assert_extra_files(folder)
    assert all(os.stat(folder / name).st_ino != inode for name, inode in inodes.items())


def test_save_through_a_symlinked_folder_replaces_the_real_folder(tmp_path, model_a, model_b):
    real = tmp_path / "real"
    model_a.save_pretrained(real)
    add_extra_files(real)
    (tmp_path / "alias").symlink_to(real)
    model_b.save_pretrained(tmp_path / "alias")
    assert (tmp_path / "alias").is_symlink()
    assert saved_as(real, model_a, model_b) == "B"
    assert_extra_files(real)


def test_save_into_a_file_raises(tmp_path, model_a):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ValueError, match="should be a directory, not a file"):
        model_a.save_pretrained(tmp_path / "file")


def test_non_main_process_writes_no_checkpoint(tmp_path, model_a):
    model_a.save_pretrained(tmp_path / "checkpoint", is_main_process=False)
    assert not (tmp_path / "checkpoint" / "model.safetensors").exists()
    assert os.listdir(tmp_path) == ["checkpoint"]


def test_in_place_save_where_the_folder_cannot_be_swapped(tmp_path, model_a, model_b, monkeypatch, caplog):
    folder = tmp_path / "mounted"
    model_a.save_pretrained(folder)
    add_extra_files(folder)
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"stale shard")
    (folder / f"_pal-staging-{modeling_pal._host_tag()}-{ended_pid()}-0a1b").mkdir()  # left by a killed in-place save
    real_ismount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda path: path == os.path.realpath(folder) or real_ismount(path))
    with caplog.at_level(logging.WARNING, logger="pal_rm.modeling_pal"):
        model_b.save_pretrained(folder)
    assert "is a mount point" in caplog.text and "Save into a subfolder" in caplog.text
    assert saved_as(folder, model_a, model_b) == "B"
    assert_extra_files(folder)
    assert [name for name in os.listdir(folder) if name.startswith(("_", ".", "model-"))] == []
    assert os.listdir(tmp_path) == ["mounted"]


# ---------------------------------------------------------------- saves that fail
@pytest.mark.parametrize("swap", ["exchange", "two_renames"])
def test_save_failing_at_any_step_keeps_the_old_checkpoint(tmp_path, model_a, model_b, monkeypatch, swap):
    if swap == "two_renames":
        use_two_renames(monkeypatch)
    steps = [
        (os, "mkdir"),
        (os, "rename"),
        (os, "replace"),
        (os, "fsync"),
        (modeling_pal.shutil, "copyfile"),
        (modeling_pal.shutil, "copytree"),
        (modeling_pal, "_exchange_folders"),
        (transformers.modeling_utils, "safe_save_file"),
    ]
    failures = 0
    for failing_step in itertools.count():
        folder = tmp_path / f"run-{failing_step}" / "checkpoint"
        model_a.save_pretrained(folder)
        add_extra_files(folder)
        counter = itertools.count()
        with monkeypatch.context() as patch:
            for owner, name in steps:
                patch.setattr(owner, name, failing_at(failing_step, counter, getattr(owner, name)))
            try:
                model_b.save_pretrained(folder)
            except OSError as error:
                assert "injected failure" in str(error)
                failures += 1
                assert saved_as(folder, model_a, model_b) == "A"
            else:
                assert saved_as(folder, model_a, model_b) == "B"
                if next(counter) <= failing_step:
                    break  # no step was left to fail
        assert_extra_files(folder)
        assert os.listdir(folder.parent) == ["checkpoint"]  # no staging or backup folder left behind
    assert failures >= 15


def failing_at(failing_step: int, counter, function):
    def wrapper(*args, **kwargs):
        if next(counter) == failing_step:
            raise OSError(errno.EIO, "injected failure")
        return function(*args, **kwargs)

    return wrapper


# ---------------------------------------------------------------- saves that are killed
def killed_save(model, folder, kill_at_step: int, swap: str, torn_write: bool = False) -> int:
    """
    Saves `model` into `folder` in a forked child that sends itself SIGKILL just before its `kill_at_step`-th filesystem
    step (with `torn_write`: halfway through writing its `kill_at_step`-th weights file). Returns the wait status.
    """
    pid = os.fork()
    if pid:
        return os.waitpid(pid, 0)[1]
    try:  # the child: never returns into pytest
        counter = itertools.count()

        def kill_first(function):
            def wrapper(*args, **kwargs):
                if next(counter) == kill_at_step:
                    os.kill(os.getpid(), signal.SIGKILL)
                return function(*args, **kwargs)

            return wrapper

        def torn_safe_save_file(tensors, filename, metadata=None):
            save_file(tensors, filename, metadata=metadata)
            if next(counter) == kill_at_step:
                with open(filename, "r+b") as file:
                    file.truncate(os.path.getsize(filename) // 2)
                os.kill(os.getpid(), signal.SIGKILL)

        if swap == "two_renames":
            modeling_pal._exchange_folders = lambda first, second: False
        if torn_write:
            transformers.modeling_utils.safe_save_file = torn_safe_save_file
        else:
            for owner, name in (
                (os, "mkdir"),
                (os, "rename"),
                (os, "replace"),
                (os, "link"),
                (os, "fsync"),
                (modeling_pal.shutil, "copyfile"),
                (modeling_pal.shutil, "rmtree"),
                (modeling_pal, "_exchange_folders"),
                (transformers.modeling_utils, "safe_save_file"),
            ):
                setattr(owner, name, kill_first(getattr(owner, name)))
        model.save_pretrained(folder)
    except BaseException:
        os._exit(1)
    os._exit(0)


@pytest.mark.parametrize("swap", ["exchange", "two_renames"])
@pytest.mark.parametrize("torn_write", [False, True], ids=["between_steps", "torn_write"])
def test_save_killed_at_any_step_leaves_a_whole_checkpoint(tmp_path, model_a, model_b, swap, torn_write):
    folder = tmp_path / "checkpoint"
    model_a.save_pretrained(folder)
    add_extra_files(folder)
    outcomes, folder_was_missing = [], False
    for kill_at_step in range(200):
        status = killed_save(model_b, folder, kill_at_step, swap, torn_write)
        if os.WIFEXITED(status):
            assert os.WEXITSTATUS(status) == 0
            break  # the save finished: no step was left to kill it at
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        folder_was_missing |= not folder.exists()
        outcomes.append(saved_as(folder, model_a, model_b))
        assert_extra_files(folder)
        # The next save deletes what the killed one left beside the checkpoint.
        model_a.save_pretrained(folder)
        assert os.listdir(tmp_path) == ["checkpoint"]
        assert saved_as(folder, model_a, model_b) == "A"
        assert_extra_files(folder)
    else:
        pytest.fail("the save never finished")
    assert saved_as(folder, model_a, model_b) == "B"
    if torn_write:
        assert outcomes == ["A"]
    else:
        assert len(outcomes) >= 10 and "A" in outcomes and "B" in outcomes
        # Between the two renames of the fallback the folder is missing; loading it restores the old checkpoint.
        assert folder_was_missing == (swap == "two_renames")


# ---------------------------------------------------------------- recovery and leftovers
def make_backup(folder, pid: int, host: str | None = None):
    """Moves `folder` where a save killed between the two renames of the fallback swap leaves it."""
    host = modeling_pal._host_tag() if host is None else host
    backup = folder.parent / f"_{folder.name}.pal-backup-{host}-{pid}-00ff"
    folder.rename(backup)
    return backup


def test_next_load_restores_a_checkpoint_left_in_a_backup(tmp_path, model_a, model_b, caplog):
    folder = tmp_path / "checkpoint"
    model_a.save_pretrained(folder)
    make_backup(folder, ended_pid())
    with caplog.at_level(logging.WARNING, logger="pal_rm.modeling_pal"):
        assert saved_as(folder, model_a, model_b) == "A"
    assert "Restored the checkpoint" in caplog.text
    assert os.listdir(tmp_path) == ["checkpoint"]


def test_next_save_restores_a_backup_and_keeps_its_extra_files(tmp_path, model_a, model_b):
    folder = tmp_path / "checkpoint"
    model_a.save_pretrained(folder)
    add_extra_files(folder)
    make_backup(folder, ended_pid())
    folder.mkdir()  # the Trainer creates the output folder before it saves
    model_b.save_pretrained(folder)
    assert saved_as(folder, model_a, model_b) == "B"
    assert_extra_files(folder)
    assert os.listdir(tmp_path) == ["checkpoint"]


def test_folders_of_running_or_remote_saves_are_left_alone(tmp_path, model_a, model_b):
    folder = tmp_path / "checkpoint"
    model_a.save_pretrained(folder)
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = modeling_pal._host_tag()
        kept = [
            tmp_path / f"_checkpoint.pal-staging-{host}-{running.pid}-0001",  # a save that is still running
            tmp_path / f"_checkpoint.pal-staging-{host}-{os.getpid()}-0002",  # one of this process
            tmp_path / f"_checkpoint.pal-staging-otherhost-{ended_pid()}-0003",  # another machine's
        ]
        if os.path.exists("/proc/self/ns/pid"):  # a container with this hostname but its own process ids
            hostname = "".join(character for character in socket.gethostname() if character.isalnum())[:32]
            kept.append(tmp_path / f"_checkpoint.pal-staging-{hostname}-{ended_pid()}-0007")
        removed = [
            tmp_path / f"_checkpoint.pal-staging-{host}-{ended_pid()}-0004",
            tmp_path / f"_checkpoint.pal-backup-{host}-{ended_pid()}-0005",  # the checkpoint exists: a replaced one
            tmp_path / f"_other.pal-staging-{host}-{ended_pid()}-0006",  # another checkpoint's, in the same parent
        ]
        for path in kept + removed:
            path.mkdir()
        model_b.save_pretrained(folder)
        assert sorted(os.listdir(tmp_path)) == sorted(["checkpoint"] + [path.name for path in kept])
        assert saved_as(folder, model_a, model_b) == "B"
    finally:
        running.kill()
        running.wait()


def test_a_backup_of_a_running_save_is_not_restored(tmp_path, model_a):
    folder = tmp_path / "checkpoint"
    model_a.save_pretrained(folder)
    backup = make_backup(folder, os.getpid())
    with pytest.raises(OSError):
        PalRewardModel.from_pretrained(folder)
    assert backup.exists() and not folder.exists()


def test_trainer_uploads_skip_the_staging_folder_of_a_checkpoint_save(tmp_path, model_a, monkeypatch):
    from huggingface_hub.utils import filter_repo_objects
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    output_dir = tmp_path / "output"
    (output_dir / "checkpoint-5").mkdir(parents=True)
    listings = []
    exchange_folders = modeling_pal._exchange_folders

    def listing_exchange(first, second):
        listings.append([str(path.relative_to(output_dir)) for path in output_dir.rglob("*")])
        return exchange_folders(first, second)

    monkeypatch.setattr(modeling_pal, "_exchange_folders", listing_exchange)
    model_a.save_pretrained(output_dir / "checkpoint-5")
    [listing] = listings
    assert any(".pal-staging-" in path for path in listing)
    # The patterns that `Trainer.push_to_hub` and its pushes of checkpoints give `upload_folder` for `output_dir`.
    assert list(filter_repo_objects(listing, ignore_patterns=["_*", f"{PREFIX_CHECKPOINT_DIR}-*"])) == []


# ---------------------------------------------------------------- push_to_hub
def test_push_to_hub_saves_all_or_nothing_then_uploads(tmp_path, model_a, model_b, monkeypatch):
    folder = tmp_path / "my-reward-model"
    model_a.save_pretrained(folder)
    add_extra_files(folder)
    pushes = []
    monkeypatch.setattr(
        PalRewardModel, "push_to_hub", lambda self, repo_id, **kwargs: pushes.append((repo_id, kwargs))
    )
    model_b.save_pretrained(
        folder, push_to_hub=True, commit_message="Add carol", private=True, allow_raw_user_ids=True
    )
    assert pushes == [
        (
            "my-reward-model",
            {"max_shard_size": "50GB", "allow_raw_user_ids": True, "commit_message": "Add carol", "private": True},
        )
    ]
    assert saved_as(folder, model_a, model_b) == "B"
    assert_extra_files(folder)
    assert os.listdir(tmp_path) == ["my-reward-model"]


def test_push_to_hub_uploads_the_code_files(tmp_path, model_a, monkeypatch):
    import transformers.utils.hub as hub

    uploaded = {}

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            return type("RepoUrl", (), {"repo_id": f"user/{repo_id}"})()

        def create_commit(self, repo_id, operations, **kwargs):
            uploaded.update({operation.path_in_repo: repo_id for operation in operations})

    class FakeCard:
        def save(self, path):
            open(path, "w").write("card")

    monkeypatch.setattr(hub, "hf_api", FakeApi)
    monkeypatch.setattr(hub, "create_and_tag_model_card", lambda *args, **kwargs: FakeCard())
    model_a.save_pretrained(tmp_path / "pal-model", push_to_hub=True, repo_id="pal-model", allow_raw_user_ids=True)
    assert {"config.json", "model.safetensors", "configuration_pal.py", "modeling_pal.py"} <= set(uploaded)
    assert set(uploaded.values()) == {"user/pal-model"}
    assert saved_as(tmp_path / "pal-model", model_a, model_a) == "A"


# ---------------------------------------------------------------- registry and weights must agree
def edit_config(folder, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("ignore_mismatched_sizes", [False, True])
def test_registry_that_disagrees_with_the_user_table_is_an_error(tmp_path, model_a, ignore_mismatched_sizes):
    model_a.save_pretrained(tmp_path)
    edit_config(tmp_path, user_ids=["alice", "bob", "carol"])
    with pytest.raises(
        ValueError, match="config.json registers 3 users but model.safetensors has 2 rows in users.logits.weight"
    ):
        PalRewardModel.from_pretrained(tmp_path, ignore_mismatched_sizes=ignore_mismatched_sizes)
    edit_config(tmp_path, user_ids=["alice"])
    with pytest.raises(ValueError, match="registers 1 users but model.safetensors has 2 rows.*never re-initialised"):
        PalRewardModel.from_pretrained(tmp_path, ignore_mismatched_sizes=ignore_mismatched_sizes)


def test_registry_passed_as_config_that_disagrees_is_an_error(tmp_path, model_a):
    model_a.save_pretrained(tmp_path)
    config = PalConfig.from_pretrained(tmp_path)
    config.user_ids = ["alice"]
    with pytest.raises(ValueError, match="the `config` passed to `from_pretrained` registers 1 users but"):
        PalRewardModel.from_pretrained(tmp_path, config=config)


def test_user_table_with_other_num_prototypes_is_an_error(tmp_path, model_a):
    model_a.save_pretrained(tmp_path)
    edit_config(tmp_path, num_prototypes=4)
    with pytest.raises(
        ValueError, match="sets num_prototypes=4 but model.safetensors has 3 columns in users.logits.weight"
    ):
        PalRewardModel.from_pretrained(tmp_path)


def test_weights_without_a_user_table_are_an_error(tmp_path, model_a):
    model_a.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["users.logits.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="registers 2 users but the weights of .* have no users.logits.weight"):
        PalRewardModel.from_pretrained(tmp_path)


def test_other_size_mismatches_raise_unless_ignored(tmp_path, model_a):
    model_a.save_pretrained(tmp_path)
    edit_config(tmp_path, preference_dim=4)
    with pytest.raises(RuntimeError, match=r"Size mismatch .*item_head.*ignore_mismatched_sizes=True"):
        PalRewardModel.from_pretrained(tmp_path)
    model, loading_info = PalRewardModel.from_pretrained(
        tmp_path, ignore_mismatched_sizes=True, output_loading_info=True
    )
    assert model.config.preference_dim == 4
    assert "item_head.layers.0.weight" in {key for key, _, _ in loading_info["mismatched_keys"]}
    assert torch.equal(model.user_weights.weight, model_a.user_weights.weight)


def test_output_loading_info_is_returned_when_asked(tmp_path, model_a):
    model_a.save_pretrained(tmp_path)
    assert isinstance(PalRewardModel.from_pretrained(tmp_path), PalRewardModel)
    model, loading_info = PalRewardModel.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(model, PalRewardModel) and not loading_info["mismatched_keys"]


def test_registry_with_duplicate_ids_names_them(tmp_path, model_a):
    model_a.save_pretrained(tmp_path)
    edit_config(tmp_path, user_ids=["alice", "bob", "alice", "bob", "carol"])
    with pytest.raises(ValueError, match=r"`user_ids` contains duplicates: 'alice', 'bob'\. Every user id must be"):
        PalRewardModel.from_pretrained(tmp_path)
