# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
"""Best-of-n: rerank candidate responses with a PAL reward model, for a user or a mixture."""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)


@dataclass
class BestOfNOutput:
    """
    Args:
        best (`list`): the best candidate of each prompt.
        best_index (`list[int]`): its index among the prompt's candidates.
        rewards (`torch.Tensor` of shape `(num_prompts, n)`): the reward of every candidate.
        candidates (`list[list]`): the candidates that were ranked.
    """

    best: list
    best_index: list[int]
    rewards: torch.Tensor
    candidates: list[list]


def best_of_n(
    model,
    tokenizer,
    prompts: Sequence,
    candidates: Sequence[Sequence],
    users: str | Sequence[str | None] | None = None,
    mixture_weights: Sequence[float] | None = None,
    batch_size: int = 32,
    unknown_users: str = "error",
) -> BestOfNOutput:
    """
    Reranks `candidates[i]` (n responses to `prompts[i]`) with a PAL reward model, for `users` (one id for all prompts,
    or one per prompt; `None`: the population) or a `mixture_weights` point of the simplex.
    """
    prompts, candidates = list(prompts), [list(group) for group in candidates]
    if len(prompts) != len(candidates):
        raise ValueError(
            f"Got {len(prompts)} prompts and {len(candidates)} candidate lists; give one list per prompt."
        )
    sizes = {len(group) for group in candidates}
    if not candidates or min(sizes) == 0:
        raise ValueError("Best-of-n needs n >= 1 candidates for every prompt; got an empty candidate list.")
    if len(sizes) != 1:
        raise ValueError(f"Every prompt needs the same number of candidates, got sizes {sorted(sizes)}.")
    n = sizes.pop()
    if users is None or isinstance(users, str):
        users = [users] * len(prompts)
    users = list(users)
    if len(users) != len(prompts):
        raise ValueError(f"Got {len(users)} users for {len(prompts)} prompts; give one user per prompt.")
    flat_prompts = [prompt for prompt in prompts for _ in range(n)]
    flat_candidates = [candidate for group in candidates for candidate in group]
    flat_users = None if mixture_weights is not None else [user for user in users for _ in range(n)]
    scorer = model.text_scorer(tokenizer, batch_size=batch_size)
    rewards = scorer.score(
        flat_prompts, flat_candidates, users=flat_users, mixture_weights=mixture_weights, unknown_users=unknown_users
    ).view(len(prompts), n)
    index = rewards.argmax(dim=1).tolist()
    return BestOfNOutput(
        best=[group[i] for group, i in zip(candidates, index)],
        best_index=index,
        rewards=rewards,
        candidates=candidates,
    )


def sample_and_rerank(
    policy,
    policy_tokenizer,
    reward_model,
    reward_tokenizer,
    prompts: Sequence,
    n: int,
    users: str | Sequence[str | None] | None = None,
    mixture_weights: Sequence[float] | None = None,
    generation_kwargs: dict | None = None,
    batch_size: int = 32,
) -> BestOfNOutput:
    """
    Samples `n` completions per prompt from a causal LM `policy` (chat template applied to conversational prompts), then
    reranks them with [`best_of_n`] for `users` or `mixture_weights`.
    """
    if n < 1:
        raise ValueError(f"Best-of-n needs n >= 1 candidates, got n={n}.")
    generation_kwargs = {"do_sample": True, "max_new_tokens": 64, **(generation_kwargs or {})}
    generation_kwargs["num_return_sequences"] = n
    if policy_tokenizer.pad_token is None:
        policy_tokenizer.pad_token = policy_tokenizer.eos_token
    device = next(policy.parameters()).device
    candidates = []
    for prompt in prompts:
        if isinstance(prompt, list):
            text = policy_tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        else:
            text = prompt
        encoded = policy_tokenizer(text, return_tensors="pt", add_special_tokens=not isinstance(prompt, list)).to(
            device
        )
        with torch.no_grad():
            output = policy.generate(**encoded, pad_token_id=policy_tokenizer.pad_token_id, **generation_kwargs)
        texts = policy_tokenizer.batch_decode(output[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
        if isinstance(prompt, list):
            candidates.append([[{"role": "assistant", "content": completion}] for completion in texts])
        else:
            candidates.append(texts)
    return best_of_n(reward_model, reward_tokenizer, prompts, candidates, users, mixture_weights, batch_size)


__all__ = ["BestOfNOutput", "best_of_n", "sample_and_rerank"]
