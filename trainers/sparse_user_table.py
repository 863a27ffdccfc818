# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
"""
Per-batch (sparse) updates of PAL's user table: with a million users, a step touches the rows of the batch's users
only, instead of a dense gradient, a dense clipping norm and a dense Adam step over the whole table.
"""

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from transformers import TrainerCallback

logger = get_logger(__name__)

STATE_KEYS = ("step", "user_rows_exp_avg", "user_rows_exp_avg_sq", "user_rows_step")


class SparseUserTableAdam(TrainerCallback):
    r"""
    Row-wise Adam(W) for the user table (`model.user_weights`, one row of K mixture logits per user) that touches only
    the rows of the users in the batch: O(batch) work per step whatever the number of users.

    How it works. While it is attached, the table does not require gradients (so DDP neither allreduces nor waits for a
    dense `num_users x K` gradient), and a forward hook on `model.user_weights` replaces each lookup by a copy of the
    looked-up rows that does require gradients. Before each optimizer step (`on_pre_optimizer_step`), the gradients of
    those copies (summed over gradient-accumulation micro-batches, gathered from every process and averaged over them
    like DDP does) update the touched rows in place with Adam(W), with the learning rate, betas, epsilon and weight
    decay of the optimizer's parameter group that holds the table (so the learning-rate schedule applies). The Adam
    moments and step counts live in that optimizer's state (`optimizer.state[table]`), so they are saved with every
    checkpoint and restored on resume.

    Adam's moments. Each row has its own step count `t_i`, the number of steps whose batches held user i, and its
    moments are updated only on those steps:

        m_i <- beta1 m_i + (1 - beta1) g_i,   v_i <- beta2 v_i + (1 - beta2) g_i^2,
        row_i <- row_i (1 - lr wd) - lr (m_i / (1 - beta1^t_i)) / (sqrt(v_i / (1 - beta2^t_i)) + eps)

    This is exactly Adam run on each user's own sequence of gradients, which is what `torch.optim.AdamW` does for a
    model with one parameter per user whose gradient is `None` when the user is not in the batch. A user absent from
    a batch neither moves nor decays its moments. Dense Adam over the table differs: every step it moves absent users
    along their stale momentum (they drift with no data) and decays their second moment, so the next update of a
    rarely seen user is inflated. When every user is in every batch the two are the same update. The table's gradient
    is not part of `max_grad_norm` clipping (it never exists as a dense tensor); Adam's update is invariant to the
    scale of a row's gradients anyway.

    It runs where the table is an ordinary replicated tensor: one process or DDP, without a gradient scaler (fp16).
    Under DeepSpeed or FSDP, or with fp16, the trainer uses dense updates (`PalRewardConfig(user_table_update=...)`).
    """

    def __init__(self, model: torch.nn.Module, accelerator: Accelerator):
        self.model = model
        self.accelerator = accelerator
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._hook = None
        self._table: torch.nn.Parameter | None = None

    # ------------------------------------------------------------------ lifecycle
    def attach(self) -> None:
        """Starts routing the table's gradients through this update; call before the model is wrapped (DDP)."""
        if self._hook is not None:
            return
        self._table = self.model.user_weights.weight
        self._table.requires_grad_(False)
        self._hook = self.model.user_weights.register_forward_hook(self._record_lookup)
        self._pending = []

    def detach(self) -> None:
        """Stops it and makes the table an ordinary trainable parameter again."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._table is not None:
            self._table.requires_grad_(True)
            self._table = None
        self._pending = []

    @property
    def table(self) -> torch.nn.Parameter | None:
        """The user table this update trains (while attached)."""
        return self._table

    # ------------------------------------------------------------------ hooks
    def _record_lookup(self, module: torch.nn.Embedding, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not torch.is_grad_enabled():
            return None  # evaluation and scoring read the table as it is
        if module.weight is not self._table:
            raise RuntimeError(
                "The user table was replaced while training (users were added after the optimizer was built). "
                "Register every user before training: `model.add_users(...)` before creating the trainer."
            )
        rows = inputs[0]
        unique_rows, inverse = torch.unique(rows, return_inverse=True)
        batch_rows = module.weight.detach()[unique_rows].requires_grad_(True)
        self._pending.append((unique_rows, batch_rows))
        return batch_rows[inverse]

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self._hook is not None:
            self.step(optimizer)

    def on_train_end(self, args, state, control, **kwargs):
        self._pending = []

    # ------------------------------------------------------------------ the update
    def _gradients(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(rows, gradients)` of the rows touched since the last step, summed per row over micro-batches and averaged
        over processes."""
        table = self._table
        pending = [(rows, batch_rows.grad) for rows, batch_rows in self._pending if batch_rows.grad is not None]
        self._pending = []
        if pending:
            rows = torch.cat([rows for rows, _ in pending])
            gradients = torch.cat([gradient for _, gradient in pending]).to(table.dtype)
        else:
            rows = torch.empty(0, dtype=torch.long, device=table.device)
            gradients = torch.empty(0, table.shape[1], dtype=table.dtype, device=table.device)
        num_processes = self.accelerator.num_processes
        if num_processes > 1:
            rows = self.accelerator.gather(self.accelerator.pad_across_processes(rows, dim=0, pad_index=-1))
            gradients = self.accelerator.gather(self.accelerator.pad_across_processes(gradients, dim=0, pad_index=0))
            keep = rows >= 0
            rows, gradients = rows[keep], gradients[keep] / num_processes
        unique_rows, inverse = torch.unique(rows, return_inverse=True)
        summed = torch.zeros(unique_rows.shape[0], table.shape[1], dtype=table.dtype, device=table.device)
        return unique_rows, summed.index_add_(0, inverse, gradients)

    @torch.no_grad()
    def step(self, optimizer) -> None:
        """Applies the row-wise Adam(W) update of the touched rows (see the class docstring)."""
        table = self._table
        rows, gradients = self._gradients()
        group = next((g for g in optimizer.param_groups if any(p is table for p in g["params"])), None)
        if group is None:
            raise RuntimeError(
                "The optimizer has no parameter group holding the user table, so the sparse user-table update has no "
                "learning rate. Let `PalRewardTrainer` build the optimizer, or set "
                "`PalRewardConfig(user_table_update='dense')`."
            )
        if rows.numel() == 0:
            return
        state = optimizer.state[table]
        if any(key not in state for key in STATE_KEYS):
            # `step` (the number of sparse steps) is what `torch.optim.Adam(W).load_state_dict` expects in any state.
            state["step"] = torch.tensor(0.0)
            state["user_rows_exp_avg"] = torch.zeros_like(table)
            state["user_rows_exp_avg_sq"] = torch.zeros_like(table)
            state["user_rows_step"] = torch.zeros(table.shape[0], dtype=torch.float32, device=table.device)
        if state["user_rows_exp_avg"].shape != table.shape:
            raise RuntimeError(
                f"The optimizer state of the user table has {state['user_rows_exp_avg'].shape[0]} rows but the table "
                f"has {table.shape[0]}: the optimizer state (or checkpoint) belongs to another user registry."
            )
        learning_rate = float(group["lr"])
        beta1, beta2 = group.get("betas", (0.9, 0.999))
        epsilon = group.get("eps", 1e-8)
        weight_decay = group.get("weight_decay", 0.0)

        state["step"] += 1
        steps = state["user_rows_step"][rows] + 1
        state["user_rows_step"][rows] = steps
        exp_avg = state["user_rows_exp_avg"][rows].lerp_(gradients, 1 - beta1)
        exp_avg_sq = state["user_rows_exp_avg_sq"][rows].mul_(beta2).addcmul_(gradients, gradients, value=1 - beta2)
        state["user_rows_exp_avg"][rows] = exp_avg
        state["user_rows_exp_avg_sq"][rows] = exp_avg_sq

        steps = steps.double().unsqueeze(-1)
        bias_correction1 = (1 - beta1**steps).to(table.dtype)
        bias_correction2_sqrt = (1 - beta2**steps).sqrt().to(table.dtype)
        denominator = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(epsilon)
        values = table[rows]
        if weight_decay:
            values.mul_(1 - learning_rate * weight_decay)
        values.addcdiv_(exp_avg / bias_correction1, denominator, value=-learning_rate)
        table[rows] = values


__all__ = ["SparseUserTableAdam"]
