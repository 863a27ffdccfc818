"""No raw user id leaves the machine unless the user asks for it (issue 8).

Every Hub call is intercepted: the fake Hub copies the folder that would be uploaded (respecting `ignore_patterns`, as
`HfApi.upload_folder` does) under `tmp_path`, and every copied file is then read as bytes and searched for every raw
user id and for the salt.
"""

import json
import logging
import os
import sys
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import make_word_tokenizer, tiny_model
from datasets import Dataset
from huggingface_hub.utils import filter_repo_objects

from pal_rm import PalRewardModel
from pal_rm.hub import USER_ID_SALT_ENV, push_to_hub
from pal_rm.modeling_pal import hash_user_id
from pal_rm.trainers import PalRewardConfig, PalRewardTrainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SALT = "pepper-9d2e61b7"
SEEN = ["u-5b18e7", "u-7f3a91", "u-c04e2d"]  # sorted: the order in which the trainer registers users
LATER = ["u-3e9c77", "u-aa41f0"]  # new users of a second training run
UNSEEN = ["u-0d62b5", "u-e81f3c"]  # fitted with adapt_users
ALL_IDS = SEEN + LATER + UNSEEN
PROMPTS = ["write a note to the team", "say hello to the group"]
LONG = ["dear team the offsite is on friday and we will meet at noon", "hello everyone i hope you are all well today"]
SHORT = ["offsite friday", "hi all"]


def comparisons(users, pairs_per_user=4) -> Dataset:
    """Users in two groups: the first prefers the long answer, the second the short one (no id in any text)."""
    rows = {"user_id": [], "prompt": [], "chosen": [], "rejected": []}
    for number, user in enumerate(users):
        for pair in range(pairs_per_user):
            long, short = LONG[pair % 2], SHORT[pair % 2]
            chosen, rejected = (long, short) if number % 2 == 0 else (short, long)
            rows["user_id"].append(user)
            rows["prompt"].append(PROMPTS[pair % 2])
            rows["chosen"].append(chosen)
            rows["rejected"].append(rejected)
    return Dataset.from_dict(rows)


@pytest.fixture()
def tokenizer():
    return make_word_tokenizer(PROMPTS + LONG + SHORT)


@pytest.fixture()
def model(tokenizer):
    return tiny_model("gpt2", vocab_size=len(tokenizer), variant="b", pooling="mean")


class FakeHub:
    """Stands in for `HfApi` (and transformers' shared `hf_api()`): keeps a copy of every uploaded folder."""

    def __init__(self, root: Path):
        self.root = root
        self.repos = []
        self.uploads = []
        self.sources = []

    def create_repo(self, repo_id, token=None, private=None, exist_ok=False, **kwargs):
        self.repos.append(repo_id)
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(
        self,
        repo_id,
        folder_path,
        path_in_repo=None,
        commit_message=None,
        allow_patterns=None,
        ignore_patterns=None,
        run_as_future=False,
        **kwargs,
    ):
        folder = Path(folder_path)
        self.sources.append(folder.resolve())
        names = sorted(path.relative_to(folder).as_posix() for path in folder.glob("**/*") if path.is_file())
        target = self.root / f"commit-{len(self.uploads)}" / (path_in_repo or "")
        for name in filter_repo_objects(names, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            (target / name).write_bytes((folder / name).read_bytes())
        self.uploads.append(target)
        if run_as_future:
            future = Future()
            future.set_result("commit")
            return future
        return "commit"

    def uploaded_files(self) -> dict[str, bytes]:
        return {
            path.relative_to(self.root).as_posix(): path.read_bytes()
            for path in self.root.rglob("*")
            if path.is_file()
        }

    def assert_holds_none_of(self, secrets):
        files = self.uploaded_files()
        assert files, "nothing was uploaded"
        for name, content in files.items():
            for secret in secrets:
                assert secret.encode() not in content, f"{secret!r} leaked into {name}"


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    fake = FakeHub(tmp_path / "hub")
    monkeypatch.setattr("huggingface_hub.HfApi", lambda *args, **kwargs: fake)
    monkeypatch.setattr("transformers.trainer.hf_api", lambda: fake)
    monkeypatch.delenv(USER_ID_SALT_ENV, raising=False)
    return fake


def make_args(tmp_path, **kwargs) -> PalRewardConfig:
    defaults = {
        "output_dir": str(tmp_path / "out"),
        "max_steps": 2,
        "per_device_train_batch_size": 4,
        "logging_steps": 1,
        "disable_tqdm": True,
        "seed": 0,
        "use_cpu": True,
        "adapt_steps": 20,
    }
    return PalRewardConfig(**{**defaults, **kwargs})


def hashed(users):
    return [hash_user_id(user, SALT) for user in users]


# ---------------------------------------------------------------- the model's registry
def test_hash_user_ids_in_place_keeps_rows_and_accepts_raw_ids(model):
    assert model.add_users(SEEN) == [0, 1, 2]
    weights = model.user_weights.weight.detach().clone()
    model.hash_user_ids(SALT)
    assert model.config.user_ids == hashed(SEEN) and model.config.hashed_user_ids
    assert torch.equal(model.user_weights.weight, weights)  # rows do not move
    model.hash_user_ids(SALT)  # idempotent
    assert model.config.user_ids == hashed(SEEN)
    assert model.user_rows(SEEN[::-1]).tolist() == [2, 1, 0]
    assert model.user_rows([hashed(SEEN)[1], None]).tolist() == [1, -1]  # hashes and the population work too
    assert model.is_registered([SEEN[0], LATER[0]]) == [True, False]
    assert model.add_users([SEEN[1], LATER[0], LATER[0]]) == [1, 3, 3]  # no duplicate row for a known user
    assert model.config.user_ids == hashed(SEEN + LATER[:1]) and model.num_users == 4
    with pytest.raises(ValueError, match="not the one the model's user registry was hashed with"):
        model.hash_user_ids("another-salt")
    with pytest.raises(ValueError, match="needs a salt"):
        model.hash_user_ids("")
    with pytest.raises(ValueError, match="salt must be a non-empty string"):
        model.set_user_id_salt("")


def test_hashed_registry_without_salt_refuses_raw_ids_and_checks_the_salt(model, tmp_path):
    model.add_users(SEEN)
    model.hash_user_ids(SALT)
    model.save_pretrained(tmp_path / "saved")
    for path in (tmp_path / "saved").iterdir():
        assert SALT.encode() not in path.read_bytes(), path.name
    loaded = PalRewardModel.from_pretrained(tmp_path / "saved")
    for call in (loaded.add_users, loaded.is_registered, loaded.user_rows):
        with pytest.raises(KeyError, match="salted hashes.*set_user_id_salt.*PAL_USER_ID_SALT"):
            call([SEEN[0]])
    assert loaded.add_users(hashed(SEEN[:1])) == [0]  # a registered hash needs no salt
    with pytest.raises(ValueError, match="not the one the model's user registry was hashed with"):
        loaded.set_user_id_salt("another-salt")
    loaded.set_user_id_salt(SALT)
    assert loaded.user_rows(SEEN).tolist() == [0, 1, 2]


# ---------------------------------------------------------------- pal_rm.hub.push_to_hub
def test_hub_push_hashes_user_ids_by_default(model, tokenizer, hub, monkeypatch, tmp_path):
    model.add_users(SEEN)
    monkeypatch.setenv(USER_ID_SALT_ENV, SALT)
    push_to_hub(model, tokenizer, "org/pal", eval_results={"seen_accuracy": 0.9})
    hub.assert_holds_none_of(SEEN + [SALT])
    (folder,) = hub.uploads
    config = json.loads((folder / "config.json").read_text())
    assert config["user_ids"] == hashed(SEEN) and config["hashed_user_ids"] is True
    card = (folder / "README.md").read_text()
    assert 'users="<user id>"' in card and "model.set_user_id_salt(salt)" in card
    # The caller's model is unchanged, and the upload scores raw ids like it once given the salt.
    assert model.config.user_ids == SEEN and not model.config.hashed_user_ids
    assert getattr(model, "user_id_salt", None) is None
    loaded = PalRewardModel.from_pretrained(folder).eval()
    loaded.set_user_id_salt(SALT)
    model.eval()
    prompts, responses = PROMPTS, SHORT
    for user in SEEN:
        expected = model.score_texts(tokenizer, prompts, responses, users=user)
        assert torch.allclose(loaded.score_texts(tokenizer, prompts, responses, users=user), expected, atol=1e-6)


def test_hub_push_refuses_without_salt_and_uploads_raw_ids_only_when_asked(model, tokenizer, hub, caplog):
    model.add_users(SEEN)
    with pytest.raises(ValueError, match="needs a salt.*PAL_USER_ID_SALT.*hash_user_ids=False"):
        push_to_hub(model, tokenizer, "org/pal")
    assert hub.repos == [] and hub.uploads == []  # nothing reached the Hub
    with caplog.at_level(logging.WARNING, logger="pal_rm.hub"):
        push_to_hub(model, tokenizer, "org/pal", hash_user_ids=False)
    assert "raw user ids" in caplog.text
    (folder,) = hub.uploads
    assert json.loads((folder / "config.json").read_text())["user_ids"] == SEEN
    assert not any(user in (folder / "README.md").read_text() for user in SEEN)  # the card never names a user


# ---------------------------------------------------------------- PalRewardTrainer
def test_trainer_pushes_only_hashes_during_and_after_training(model, tokenizer, hub, tmp_path):
    args = make_args(
        tmp_path,
        push_to_hub=True,
        hub_model_id="org/pal",
        save_strategy="steps",
        save_steps=1,
        hub_strategy="checkpoint",
    )
    trainer = PalRewardTrainer(
        model, args, train_dataset=comparisons(SEEN), processing_class=tokenizer, user_id_salt=SALT
    )
    assert model.config.user_ids == hashed(sorted(SEEN))  # hashed before anything is saved (sorted: trainer order)
    trainer.train()
    trainer.save_state()
    trainer.push_to_hub(dataset_name="org/private-comparisons")
    assert len(hub.uploads) >= 3  # checkpoint pushes during training, then the final push
    names = set(hub.uploaded_files())
    for required in ("last-checkpoint/trainer_state.json", "last-checkpoint/training_args.bin", "/config.json"):
        assert any(name.endswith(required) for name in names), required
    assert any(name.endswith("model.safetensors") for name in names)
    hub.assert_holds_none_of(SEEN + [SALT])
    final = json.loads((hub.uploads[-1] / "config.json").read_text())
    assert final["user_ids"] == hashed(sorted(SEEN))
    assert model.user_rows(sorted(SEEN)).tolist() == [0, 1, 2]  # raw ids still work on the trained model


def test_trainer_refuses_to_push_without_salt(model, tokenizer, hub, tmp_path):
    with pytest.raises(ValueError, match="needs a salt.*user_id_salt.*PAL_USER_ID_SALT.*hash_user_ids=False"):
        PalRewardTrainer(
            model, make_args(tmp_path, push_to_hub=True), train_dataset=comparisons(SEEN), processing_class=tokenizer
        )
    assert hub.repos == [] and model.num_users == 0  # refused before anything else
    trainer = PalRewardTrainer(model, make_args(tmp_path), train_dataset=comparisons(SEEN), processing_class=tokenizer)
    with pytest.raises(ValueError, match="needs a salt"):
        trainer.push_to_hub()
    assert hub.uploads == [] and model.config.user_ids == sorted(SEEN)


def test_trainer_uploads_raw_ids_only_when_asked(model, tokenizer, hub, tmp_path, caplog):
    trainer = PalRewardTrainer(
        model, make_args(tmp_path, hash_user_ids=False), train_dataset=comparisons(SEEN), processing_class=tokenizer
    )
    with caplog.at_level(logging.WARNING):
        trainer.push_to_hub()
    assert "raw user ids of the model's registry are uploaded" in caplog.text
    assert json.loads((hub.uploads[-1] / "config.json").read_text())["user_ids"] == SEEN


def test_hashed_model_trained_further_and_adapted_then_reuploaded(model, tokenizer, hub, tmp_path):
    first = PalRewardTrainer(
        model, make_args(tmp_path), train_dataset=comparisons(SEEN), processing_class=tokenizer, user_id_salt=SALT
    )
    first.train()
    assert model.config.user_ids == SEEN  # a trainer that does not push leaves the ids as they are
    first.push_to_hub()  # hashes the registry in place first
    assert model.config.user_ids == hashed(SEEN) and model.user_rows(SEEN).tolist() == [0, 1, 2]
    published = PalRewardModel.from_pretrained(hub.uploads[-1])
    known_weights = published.user_weights.weight.detach().clone()

    with pytest.raises(KeyError, match="salted hashes"):  # raw ids without the salt would look unknown
        PalRewardTrainer(published, make_args(tmp_path), train_dataset=comparisons(SEEN), processing_class=tokenizer)
    with pytest.raises(ValueError, match="not the one the model's user registry was hashed with"):
        PalRewardTrainer(
            published,
            make_args(tmp_path),
            train_dataset=comparisons(SEEN),
            processing_class=tokenizer,
            user_id_salt="another-salt",
        )

    # Train further on known and new users: the known users keep their rows, the new ones are registered as hashes.
    trainer = PalRewardTrainer(
        published,
        make_args(tmp_path, max_steps=1),
        train_dataset=comparisons(SEEN[:2] + LATER),
        eval_dataset=comparisons(SEEN),
        processing_class=tokenizer,
        user_id_salt=SALT,
    )
    assert published.config.user_ids == hashed(SEEN + LATER)
    assert torch.equal(published.user_weights.weight[:3], known_weights)
    trainer.train()
    assert trainer.evaluate()["eval_accuracy"] >= 0.0  # raw eval ids resolve to the hashed rows

    # Adapt new users (one known user in the data too): only the unknown ones get rows.
    result = trainer.adapt_users(comparisons(UNSEEN + SEEN[:1]))
    assert result["users"] == UNSEEN and result["rows"] == [5, 6]
    assert published.config.user_ids == hashed(ALL_IDS)

    trainer.push_to_hub()
    hub.assert_holds_none_of(ALL_IDS + [SALT])
    assert json.loads((hub.uploads[-1] / "config.json").read_text())["user_ids"] == hashed(ALL_IDS)


# ---------------------------------------------------------------- trainers/train_pal.py --push_to_hub true
def test_train_pal_push_uploads_hashes_only(hub, monkeypatch, tmp_path, demo_tokenizer):
    from transformers import AutoModel, GPT2Config

    sys.path.insert(0, os.path.join(REPO, "trainers"))
    try:
        from train_pal import main, make_parser
    finally:
        sys.path.pop(0)
    backbone = tmp_path / "backbone"
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(demo_tokenizer), n_positions=256)
    AutoModel.from_config(config).save_pretrained(backbone)
    demo_tokenizer.save_pretrained(backbone)
    small_demo = {"users_per_group": 1, "num_mixture_users": 0, "pairs_per_user": 8, "num_unseen_users": 2}
    arguments = ["--config", os.path.join(REPO, "hub_configs", "pal-demo.yaml"), "--model_name_or_path", str(backbone)]
    arguments += ["--dataset_kwargs", json.dumps({**small_demo, "unseen_shots": 4, "unseen_test_pairs": 4})]
    arguments += ["--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--eval_strategy", "no"]
    arguments += ["--save_strategy", "steps", "--save_steps", "1", "--push_to_hub", "true", "--disable_tqdm", "true"]
    script_args, model_args, training_args = make_parser().parse_args_and_config(arguments)

    with pytest.raises(ValueError, match="needs a salt"):
        main(script_args, model_args, training_args)
    assert hub.uploads == []

    monkeypatch.setenv(USER_ID_SALT_ENV, SALT)
    main(script_args, model_args, training_args)
    from pal_rm.data import load_demo_preferences

    dataset = load_demo_preferences(seed=0, **small_demo, unseen_shots=4, unseen_test_pairs=4)
    users = sorted({user for split in dataset.values() for user in split["user_id"]})
    assert hub.repos and set(hub.repos) == {"pal-rm/pal-demo"}
    assert set(hub.sources) == {
        (tmp_path / "out").resolve()
    }  # only the PAL model's folder: the baseline is not pushed
    files = hub.uploaded_files()
    assert any(name.endswith("baseline/checkpoint-2/config.json") for name in files)  # inside output_dir
    hub.assert_holds_none_of(users + [SALT])
    final = json.loads((hub.uploads[-1] / "config.json").read_text())
    assert sorted(final["user_ids"]) == sorted(hashed(users))


def test_transformers_push_paths_refuse_raw_ids(model, tmp_path, monkeypatch):
    """`model.push_to_hub` and `save_pretrained(push_to_hub=True)` (transformers' own upload paths) refuse a registry
    of raw ids unless asked, and upload only hashes once the registry is hashed."""
    import transformers.utils.hub as transformers_hub

    uploaded = {}

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            return SimpleNamespace(repo_id=repo_id)

        def create_commit(self, repo_id, operations, **kwargs):
            for operation in operations:
                source = operation.path_or_fileobj
                uploaded[operation.path_in_repo] = source if isinstance(source, bytes) else Path(source).read_bytes()

    monkeypatch.setattr(transformers_hub, "hf_api", FakeApi)
    monkeypatch.setattr(
        transformers_hub, "create_and_tag_model_card", lambda *a, **k: SimpleNamespace(save=lambda p: None)
    )
    model.add_users(SEEN)
    with pytest.raises(ValueError, match="raw user ids, which an upload would publish"):
        model.push_to_hub("org/pal")
    with pytest.raises(ValueError, match="raw user ids, which an upload would publish"):
        model.save_pretrained(tmp_path / "push", push_to_hub=True, repo_id="org/pal")
    assert uploaded == {}
    model.hash_user_ids(SALT)
    model.save_pretrained(tmp_path / "push", push_to_hub=True, repo_id="org/pal")
    assert "config.json" in uploaded
    for name, content in uploaded.items():
        for secret in [*SEEN, SALT]:
            assert secret.encode() not in content, f"{secret!r} leaked into {name}"
