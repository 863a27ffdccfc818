"""A million users: set-up, training steps and per-user evaluation that scale with rows, not with rows x users."""

import functools
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from datasets import Dataset

from pal_rm import PalConfig, PalRewardModel, modeling_pal
from pal_rm.modeling_pal import PalUsers
from pal_rm.trainers import PalRewardConfig, PalRewardTrainer, SparseUserTableAdam
from pal_rm.trainers.pal_reward_trainer import _column_tensor

FEATURE_DIM = 4


def feature_dataset(num_users: int, num_rows: int, seed: int = 0, prefix: str = "user") -> Dataset:
    """Random pooled features; every user has at least one comparison when `num_rows >= num_users`."""
    rng = np.random.default_rng(seed)
    users = np.arange(num_rows) % num_users
    rng.shuffle(users)
    return Dataset.from_dict(
        {
            "user_id": [f"{prefix}-{user}" for user in users],
            "prompt_features": rng.standard_normal((num_rows, FEATURE_DIM), dtype=np.float32),
            "chosen_features": rng.standard_normal((num_rows, FEATURE_DIM), dtype=np.float32),
            "rejected_features": rng.standard_normal((num_rows, FEATURE_DIM), dtype=np.float32),
        }
    )


def feature_model(seed: int = 0) -> PalRewardModel:
    torch.manual_seed(seed)
    return PalRewardModel(PalConfig(feature_dim=FEATURE_DIM, variant="b", num_prototypes=3, preference_dim=4))


def make_args(tmp_path, **overrides) -> PalRewardConfig:
    defaults = {
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": 16,
        "max_steps": 2,
        "use_cpu": True,
        "disable_tqdm": True,
        "report_to": "none",
        "logging_steps": 1000,
        "seed": 0,
        "user_learning_rate": 0.05,
    }
    return PalRewardConfig(**{**defaults, **overrides})


# ---------------------------------------------------------------------- set-up is O(rows)
MAX_REGISTRY_SCANS = 50  # far above what set-up needs; per-row scans fail here instead of running for hours


class _CountingList(list):
    """The registry list of a config: counts full scans (`iter`, `in`), which per-row code would repeat."""

    counts: dict

    def _scan(self):
        self.counts["registry_scans"] += 1
        if self.counts["registry_scans"] > MAX_REGISTRY_SCANS:
            raise AssertionError("`config.user_ids` is scanned again and again: per-row work over every user.")

    def __iter__(self):
        self._scan()
        return super().__iter__()

    def __contains__(self, item):
        self._scan()
        return super().__contains__(item)


def count_setup_operations(monkeypatch, tmp_path, num_users: int) -> dict[str, int]:
    """Registry builds, entries built, lookups, scans of `config.user_ids` and registry API calls made while a trainer
    sets up on `num_users` users with two comparisons each."""
    counts = {"builds": 0, "entries_built": 0, "lookups": 0, "registry_scans": 0, "api_calls": 0}

    class CountingRegistry(dict):
        def __contains__(self, key):
            counts["lookups"] += 1
            return super().__contains__(key)

        def __getitem__(self, key):
            counts["lookups"] += 1
            return super().__getitem__(key)

    def build(user_ids):
        counts["builds"] += 1
        if counts["builds"] > MAX_REGISTRY_SCANS:
            raise AssertionError("The user registry is rebuilt again and again: per-row work over every user.")
        counts["entries_built"] += len(user_ids)
        return CountingRegistry((user, row) for row, user in enumerate(list.__iter__(user_ids)))

    class CountingList(_CountingList):
        pass

    CountingList.counts = counts

    def get_user_ids(config):
        return config.__dict__["_counted_user_ids"]

    def set_user_ids(config, value):
        config.__dict__["_counted_user_ids"] = value if isinstance(value, CountingList) else CountingList(value)

    monkeypatch.setattr(modeling_pal, "_build_user_registry", build)
    monkeypatch.setattr(PalConfig, "user_ids", property(get_user_ids, set_user_ids), raising=False)
    for name in ("add_users", "user_rows", "is_registered", "_registry_keys"):
        method = getattr(PalRewardModel, name)

        @functools.wraps(method)
        def counted(*args, __method=method, **kwargs):
            counts["api_calls"] += 1
            return __method(*args, **kwargs)

        monkeypatch.setattr(PalRewardModel, name, counted)

    dataset = feature_dataset(num_users, 2 * num_users)
    model = feature_model()
    trainer = PalRewardTrainer(model, make_args(tmp_path), train_dataset=dataset)
    assert model.num_users == num_users and len(trainer.train_dataset) == 2 * num_users
    monkeypatch.undo()
    return counts


def test_trainer_setup_with_100k_users_is_linear(monkeypatch, tmp_path):
    small = count_setup_operations(monkeypatch, tmp_path / "small", 10_000)
    large = count_setup_operations(monkeypatch, tmp_path / "large", 100_000)
    rows = 2 * 100_000
    # Batched registry calls and registry builds do not depend on the number of users or rows ...
    assert large["api_calls"] == small["api_calls"] and large["builds"] == small["builds"]
    assert large["registry_scans"] == small["registry_scans"]  # no `user in config.user_ids` / set() per row
    # ... and the work they do is a few operations per row / per user.
    assert large["entries_built"] <= 2 * 100_000 + 10
    assert large["lookups"] <= 4 * rows
    assert large["lookups"] <= 10.5 * small["lookups"]


def test_feature_columns_are_read_in_one_go_in_row_order():
    dataset = Dataset.from_dict({"features": [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], "margin": [0.5, 1.0, 2.0]})
    shuffled = dataset.select([2, 0])
    assert torch.equal(_column_tensor(shuffled, "features", torch.float32), torch.tensor([[5.0, 6.0], [1.0, 2.0]]))
    assert torch.equal(_column_tensor(dataset, "margin", torch.float32), torch.tensor([0.5, 1.0, 2.0]))
    ragged = Dataset.from_dict({"features": [[1.0], [2.0, 3.0]]})
    with pytest.raises(TypeError, match="numpy.object_"):
        _column_tensor(ragged, "features", torch.float32)


# ---------------------------------------------------------------------- metrics that scale with users
def test_mixture_entropy_is_computed_at_logging_steps_only(monkeypatch, tmp_path):
    calls = []
    original = PalUsers.all_mixture_weights

    def counted(self):
        calls.append(self.num_users)
        return original(self)

    monkeypatch.setattr(PalUsers, "all_mixture_weights", counted)
    trainer = PalRewardTrainer(
        feature_model(), make_args(tmp_path, max_steps=6, logging_steps=3), train_dataset=feature_dataset(50, 200)
    )
    trainer.train()
    logged = [entry["mixture_entropy"] for entry in trainer.state.log_history if "mixture_entropy" in entry]
    assert len(logged) == 2 and all(0.0 <= value <= np.log(3) + 1e-6 for value in logged)
    assert len(calls) == 3  # two logging steps and the population refresh at the end, not one per step


def test_per_user_accuracy_by_bincount_matches_each_users_pairs(monkeypatch, tmp_path):
    train = feature_dataset(30, 120)
    evaluation = Dataset.from_dict(
        {
            **feature_dataset(40, 200, seed=1).to_dict(),
            "user_id": [f"user-{index % 40}" for index in range(200)],  # users 30..39 are unknown: the population
        }
    )
    model = feature_model()
    args = make_args(tmp_path, unknown_users="population", per_device_eval_batch_size=64)
    trainer = PalRewardTrainer(model, args, train_dataset=train, eval_dataset=evaluation)
    trainer.train()

    equality_calls = []
    original_eq = torch.Tensor.__eq__

    def counted_eq(self, other):
        equality_calls.append(1)
        return original_eq(self, other)

    monkeypatch.setattr(torch.Tensor, "__eq__", counted_eq)
    trainer.evaluate()
    monkeypatch.undo()
    assert len(equality_calls) < 10  # no comparison of the whole evaluation per user

    model.eval()
    with torch.no_grad():
        features = {name: torch.tensor(evaluation[f"{name}_features"]) for name in ("prompt", "chosen", "rejected")}
        rows = model.user_rows(evaluation["user_id"], unknown_users="population")
        chosen = model(item_features=features["chosen"], prompt_features=features["prompt"], user_ids=rows).logits
        rejected = model(item_features=features["rejected"], prompt_features=features["prompt"], user_ids=rows).logits
    correct = (chosen > rejected).squeeze(-1).double()
    expected = {}
    for user in range(40):
        name = f"user-{user}" if user < 30 else "<population>"
        expected.setdefault(name, []).extend(correct[torch.arange(200) % 40 == user].tolist())
    result = trainer.per_user_accuracy["eval"]
    assert set(result) == set(expected)
    for name, values in expected.items():
        assert result[name] == pytest.approx(sum(values) / len(values))


# ---------------------------------------------------------------------- sparse user-table updates
def test_sparse_update_is_adam_on_each_users_own_steps():
    """The row-wise update equals `torch.optim.AdamW` on one parameter per user whose gradient is `None` when the user
    is not in the batch: absent users neither move nor advance their moments."""
    model = feature_model()
    model.add_users(["a", "b", "c"])
    with torch.no_grad():
        model.user_weights.weight.copy_(torch.randn(3, 3))
    table = model.user_weights.weight
    hyper = {"lr": 0.1, "betas": (0.8, 0.9), "eps": 1e-6, "weight_decay": 0.01}
    optimizer = torch.optim.AdamW([table], **hyper)
    update = SparseUserTableAdam(model, accelerator=type("OneProcess", (), {"num_processes": 1})())
    reference = [torch.nn.Parameter(row.detach().clone()) for row in table]
    reference_optimizer = torch.optim.AdamW(reference, foreach=False, **hyper)
    target = torch.randn(3, 3)

    update.attach()
    for batch in ([0, 1, 1], [0], [2, 0], [1]):
        rows = torch.tensor(batch)
        loss = ((model.user_weights(rows) - target[rows]) ** 2).sum()
        loss.backward()
        update.step(optimizer)
        reference_optimizer.zero_grad(set_to_none=True)
        ((torch.stack([reference[row] for row in batch]) - target[rows]) ** 2).sum().backward()
        before_absent = {row: table[row].clone() for row in range(3) if row not in batch}
        reference_optimizer.step()
        assert table.grad is None  # no dense gradient of the table
        for row in range(3):
            assert torch.allclose(table[row], reference[row], atol=1e-6), (batch, row)
        for row, value in before_absent.items():
            assert torch.equal(table[row], value)
    update.detach()
    assert table.requires_grad
    assert optimizer.state[table]["user_rows_step"].tolist() == [3.0, 2.0, 1.0]


def train_table(tmp_path, name, **overrides) -> torch.Tensor:
    model = feature_model()
    args = make_args(tmp_path / name, **overrides)
    trainer = PalRewardTrainer(model, args, train_dataset=feature_dataset(4, 16))
    trainer.train()
    return model.user_weights.weight.detach().clone()


def test_sparse_and_dense_agree_when_every_user_is_in_every_batch(tmp_path):
    settings = {"per_device_train_batch_size": 16, "max_steps": 5, "max_grad_norm": 0.0, "optim": "adamw_torch"}
    sparse = train_table(tmp_path, "sparse", user_table_update="sparse", **settings)
    dense = train_table(tmp_path, "dense", user_table_update="dense", **settings)
    start = feature_model().population_logits()  # every user starts at the population mixture
    assert not torch.allclose(sparse, start.expand_as(sparse), atol=1e-3)
    assert torch.allclose(sparse, dense, atol=1e-5)


def test_sparse_optimizer_state_is_checkpointed_and_resumed(tmp_path):
    settings = {"per_device_train_batch_size": 4, "max_steps": 6, "save_strategy": "steps", "save_steps": 3}
    uninterrupted = train_table(tmp_path, "full", **settings)
    model = feature_model()
    args = make_args(tmp_path / "resumed", **settings)
    trainer = PalRewardTrainer(model, args, train_dataset=feature_dataset(4, 16))
    trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "out" / "checkpoint-3"))
    state = trainer.optimizer.state[model.user_weights.weight]
    assert state["user_rows_step"].sum() > 0
    assert torch.equal(model.user_weights.weight.detach(), uninterrupted)


def test_user_table_update_settings(tmp_path):
    with pytest.raises(ValueError, match="`user_table_update` must be 'auto', 'sparse' or 'dense'"):
        make_args(tmp_path, user_table_update="lazy")
    model = feature_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    args = make_args(tmp_path, user_table_update="sparse")
    trainer = PalRewardTrainer(model, args, train_dataset=feature_dataset(4, 16), optimizers=(optimizer, None))
    with pytest.raises(ValueError, match="cannot run here: the optimizer was given to the trainer"):
        trainer.train()
    assert model.user_weights.weight.requires_grad  # left as it was
    args = make_args(tmp_path, user_table_update="sparse", optim="sgd")
    trainer = PalRewardTrainer(feature_model(), args, train_dataset=feature_dataset(4, 16))
    with pytest.raises(ValueError, match="`optim='sgd'` is not Adam"):
        trainer.train()

    # "auto" falls back to dense updates by the caller's optimizer, which then trains the table.
    model = feature_model()
    model.add_users([f"user-{index}" for index in range(4)])
    before = model.user_weights.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    args = make_args(tmp_path)
    trainer = PalRewardTrainer(model, args, train_dataset=feature_dataset(4, 16), optimizers=(optimizer, None))
    trainer.train()
    assert not torch.equal(model.user_weights.weight.detach(), before)


DDP_SCRIPT = """
import pathlib, sys, torch
sys.path.insert(0, {tests!r})
from test_many_users import train_for_ddp_comparison
from accelerate import PartialState

state = train_for_ddp_comparison(pathlib.Path(sys.argv[1]), per_device_batch_size=8)
torch.save(state, f"{{sys.argv[1]}}/state-{{PartialState().process_index}}.pt")
"""


def train_for_ddp_comparison(output_dir, per_device_batch_size: int) -> dict[str, torch.Tensor]:
    """4 steps on 64 comparisons of 40 users; the model's weights and the rows' sparse-update step counts."""
    model = feature_model()
    args = make_args(
        output_dir,
        per_device_train_batch_size=per_device_batch_size,
        max_steps=4,
        max_grad_norm=0.0,
        optim="adamw_torch",
        dataloader_drop_last=True,
    )
    trainer = PalRewardTrainer(model, args, train_dataset=feature_dataset(40, 64))
    trainer.train()
    row_steps = trainer.optimizer.state[model.user_weights.weight]["user_rows_step"]
    return {**{name: value.detach().clone() for name, value in model.state_dict().items()}, "row_steps": row_steps}


def test_sparse_update_under_two_process_ddp_matches_one_process(tmp_path):
    """2 gloo processes with batch 8 each take the same steps as 1 process with batch 16: the same weights and user
    table on both replicas."""
    script = tmp_path / "train_ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    # `--multi_gpu` makes accelerate start two processes with torch.distributed; `use_cpu=True` (in `make_args`) makes
    # them gloo ranks on the CPU.
    command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", str(script), str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    two = [torch.load(tmp_path / f"state-{rank}.pt") for rank in (0, 1)]
    one = train_for_ddp_comparison(tmp_path / "one", per_device_batch_size=16)
    assert one["row_steps"].sum() > 0 and torch.equal(two[0]["row_steps"], one["row_steps"])  # sparse updates ran
    assert torch.equal(two[0]["users.logits.weight"], two[1]["users.logits.weight"])  # the replicas stay in sync
    start = feature_model().population_logits()
    assert not torch.allclose(one["users.logits.weight"], start.expand(40, -1), atol=1e-3)
    for name, value in one.items():
        assert torch.allclose(two[0][name], value, atol=1e-5), name
