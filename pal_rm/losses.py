# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
"""Preference losses of PAL, as pure tensor functions.

PAL (Chen et al., ICLR 2025) fits a Bradley-Terry-Luce likelihood on the difference of (distance-based) rewards:

    P(x_chosen > x_rejected | user i) = sigmoid(r_i(x_chosen) - r_i(x_rejected))

and minimises its negative log-likelihood. The paper also reports a hinge variant, and keeps ideal points inside a ball
with the penalty `lambda * sum max(0, ||a|| - B)`.
"""

import torch
from torch.nn import functional as F


def btl_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: torch.Tensor | float | None = None
) -> torch.Tensor:
    """
    Mean negative log-likelihood of the Bradley-Terry model, `-log sigmoid(r_c - r_r - margin)`.

    Args:
        chosen_rewards, rejected_rewards (`torch.Tensor` of shape `(num_pairs,)`): rewards of the two responses.
        margin (`torch.Tensor` of shape `(num_pairs,)` or `float`, *optional*): required reward gap (TRL's `margin`).
    """
    difference = chosen_rewards - rejected_rewards
    if margin is not None:
        difference = difference - margin
    return -F.logsigmoid(difference).mean()


def hinge_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: torch.Tensor | float | None = None
) -> torch.Tensor:
    """Mean hinge loss `max(0, margin - (r_c - r_r))`, with `margin` defaulting to 1."""
    margin = 1.0 if margin is None else margin
    return F.relu(margin - (chosen_rewards - rejected_rewards)).mean()


def norm_bound_penalty(points: torch.Tensor, bound: float) -> torch.Tensor:
    """Mean of `max(0, ||a|| - bound)` over the rows of `points` `(num_points, dim)`: keeps ideal points in a ball."""
    return F.relu(points.norm(dim=-1) - bound).mean()


LOSSES = {"sigmoid": btl_loss, "hinge": hinge_loss}


def preference_loss(loss_type: str, chosen_rewards, rejected_rewards, margin=None) -> torch.Tensor:
    """Dispatches to `btl_loss` (`"sigmoid"`, the default) or `hinge_loss` (`"hinge"`)."""
    if loss_type not in LOSSES:
        raise ValueError(f"Unknown `loss_type` {loss_type!r}; choose one of {sorted(LOSSES)}.")
    return LOSSES[loss_type](chosen_rewards, rejected_rewards, margin)


__all__ = ["btl_loss", "hinge_loss", "norm_bound_penalty", "preference_loss"]
