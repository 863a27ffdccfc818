# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
"""
Baselines PAL is measured against, trained on the same features and data:

- one reward for everyone: plain Bradley-Terry, a single reward head (`one_reward_model`; trained with
  `PalRewardTrainer`, it is what TRL's `RewardTrainer` fits on a frozen backbone);
- one independent reward head per user, nothing shared (`IndependentRewardHeads`);
- LoRe's low-rank reward basis with unconstrained per-user weights (`LowRankRewardBasis`; Bose et al. 2025);
- a per-group oracle: PAL whose user mixtures are fixed to the true group labels (or true mixture weights), so the
  shared maps are fitted on all of each group's data (`fix_user_mixtures`; an upper reference, not a competitor).
"""

from collections.abc import Sequence

import torch
from transformers.utils import logging

from .configuration_pal import PalConfig
from .losses import pair_losses, per_user_sums
from .metrics import personalized_preference_metrics
from .modeling_pal import PalRewardModel

logger = logging.get_logger(__name__)


def one_reward_model(feature_dim: int | None = None, backbone_config=None, **head_kwargs) -> PalRewardModel:
    """A Bradley-Terry reward model with PAL's item map: PAL-A with one prototype and the `dot` similarity, so every
    user (seen or not) gets the same linear reward `<f(x), p>`."""
    config = PalConfig(
        backbone_config=backbone_config,
        feature_dim=feature_dim,
        variant="a",
        num_prototypes=1,
        similarity="dot",
        **head_kwargs,
    )
    return PalRewardModel(config)


def fix_user_mixtures(model: PalRewardModel, user_ids: Sequence[str], weights, floor: float = 1e-4) -> None:
    """
    Sets the mixture of each user of `user_ids` (registering unknown ones) to the given points of the simplex and
    freezes the user table, so training only fits the shared parts: the per-group oracle when `weights` are the true
    group labels (one-hot) or true mixture weights. Entries below `floor` are raised to `floor` (softmax logits must
    be finite).
    """
    weights = torch.as_tensor(weights, dtype=torch.float32)
    if weights.shape != (len(user_ids), model.config.num_prototypes):
        raise ValueError(
            f"`weights` must have shape ({len(user_ids)}, {model.config.num_prototypes}) (one row per user, one "
            f"column per prototype), got {tuple(weights.shape)}."
        )
    if (weights < 0).any() or not torch.allclose(weights.sum(-1), torch.ones(len(user_ids)), atol=1e-4):
        raise ValueError("Every row of `weights` must be on the simplex (non-negative, summing to 1).")
    model.add_users(list(user_ids))  # known users keep their rows
    rows = model.user_rows(list(user_ids))
    logits = torch.log(weights.clamp(min=floor)) * model.config.mixture_temperature
    with torch.no_grad():
        model.user_weights.weight[rows] = logits.to(model.user_weights.weight)
    model.user_weights.requires_grad_(False)


def feature_differences(dataset) -> tuple[torch.Tensor, list[str]]:
    """`phi(chosen) - phi(rejected)` `(num_pairs, D)` of a featurized split, and the user of each comparison."""
    for column in ("chosen_features", "rejected_features", "user_id"):
        if column not in dataset.column_names:
            raise ValueError(f"The dataset has no {column!r} column; featurize it first (`featurize_preferences`).")
    arrays = dataset.with_format("numpy", columns=["chosen_features", "rejected_features"])[:]
    difference = (
        torch.from_numpy(arrays["chosen_features"]).float() - torch.from_numpy(arrays["rejected_features"]).float()
    )
    return difference, list(dataset["user_id"])


class IndependentRewardHeads:
    """
    One linear reward per user on frozen features, `r_u(x) = <w_u, phi(x)>`, nothing shared between users: each
    `w_u` is fitted on user `u`'s comparisons alone by the Bradley-Terry loss with an L2 penalty `l2 * ||w_u||^2`
    (full batch, all users at once; their losses are independent).

    Args:
        l2 (`float`): strength of the L2 penalty.
        steps (`int`), learning_rate (`float`): full-batch Adam steps and learning rate.
    """

    def __init__(self, l2: float = 0.01, steps: int = 300, learning_rate: float = 0.05):
        self.l2, self.steps, self.learning_rate = l2, steps, learning_rate
        self.user_ids: list[str] = []
        self.weights: torch.Tensor | None = None

    def fit(self, dataset) -> "IndependentRewardHeads":
        """Fits one head per user of `dataset` (users already fitted are refitted from scratch)."""
        difference, users = feature_differences(dataset)
        self.user_ids = list(dict.fromkeys(users))
        position = {user: i for i, user in enumerate(self.user_ids)}
        index = torch.tensor([position[user] for user in users])
        counts = torch.bincount(index, minlength=len(self.user_ids)).float()
        weights = torch.zeros(len(self.user_ids), difference.shape[1], requires_grad=True)
        optimizer = torch.optim.Adam([weights], lr=self.learning_rate)
        for _ in range(self.steps):
            optimizer.zero_grad()
            margins = (weights[index] * difference).sum(-1)
            per_user = per_user_sums(pair_losses("sigmoid", margins), index, len(self.user_ids))
            loss = (per_user / counts).sum() + self.l2 * weights.pow(2).sum()
            loss.backward()
            optimizer.step()
        self.weights = weights.detach()
        return self

    @torch.no_grad()
    def reward_differences(self, dataset) -> tuple[torch.Tensor, list[str]]:
        """`r(chosen) - r(rejected)` of each comparison of `dataset` for its user's head, and its user."""
        if self.weights is None:
            raise ValueError("Call `fit` first.")
        difference, users = feature_differences(dataset)
        unknown = sorted(set(users) - set(self.user_ids))
        if unknown:
            raise ValueError(f"No head for users {unknown[:3]} (fit them first: each user needs comparisons).")
        position = {user: i for i, user in enumerate(self.user_ids)}
        index = torch.tensor([position[user] for user in users])
        return (self.weights[index] * difference).sum(-1), users

    def correct(self, dataset) -> tuple[torch.Tensor, list[str]]:
        """Whether each comparison of `dataset` is ranked right (`chosen` above `rejected`), and its user."""
        differences, users = self.reward_differences(dataset)
        return differences > 0, users

    def accuracy(self, dataset) -> float:
        """Pair-weighted accuracy (`pal_rm.metrics.personalized_preference_metrics`; a tie counts half)."""
        differences, users = self.reward_differences(dataset)
        return personalized_preference_metrics(differences.numpy(), users)["accuracy"]


class LowRankRewardBasis:
    """
    LoRe (Bose et al., *LoRe: Personalizing LLMs via Low-Rank Reward Modeling*, 2025) on frozen features: K shared
    basis rewards `r_k(x) = <b_k, phi(x)>` (the rows of `B`, `(K, D)`) and, for each user, unconstrained weights
    `w_u` in R^K, so that `r_u(x) = w_u^T B phi(x)`. Seen users: `B` and every `w_u` are fitted jointly by the
    Bradley-Terry loss (each user's mean over their comparisons, summed over users) with the penalty
    `l2 * (||B||_F^2 + ||W||_F^2)`, which for a product `W B` is the low-rank (nuclear-norm) penalty LoRe's
    formulation rests on. New users ([`fit_new_users`]): `B` frozen, each `w_u` fitted alone on their few
    comparisons with the penalty `l2 * ||w_u||^2` (a convex problem in K numbers). Full-batch Adam.

    Relation to PAL-A with the `dot` similarity: PAL-A's reward is `<f(phi(x)), sum_k a_uk p_k> = sum_k a_uk
    <f(phi(x)), p_k>`; with a linear item map `f(phi) = F phi` (`head_hidden_dims=[]`), `<F phi, p_k> = <F^T p_k, phi>`,
    so PAL-A-dot is this model with basis `b_k = F^T p_k` and weights `a_u = softmax(z_u / tau)` restricted to the
    simplex. LoRe's weights are free (a user may weigh a basis reward negatively, or by more than 1), PAL's are a convex
    combination (every user's ideal point lies in the prototypes' hull).

    What was checked against LoRe's released code (facebookresearch/LoRe, `utils.py`, commit 6f93990): the bilinear
    form with a shared linear basis over frozen embeddings, and few-shot users fitted on the frozen basis. That code
    puts the user weights on the simplex (`softmax` of free logits, in joint training and for new users), and it
    pulls the basis towards a pretrained reward head; `simplex_weights=True` gives the simplex weights (then only the
    basis is penalised), which makes LoRe on frozen features the same model as PAL-A-dot with a linear item map. The
    default, free weights, is the formulation the low-rank argument is stated in. The regularisation and the
    optimiser here are this implementation's choices.

    Args:
        rank (`int`): number K of basis rewards.
        l2 (`float`): strength of the penalty.
        steps (`int`), learning_rate (`float`): full-batch Adam steps and learning rate (seen users and new users).
        seed (`int`): seed of the initialisation.
        simplex_weights (`bool`, defaults to `False`): user weights on the simplex (`softmax` of free logits), as in
            LoRe's released code, instead of free weights.
    """

    def __init__(
        self,
        rank: int = 4,
        l2: float = 0.01,
        steps: int = 300,
        learning_rate: float = 0.05,
        seed: int = 0,
        simplex_weights: bool = False,
    ):
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"`rank` must be an integer >= 1, got {rank!r}.")
        self.rank, self.l2, self.steps, self.learning_rate, self.seed = rank, l2, steps, learning_rate, seed
        if not isinstance(simplex_weights, bool):
            raise ValueError(f"`simplex_weights` must be True or False, got {simplex_weights!r}.")
        self.simplex_weights = simplex_weights
        self.basis: torch.Tensor | None = None
        self.user_ids: list[str] = []
        self.weights: torch.Tensor | None = None

    def _fit(self, dataset, fit_basis: bool) -> tuple[list[str], torch.Tensor]:
        difference, users = feature_differences(dataset)
        user_ids = list(dict.fromkeys(users))
        position = {user: i for i, user in enumerate(user_ids)}
        index = torch.tensor([position[user] for user in users])
        counts = torch.bincount(index, minlength=len(user_ids)).float()
        generator = torch.Generator().manual_seed(self.seed)
        scale = difference.shape[1] ** -0.5
        # free weights, or the logits of simplex weights
        parameters = (torch.randn(len(user_ids), self.rank, generator=generator) * 0.1).requires_grad_()
        basis = (
            (torch.randn(self.rank, difference.shape[1], generator=generator) * scale).requires_grad_()
            if fit_basis
            else self.basis
        )
        optimizer = torch.optim.Adam([parameters, basis] if fit_basis else [parameters], lr=self.learning_rate)
        for _ in range(self.steps):
            optimizer.zero_grad()
            weights = parameters.softmax(-1) if self.simplex_weights else parameters
            margins = (weights[index] * (difference @ basis.T)).sum(-1)
            per_user = per_user_sums(pair_losses("sigmoid", margins), index, len(user_ids))
            penalty = (0.0 if self.simplex_weights else weights.pow(2).sum()) + (
                basis.pow(2).sum() if fit_basis else 0.0
            )
            loss = (per_user / counts).sum() + self.l2 * penalty
            loss.backward()
            optimizer.step()
        if fit_basis:
            self.basis = basis.detach()
        with torch.no_grad():
            return user_ids, parameters.softmax(-1) if self.simplex_weights else parameters.detach()

    def fit(self, dataset) -> "LowRankRewardBasis":
        """Fits the basis and the weights of every user of `dataset` (seen users), from scratch."""
        self.user_ids, self.weights = self._fit(dataset, fit_basis=True)
        return self

    def fit_new_users(self, dataset) -> "LowRankRewardBasis":
        """Fits the weights of the users of `dataset` on the frozen basis; users already known are an error."""
        if self.basis is None:
            raise ValueError("Call `fit` on the seen users first: new users are fitted on the learned basis.")
        known = sorted(set(dataset["user_id"]) & set(self.user_ids))
        if known:
            raise ValueError(f"Users {known[:3]} are fitted already; `fit_new_users` takes new users only.")
        user_ids, weights = self._fit(dataset, fit_basis=False)
        self.user_ids += user_ids
        self.weights = torch.cat([self.weights, weights])
        return self

    @torch.no_grad()
    def reward_differences(self, dataset) -> tuple[torch.Tensor, list[str]]:
        """`r_u(chosen) - r_u(rejected)` of each comparison of `dataset` for its user, and its user."""
        difference, users = feature_differences(dataset)
        return self.rewards(difference, users), users  # the reward is linear in the features

    def accuracy(self, dataset) -> float:
        """Pair-weighted accuracy (`pal_rm.metrics.personalized_preference_metrics`; a tie counts half)."""
        differences, users = self.reward_differences(dataset)
        return personalized_preference_metrics(differences.numpy(), users)["accuracy"]

    @torch.no_grad()
    def rewards(self, features: torch.Tensor, users: Sequence[str]) -> torch.Tensor:
        """`r_u(x) = w_u^T B phi(x)` `(N,)` of features `(N, D)` for `users[i]` (fitted users only)."""
        if self.basis is None:
            raise ValueError("Call `fit` first.")
        position = {user: i for i, user in enumerate(self.user_ids)}
        unknown = sorted(set(users) - set(position))
        if unknown:
            raise ValueError(f"No weights for users {unknown[:3]}: fit them first (`fit_new_users`).")
        index = torch.tensor([position[user] for user in users])
        return (self.weights[index] * (features.float() @ self.basis.T)).sum(-1)


__all__ = [
    "IndependentRewardHeads",
    "LowRankRewardBasis",
    "feature_differences",
    "fix_user_mixtures",
    "one_reward_model",
]
