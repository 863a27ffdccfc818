# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
"""Sanity checks a user can run on their own PAL model: does it really personalise?

A personalized reward model can look accurate while ignoring who the user is (every user near the same mixture), or
while being unable to move a user away from the population from their comparisons. Two checks catch that:

- [`user_swap_check`]: score every user's comparisons with another user's mixture. If the users are really modelled
  apart, accuracy drops; a model whose users are interchangeable is flagged.
- [`label_flip_check`]: fit each user twice from their comparisons, once as given and once with every label flipped.
  The two mixtures should differ and most predictions should flip; if they do not, the comparisons cannot move a user
  and few-shot adaptation cannot personalise.
"""

from collections.abc import Sequence

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

CHECK_USER_PREFIX = "__pal_sanity_check__"


def pair_reward_differences(
    model,
    tokenizer,
    dataset,
    users: Sequence[str] | None = None,
    mixture_weights: torch.Tensor | None = None,
    batch_size: int = 32,
) -> torch.Tensor:
    """
    `r(chosen) - r(rejected)` for every comparison of a preference dataset (texts, or pooled `*_features` columns),
    for the given per-row `users` or per-row `mixture_weights` `(num_rows, K)`.
    """
    columns = dataset.column_names
    with torch.no_grad():
        if "chosen_features" in columns:
            device = model.population_mixture.device

            def column(name):
                values = dataset.select_columns([name]).with_format("numpy")[:][name]
                return torch.as_tensor(values, dtype=torch.float32).to(device)

            chosen, rejected = column("chosen_features"), column("rejected_features")
            prompt = column("prompt_features") if "prompt_features" in columns else None
            kwargs = {"user_ids": list(users)} if users is not None else {"mixture_weights": mixture_weights}
            rewards = [
                model(item_features=features, prompt_features=prompt, **kwargs).logits.squeeze(-1).float().cpu()
                for features in (chosen, rejected)
            ]
            return rewards[0] - rewards[1]
        prompts = list(dataset["prompt"]) if "prompt" in columns else [""] * len(dataset)
        both_users = list(users) * 2 if users is not None else None
        both_mixtures = torch.cat([mixture_weights, mixture_weights]) if mixture_weights is not None else None
        rewards = model.score_texts(
            tokenizer,
            prompts * 2,
            list(dataset["chosen"]) + list(dataset["rejected"]),
            users=both_users,
            mixture_weights=both_mixtures,
            batch_size=batch_size,
        )
        return rewards[: len(dataset)] - rewards[len(dataset) :]


def _accuracy(differences: torch.Tensor) -> float:
    from .metrics import personalized_preference_metrics

    return personalized_preference_metrics(differences.numpy())["accuracy"]


def user_swap_check(
    model, tokenizer, dataset, user_column: str = "user_id", min_accuracy_drop: float = 0.02, seed: int = 0
) -> dict:
    """
    Scores each registered user's comparisons in `dataset` with their own mixture and with another user's (a random
    derangement of the users), and reports both accuracies. Users whose preferences the model tells apart lose
    accuracy when swapped; a drop under `min_accuracy_drop` flags a model whose users are interchangeable (logged as a
    warning).

    Returns `{"accuracy", "swapped_accuracy", "accuracy_drop", "num_users", "interchangeable"}`.
    """
    user_ids = list(dataset[user_column])
    users = list(dict.fromkeys(user_ids))
    if len(users) < 2:
        raise ValueError(f"`user_swap_check` needs comparisons of at least 2 users, got {len(users)}.")
    rows = model.user_rows(users)  # raises on unknown users
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(users), generator=generator)
    partner = torch.empty_like(order)
    partner[order] = order.roll(1)  # a derangement: every user gets someone else's mixture
    mixtures = model.resolve_mixture_weights(rows, None, len(users)).detach().cpu()
    position = {user: index for index, user in enumerate(users)}
    own_index = torch.tensor([position[user] for user in user_ids])
    own = pair_reward_differences(model, tokenizer, dataset, mixture_weights=mixtures[own_index])
    swapped = pair_reward_differences(model, tokenizer, dataset, mixture_weights=mixtures[partner[own_index]])
    result = {"accuracy": _accuracy(own), "swapped_accuracy": _accuracy(swapped), "num_users": len(users)}
    result["accuracy_drop"] = result["accuracy"] - result["swapped_accuracy"]
    result["interchangeable"] = result["accuracy_drop"] < min_accuracy_drop
    if result["interchangeable"]:
        logger.warning(
            f"User swap check: giving each of {len(users)} users another user's mixture changes accuracy by only "
            f"{result['accuracy_drop']:+.3f} ({result['accuracy']:.3f} -> {result['swapped_accuracy']:.3f}): the model "
            "treats these users as interchangeable. Check the user column, K, and the user learning rate."
        )
    return result


def label_flip_check(trainer, dataset, min_flipped: float = 0.5, **adapt_kwargs) -> dict:
    """
    Fits every user of `dataset` twice with `trainer.adapt_users` (as temporary new users): on their comparisons as
    given, and with every label flipped (chosen and rejected swapped). Reports how far the two mixtures lie apart
    (total variation distance, mean over users) and the fraction of the users' comparisons whose predicted preference
    flips. The temporary users are removed afterwards: the model is left as it was. A flipped fraction under
    `min_flipped` is flagged (logged as a warning): the users' comparisons cannot move their mixture.

    Returns `{"mixture_shift", "flipped_predictions", "num_users", "insensitive"}`.
    """
    from datasets import concatenate_datasets

    model = (
        trainer.model if hasattr(trainer.model, "truncate_users") else trainer.accelerator.unwrap_model(trainer.model)
    )
    column = trainer.args.user_column
    feature_columns = "chosen_features" in dataset.column_names
    swap = ("chosen_features", "rejected_features") if feature_columns else ("chosen", "rejected")

    def renamed(tag):
        return lambda row: {column: f"{CHECK_USER_PREFIX}{tag}::{row[column]}"}

    original = dataset.map(renamed("original"))
    flipped = dataset.map(renamed("flipped")).map(lambda row: {swap[0]: row[swap[1]], swap[1]: row[swap[0]]})
    num_users_before = model.num_users
    try:
        trainer.adapt_users(concatenate_datasets([original, flipped]), **adapt_kwargs)
        users = list(dataset[column])
        original_users = [f"{CHECK_USER_PREFIX}original::{user}" for user in users]
        flipped_users = [f"{CHECK_USER_PREFIX}flipped::{user}" for user in users]
        tokenizer = trainer.processing_class
        as_given = pair_reward_differences(model, tokenizer, dataset, users=original_users)
        as_flipped = pair_reward_differences(model, tokenizer, dataset, users=flipped_users)
        unique = list(dict.fromkeys(users))
        with torch.no_grad():
            mixtures_original = model.resolve_mixture_weights(
                [f"{CHECK_USER_PREFIX}original::{u}" for u in unique], None, len(unique)
            )
            mixtures_flipped = model.resolve_mixture_weights(
                [f"{CHECK_USER_PREFIX}flipped::{u}" for u in unique], None, len(unique)
            )
            shift = 0.5 * (mixtures_original - mixtures_flipped).abs().sum(-1).mean().item()
    finally:
        model.truncate_users(num_users_before)
    flipped_fraction = ((as_given > 0) != (as_flipped > 0)).float().mean().item()
    result = {
        "mixture_shift": shift,
        "flipped_predictions": flipped_fraction,
        "num_users": len(unique),
        "insensitive": flipped_fraction < min_flipped,
    }
    if result["insensitive"]:
        logger.warning(
            f"Label flip check: fitting {len(unique)} users on flipped labels flips only {flipped_fraction:.0%} of their "
            f"predictions (mixture shift {shift:.3f}): their comparisons barely move a user's mixture, so few-shot "
            "adaptation cannot personalise. Check K, the prototypes' spread and `adapt_steps`/`adapt_learning_rate`."
        )
    return result


__all__ = ["label_flip_check", "pair_reward_differences", "user_swap_check"]
