# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
"""Personalized rewards for TRL's online trainers (`GRPOTrainer`, `RLOOTrainer`, `OnlineDPOTrainer`)."""

from collections.abc import Sequence

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)


class PalRewardFunction:
    """
    A PAL reward model as a TRL reward function: each completion is scored for the user named in its row.

    TRL calls reward functions as `reward_func(prompts=..., completions=..., **columns)`, where `columns` holds every
    other column of the training dataset, one value per completion. This callable reads the user of each completion
    from `user_column`, so one batch can mix users, and returns one float per completion. It is a plain, picklable
    object (not an `nn.Module`), so TRL calls it as a function and never tokenizes for it. Prompts and completions may be
    plain text or conversations.

    Args:
        model ([`PalRewardModel`]): the reward model (PAL-A or PAL-B; the prompt is kept apart for PAL-B).
        tokenizer: the tokenizer saved with the reward model.
        user_column (`str` or `None`, *optional*, defaults to `"user_id"`):
            Dataset column naming the user of each row. `None`: score every completion for `mixture` (or the
            population).
        batch_size (`int`, *optional*, defaults to 32): backbone batch size.
        mixture (`Sequence[float]`, *optional*): score every completion for this point of the simplex instead of users.
        unknown_users (`str`, *optional*, defaults to `"error"`): `"population"` scores unregistered users with the
            population mixture instead of raising.
        max_length (`int`, *optional*): truncation length of the backbone (default: the backbone's limit).
        prompt_column (`str`, *optional*): score each completion against this dataset column's text instead of the
            policy's prompt, for a reward model trained on prompts written differently from the policy's (for example
            plain-text requests while the policy gets chat messages). Conversational completions are then scored on
            their text content.
        name (`str`, *optional*, defaults to `"pal_reward"`): the name TRL logs this reward under
            (`rewards/<name>/mean`); give each of several PAL reward functions its own.

    Example:

    ```python
    >>> from trl import GRPOConfig, GRPOTrainer
    >>> reward = PalRewardFunction(pal_model, pal_tokenizer)     # dataset rows carry a "user_id" column
    >>> trainer = GRPOTrainer(model=policy, reward_funcs=[reward], train_dataset=prompts_with_users, args=GRPOConfig(...))
    ```
    """

    def __init__(
        self,
        model,
        tokenizer,
        user_column: str | None = "user_id",
        batch_size: int = 32,
        mixture: Sequence[float] | None = None,
        unknown_users: str = "error",
        max_length: int | None = None,
        prompt_column: str | None = None,
        name: str = "pal_reward",
    ):
        if not hasattr(model, "text_scorer"):
            raise TypeError(f"`model` must be a PalRewardModel, got {type(model).__name__}.")
        self.scorer = model.text_scorer(tokenizer, max_length=max_length, batch_size=batch_size)
        if mixture is not None:
            model.resolve_mixture_weights(mixture_weights=mixture)  # raises if not on the simplex
            mixture = [float(value) for value in mixture]
        if unknown_users not in ("error", "population"):
            raise ValueError(f"`unknown_users` must be 'error' or 'population', got {unknown_users!r}.")
        self.model = model
        self.tokenizer = tokenizer
        self.user_column = user_column
        self.batch_size = batch_size
        self.mixture = mixture
        self.unknown_users = unknown_users
        self.max_length = max_length
        self.prompt_column = prompt_column
        self.__name__ = name

    def __call__(self, prompts: Sequence, completions: Sequence, **columns) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"Got {len(prompts)} prompts for {len(completions)} completions.")
        users = None
        if self.mixture is None and self.user_column is not None:
            users = columns.get(self.user_column)
            if users is None:
                raise ValueError(
                    f"The batch has no {self.user_column!r} column, so the completions cannot be scored per user. Add "
                    f"that column to the training dataset (TRL passes every dataset column to reward functions), set "
                    f"`user_column` to the column that names users, or pass `mixture=...` / `user_column=None`."
                )
            users = list(users)
            if len(users) != len(completions):
                raise ValueError(
                    f"Column {self.user_column!r} has {len(users)} values for {len(completions)} completions."
                )
        prompts, completions = list(prompts), list(completions)
        if self.prompt_column is not None:
            if self.prompt_column not in columns:
                raise ValueError(
                    f"The batch has no {self.prompt_column!r} column (the `prompt_column` of this reward function). "
                    f"Columns: {sorted(columns)}."
                )
            prompts = list(columns[self.prompt_column])
            completions = [_text_content(completion) for completion in completions]
        with torch.inference_mode():
            rewards = self.scorer.score(
                prompts,
                completions,
                users=users,
                mixture_weights=self.mixture,
                unknown_users=self.unknown_users,
                allow_empty_responses=True,  # a policy may stop at once; the prompt alone is then scored
            )
        return rewards.tolist()

    def __repr__(self) -> str:
        target = f"mixture={self.mixture}" if self.mixture is not None else f"user_column={self.user_column!r}"
        return f"PalRewardFunction({type(self.model).__name__}, {target})"


def _text_content(completion) -> str:
    """The text of a completion: itself when it is a string, the joined message contents of a conversation."""
    if isinstance(completion, str):
        return completion
    return "".join(str(message.get("content", "")) for message in completion)


__all__ = ["PalRewardFunction"]
