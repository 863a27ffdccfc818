# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
"""
Few-shot adaptation of users: the posterior of a user's mixture given its comparisons under a population prior
learned from the trained users, the choice of that prior on validation data, and the choice of the comparisons to ask
a new user.

A user of PAL is K mixture logits `z`; its mixture is `w = softmax(z / tau)`. Given a user's comparisons and a trained
model (frozen), every comparison adds its Bradley-Terry log-likelihood `log sigmoid(r_z(chosen) - r_z(rejected))` to
the log-posterior (a sum over comparisons), and the prior keeps a fixed weight, so the prior matters less the more a
user answers. Two priors, both learned from the trained users' logits (centred: a softmax ignores a shift):

- `"empirical"` (a kernel density estimate): the trained users' logits, each blurred by a Gaussian of standard
  deviation `bandwidth * std`. The posterior is computed exactly on particles drawn from it (importance weights = the
  likelihood of the user's comparisons); the user gets the posterior-mean mixture, whose ideal point is the posterior
  mean ideal point, and the particles' weighted covariance as posterior covariance. This follows a population made
  of groups, where a Gaussian does not.
- `"gaussian"`: `N(mean, diag(std^2) / strength)`. The user gets the MAP estimate of
  [`~pal_rm.losses.map_adaptation_objective`] (full-batch Adam; honours the hinge loss) and the Laplace covariance.

[`fit_adaptation_prior`] chooses the method and its setting by fitting seen users again from part of their
validation comparisons and scoring the rest. The posterior covariance gives [`PalRewardModel.user_confidence`] and
`score_texts(..., return_uncertainty=True)`; [`select_comparisons`] picks the comparisons whose answers are expected to
tell most about the user (mutual information on the particles).

The trainer's [`~pal_rm.trainers.PalRewardTrainer.adapt_users`] and `fit_adaptation_prior` call these functions on
features they prepare; the functions also work on features you bring (`PalConfig(feature_dim=...)` models).
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from .losses import map_adaptation_objective, pair_losses
from .metrics import personalized_preference_metrics
from .modeling_pal import PalAdaptationPrior, PalRewardModel, full_tensor

logger = logging.get_logger(__name__)

# Candidates of `fit_adaptation_prior`: kernel bandwidths of the empirical prior (in units of the population's
# spread) and strengths of the Gaussian prior.
PRIOR_CANDIDATES = {"empirical": (0.0, 0.1, 0.3, 1.0), "gaussian": (0.1, 0.3, 1.0, 3.0, 10.0)}
MAX_PARTICLES = 4096


class NotEnoughValidationData(ValueError):
    """No seen user has the 2 validation comparisons needed to choose the prior's strength."""


@dataclass
class PairEmbeddings:
    """A model's view of comparisons, computed once: item embeddings and prototype points (no gradient)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    points: torch.Tensor
    prototype_differences: torch.Tensor | None

    def __len__(self) -> int:
        return self.chosen.shape[0]

    def select(self, index: torch.Tensor) -> "PairEmbeddings":
        differences = self.prototype_differences
        return PairEmbeddings(
            self.chosen[index],
            self.rejected[index],
            self.points[index],
            differences[index] if differences is not None else None,
        )

    def differences(self, model: PalRewardModel, weights: torch.Tensor) -> torch.Tensor:
        """`r(chosen) - r(rejected)` per pair for per-pair mixture weights `(num_pairs, K)`."""
        return model.pair_reward_differences(
            self.chosen, self.rejected, self.points, weights, self.prototype_differences
        )


@torch.no_grad()
def embed_pairs(
    model: PalRewardModel,
    chosen_features: torch.Tensor,
    rejected_features: torch.Tensor,
    prompt_features: torch.Tensor | None = None,
) -> PairEmbeddings:
    """Maps pooled backbone features of comparisons `(num_pairs, H)` to the model's preference space, once."""
    for name, value in (("chosen", chosen_features), ("rejected", rejected_features), ("prompt", prompt_features)):
        if value is not None and not torch.isfinite(value).all():
            bad = (~torch.isfinite(value).all(-1)).nonzero().flatten().tolist()
            raise ValueError(f"The {name} features of comparisons {bad[:10]} are not finite (NaN or inf).")
    was_training = model.training
    model.eval()
    try:
        dtype = model.item_head.layers[-1].weight.dtype
        chosen = model.item_head(chosen_features.to(dtype))
        rejected = model.item_head(rejected_features.to(dtype))
        prompts = prompt_features.to(dtype) if prompt_features is not None else None
        points = model.prototype_points(prompts, chosen.shape[0])
        return PairEmbeddings(chosen, rejected, points, model.prototype_reward_differences(chosen, rejected, points))
    finally:
        model.train(was_training)


@dataclass
class MixtureFit:
    """
    The result of [`fit_users`]: per user the fitted logits `(U, K)` (MAP or posterior-mean mixture), the posterior
    covariance of the logits `(U, K, K)` and the number of comparisons `(U,)`; per pair the fitted reward differences; the objective per
    comparison and the training accuracy.
    """

    logits: torch.Tensor
    covariance: torch.Tensor
    num_comparisons: torch.LongTensor
    differences: torch.Tensor
    loss: float
    accuracy: float


def _check_prior(prior: PalAdaptationPrior, num_prototypes: int) -> None:
    if prior.method not in PRIOR_CANDIDATES:
        raise ValueError(f"Unknown prior method {prior.method!r}; choose one of {sorted(PRIOR_CANDIDATES)}.")
    if not prior.bandwidth >= 0:
        raise ValueError(f"The empirical prior's bandwidth must be >= 0, got {prior.bandwidth}.")
    if prior.mean.shape != (num_prototypes,) or prior.std.shape != (num_prototypes,):
        raise ValueError(f"The prior needs a mean and a std of shape ({num_prototypes},).")
    if not (prior.strength > 0 and (prior.std > 0).all()):
        raise ValueError(f"The prior needs positive `std` and `strength`, got {prior.std.tolist()}, {prior.strength}.")


def fit_map_logits(
    model: PalRewardModel,
    pairs: PairEmbeddings,
    users: torch.LongTensor,
    num_users: int,
    prior: PalAdaptationPrior | None = None,
    margin: torch.Tensor | None = None,
    loss_type: str = "sigmoid",
    steps: int = 300,
    learning_rate: float = 0.1,
    show_progress: bool = False,
) -> MixtureFit:
    """
    MAP estimate of the mixture logits of `num_users` users from their comparisons, all users at once: full-batch Adam
    from the prior mean on [`~pal_rm.losses.map_adaptation_objective`] (the sum of the pairs' losses plus the Gaussian
    prior at its fixed strength), then the Laplace covariance of each user's logits at the estimate (the inverse of the
    prior precision plus the Bradley-Terry Fisher information `sum_j p_j (1 - p_j) g_j g_j^T`, `g_j` the gradient of
    pair j's reward difference in the logits; with `loss_type="hinge"` the fit minimises the hinge loss and the
    covariance still uses the Bradley-Terry curvature).

    Args:
        pairs: the comparisons, from [`embed_pairs`].
        users (`torch.LongTensor` of shape `(num_pairs,)`): the user (`0..num_users-1`) of each comparison.
        prior: defaults to [`PalRewardModel.adaptation_prior`].
        margin (`torch.Tensor` of shape `(num_pairs,)`, *optional*): TRL's `margin` column.
    """
    k = model.config.num_prototypes
    prior = prior if prior is not None else model.adaptation_prior()
    _check_prior(prior, k)
    device = pairs.chosen.device
    users = users.to(device)
    counts = _check_users(users, num_users, len(pairs))
    mean, std = prior.mean.to(device), prior.std.to(device)
    temperature = model.config.mixture_temperature
    logits = torch.nn.Parameter(mean.repeat(num_users, 1).clone())
    optimizer = torch.optim.Adam([logits], lr=learning_rate)
    differences = torch.zeros(0, device=device)
    objective = torch.zeros((), device=device)
    progress = tqdm(range(steps), desc="Adapting users", disable=not show_progress or steps == 0)
    for step in progress:
        optimizer.zero_grad()
        weights = torch.softmax(logits / temperature, dim=-1)[users]
        differences = pairs.differences(model, weights)
        objective = map_adaptation_objective(
            pair_losses(loss_type, differences, margin), users, logits, mean, std, prior.strength
        )
        if not torch.isfinite(objective):
            raise FloatingPointError(
                f"Adaptation: the loss became {objective.item()} at step {step}; no user was registered. Lower the "
                "adaptation learning rate (`adapt_learning_rate`) or check the users' comparisons and features."
            )
        objective.backward()
        optimizer.step()
    with torch.no_grad():
        if not torch.isfinite(logits).all():
            raise FloatingPointError("Adaptation: the fitted mixture logits are not finite; no user was registered.")
        weights = torch.softmax(logits / temperature, dim=-1)[users]
        differences = pairs.differences(model, weights)
        objective = map_adaptation_objective(
            pair_losses(loss_type, differences, margin), users, logits, mean, std, prior.strength
        )
    covariance = laplace_covariance(model, pairs, users, logits.detach(), prior, margin)
    accuracy = personalized_preference_metrics(differences.cpu().numpy())["accuracy"] if len(pairs) else float("nan")
    return MixtureFit(
        logits=logits.detach(),
        covariance=covariance,
        num_comparisons=counts.cpu(),
        differences=differences.detach(),
        loss=objective.item() / max(len(pairs), 1),
        accuracy=accuracy,
    )


def difference_gradients(
    model: PalRewardModel, pairs: PairEmbeddings, logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair, the reward difference `(P,)` and its gradient in the pair's user's logits `(P, K)` (rows of `logits`)."""
    with torch.enable_grad():
        per_pair = logits.detach().clone().requires_grad_(True)
        differences = pairs.differences(model, torch.softmax(per_pair / model.config.mixture_temperature, dim=-1))
        (gradients,) = torch.autograd.grad(differences.sum(), per_pair)
    return differences.detach(), gradients


@torch.no_grad()
def laplace_covariance(
    model: PalRewardModel,
    pairs: PairEmbeddings,
    users: torch.LongTensor,
    logits: torch.Tensor,
    prior: PalAdaptationPrior,
    margin: torch.Tensor | None = None,
) -> torch.Tensor:
    """
    Laplace covariance `(U, K, K)` of each user's logits at `logits` `(U, K)`: the inverse of the prior precision
    `strength * diag(1 / std^2)` plus the Bradley-Terry Fisher information of the user's comparisons.
    """
    num_users, k = logits.shape
    differences, gradients = difference_gradients(model, pairs, logits[users])
    if margin is not None:
        differences = differences - margin.to(differences.device)
    probability = torch.sigmoid(differences)
    curvature = (probability * (1 - probability)).unsqueeze(-1).unsqueeze(-1)
    fisher = gradients.unsqueeze(-1) * gradients.unsqueeze(-2) * curvature
    precision = torch.zeros(num_users, k, k, device=logits.device).index_add(0, users, fisher)
    precision = precision + torch.diag(prior.strength / prior.std.to(logits.device).pow(2))
    return torch.linalg.inv(precision)


def prior_particles(
    model: PalRewardModel,
    prior: PalAdaptationPrior,
    max_particles: int = MAX_PARTICLES,
    seed: int = 0,
    rows: Sequence[int] | None = None,
) -> torch.Tensor:
    """
    Particles `(C, K)` (centred logits) drawn from the prior: for `"empirical"`, the trained users' centred logits (all
    of them when there are at most `max_particles` and no blur, else `max_particles` draws, each a trained user plus
    Gaussian noise of standard deviation `bandwidth * std`); for `"gaussian"`, `max_particles` draws of the Gaussian.
    `rows`: the trained users (default: the rows without a few-shot posterior). Deterministic given `seed`.
    """
    generator = torch.Generator().manual_seed(seed)
    k = model.config.num_prototypes
    mean, std = prior.mean.float().cpu(), prior.std.float().cpu()
    if prior.method == "gaussian":
        noise = torch.randn(max_particles, k, generator=generator)
        return (mean + noise * std / prior.strength**0.5).to(prior.mean.device)
    rows = model.trained_user_rows() if rows is None else list(rows)
    if not rows:
        raise ValueError(
            "The empirical adaptation prior needs trained users (rows without a few-shot posterior); this model has "
            "none. Train the model on users first, or use a Gaussian prior."
        )
    logits = full_tensor(model.user_weights.weight).detach().float().cpu()[torch.tensor(rows, dtype=torch.long)]
    logits = logits - logits.mean(-1, keepdim=True)
    if prior.bandwidth == 0 and logits.shape[0] <= max_particles:
        return logits.to(prior.mean.device)
    picks = torch.randint(logits.shape[0], (max_particles,), generator=generator)
    if prior.bandwidth == 0:
        return logits[picks].to(prior.mean.device)
    noise = torch.randn(max_particles, k, generator=generator)
    return (logits[picks] + noise * prior.bandwidth * std).to(prior.mean.device)


def particle_log_likelihoods(
    model: PalRewardModel,
    pairs: PairEmbeddings,
    users: torch.LongTensor,
    num_users: int,
    particles: torch.Tensor,
    margin: torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """
    Bradley-Terry log-likelihood `(U, C)` of each user's comparisons (a sum over them) at each particle `(C, K)`,
    computed in chunks of pairs so that memory stays `O(chunk_size * C)`.
    """
    weights = torch.softmax(particles / model.config.mixture_temperature, dim=-1)
    totals = torch.zeros(num_users, particles.shape[0], device=particles.device)
    with torch.no_grad():
        for start in range(0, len(pairs), chunk_size):
            index = torch.arange(start, min(start + chunk_size, len(pairs)), device=users.device)
            chunk = pairs.select(index)
            differences = particle_differences(model, chunk, weights)
            if margin is not None:
                differences = differences - margin[index].unsqueeze(-1)
            totals.index_add_(0, users[index], torch.nn.functional.logsigmoid(differences))
    return totals


def particle_differences(model: PalRewardModel, pairs: PairEmbeddings, weights: torch.Tensor) -> torch.Tensor:
    """Reward differences `(P, C)` of every pair for every particle's mixture `weights` `(C, K)`."""
    if pairs.prototype_differences is not None:
        return pairs.prototype_differences @ weights.T.to(pairs.prototype_differences.dtype)
    columns = []
    for particle in weights:
        columns.append(pairs.differences(model, particle.unsqueeze(0).expand(len(pairs), -1)))
    return torch.stack(columns, dim=-1)


def fit_empirical_posterior(
    model: PalRewardModel,
    pairs: PairEmbeddings,
    users: torch.LongTensor,
    num_users: int,
    prior: PalAdaptationPrior,
    margin: torch.Tensor | None = None,
    seed: int = 0,
    prior_rows: Sequence[int] | None = None,
) -> MixtureFit:
    """
    The posterior of each user's mixture under the empirical prior, on [`prior_particles`]: importance weights
    `softmax_c(sum_j log sigmoid(d_j(z_c)))`; the user's mixture is the posterior-mean mixture `sum_c pi_c w_c` (its ideal
    point is the posterior-mean ideal point), its logits `tau * log` of it, and its covariance the particles' weighted
    covariance (plus `1e-6` on the diagonal). `prior_rows`: the trained users the prior is made of (default: the
    rows without a few-shot posterior; pass them when the users being fitted are registered already).
    """
    device = pairs.chosen.device
    users = users.to(device)
    counts = _check_users(users, num_users, len(pairs))
    particles = prior_particles(model, prior, seed=seed, rows=prior_rows).to(device)
    log_weights = torch.log_softmax(
        particle_log_likelihoods(model, pairs, users, num_users, particles, margin), dim=-1
    )
    posterior = log_weights.exp()
    temperature = model.config.mixture_temperature
    mixtures = posterior @ torch.softmax(particles / temperature, dim=-1)
    logits = temperature * mixtures.clamp(min=1e-12).log()
    logits = logits - logits.mean(-1, keepdim=True)
    centred = particles.unsqueeze(0) - (posterior @ particles).unsqueeze(1)  # (U, C, K)
    covariance = torch.einsum("uc,uck,ucl->ukl", posterior, centred, centred)
    covariance = covariance + 1e-6 * torch.eye(particles.shape[1], device=device)
    with torch.no_grad():
        differences = pairs.differences(model, mixtures[users])
        shifted = differences - margin if margin is not None else differences
        loss = -torch.nn.functional.logsigmoid(shifted).sum().item() / max(len(pairs), 1)
    accuracy = personalized_preference_metrics(shifted.cpu().numpy())["accuracy"] if len(pairs) else float("nan")
    return MixtureFit(logits, covariance, counts.cpu(), differences, loss, accuracy)


def _check_users(users: torch.LongTensor, num_users: int, num_pairs: int) -> torch.LongTensor:
    if users.numel() != num_pairs:
        raise ValueError(f"Got {users.numel()} user rows for {num_pairs} comparisons.")
    if users.numel() and (users.min() < 0 or users.max() >= num_users):
        raise IndexError(f"User rows must lie in 0..{num_users - 1}.")
    counts = torch.bincount(users, minlength=num_users)
    if (counts == 0).any():
        empty = (counts == 0).nonzero().flatten().tolist()
        raise ValueError(
            f"Users {empty[:10]} have no comparison: adaptation needs at least one comparison per user (a user without "
            "comparisons is the population; score it with `users=None` or `unknown_users='population'`)."
        )
    return counts


def fit_users(
    model: PalRewardModel,
    pairs: PairEmbeddings,
    users: torch.LongTensor,
    num_users: int,
    prior: PalAdaptationPrior | None = None,
    margin: torch.Tensor | None = None,
    loss_type: str = "sigmoid",
    steps: int = 300,
    learning_rate: float = 0.1,
    show_progress: bool = False,
    seed: int = 0,
    prior_rows: Sequence[int] | None = None,
) -> MixtureFit:
    """
    Fits `num_users` users from their comparisons with the prior's method: [`fit_empirical_posterior`] or
    [`fit_map_logits`] (always the latter with `loss_type="hinge"`, which has no likelihood to weight particles by).
    `prior` defaults to [`PalRewardModel.adaptation_prior`]; `prior_rows`: the trained users an empirical prior is
    made of (default: the rows without a few-shot posterior).
    """
    prior = prior if prior is not None else model.adaptation_prior()
    _check_prior(prior, model.config.num_prototypes)
    if prior.method == "empirical" and loss_type == "sigmoid":
        return fit_empirical_posterior(model, pairs, users, num_users, prior, margin, seed, prior_rows)
    return fit_map_logits(
        model, pairs, users, num_users, prior, margin, loss_type, steps, learning_rate, show_progress
    )


def _folds(users: torch.LongTensor, num_folds: int, seed: int) -> tuple[torch.LongTensor, torch.Tensor]:
    """A fold `0..num_folds-1` for every comparison (dealt round-robin within each user, in a random order), and
    whether its user has 2 or more comparisons."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(users.numel(), generator=generator).to(users.device)
    shuffled = users[order]
    sort = torch.sort(shuffled, stable=True)
    counts = torch.bincount(users)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.empty_like(shuffled)
    position[sort.indices] = torch.arange(users.numel(), device=users.device) - starts[sort.values]
    fold = torch.empty_like(users)
    fold[order] = position % num_folds
    return fold, counts[users] >= 2


def fit_adaptation_prior(
    model: PalRewardModel,
    pairs: PairEmbeddings,
    users: torch.LongTensor,
    seen_rows: Sequence[int],
    candidates: dict[str, Sequence[float]] | None = None,
    margin: torch.Tensor | None = None,
    loss_type: str = "sigmoid",
    steps: int = 300,
    learning_rate: float = 0.1,
    seed: int = 0,
    max_folds: int = 5,
    split: str = "validation",
) -> dict:
    """
    Learns the population prior of adaptation and stores it in `model.config.adaptation_prior`.

    The prior's mean and spread are those of the centred logits of the trained users `seen_rows`. Its method and
    setting (kernel bandwidth of `"empirical"`, strength of `"gaussian"`; `candidates` defaults to
    `PRIOR_CANDIDATES`) are chosen by cross-validation on the seen users' *validation* comparisons `pairs` (never
    test): each user's comparisons are dealt into up to `max_folds` folds; every fold in turn, each user is fitted
    again from its other comparisons (its trained logits are not used) and scored on the fold. The candidate with the
    highest held-out accuracy wins, ties broken by the lower Bradley-Terry log-loss. (Accuracy is what a reward model is
    used for; on groups of users the log-loss of a point estimate prefers a strong Gaussian prior, whose predictions
    are hedged, over the empirical posterior, which ranks better.)
    Users with fewer than 2 validation comparisons are skipped.

    Args:
        pairs: the seen users' validation comparisons, from [`embed_pairs`].
        users (`torch.LongTensor` of shape `(num_pairs,)`): each comparison's row in the model's user table.
        seen_rows: the rows of the users the model was trained on (the population the prior describes).

    Returns the stored prior (`model.config.adaptation_prior`).
    """
    candidates = PRIOR_CANDIDATES if candidates is None else candidates
    unknown = set(candidates) - set(PRIOR_CANDIDATES)
    if unknown or not any(len(values) for values in candidates.values()):
        raise ValueError(
            f"`candidates` must map prior methods ({sorted(PRIOR_CANDIDATES)}) to non-empty lists of settings, got "
            f"{candidates!r}."
        )
    if loss_type != "sigmoid":  # the hinge loss has no likelihood for the empirical posterior
        candidates = {"gaussian": candidates.get("gaussian", PRIOR_CANDIDATES["gaussian"])}
    mean, std = model.population_prior_statistics(seen_rows)
    users = users.to(pairs.chosen.device)
    if users.numel() == 0:
        raise NotEnoughValidationData("No validation comparison of a seen user: the prior cannot be chosen.")
    num_folds = int(min(max_folds, torch.bincount(users).max()))
    fold, eligible = _folds(users, max(num_folds, 2), seed)
    if not eligible.any():
        raise NotEnoughValidationData(
            "No seen user has 2 or more validation comparisons: the adaptation prior cannot be chosen on validation "
            "data. Give the validation split several comparisons per user."
        )
    results = []
    for method, values in candidates.items():
        for value in values:
            prior = PalAdaptationPrior(
                mean=mean,
                std=std,
                strength=float(value) if method == "gaussian" else 1.0,
                learned=True,
                method=method,
                bandwidth=float(value) if method == "empirical" else 0.0,
            )
            held_out, held_out_margin = [], []
            for test_fold in range(num_folds):
                train_index = (eligible & (fold != test_fold)).nonzero().flatten()
                test_index = (eligible & (fold == test_fold)).nonzero().flatten()
                train_users, local = torch.unique(users[train_index], return_inverse=True)
                position = torch.full((int(users.max()) + 1,), -1, dtype=torch.long, device=users.device)
                position[train_users] = torch.arange(train_users.numel(), device=users.device)
                test_index = test_index[position[users[test_index]] >= 0]
                if test_index.numel() == 0:
                    continue
                fit = fit_users(
                    model,
                    pairs.select(train_index),
                    local,
                    train_users.numel(),
                    prior,
                    margin[train_index] if margin is not None else None,
                    loss_type,
                    steps,
                    learning_rate,
                    seed=seed,
                    prior_rows=seen_rows,
                )
                weights = torch.softmax(fit.logits / model.config.mixture_temperature, dim=-1)
                with torch.no_grad():
                    held_out.append(pairs.select(test_index).differences(model, weights[position[users[test_index]]]))
                held_out_margin.append(margin[test_index] if margin is not None else None)
            differences = torch.cat(held_out)
            if margin is not None:
                differences = differences - torch.cat(held_out_margin)
            metrics = personalized_preference_metrics(differences.cpu().numpy())
            results.append(
                {
                    "method": method,
                    "value": float(value),
                    "log_loss": metrics["log_loss"],
                    "accuracy": metrics["accuracy"],
                }
            )
    best = min(results, key=lambda entry: (-entry["accuracy"], entry["log_loss"]))
    stored = {
        "method": best["method"],
        "mean": mean.tolist(),
        "std": std.tolist(),
        "strength": best["value"] if best["method"] == "gaussian" else 1.0,
        "bandwidth": best["value"] if best["method"] == "empirical" else 0.0,
        "selection": {
            "split": split,
            "criterion": f"{num_folds}-fold held-out accuracy (then log-loss) of seen users fitted again from their "
            "other validation comparisons",
            "users": int(torch.unique(users[eligible]).numel()),
            "comparisons": int(eligible.sum()),
            "candidates": results,
        },
    }
    model.config.adaptation_prior = stored
    setting = f"bandwidth {best['value']:g}" if best["method"] == "empirical" else f"strength {best['value']:g}"
    logger.info(
        f"Adaptation prior: {best['method']} ({setting}), chosen on {stored['selection']['users']} seen users' {split} "
        f"comparisons (held-out log-loss {best['log_loss']:.4f}, accuracy {best['accuracy']:.4f})."
    )
    return stored


def user_particles(
    model: PalRewardModel,
    user: str | None = None,
    answered: dict | None = None,
    max_particles: int = MAX_PARTICLES,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Particles `(C, K)` and their log-weights `(C,)` describing what the model believes about one user's logits:

    - `answered` given (the user's comparisons so far, as `{"chosen_features", "rejected_features"}` plus
      `"prompt_features"` for PAL-B): the posterior of the model's prior given them (importance weights);
    - a user fitted by `adapt_users`: draws of a Gaussian with its logits and stored posterior covariance;
    - `None` or an unregistered id (nothing answered yet): the prior;
    - a user the model was trained with: draws of `N(its logits, prior covariance)` (logged: it has no posterior).
    """
    prior = model.adaptation_prior()
    device = prior.mean.device
    registered = user is not None and model.is_registered([user])[0]
    if answered is not None:
        particles = prior_particles(model, prior, max_particles, seed)
        features = {key: torch.as_tensor(value, dtype=torch.float32, device=device) for key, value in answered.items()}
        pairs = embed_pairs(
            model, features["chosen_features"], features["rejected_features"], features.get("prompt_features")
        )
        users = torch.zeros(len(pairs), dtype=torch.long, device=device)
        log_likelihood = particle_log_likelihoods(model, pairs, users, 1, particles)[0]
        return particles, torch.log_softmax(log_likelihood, dim=-1)
    if not registered:
        particles = prior_particles(model, prior, max_particles, seed)
        return particles, torch.full((particles.shape[0],), -math.log(particles.shape[0]), device=device)
    confidence = model.user_confidence([user])
    centre = model.user_weights.weight[model.user_rows([user])[0]].detach().float().to(device)
    centre = centre - centre.mean()
    if int(confidence.num_comparisons[0]) >= 0:
        covariance = confidence.logit_covariance[0].to(device)
    else:
        logger.warning(
            f"User {user!r} was trained with the model and has no posterior; the prior's spread around its mixture "
            "stands in for it."
        )
        covariance = torch.diag(prior.std.pow(2))
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(max_particles, centre.numel(), generator=generator).to(device)
    factor = torch.linalg.cholesky(covariance + 1e-6 * torch.eye(centre.numel(), device=device))
    particles = centre + noise @ factor.T
    return particles, torch.full((max_particles,), -math.log(max_particles), device=device)


def _entropy(probability: torch.Tensor) -> torch.Tensor:
    probability = probability.clamp(1e-7, 1 - 1e-7)
    return -(probability * probability.log() + (1 - probability) * (1 - probability).log())


@torch.no_grad()
def select_by_mutual_information(
    model: PalRewardModel,
    pairs: PairEmbeddings,
    particles: torch.Tensor,
    log_weights: torch.Tensor,
    n: int,
    num_samples: int = 128,
    seed: int = 0,
) -> list[int]:
    """
    Greedy choice of `n` candidate comparisons for one user whose beliefs are weighted particles: each step takes the
    comparison with the largest mutual information between its answer and the user's mixture *given the answers to the
    comparisons already chosen* (BatchBALD, Kirsch et al. 2019), which those answers' `num_samples` simulated outcomes
    estimate. The first pick is exact BALD: `H(E_z p) - E_z H(p)`.
    """
    weights = torch.softmax(particles / model.config.mixture_temperature, dim=-1)
    probability = torch.sigmoid(particle_differences(model, pairs, weights))  # (P, C)
    prior = log_weights.exp()
    expected_entropy = _entropy(probability) @ prior  # E_z H(y | z), (P,)
    generator = torch.Generator().manual_seed(seed)
    # Each row: the particle posterior after one simulated set of answers to the comparisons chosen so far.
    posterior = prior.unsqueeze(0).repeat(num_samples, 1)
    available = torch.ones(len(pairs), dtype=torch.bool, device=probability.device)
    chosen = []
    for _ in range(min(n, len(pairs))):
        predictive = posterior @ probability.T  # (S, P): P(y = chosen first | simulated answers)
        gain = (_entropy(predictive).mean(0) - expected_entropy).masked_fill(~available, float("-inf"))
        best = int(torch.argmax(gain))
        chosen.append(best)
        available[best] = False
        answers = torch.rand(num_samples, generator=generator).to(predictive.device) < predictive[:, best]
        likelihood = torch.where(answers.unsqueeze(-1), probability[best], 1 - probability[best])
        posterior = posterior * likelihood
        posterior = posterior / posterior.sum(-1, keepdim=True).clamp(min=1e-30)
    return chosen


def select_comparisons(
    model: PalRewardModel,
    candidate_pairs,
    user: str | None = None,
    n: int = 1,
    tokenizer=None,
    answered: dict | None = None,
    batch_size: int = 32,
    seed: int = 0,
) -> list[int]:
    """
    Picks the `n` comparisons to ask `user` next, among `candidate_pairs`: those whose answers are expected to tell
    most about the user's mixture (greedy mutual information on particles of the user's posterior, see
    [`select_by_mutual_information`] and [`user_particles`]). Returns their indices in `candidate_pairs`, best first.

    To onboard a user: select a few comparisons, ask them, select again with `answered=` (the answers so far), and
    finally fit the user with `trainer.adapt_users` on all its answers.

    Args:
        candidate_pairs: a list of `{"prompt", "response_a", "response_b"}` dicts (strings or conversations; needs
            `tokenizer`), or a dict of pooled features `{"features_a", "features_b"}` `(P, H)` (plus
            `"prompt_features"` for PAL-B).
        answered (`dict`, *optional*): the user's answered comparisons as pooled features `{"chosen_features",
            "rejected_features"}` (plus `"prompt_features"` for PAL-B).

    Example:

    ```python
    >>> candidates = [{"prompt": p, "response_a": a, "response_b": b} for p, a, b in pool]
    >>> ask = select_comparisons(model, candidates, user="new-user", n=5, tokenizer=tokenizer)
    ```
    """
    if n < 1:
        raise ValueError(f"`n` must be >= 1, got {n}.")
    features = _candidate_features(model, candidate_pairs, tokenizer, batch_size)
    device = model.item_head.layers[-1].weight.device
    prompts = features.get("prompt_features")
    pairs = embed_pairs(
        model,
        features["features_a"].to(device),
        features["features_b"].to(device),
        prompts.to(device) if prompts is not None else None,
    )
    particles, log_weights = user_particles(model, user, answered, seed=seed)
    return select_by_mutual_information(model, pairs, particles.to(device), log_weights.to(device), n, seed=seed)


def _candidate_features(model: PalRewardModel, candidate_pairs, tokenizer, batch_size: int) -> dict:
    needs_prompt = model.needs_prompt
    if isinstance(candidate_pairs, dict):
        missing = {"features_a", "features_b"} - set(candidate_pairs)
        if needs_prompt and candidate_pairs.get("prompt_features") is None:
            missing.add("prompt_features")
        if missing:
            raise ValueError(f"`candidate_pairs` as features needs {sorted(missing)}.")
        if len(candidate_pairs["features_a"]) == 0:
            raise ValueError("`candidate_pairs` is empty: there is nothing to choose from.")
        return {name: torch.as_tensor(value, dtype=torch.float32) for name, value in candidate_pairs.items()}
    candidate_pairs = list(candidate_pairs)
    if not candidate_pairs:
        raise ValueError("`candidate_pairs` is empty: there is nothing to choose from.")
    if tokenizer is None:
        raise ValueError("`candidate_pairs` given as texts needs the model's `tokenizer`.")
    scorer = model.text_scorer(tokenizer, batch_size=batch_size)
    texts_a, texts_b, prompts = [], [], []
    for row, pair in enumerate(candidate_pairs):
        if not isinstance(pair, dict) or not {"prompt", "response_a", "response_b"} <= set(pair):
            raise ValueError(
                f"Candidate {row} must be a dict with `prompt`, `response_a` and `response_b`, got {pair!r}."
            )
        prompt, text_a = scorer.format_pair(pair["prompt"], pair["response_a"], row=row)
        _, text_b = scorer.format_pair(pair["prompt"], pair["response_b"], row=row)
        texts_a.append(text_a)
        texts_b.append(text_b)
        prompts.append(prompt)
    n = len(candidate_pairs)
    table = scorer.encode(texts_a + texts_b + (prompts if needs_prompt else []))
    features = {"features_a": table[:n], "features_b": table[n : 2 * n]}
    if needs_prompt:
        features["prompt_features"] = table[2 * n :]
    return features


__all__ = [
    "MAX_PARTICLES",
    "PRIOR_CANDIDATES",
    "MixtureFit",
    "NotEnoughValidationData",
    "PairEmbeddings",
    "embed_pairs",
    "fit_adaptation_prior",
    "fit_empirical_posterior",
    "fit_map_logits",
    "fit_users",
    "laplace_covariance",
    "particle_log_likelihoods",
    "prior_particles",
    "select_by_mutual_information",
    "select_comparisons",
    "user_particles",
]
