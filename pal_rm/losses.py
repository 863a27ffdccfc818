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


def pair_losses(loss_type: str, differences: torch.Tensor, margin: torch.Tensor | float | None = None) -> torch.Tensor:
    """
    Unreduced per-pair losses of reward differences `r_c - r_r` `(num_pairs,)`: `-log sigmoid(d - margin)`
    (`"sigmoid"`) or `max(0, margin - d)` with `margin` defaulting to 1 (`"hinge"`).
    """
    if loss_type == "sigmoid":
        return -F.logsigmoid(differences if margin is None else differences - margin)
    if loss_type == "hinge":
        return F.relu((1.0 if margin is None else margin) - differences)
    raise ValueError(f"Unknown `loss_type` {loss_type!r}; choose one of {sorted(LOSSES)}.")


def per_user_sums(values: torch.Tensor, users: torch.LongTensor, num_users: int) -> torch.Tensor:
    """Sums `(num_users,)` of per-pair `values` grouped by `users` (rows `0..num_users-1`), differentiable."""
    return values.new_zeros(num_users).index_add(0, users, values)


def gaussian_prior_penalty(logits: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """
    Per-user negative log-density (up to a constant) of independent Gaussians on the mixture logits,
    `0.5 * sum_k ((z_k - mean_k) / std_k)^2`, of `logits` `(num_users, K)`: shape `(num_users,)`.
    """
    return 0.5 * ((logits - mean) / std).pow(2).sum(-1)


def map_adaptation_objective(
    per_pair_losses: torch.Tensor,
    users: torch.LongTensor,
    logits: torch.Tensor,
    prior_mean: torch.Tensor,
    prior_std: torch.Tensor,
    prior_strength: float,
) -> torch.Tensor:
    """
    The negative log-posterior that few-shot adaptation minimises, summed over users:

        sum_i [ sum_{pairs j of user i} loss_j(z_i)  +  prior_strength * 0.5 * sum_k ((z_ik - mean_k) / std_k)^2 ]

    Each comparison adds its own term (a sum, not a mean over the user's pairs), while the prior's weight is fixed: the
    more comparisons a user gives, the less the prior counts. With the Bradley-Terry loss and `prior_strength=1` this
    is exactly the MAP estimate under the Gaussian prior `N(mean, diag(std^2))`; `prior_strength` scales the prior's
    precision (it is chosen on validation data, see `pal_rm.adaptation.fit_adaptation_prior`).

    Args:
        per_pair_losses (`torch.Tensor` of shape `(num_pairs,)`): e.g. from [`pair_losses`].
        users (`torch.LongTensor` of shape `(num_pairs,)`): the row in `logits` of each pair's user.
        logits (`torch.Tensor` of shape `(num_users, K)`): the users' mixture logits.
        prior_mean, prior_std (`torch.Tensor` of shape `(K,)`): the population prior on the logits.
    """
    evidence = per_user_sums(per_pair_losses, users, logits.shape[0])
    return (evidence + prior_strength * gaussian_prior_penalty(logits, prior_mean, prior_std)).sum()


def preference_loss(loss_type: str, chosen_rewards, rejected_rewards, margin=None) -> torch.Tensor:
    """Dispatches to `btl_loss` (`"sigmoid"`, the default) or `hinge_loss` (`"hinge"`)."""
    if loss_type not in LOSSES:
        raise ValueError(f"Unknown `loss_type` {loss_type!r}; choose one of {sorted(LOSSES)}.")
    return LOSSES[loss_type](chosen_rewards, rejected_rewards, margin)


__all__ = [
    "btl_loss",
    "gaussian_prior_penalty",
    "hinge_loss",
    "map_adaptation_objective",
    "norm_bound_penalty",
    "pair_losses",
    "per_user_sums",
    "preference_loss",
]
