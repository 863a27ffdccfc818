# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
"""PAL: personalized reward models with shared prototypes (Chen, Chen, Rege, Wang, Vinayak, ICLR 2025).

This file is copied next to the weights by `save_pretrained`, so that a checkpoint loads with
`AutoModel.from_pretrained(path, trust_remote_code=True)` where pal_rm is not installed. It therefore only uses relative
imports and the stable public transformers API.
"""

import contextvars
import copy
import ctypes
import errno
import fnmatch
import functools
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, PretrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.utils import ModelOutput, logging

from .configuration_pal import SIMILARITIES, VARIANTS, PalConfig, image_text_widths

logger = logging.get_logger(__name__)

IMAGE_MODEL_TAKES_IMAGES = (
    "This PAL model scores images (its backbone is a two-tower image-text model): pass the images as `pixel_values` "
    "(from the backbone's image processor) or `item_features`, and the captions as `prompt_input_ids`; score with "
    "`model.score_images(processor, prompts, images)` and train on `chosen_image` / `rejected_image` columns."
)
PAL_B_NEEDS_PROMPT = (
    "This is a PAL-B model: its ideal points depend on the prompt, so it needs the prompt apart from the response. "
    "Single-sequence entry points (`pipeline('text-classification')`, `forward(input_ids=...)` without prompt inputs, "
    "TRL's model-as-reward path, PPO's `score`) cannot provide it. Use the prompt-aware API instead: "
    "`model.score_texts(tokenizer, prompts, responses, users=...)`, `forward(..., prompt_input_ids=..., "
    "prompt_attention_mask=...)` or `pal_rm.PalRewardFunction` for TRL's online trainers."
)


@dataclass
class PalRewardModelOutput(ModelOutput):
    """
    Output of [`PalRewardModel`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            Not computed by the model itself (the trainer computes the preference loss); kept first by convention.
        logits (`torch.FloatTensor` of shape `(batch_size, 1)`):
            The reward of each sequence for its user (or mixture), following the transformers/TRL reward convention.
        prototype_rewards (`torch.FloatTensor` of shape `(batch_size, num_prototypes)`):
            The reward of each sequence for each prototype alone (mixture `e_k`): a multi-objective reward.
        mixture_weights (`torch.FloatTensor` of shape `(batch_size, num_prototypes)`):
            The mixture weights used for each row (a point of the simplex).
        item_embeddings (`torch.FloatTensor` of shape `(batch_size, preference_dim)`):
            `f(phi(x))`, the response mapped into the preference space.
        ideal_points (`torch.FloatTensor` of shape `(batch_size, preference_dim)`):
            The user's ideal point for each row.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    prototype_rewards: torch.FloatTensor | None = None
    mixture_weights: torch.FloatTensor | None = None
    item_embeddings: torch.FloatTensor | None = None
    ideal_points: torch.FloatTensor | None = None


@dataclass
class PalUserConfidence(ModelOutput):
    """
    How well each user's mixture is determined ([`PalRewardModel.user_confidence`]).

    Args:
        num_comparisons (`torch.LongTensor` of shape `(num_users,)`):
            Comparisons the user's posterior was fitted on ([`PalRewardTrainer.adapt_users`]); `-1` for a user without
            a posterior (trained jointly with the model, or registered with `add_users` and never fitted).
        mixture_weights (`torch.FloatTensor` of shape `(num_users, num_prototypes)`):
            The user's mixture (posterior mode, mapped to the simplex).
        mixture_entropy (`torch.FloatTensor` of shape `(num_users,)`):
            Entropy (nats) of the mixture: `log K` for a uniform mixture, 0 for a single prototype. It says how mixed a
            user is, not how certain the model is about it; `mixture_std` says that.
        mixture_std (`torch.FloatTensor` of shape `(num_users, num_prototypes)`):
            Posterior standard deviation of each mixture weight (from `logit_covariance` by the delta method); NaN
            without a posterior.
        logit_covariance (`torch.FloatTensor` of shape `(num_users, num_prototypes, num_prototypes)`):
            Posterior covariance of the mixture logits: the weighted covariance of the particles (empirical prior) or
            the Laplace approximation at the MAP estimate (Gaussian prior); NaN without a posterior.
    """

    num_comparisons: torch.LongTensor | None = None
    mixture_weights: torch.FloatTensor | None = None
    mixture_entropy: torch.FloatTensor | None = None
    mixture_std: torch.FloatTensor | None = None
    logit_covariance: torch.FloatTensor | None = None


@dataclass
class PalAdaptationPrior:
    """
    The population prior of few-shot adaptation on a new user's (centred) mixture logits (see `pal_rm.adaptation`).

    `method="empirical"`: the trained users' logits themselves, each blurred by a Gaussian of standard deviation
    `bandwidth * std` (a kernel density estimate of the population). `method="gaussian"`: `N(mean, diag(std^2) /
    strength)`. `learned`: chosen on validation data (`config.adaptation_prior`), not a fallback.
    """

    mean: torch.Tensor
    std: torch.Tensor
    strength: float = 1.0
    learned: bool = False
    method: str = "gaussian"
    bandwidth: float = 0.0

    @property
    def covariance(self) -> torch.Tensor:
        """The covariance of the Gaussian prior (`method="gaussian"`)."""
        return torch.diag(self.std.pow(2) / self.strength)


# ---------------------------------------------------------------------- PAL's parts
# A PAL model is a backbone `phi` and four parts, each a module below: the item map `f` (`PalMLP`, `item_head`), the
# prototypes (`PalPrototypePoints` for PAL-A, `PalPrototypeMaps` for PAL-B, `prototype_head`), the users (`PalUsers`:
# mixture logits, population mixture, posteriors) and the similarity (a `PalSimilarity` from `SIMILARITY_CLASSES`).
# `PalRewardModel` composes them:
#
#     w_i = softmax(z_i / tau)                                   (PalUsers)
#     a_i(x_c) = sum_k w_ik p_k(x_c)                             (prototype_head: p_k = p_k (A) or g_k(phi(x_c)) (B))
#     r_i(x) = sim(f(phi(x)), a_i(x_c))                          (item_head, similarity)
#
# Each part says what the rest of the code needs to know about it (whether the prototypes need the prompt, whether a
# similarity is linear in the ideal point, which learning-rate group its parameters belong to), so a new variant or
# similarity is one class and one registry entry.


class PalMLP(nn.Module):
    """`in_features -> hidden_dims... -> out_features`, dropout before every linear layer, activation in between."""

    parameter_group = "heads"

    def __init__(
        self, in_features: int, hidden_dims: Sequence[int], out_features: int, activation: str, dropout: float
    ):
        super().__init__()
        widths = [in_features, *hidden_dims, out_features]
        layers = []
        for index, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:])):
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            layers.append(nn.Linear(width_in, width_out))
            if index < len(widths) - 2:
                # "identity" is PAL's name (kept in saved configs) for transformers' "linear".
                layers.append(ACT2FN["linear" if activation == "identity" else activation])
        self.layers = nn.Sequential(*layers)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.layers(hidden)


def tile_rows(tensor: torch.Tensor, batch_size: int, name: str) -> torch.Tensor:
    """`tensor` with `batch_size` rows: as it is, or tiled (TRL's chosen-then-rejected layout); else a `ValueError`."""
    if tensor.shape[0] == batch_size:
        return tensor
    if tensor.shape[0] > 0 and batch_size % tensor.shape[0] == 0:
        return tensor.repeat(batch_size // tensor.shape[0], *([1] * (tensor.dim() - 1)))
    raise ValueError(
        f"`{name}` has {tensor.shape[0]} rows for a batch of {batch_size} sequences; it must have one row per "
        "sequence (or per pair, tiled over the chosen/rejected halves)."
    )


class PalPrototypePoints(nn.Module):
    """
    PAL-A's prototypes: K points `p_k` of the preference space, the same for every prompt, so a user's ideal point
    `a_i = sum_k w_ik p_k` and the reward depend on the response only. `forward` gives each row's prototype points
    `(batch_size, K, d)`.
    """

    needs_prompt = False
    parameter_group = "prototypes"
    description = "PAL-A: the K prototypes are points of the preference space; the reward depends on the response."

    def __init__(self, config: PalConfig):
        super().__init__()
        self.points = nn.Parameter(torch.empty(config.num_prototypes, config.preference_dim))

    def forward(self, prompt_features: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        return self.points.unsqueeze(0).expand(batch_size, -1, -1)


class PalPrototypeMaps(nn.Module):
    """
    PAL-B's prototypes: K maps `g_k: R^H -> R^d` of the prompt feature, so a user's ideal point `a_i(x_c) = sum_k w_ik
    g_k(phi(x_c))` depends on the prompt. `forward` maps `(B, H)` prompt features to `(batch_size, K, d)` points (tiled
    when there is one prompt per pair).
    """

    needs_prompt = True
    parameter_group = "heads"
    description = "PAL-B: the K prototypes are maps of the prompt, so each user's ideal point depends on the prompt."

    def __init__(self, config: PalConfig):
        super().__init__()
        self.maps = nn.ModuleList(
            PalMLP(
                config.hidden_size,
                config.head_hidden_dims,
                config.preference_dim,
                config.head_activation,
                config.head_dropout,
            )
            for _ in range(config.num_prototypes)
        )

    def forward(self, prompt_features: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        if prompt_features is None:
            raise ValueError(PAL_B_NEEDS_PROMPT)
        points = torch.stack([prototype_map(prompt_features) for prototype_map in self.maps], dim=1)
        return tile_rows(points, batch_size, "prompt_features")


# `PalConfig.variant` -> the prototypes' class; grown by `register_prototypes`.
PROTOTYPE_CLASSES: dict[str, type[nn.Module]] = {}


def register_prototypes(variant: str, prototypes_class: type[nn.Module]) -> type[nn.Module]:
    """
    Makes `prototypes_class` available as `PalConfig(variant=variant)`. The class takes the config, says whether it
    `needs_prompt`, which learning-rate group its parameters join (`parameter_group`) and how the model card
    describes it (`description`), and maps `(prompt_features or None, batch_size)` to the prototype points
    `(batch_size, K, d)` of each row.
    """
    PROTOTYPE_CLASSES[variant] = prototypes_class
    if variant not in VARIANTS:
        VARIANTS.append(variant)
    return prototypes_class


register_prototypes("a", PalPrototypePoints)
register_prototypes("b", PalPrototypeMaps)


class PalSimilarity(nn.Module):
    """
    The reward of a response for an ideal point, `sim(f(phi(x)), a)`: `forward(item_embeddings, ideal_points)` maps
    `(..., d), (..., d) -> (...)`, broadcasting over the leading dimensions. Subclasses set `linear_in_ideal_point`
    when the reward *difference* of two responses is linear in the ideal point (then a pair's difference for any
    mixture is the mixture-weighted sum of its differences for each prototype, which few-shot adaptation uses), and
    `description` (for the model card). Register one with [`register_similarity`].
    """

    linear_in_ideal_point = False
    parameter_group = "logit_scale"
    description = None

    def __init__(self, config: PalConfig):
        super().__init__()

    def forward(self, item_embeddings: torch.Tensor, ideal_points: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


# `PalConfig.similarity` -> the similarity's class; grown by `register_similarity`.
SIMILARITY_CLASSES: dict[str, type[PalSimilarity]] = {}


def register_similarity(name: str):
    """
    Class decorator that makes a [`PalSimilarity`] subclass available as `PalConfig(similarity=name)`.

    Example:

    ```python
    >>> @register_similarity("neg_l1")
    ... class NegL1Similarity(PalSimilarity):
    ...     description = "minus the L1 distance to the user's ideal point"
    ...
    ...     def forward(self, item_embeddings, ideal_points):
    ...         return -(item_embeddings - ideal_points).abs().sum(-1)
    ```
    """

    def register(cls: type[PalSimilarity]) -> type[PalSimilarity]:
        if not (isinstance(cls, type) and issubclass(cls, PalSimilarity)):
            raise TypeError(f"`register_similarity({name!r})` needs a subclass of PalSimilarity, got {cls!r}.")
        SIMILARITY_CLASSES[name] = cls
        if name not in SIMILARITIES:
            SIMILARITIES.append(name)
        return cls

    return register


@register_similarity("neg_sq_l2")
class PalNegSquaredL2Similarity(PalSimilarity):
    """`-||e - a||^2`: the reward difference of two responses is linear in the ideal point (the `||a||^2` cancel)."""

    linear_in_ideal_point = True
    description = "minus the squared Euclidean distance to the user's ideal point"

    def forward(self, item_embeddings: torch.Tensor, ideal_points: torch.Tensor) -> torch.Tensor:
        return -(item_embeddings - ideal_points).pow(2).sum(-1)


@register_similarity("neg_l2")
class PalNegL2Similarity(PalSimilarity):
    """`-||e - a||`."""

    description = "minus the Euclidean distance to the user's ideal point"

    def forward(self, item_embeddings: torch.Tensor, ideal_points: torch.Tensor) -> torch.Tensor:
        return -((item_embeddings - ideal_points).pow(2).sum(-1) + 1e-12).sqrt()


@register_similarity("dot")
class PalDotSimilarity(PalSimilarity):
    """`<e, a>`."""

    linear_in_ideal_point = True
    description = "the inner product with the user's ideal point"

    def forward(self, item_embeddings: torch.Tensor, ideal_points: torch.Tensor) -> torch.Tensor:
        return (item_embeddings * ideal_points).sum(-1)


@register_similarity("cosine")
class PalCosineSimilarity(PalSimilarity):
    """`s * cos(e, a)` with a learned logit scale `s` (stored as `log s`, clamped at `config.logit_scale_max`)."""

    description = "a scaled cosine similarity with the user's ideal point"

    def __init__(self, config: PalConfig):
        super().__init__(config)
        self.logit_scale_init = config.logit_scale_init
        self.logit_scale_max = config.logit_scale_max
        self.logit_scale = nn.Parameter(torch.empty(()))

    def forward(self, item_embeddings: torch.Tensor, ideal_points: torch.Tensor) -> torch.Tensor:
        scale = self.logit_scale.exp().clamp(max=self.logit_scale_max)
        return scale * nn.functional.cosine_similarity(item_embeddings, ideal_points, dim=-1, eps=1e-8)


def _pooled(output) -> torch.Tensor:
    """The embeddings a two-tower model's `get_image_features` / `get_text_features` return: a tensor, or (recent
    transformers) an output whose `pooler_output` holds them."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """
    The whole tensor of a parameter that FSDP2 (or tensor parallelism) may have sharded into a `DTensor` (a collective:
    call it from every process), or the tensor itself. PAL code that reads or grows its own parameters outside
    `forward` (the user table, the population mixture) goes through it.
    """
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def pool_hidden_states(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """Pools `(B, L, H)` token states to `(B, H)`. `last` finds the last non-pad token for left and right padding."""
    if attention_mask is None:
        attention_mask = torch.ones(hidden_states.shape[:2], dtype=torch.long, device=hidden_states.device)
    mask = attention_mask.to(hidden_states.device)
    if pooling == "mean":
        weights = mask.unsqueeze(-1).to(hidden_states.dtype)
        return (hidden_states * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    if pooling == "cls":
        return hidden_states[:, 0]
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (positions * (mask > 0)).argmax(dim=1)
    return hidden_states[torch.arange(hidden_states.shape[0], device=hidden_states.device), last]


# ---------------------------------------------------------------------- the canonical token form of a text
# Every entry point (the trainer, `score_texts`, `PalRewardFunction`, TRL's model-as-reward path, `pipeline`) must give
# the same reward for the same text. They tokenize differently: TRL's online trainers call the tokenizer with
# `add_special_tokens=False` and append no EOS, `pipeline` adds the tokenizer's special tokens but no EOS, the trainer
# appends EOS (as TRL's `RewardTrainer` does). The model therefore records its tokenizer's *framing* (the special
# tokens the tokenizer puts before and after a text, and its EOS token) and brings every sequence to one canonical
# form:
#
#     item (prompt + response):  prefix + content + [eos] + suffix      e.g. [CLS] ... [SEP] or ... <|endoftext|>
#     prompt (PAL-B only):       prefix + content + suffix
#
# where `content` is the text tokenized without special tokens. Tokenizing a text this way and framing token ids that
# lack their prefix, EOS or suffix give the same ids, so the reward depends on the text alone.

_FRAMING_CACHE = None


def sequence_framing(tokenizer) -> dict:
    """
    The framing of `tokenizer`: `{"prefix_ids", "suffix_ids", "eos_token_id", "vocab_size", "tokenizer_fingerprint"}`.
    `prefix_ids` / `suffix_ids` are the special tokens the tokenizer adds around a text (for example `[CLS]` and
    `[SEP]`, or a BOS token); `eos_token_id` is appended to responses unless the suffix already holds it; the
    fingerprint is a hash of the vocabulary, so a model can tell its own tokenizer from another one.
    """
    global _FRAMING_CACHE
    import weakref

    if _FRAMING_CACHE is None:
        _FRAMING_CACHE = weakref.WeakKeyDictionary()
    try:
        cached = _FRAMING_CACHE.get(tokenizer)
    except TypeError:  # not weak-referenceable
        cached = None
    if cached is not None and cached[0] == len(tokenizer):
        return dict(cached[1])

    import hashlib
    import json

    probe = "pal rm framing probe"
    with_special = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    content = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    prefix, suffix = [], []
    for start in range(len(with_special) - len(content) + 1):
        if with_special[start : start + len(content)] == content:
            prefix, suffix = with_special[:start], with_special[start + len(content) :]
            break
    else:
        logger.warning(
            f"Could not tell which special tokens {type(tokenizer).__name__} adds around a text; PAL scores texts "
            "without them."
        )
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and eos in suffix:
        eos = None  # the tokenizer appends EOS itself
    vocab = sorted(tokenizer.get_vocab().items())
    digest = hashlib.sha256(json.dumps([vocab, prefix, suffix, eos]).encode("utf-8")).hexdigest()[:16]
    framing = {
        "prefix_ids": prefix,
        "suffix_ids": suffix,
        "eos_token_id": eos,
        "vocab_size": len(tokenizer),
        "tokenizer_fingerprint": digest,
    }
    try:
        _FRAMING_CACHE[tokenizer] = (len(tokenizer), framing)
    except TypeError:
        pass
    return dict(framing)


def frame_token_ids(
    content: Sequence[int], framing: dict, kind: str = "item", max_length: int | None = None
) -> list[int]:
    """
    The canonical token ids of one sequence (see `sequence_framing`): `prefix + content + [eos] + suffix` for an
    `"item"` (prompt + response), `prefix + content + suffix` for a `"prompt"`. Framing tokens already present are kept
    once, so the function is idempotent. With `max_length`, the content is truncated from the left (the end of a
    response survives a long prompt).
    """
    prefix, suffix = list(framing["prefix_ids"]), list(framing["suffix_ids"])
    eos = framing["eos_token_id"] if kind == "item" else None
    content = list(content)
    if prefix and content[: len(prefix)] == prefix:
        content = content[len(prefix) :]
    if suffix and len(content) >= len(suffix) and content[-len(suffix) :] == suffix:
        content = content[: -len(suffix)]
    if eos is not None and (not content or content[-1] != eos):
        content.append(eos)
    if max_length is not None:
        budget = max_length - len(prefix) - len(suffix)
        if budget < 1:
            raise ValueError(f"`max_length={max_length}` leaves no room for text between the special tokens.")
        if len(content) > budget:
            content = content[len(content) - budget :]
    return prefix + content + suffix


def _frame_batch(input_ids, attention_mask, framing: dict, kind: str, pad_token_id: int):
    """Brings a padded batch of token ids to the canonical form; returns it unchanged when it already is."""
    prefix = list(framing["prefix_ids"])
    end = ([framing["eos_token_id"]] if kind == "item" and framing["eos_token_id"] is not None else []) + list(
        framing["suffix_ids"]
    )
    if not prefix and not end:
        return input_ids, attention_mask, False
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    valid = mask > 0
    lengths = valid.sum(1)
    first = valid.long().argmax(1)
    last = first + lengths - 1
    width = input_ids.shape[1]
    ok = lengths >= len(prefix) + len(end)
    for offset, token in enumerate(prefix):
        position = (first + offset).clamp(max=width - 1)
        ok &= input_ids.gather(1, position.unsqueeze(1)).squeeze(1) == token
    for offset, token in enumerate(end):
        position = (last - (len(end) - 1 - offset)).clamp(min=0, max=width - 1)
        ok &= input_ids.gather(1, position.unsqueeze(1)).squeeze(1) == token
    if bool(ok.all()):
        return input_ids, attention_mask, False
    left_padded = bool((~valid[:, 0]).any()) and bool(valid[:, -1].all())
    rows = []
    for row in range(input_ids.shape[0]):
        content = input_ids[row, first[row] : first[row] + lengths[row]].tolist()
        rows.append(content if bool(ok[row]) else frame_token_ids(content, framing, kind))
    longest = max(len(row) for row in rows)
    framed = torch.full((len(rows), longest), pad_token_id, dtype=input_ids.dtype, device=input_ids.device)
    framed_mask = torch.zeros((len(rows), longest), dtype=mask.dtype, device=input_ids.device)
    for index, row in enumerate(rows):
        span = slice(longest - len(row), longest) if left_padded else slice(0, len(row))
        framed[index, span] = torch.tensor(row, dtype=input_ids.dtype, device=input_ids.device)
        framed_mask[index, span] = 1
    return framed, framed_mask, True


def tokenize_texts(tokenizer, texts: Sequence[str], framing: dict, max_length: int) -> list[list[int]]:
    """
    Token ids of texts in the canonical form: each text tokenized without special tokens, then framed with the
    tokenizer's prefix and suffix and truncated from the left to `max_length`. Item texts already end with the EOS
    token (see `format_preference_texts`).
    """
    content = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [frame_token_ids(ids, framing, "prompt", max_length=max_length) for ids in content]


# ------------------------------------------------------------------ all-or-nothing checkpoints
# A save writes the whole checkpoint into a staging folder beside `save_directory`, hard-links into it what the save does
# not write itself (the Trainer's `checkpoint-*` folders, `training_args.bin`, tokenizer files, ...), then swaps the two
# folders in one step with Linux's `renameat2(RENAME_EXCHANGE)`. Where that call is missing, two renames do the swap: a
# save killed between them leaves `save_directory` missing and the previous checkpoint in a backup folder beside it,
# which the next load or save moves back. The staging and backup folders are named
# `_<name>.pal-<staging|backup>-<host>-<pid>-<random>`: outside the checkpoint, so never uploaded with it (and the
# Trainer's uploads of its output folder skip names that start with `_`), and the next save deletes those whose process
# has ended.
_SWAP_FOLDER = re.compile(
    r"_(?P<name>.+)\.pal-(?P<kind>staging|backup)-(?P<host>[A-Za-z0-9]*)-(?P<pid>[0-9]+)-[0-9a-f]+"
)
# Staging folders inside `save_directory`: the in-place save's, and the `.pal-save-*` ones of older pal-rm versions.
_IN_PLACE_STAGING_FOLDER = re.compile(r"_pal-staging-(?P<host>[A-Za-z0-9]*)-(?P<pid>[0-9]+)-[0-9a-f]+|\.pal-save-.*")
# Files that every save writes anew: never carried over from the checkpoint that a save replaces.
_CHECKPOINT_FILES = (
    "config.json",
    "model*.safetensors",
    "model*.safetensors.index*.json",
    "pytorch_model*",
    "configuration_pal.py",
    "modeling_pal.py",
    "backbone_adapter",
)
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


@functools.lru_cache(maxsize=1)
def _host_tag() -> str:
    """
    This machine and its PID namespace, as named in staging and backup folders: a process id only tells whether a save
    still runs when read on the same machine and in the same PID namespace (containers can share a hostname).
    """
    host = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32]
    try:
        namespace = re.sub(r"[^0-9]", "", os.readlink("/proc/self/ns/pid"))
    except OSError:
        namespace = ""
    return host + namespace


def _swap_folder_path(target: str, kind: str) -> str:
    """A fresh staging or backup folder path beside `target`, named after it, this machine and this process."""
    parent, name = os.path.split(target)
    return os.path.join(parent, f"_{name}.pal-{kind}-{_host_tag()}-{os.getpid()}-{secrets.token_hex(4)}")


def _owner_has_ended(host: str, pid: str) -> bool:
    """
    Whether the process that made a staging or backup folder has ended. This is only provable for another process of
    this machine (and not on Windows, where `os.kill(pid, 0)` would stop it): anything else counts as still saving.
    """
    if os.name == "nt" or host != _host_tag() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _is_checkpoint_file(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in _CHECKPOINT_FILES)


def _is_missing_or_empty(folder: str) -> bool:
    if not os.path.lexists(folder):
        return True
    return os.path.isdir(folder) and not os.path.islink(folder) and not os.listdir(folder)


def _recover_interrupted_saves(
    parent: str, checkpoint_name: str | None = None, remove_leftovers: bool = False
) -> None:
    """
    Repairs what saves killed midway left in `parent`. A checkpoint folder that is missing (or empty) while a backup of
    it exists gets the backup back: the save was killed between the two renames of the fallback swap.
    `checkpoint_name` limits this to one checkpoint. With `remove_leftovers`, the other staging and backup folders of
    ended saves are deleted (each holds a partial new or a replaced old checkpoint).
    """
    if not os.path.isdir(parent):
        return
    leftovers = []
    with os.scandir(parent) as entries:
        for entry in entries:
            match = _SWAP_FOLDER.fullmatch(entry.name)
            if match and entry.is_dir(follow_symlinks=False) and _owner_has_ended(match["host"], match["pid"]):
                try:
                    modified = entry.stat(follow_symlinks=False).st_mtime
                except FileNotFoundError:  # another process cleaned it up meanwhile
                    continue
                leftovers.append((match["kind"] != "backup", -modified, entry.path))
    for _, _, path in sorted(leftovers):  # backups first, the newest first
        match = _SWAP_FOLDER.fullmatch(os.path.basename(path))
        target = os.path.join(parent, match["name"])
        if match["kind"] == "backup" and checkpoint_name in (None, match["name"]) and _is_missing_or_empty(target):
            try:
                os.rename(path, target)  # replaces an empty folder in one step
            except FileNotFoundError:  # another process restored it meanwhile
                continue
            logger.warning(f"Restored the checkpoint {target} from {path}, left there by a save that was killed.")
        elif remove_leftovers:
            shutil.rmtree(path, ignore_errors=True)
            logger.info(f"Removed {path}, left by a save that was killed.")


@functools.lru_cache(maxsize=1)
def _renameat2():
    """The C library's `renameat2`, or None where there is none (not Linux, or a C library without it)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _exchange_folders(first: str, second: str) -> bool:
    """
    Swaps two folders in one atomic step with Linux's `renameat2(RENAME_EXCHANGE)`. Returns False and changes nothing
    where that is not available (another OS, an old kernel or C library, a filesystem that does not support it).
    """
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), first, None, second)


def _swap_into_place(staging: str, target: str) -> str | None:
    """
    Puts the finished checkpoint in `staging` at `target`, so that a kill at any instant leaves a whole checkpoint at
    `target`, the old one or the new one (or, in the fallback's window between two renames, the old one in a backup
    folder that the next load or save moves back). Returns the folder now holding the replaced checkpoint, if any.
    """
    if not os.path.lexists(target):
        os.rename(staging, target)
        return None
    if _exchange_folders(staging, target):
        return staging
    backup = _swap_folder_path(target, "backup")
    os.rename(target, backup)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(backup, target)
        raise
    return backup


def _link_or_copy(source: str, destination: str) -> None:
    """Hard-links `source` at `destination`, so no data is copied; copies it where hard links fail."""
    try:
        os.link(source, destination, follow_symlinks=False)
    except OSError as error:
        logger.warning_once(
            f"Could not hard-link files of the previous checkpoint into the new one ({error.strerror}): copying them."
        )
        shutil.copy2(source, destination, follow_symlinks=False)


def _carry_over(previous: str, staging: str) -> None:
    """
    Adds to the new checkpoint in `staging` every entry of the folder it replaces that the save did not write itself:
    the Trainer's `checkpoint-*` folders, `training_args.bin`, tokenizer files, a model card, ... as hard links to the
    same data. The previous weights, `config.json` and code files are not carried over (the save rewrote them), nor are
    the staging and backup folders that killed saves (or older pal-rm versions) left inside it.
    """
    written = set(os.listdir(staging))
    with os.scandir(previous) as entries:
        for entry in entries:
            leftover = _SWAP_FOLDER.fullmatch(entry.name)
            if (
                entry.name in written
                or _is_checkpoint_file(entry.name)
                or _IN_PLACE_STAGING_FOLDER.fullmatch(entry.name)
                or (leftover and _owner_has_ended(leftover["host"], leftover["pid"]))
            ):
                continue
            destination = os.path.join(staging, entry.name)
            if entry.is_symlink():
                os.symlink(os.readlink(entry.path), destination)
            elif entry.is_dir():
                shutil.copytree(entry.path, destination, symlinks=True, copy_function=_link_or_copy)
            else:
                _link_or_copy(entry.path, destination)


def _sync_directory(folder: str) -> None:
    """Flushes a folder's entries to disk, where the OS allows it."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _sync_tree(folder: str) -> None:
    """
    Flushes every file and folder under `folder` to disk before the swap, so that a power cut cannot leave a swapped-in
    checkpoint with empty files. Hard links to files already on disk cost nothing.
    """
    if os.name == "nt":
        return
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                descriptor = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(descriptor)
                finally:
                    os.close(descriptor)
        _sync_directory(root)


def _why_not_swappable(target: str) -> str | None:
    """Why `target` cannot be swapped for a sibling folder, if it cannot."""
    if os.path.ismount(target):
        return "is a mount point"
    parent = os.path.dirname(target)
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"is in a folder this process cannot write ({parent})"
    return None


# ------------------------------------------------------------------ backbone references and adapters
# A checkpoint keeps the backbone in one of three ways: its weights in `model.safetensors` (`backbone_weights=
# "included"`, under the plain names of the backbone: `backbone.h.0.attn.c_attn.weight`); a reference to where they came
# from (`"reference"`: `backbone_name_or_path` at `backbone_revision`, loaded again with `AutoModel.from_pretrained`);
# and, in both cases, a PEFT adapter on top (`backbone_adapter`), saved in PEFT's own format in the `backbone_adapter/`
# folder (so it is also a plain PEFT adapter of the base backbone). The adapter lives in memory as a `PeftModel` that
# wraps `model.backbone` only: PAL's heads, prototypes, user table and logit scale stay ordinary parameters.
BACKBONE_ADAPTER_FOLDER = "backbone_adapter"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
# The name of the adapter inside the `PeftModel` (PEFT's default). PEFT keeps every adapter parameter under a module or
# parameter dict keyed by this name (`lora_A.default.weight`, `modules_to_save.default.weight`, ...).
_ADAPTER_NAME = "default"
# Where PEFT puts the wrapped model's own modules: `base_model.model.<name>`, with `base_layer` (a layer an adapter
# wraps) or `original_module` (a module PEFT copied to train) inserted before the original parameter names.
_PEFT_PREFIX = "base_model.model."
_PEFT_INFIXES = ("base_layer", "original_module")
# Hub download arguments shared by the checkpoint, its adapter and the backbone it refers to.
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "token")
# `from_pretrained` arguments that only concern the backbone of a checkpoint that refers to its backbone.
_BACKBONE_LOADING_KWARGS = (
    "dtype",
    "torch_dtype",
    "attn_implementation",
    "device_map",
    "max_memory",
    "offload_folder",
    "offload_buffers",
    "quantization_config",
)
# `from_backbone` arguments that a reference (name, revision, plus the loading arguments above) reproduces.
_REPRODUCIBLE_BACKBONE_KWARGS = frozenset(
    _BACKBONE_LOADING_KWARGS + _HUB_KWARGS + ("revision", "low_cpu_mem_usage", "use_safetensors")
)
# What `PalRewardModel.__init__` leaves to `from_pretrained` while it loads a checkpoint: the backbone of a checkpoint
# that refers to it (loaded from the reference instead), and the adapter (attached once the base weights are in place).
_LOADING: contextvars.ContextVar = contextvars.ContextVar("pal_rm_loading", default=None)


def _peft_classes():
    """`(PeftModel, BaseTunerLayer)` when PEFT has been imported, else `None`: nothing can hold an adapter before."""
    if "peft" not in sys.modules:
        return None
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    return PeftModel, BaseTunerLayer


def _is_adapter_key(key: str) -> bool:
    """Whether a state dict key of a PEFT-wrapped backbone is an adapter weight (it sits under the adapter's name)."""
    return _ADAPTER_NAME in key.split(".")


def _base_key(key: str) -> str:
    """The plain name of a base weight of a PEFT-wrapped backbone: `base_model.model.h.0.attn.c_attn.base_layer.weight`
    -> `h.0.attn.c_attn.weight`."""
    key = key[len(_PEFT_PREFIX) :] if key.startswith(_PEFT_PREFIX) else key
    return ".".join(part for part in key.split(".") if part not in _PEFT_INFIXES)


def _import_peft():
    """The `peft` package, or an `ImportError` that says what needs it and how to install it."""
    try:
        import peft
    except ImportError as error:
        raise ImportError(
            "A backbone adapter (LoRA and other PEFT methods, `config.backbone_adapter`) needs the `peft` package: "
            "`pip install peft`."
        ) from error
    return peft


def _json_ready(peft_config_dict: dict) -> dict:
    """A PEFT config dict as JSON values (sets become sorted lists, enums their values), as PEFT itself saves it."""

    def convert(value):
        if isinstance(value, set):
            return sorted(value, key=str)
        return value.value if hasattr(value, "value") else str(value)

    return json.loads(json.dumps(peft_config_dict, default=convert))


def weights_fingerprint(state_dict: dict[str, torch.Tensor]) -> str | None:
    """
    A checksum of a sample of weights: 16 evenly spaced values of every tensor (with its name, shape and dtype), as
    `"<dtypes>:<sha256>"`. Cheap for any model size; it changes when weights are trained, merged or cast. `None` when a
    tensor is not in memory here (meta, sharded across processes), so the weights cannot be checked.
    """
    digest = hashlib.sha256()
    dtypes = set()
    with torch.no_grad():
        for name in sorted(state_dict):
            tensor = state_dict[name]
            if not isinstance(tensor, torch.Tensor):
                continue
            if tensor.device.type == "meta" or type(tensor).__name__ == "DTensor" or hasattr(tensor, "ds_id"):
                return None
            flat = tensor.detach().reshape(-1)
            if not flat.numel():  # a parameter partitioned away (DeepSpeed ZeRO-3) looks empty
                return None
            count = min(16, flat.numel())  # evenly spaced positions, in integers (floats round large indices)
            positions = torch.arange(count, device=flat.device) * (flat.numel() - 1) // max(count - 1, 1)
            sample = flat[positions].cpu().contiguous()
            dtypes.add(str(tensor.dtype).replace("torch.", ""))
            digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
            digest.update(sample.view(torch.uint8).numpy().tobytes())
    return f"{','.join(sorted(dtypes))}:{digest.hexdigest()[:32]}"


class PalUsers(nn.Module):
    """
    The users: one row of K mixture logits `z_i` per registered user (`logits`, an `nn.Embedding`), whose softmax at
    temperature `tau` is the user's mixture `w_i`; the population mixture (what rows without a user are scored for:
    the mean mixture of the trained users); and the posteriors of the users fitted by few-shot adaptation (their rows,
    the covariance of their logits and how many comparisons they were fitted on). Rows are named by the model's user
    registry (`config.user_ids`, see [`PalRewardModel.add_users`]); this module only knows rows.
    """

    parameter_group = "user_weights"

    def __init__(self, config: PalConfig):
        super().__init__()
        k = config.num_prototypes
        self.temperature = config.mixture_temperature
        self.logits = nn.Embedding(config.num_users, k)
        self.register_buffer("population_mixture", torch.empty(k), persistent=True)
        posteriors = config.num_user_posteriors
        self.register_buffer("posterior_rows", torch.zeros(posteriors, dtype=torch.long), persistent=True)
        self.register_buffer("posterior_covariance", torch.zeros(posteriors, k, k), persistent=True)
        self.register_buffer("posterior_comparisons", torch.zeros(posteriors, dtype=torch.long), persistent=True)

    @property
    def num_users(self) -> int:
        return self.logits.num_embeddings

    @property
    def num_prototypes(self) -> int:
        return self.logits.embedding_dim

    def mixture_weights(self, logits: torch.Tensor) -> torch.Tensor:
        """The mixtures `softmax(z / tau)` of mixture logits `(..., K)`."""
        return torch.softmax(logits / self.temperature, dim=-1)

    def population_logits(self) -> torch.Tensor:
        """Logits whose softmax (at the temperature) is the population mixture."""
        return torch.log(self.population_mixture.clamp(min=1e-12)) * self.temperature

    def all_mixture_weights(self) -> torch.Tensor:
        """Mixture weights `(num_users, K)` of every row."""
        return self.mixture_weights(full_tensor(self.logits.weight))

    def forward(self, rows: torch.LongTensor) -> torch.Tensor:
        """Mixture weights `(N, K)` of rows of the table; row `-1` is the population mixture."""
        if (rows >= self.num_users).any() or (rows < -1).any():
            bad = int(rows.max()) if (rows >= self.num_users).any() else int(rows.min())
            raise IndexError(
                f"User row {bad} is out of range: the model has {self.num_users} users (rows 0 to "
                f"{self.num_users - 1}, or -1 for the population mixture)."
            )
        known = rows >= 0
        weights = self.population_mixture.unsqueeze(0).expand(rows.shape[0], -1)
        if known.any():
            user_mixtures = self.mixture_weights(self.logits(rows.clamp(min=0)))
            weights = torch.where(known.unsqueeze(-1), user_mixtures, weights.to(user_mixtures.dtype))
        return weights

    @torch.no_grad()
    def refresh(self, rows: Sequence[int] | None = None) -> torch.Tensor:
        """Sets the population mixture to the mean mixture of the given rows (all rows by default)."""
        if self.num_users == 0:
            return self.population_mixture
        weights = self.all_mixture_weights()
        if rows is not None:
            weights = weights[torch.as_tensor(list(rows), dtype=torch.long, device=weights.device)]
        self.population_mixture.copy_(weights.mean(0))
        return self.population_mixture

    @torch.no_grad()
    def grow(self, num_new: int) -> None:
        """Adds `num_new` rows at the population mixture (a new, larger table: build optimizers afterwards)."""
        old = self.logits
        old_weight = full_tensor(old.weight)
        table = nn.Embedding(old_weight.shape[0] + num_new, self.num_prototypes)
        table.to(device=old_weight.device, dtype=old_weight.dtype)
        table.weight[: old_weight.shape[0]] = old_weight
        table.weight[old_weight.shape[0] :] = self.population_logits().to(table.weight.dtype)
        table.weight.requires_grad_(old.weight.requires_grad)
        self.logits = table

    @torch.no_grad()
    def truncate(self, num_users: int) -> None:
        """Keeps the first `num_users` rows (and their posteriors) only."""
        old_weight = full_tensor(self.logits.weight)
        table = nn.Embedding(num_users, self.num_prototypes)
        table.to(device=old_weight.device, dtype=old_weight.dtype)
        table.weight.copy_(old_weight[:num_users])
        table.weight.requires_grad_(self.logits.weight.requires_grad)
        self.logits = table
        self.drop_posteriors(range(num_users, old_weight.shape[0]))

    def posterior_index(self, rows: torch.LongTensor) -> torch.LongTensor:
        """For rows of the table (`-1`: the population), the index of their stored posterior, or `-1`."""
        lookup = torch.full((self.num_users + 1,), -1, dtype=torch.long, device=rows.device)
        stored = self.posterior_rows.to(rows.device)
        lookup[stored] = torch.arange(stored.numel(), device=rows.device)
        return lookup[torch.where(rows < 0, self.num_users, rows)]

    @torch.no_grad()
    def set_posteriors(
        self, rows: Sequence[int], logit_covariance: torch.Tensor, num_comparisons: Sequence[int]
    ) -> None:
        """Stores (or replaces) the posterior covariance of the mixture logits of the given rows."""
        rows = torch.as_tensor(list(rows), dtype=torch.long)
        covariance = torch.as_tensor(logit_covariance, dtype=torch.float32)
        k = self.num_prototypes
        if covariance.shape != (rows.numel(), k, k) or len(num_comparisons) != rows.numel():
            raise ValueError(
                f"Posteriors of {rows.numel()} users need a covariance of shape ({rows.numel()}, {k}, {k}) and one "
                f"count each, got {tuple(covariance.shape)} and {len(num_comparisons)}."
            )
        if rows.numel() and (rows.min() < 0 or rows.max() >= self.num_users):
            raise IndexError(f"User rows must be registered (0 to {self.num_users - 1}), got {rows.tolist()[:10]}.")
        if not torch.isfinite(covariance).all():
            raise FloatingPointError("The posterior covariances to store are not finite.")
        self.drop_posteriors(rows.tolist())
        device = self.posterior_rows.device
        self.posterior_rows = torch.cat([self.posterior_rows, rows.to(device)])
        self.posterior_covariance = torch.cat([self.posterior_covariance, covariance.to(device)])
        counts = torch.as_tensor(list(num_comparisons), dtype=torch.long, device=device)
        self.posterior_comparisons = torch.cat([self.posterior_comparisons, counts])

    @torch.no_grad()
    def drop_posteriors(self, rows: Sequence[int]) -> None:
        """Forgets the stored posteriors of the given rows."""
        rows = torch.as_tensor(list(rows), dtype=torch.long, device=self.posterior_rows.device)
        if rows.numel() == 0 or self.posterior_rows.numel() == 0:
            return
        keep = ~torch.isin(self.posterior_rows, rows)
        self.posterior_rows = self.posterior_rows[keep]
        self.posterior_covariance = self.posterior_covariance[keep]
        self.posterior_comparisons = self.posterior_comparisons[keep]


# State-dict keys of checkpoints saved before PAL's parts were modules -> today's keys. `from_pretrained` and
# `load_state_dict` (the trainer's resume) rename them, so such checkpoints still load.
USER_TABLE_KEY = "users.logits.weight"

LEGACY_KEY_MAPPING = {
    r"^prototypes$": "prototype_head.points",
    r"^prototype_maps\.": "prototype_head.",
    r"^user_weights\.weight$": "users.logits.weight",
    r"^population_mixture$": "users.population_mixture",
    r"^user_posterior_": "users.posterior_",
    r"^logit_scale$": "similarity.logit_scale",
}


def rename_legacy_keys(state_dict: dict, prefix: str = "") -> dict:
    """Renames, in place, the keys of `state_dict` (under `prefix`) saved with the layout before PAL's parts."""
    for key in [key for key in state_dict if key.startswith(prefix)]:
        name = key[len(prefix) :]
        for pattern, replacement in LEGACY_KEY_MAPPING.items():
            name = re.sub(pattern, replacement, name)
        if prefix + name != key:
            state_dict[prefix + name] = state_dict.pop(key)
    return state_dict


def _rename_legacy_keys_hook(state_dict, prefix, *args) -> None:
    rename_legacy_keys(state_dict, prefix)


class PalPreTrainedModel(PreTrainedModel):
    config_class = PalConfig
    base_model_prefix = "backbone"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    # PAL's own parts are small and numerically delicate (mixture logits, squared distances): they stay float32
    # whatever dtype the backbone is loaded in.
    _keep_in_fp32_modules_strict = [
        "item_head",
        "prototype_head",
        "users.logits",
        "users.population_mixture",
        "users.posterior_covariance",
        "similarity",
    ]

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, PalPrototypePoints):
            nn.init.normal_(module.points, mean=0.0, std=1.0 / math.sqrt(self.config.preference_dim))
        elif isinstance(module, PalCosineSimilarity):
            module.logit_scale.fill_(math.log(module.logit_scale_init))
        elif isinstance(module, PalUsers):
            module.population_mixture.fill_(1.0 / module.num_prototypes)
            module.posterior_rows.zero_()
            module.posterior_covariance.zero_()
            module.posterior_comparisons.zero_()


class PalRewardModel(PalPreTrainedModel):
    """
    A personalized reward model: `r_i(x) = sim(f(phi(x)), a_i)` where `phi` is the backbone, `f` the item map and
    `a_i = sum_k w_ik p_k` user i's ideal point (PAL-A), or `a_i(x_c) = sum_k w_ik g_k(phi(x_c))` (PAL-B).

    The parts: `backbone` (`phi`, any `AutoModel`, or none for pooled features), `item_head` (`f`, a [`PalMLP`]),
    `prototype_head` ([`PalPrototypePoints`] or [`PalPrototypeMaps`], from `PROTOTYPE_CLASSES[config.variant]`),
    `users` ([`PalUsers`]: a row of mixture logits per user, the population mixture, the posteriors of fitted users)
    and `similarity` (a [`PalSimilarity`], from `SIMILARITY_CLASSES[config.similarity]`). Users are named by the string
    ids in `config.user_ids` (row `i` is `user_ids[i]`). With no user given, rows are scored for the population
    mixture (the mean mixture of the seen users, refreshed by the trainer) or for the `mixture_weights` passed.
    """

    def __init__(self, config: PalConfig, backbone: PreTrainedModel | None = None):
        super().__init__(config)
        loading = _LOADING.get()
        if backbone is not None:
            # A pretrained backbone (see `from_backbone`): keep its weights, never build or initialise another one.
            for module in backbone.modules():
                module._is_hf_initialized = True
            self.backbone = backbone
        elif config.backbone_config is not None and not (loading and loading["backbone_by_reference"]):
            self.backbone = AutoModel.from_config(config.backbone_config)
        else:  # no backbone, or `from_pretrained` attaches the one the checkpoint refers to
            self.backbone = None
        self.item_head = PalMLP(
            config.hidden_size,
            config.head_hidden_dims,
            config.preference_dim,
            config.head_activation,
            config.head_dropout,
        )
        self.prototype_head = PROTOTYPE_CLASSES[config.variant](config)
        self.users = PalUsers(config)
        if config.similarity not in SIMILARITY_CLASSES:
            raise ValueError(
                f"Unknown similarity {config.similarity!r}: registered are {sorted(SIMILARITY_CLASSES)}. Register a "
                "new one with `pal_rm.modeling_pal.register_similarity` before building the model."
            )
        self.similarity = SIMILARITY_CLASSES[config.similarity](config)
        if config.item_modality == "image" and self.needs_prompt:
            image_width, text_width = image_text_widths(config.backbone_config)
            if image_width != text_width:
                raise ValueError(
                    f"PAL-{config.variant.upper()} maps caption features to prototypes in the image features' space, but "
                    f"this {config.backbone_config.model_type} backbone embeds images in {image_width} and texts in "
                    f"{text_width} dimensions. Use a backbone whose towers share a width, or a variant whose ideal "
                    "points do not depend on the prompt (`variant='a'`)."
                )
        # Checkpoints saved before PAL's parts were modules (see `LEGACY_KEY_MAPPING`) load through `load_state_dict`.
        self._register_load_state_dict_pre_hook(_rename_legacy_keys_hook)
        # What single-sequence entry points score for when no user is given (see `set_default_mixture`).
        self.default_mixture: torch.Tensor | None = None
        if config.backbone_adapter is not None and self.backbone is not None and loading is None:
            # `from_pretrained` attaches the adapter itself, once the base weights are loaded.
            self._attach_backbone_adapter(config.backbone_adapter)
            for name, module in self.backbone.named_modules():
                if _ADAPTER_NAME in name.split("."):  # keep PEFT's initialisation of the adapter (LoRA B = 0)
                    module._is_hf_initialized = True
        self.post_init()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_backbone(
        cls,
        backbone_name_or_path: str,
        backbone_kwargs: dict | None = None,
        dtype=None,
        attn_implementation: str | None = None,
        device_map=None,
        quantization_config=None,
        **config_kwargs,
    ):
        """
        Builds a PAL model around pretrained backbone weights (a Hub id or a local folder loaded with
        `AutoModel.from_pretrained`); `config_kwargs` are [`PalConfig`] fields (`variant`, `num_prototypes`, ...).
        `dtype`, `attn_implementation`, `device_map` and `quantization_config` (and anything in `backbone_kwargs`) go
        to the backbone's `from_pretrained`. The backbone is loaded once and never rebuilt or re-initialised; PAL's own
        parts (heads, prototypes, user table, logit scale) are float32 whatever the backbone's dtype, on the device of
        the backbone's input embeddings.

        The model records where the backbone came from (`config.backbone_name_or_path`, `config.backbone_revision`
        and a fingerprint of its weights), so that a checkpoint can refer to the backbone instead of holding it (see
        [`save_pretrained`]'s `include_backbone`). A backbone loaded with arguments a reference does not reproduce
        (`subfolder`, `gguf_file`, ...) gets no reference: its checkpoints always hold its weights.

        Example:

        ```python
        >>> model = PalRewardModel.from_backbone("sentence-transformers/all-MiniLM-L6-v2", variant="b", num_prototypes=4)
        >>> model = PalRewardModel.from_backbone("Qwen/Qwen2.5-1.5B", dtype=torch.bfloat16, variant="b")
        ```
        """
        backbone_kwargs = dict(backbone_kwargs or {})
        for name, value in (
            ("dtype", dtype),
            ("attn_implementation", attn_implementation),
            ("device_map", device_map),
            ("quantization_config", quantization_config),
        ):
            if value is not None:
                if name in backbone_kwargs:
                    raise ValueError(f"`{name}` is given twice: as an argument and in `backbone_kwargs`.")
                backbone_kwargs[name] = value
        backbone, loading_info = AutoModel.from_pretrained(
            backbone_name_or_path, output_loading_info=True, **backbone_kwargs
        )
        # The nested config keeps the backbone's attention implementation and dtype (saved, and used on reload).
        config_kwargs.setdefault("attn_implementation", backbone.config._attn_implementation)
        reference = cls._backbone_reference(backbone_name_or_path, backbone_kwargs, backbone, loading_info)
        for name, value in reference.items():
            config_kwargs.setdefault(name, value)
        config = PalConfig(backbone_config=backbone.config, **config_kwargs)
        config.dtype = backbone.dtype
        model = cls(config, backbone=backbone)
        model._place_pal_parts()
        if model.config.sequence_framing is None:
            try:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(backbone_name_or_path)
            except Exception as error:  # a backbone without a tokenizer: the first tokenizer used is recorded
                logger.info(f"No tokenizer next to {backbone_name_or_path} ({error}); none recorded yet.")
            else:
                model.register_tokenizer(tokenizer)
        return model

    @staticmethod
    def _backbone_reference(
        name_or_path, backbone_kwargs: dict, backbone: PreTrainedModel, loading_info: dict
    ) -> dict:
        """The config fields that let a checkpoint refer to a backbone loaded by `from_backbone` (empty if none can)."""
        unreproducible = sorted(set(backbone_kwargs) - _REPRODUCIBLE_BACKBONE_KWARGS)
        random = sorted(loading_info.get("missing_keys") or [])
        if unreproducible or random:
            reason = (
                f"was loaded with {unreproducible}, which a reference does not reproduce"
                if unreproducible
                else f"lacks weights ({', '.join(random[:5])}{', ...' if len(random) > 5 else ''}) that transformers "
                "initialised at random, so loading it again would not give the same backbone"
            )
            logger.info(
                f"The backbone {name_or_path} {reason}: no reference to it is recorded, and checkpoints of this model "
                "always hold the backbone weights."
            )
            return {}
        name_or_path = os.fspath(name_or_path)
        reference = os.path.abspath(name_or_path) if os.path.isdir(name_or_path) else name_or_path
        quantized = getattr(backbone, "hf_quantizer", None) is not None
        return {
            "backbone_name_or_path": reference,
            "backbone_revision": backbone_kwargs.get("revision"),
            "backbone_fingerprint": None if quantized else weights_fingerprint(backbone.state_dict()),
        }

    def _place_pal_parts(self) -> None:
        """Puts PAL's own parts (heads, prototypes, users, similarity) in float32 on the backbone's input device."""
        device = self._backbone_input_device()
        if device.type == "meta":
            return
        for name, module in self.named_children():
            if name != "backbone":
                module.to(device=device, dtype=torch.float32)  # casts floating tensors only: user rows stay integers

    def _backbone_input_device(self) -> torch.device:
        """The device of the backbone's input embeddings (of its text tower, for a two-tower image-text backbone)."""
        if self.is_image_model:  # no single input embedding: PAL's parts go with the first weights
            return next(self.backbone.parameters()).device
        return self.backbone.get_input_embeddings().weight.device

    # ------------------------------------------------------------------ the parts, by their usual names
    @property
    def is_image_model(self) -> bool:
        """Whether the items are images (a two-tower image-text backbone such as CLIP or SigLIP; the prompt is the
        caption): score them with [`score_images`], give the trainer `chosen_image` / `rejected_image` columns."""
        return self.config.item_modality == "image"

    @property
    def needs_prompt(self) -> bool:
        """Whether the ideal points depend on the prompt (PAL-B), so that scoring needs the prompt apart from the response."""
        return self.prototype_head.needs_prompt

    @property
    def prototypes(self) -> torch.Tensor | None:
        """PAL-A's prototype points `(K, d)` (the `prototype_head.points` parameter); `None` for PAL-B."""
        return getattr(self.prototype_head, "points", None)

    @property
    def user_weights(self) -> nn.Embedding:
        """The user table: one row of K mixture logits per registered user (`users.logits`)."""
        return self.users.logits

    @property
    def population_mixture(self) -> torch.Tensor:
        """The mixture rows without a user are scored for (`users.population_mixture`)."""
        return self.users.population_mixture

    @property
    def logit_scale(self) -> torch.Tensor | None:
        """The cosine similarity's log logit scale (`similarity.logit_scale`); `None` for other similarities."""
        return getattr(self.similarity, "logit_scale", None)

    @property
    def dtype(self) -> torch.dtype:
        """The backbone's dtype (what `save_pretrained` records and `dtype="auto"` reloads); PAL's parts are float32."""
        if self.backbone is not None:
            return self.backbone.dtype
        return torch.float32

    # ------------------------------------------------------------------ backbone adapters (PEFT)
    @property
    def has_backbone_adapter(self) -> bool:
        """Whether the backbone carries a PEFT adapter (attached by [`add_backbone_adapter`] or by loading)."""
        classes = _peft_classes()
        return classes is not None and isinstance(self.backbone, classes[0])

    def set_backbone_trainable(self, trainable: bool) -> None:
        """
        Freezes the backbone (`trainable=False`) or makes it train: the whole backbone, or, when it carries a PEFT
        adapter, the adapter only (LoRA matrices and PEFT's `modules_to_save`), its base weights staying frozen.
        PAL's own parameters are left as they are.
        """
        if self.backbone is None:
            if trainable:
                raise ValueError(
                    "This PAL model has no backbone (it scores pooled features); there is nothing to train."
                )
            return
        if self.has_backbone_adapter:
            for name, parameter in self.backbone.named_parameters():
                parameter.requires_grad_(trainable and _is_adapter_key(name))
        else:
            self.backbone.requires_grad_(trainable)

    def add_backbone_adapter(self, peft_config) -> None:
        """
        Puts a PEFT adapter (LoRA or another PEFT method that injects layers) on the backbone, and on the backbone only:
        `model.backbone` becomes a `peft.PeftModel` (`get_peft_model(backbone, peft_config)`) whose base weights are
        frozen, while PAL's item head, prototypes, user table and logit scale stay ordinary, trainable parameters. The
        adapter config is recorded in `config.backbone_adapter` (with PEFT's resolved `target_modules`), the numbers of
        trainable parameters are logged, and [`save_pretrained`] then saves the adapter next to PAL's weights with a
        reference to the base backbone; `from_pretrained` attaches it again. `peft_config.task_type` is ignored: the
        task head is PAL's.

        Example:

        ```python
        >>> from peft import LoraConfig
        >>> model = PalRewardModel.from_backbone("HuggingFaceTB/SmolLM2-135M-Instruct", variant="b")
        >>> model.add_backbone_adapter(LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
        ```
        """
        if self.backbone is None:
            raise ValueError(
                "This PAL model has no backbone (it scores pooled features), so there is nothing to put an adapter on. "
                "Build the model on a backbone with `PalRewardModel.from_backbone(name_or_path, ...)`."
            )
        if self.is_image_model:
            raise ValueError(
                "Adapters on two-tower image-text backbones (CLIP, SigLIP) are not supported: an image PAL model trains "
                "its heads on frozen image and caption features. Train without `peft_config` / `train_backbone`."
            )
        if self.has_backbone_adapter:
            raise ValueError(
                "The backbone already carries an adapter (`config.backbone_adapter`); a PAL model holds one adapter. "
                "Train that one further, merge it into the backbone with `model.merge_backbone_adapter()` before "
                "adding another, or reload the model without it."
            )
        self._check_no_foreign_adapters()
        _import_peft()
        from peft import PeftConfig

        if not isinstance(peft_config, (PeftConfig, dict)):
            raise TypeError(
                f"`peft_config` must be a PEFT config (for example `peft.LoraConfig(...)`) or its dict, got "
                f"{type(peft_config).__name__}."
            )
        self._attach_backbone_adapter(peft_config)
        logger.info(
            f"Added a {self.config.backbone_adapter['peft_type']} adapter to the backbone; the base backbone weights "
            f"are frozen. {self.trainable_parameters_summary()}"
        )

    def trainable_parameters_summary(self) -> str:
        """One line: the trainable parameters of the backbone (or its adapter) and of PAL's own parts, of the total."""
        counts = {"backbone": 0, "pal": 0}
        total = 0
        for name, parameter in self.named_parameters():
            total += parameter.numel()
            if parameter.requires_grad:
                counts["backbone" if name.startswith("backbone.") else "pal"] += parameter.numel()
        trainable = counts["backbone"] + counts["pal"]
        where = "adapter" if self.has_backbone_adapter else "backbone"
        return (
            f"Trainable parameters: {counts['backbone']:,} in the {where} + {counts['pal']:,} in PAL's heads, "
            f"prototypes, user table and logit scale = {trainable:,} of {total:,} "
            f"({100 * trainable / max(total, 1):.4f}%)."
        )

    def _attach_backbone_adapter(self, peft_config) -> None:
        """Wraps `self.backbone` in a `PeftModel` for `peft_config` (a PEFT config or its dict) and records the config."""
        _import_peft()
        from peft import PeftConfig, get_peft_model

        if isinstance(peft_config, dict):
            peft_config = PeftConfig.from_peft_type(**peft_config)
        else:
            peft_config = copy.deepcopy(peft_config)  # `get_peft_model` fills in the caller's config otherwise
        if peft_config.is_prompt_learning:
            raise ValueError(
                f"{peft_config.peft_type} is a prompt-learning method: it changes the backbone's inputs rather than its "
                "layers, which PAL's pooling does not support. Use LoRA (or another PEFT method that adapts layers)."
            )
        if peft_config.task_type is not None:
            logger.info(
                f"`task_type={peft_config.task_type}` of the PEFT config is ignored: the adapter goes on the backbone, "
                "which has no task head; PAL's own heads, prototypes and user table train fully."
            )
            peft_config.task_type = None
        training = self.backbone.training
        self.backbone = get_peft_model(self.backbone, peft_config, adapter_name=_ADAPTER_NAME)
        self.backbone.train(training)  # the new adapter layers follow the model's mode (no dropout in eval)
        self.config.backbone_adapter = _json_ready(self.backbone.peft_config[_ADAPTER_NAME].to_dict())

    def merge_backbone_adapter(self) -> None:
        """
        Merges the backbone adapter into the backbone weights and removes it (`PeftModel.merge_and_unload`):
        `model.backbone` is a plain model again and `config.backbone_adapter` is `None`. The merged backbone differs from
        `config.backbone_name_or_path`, so checkpoints hold it whole from then on.
        """
        if not self.has_backbone_adapter:
            raise ValueError(
                "This model has no backbone adapter to merge: attach one with `model.add_backbone_adapter(peft_config)`."
            )
        self.backbone = self.backbone.merge_and_unload()
        self.config.backbone_adapter = None

    def _check_no_foreign_adapters(self) -> None:
        """Raises if PEFT layers were injected into this model other than by `add_backbone_adapter`."""
        classes = _peft_classes()
        if classes is None:
            return
        peft_model, tuner_layer = classes
        managed = isinstance(self.backbone, peft_model)
        foreign = [
            name
            for name, module in self.named_modules()
            if isinstance(module, tuner_layer) and not (managed and name.startswith("backbone."))
        ]
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise ValueError(
                f"This PAL model holds PEFT adapter layers that `add_backbone_adapter` did not attach ({shown}): "
                "`get_peft_model` was applied to the whole PAL model, or to `model.backbone` without putting the "
                "result back. Such a model neither trains PAL's parts as intended nor saves and reloads its adapter. "
                "Build the model again and call `model.add_backbone_adapter(peft_config)` (or pass `peft_config=` to "
                "`PalRewardTrainer`): LoRA goes on the backbone, and PAL's heads, prototypes and user table train fully."
            )

    def _merged_adapter_weights(self) -> dict[str, torch.Tensor]:
        """
        The weights of the backbone modules an adapter changes, with the adapter merged, under their plain names: what
        `merge_and_unload` would leave, computed on a copy of one module at a time (the model is not modified).
        """
        from peft.tuners.tuners_utils import BaseTunerLayer

        inner = self.backbone.get_base_model()
        tuner_layers = {name for name, module in inner.named_modules() if isinstance(module, BaseTunerLayer)}
        merged = {}
        for name, module in inner.named_modules():
            parent = name.rpartition(".")[0]
            if any(parent == layer or parent.startswith(layer + ".") for layer in tuner_layers):
                continue
            if hasattr(module, "unload_and_optionally_merge_module"):  # PEFT's wrappers (modules_to_save, ...)
                unloaded = copy.deepcopy(module).unload_and_optionally_merge_module(
                    merge=True, safe_merge=False, adapter_names=None
                )
            elif isinstance(module, BaseTunerLayer):
                clone = copy.deepcopy(module)
                clone.merge()
                unloaded = clone.get_base_layer()
            else:
                continue
            for key, value in unloaded.state_dict().items():
                merged[f"{name}.{key}" if name else key] = value
        return merged

    # ------------------------------------------------------------------ saving and loading
    AUTO_MAP = {
        "AutoConfig": "configuration_pal.PalConfig",
        "AutoModel": "modeling_pal.PalRewardModel",
        "AutoModelForSequenceClassification": "modeling_pal.PalRewardModel",
    }
    CODE_FILES = ("configuration_pal.py", "modeling_pal.py")
    # `save_pretrained(..., push_to_hub=True)` arguments that go to `push_to_hub`.
    PUSH_TO_HUB_ARGUMENTS = (
        "commit_message",
        "commit_description",
        "private",
        "token",
        "revision",
        "create_pr",
        "tags",
    )

    def save_pretrained(
        self,
        save_directory,
        is_main_process: bool = True,
        state_dict=None,
        push_to_hub: bool = False,
        include_backbone: bool | None = None,
        merge_adapter: bool = False,
        **kwargs,
    ):
        """
        `PreTrainedModel.save_pretrained`, plus the two code files and an `auto_map` for `AutoConfig`, `AutoModel` and
        `AutoModelForSequenceClassification`, so the folder loads with `trust_remote_code=True` where pal_rm is not
        installed.

        What the checkpoint holds of the backbone (recorded in its `config.json` as `backbone_weights`):

        - a backbone without adapter: its weights, in `model.safetensors` (`include_backbone=None` or `True`), or, with
          `include_backbone=False`, only a reference to it (`config.backbone_name_or_path` and `backbone_revision`,
          recorded by [`from_backbone`]): the checkpoint is then PAL's weights alone, and loading it loads the backbone
          from the reference. That is what [`PalRewardTrainer`] saves for a frozen backbone. It needs a reference and a
          backbone whose weights are still those of the reference (checked on a fingerprint; a cast is allowed).
        - a backbone with an adapter ([`add_backbone_adapter`]): PAL's weights, the adapter in `backbone_adapter/`
          (PEFT's format: `adapter_config.json` and `adapter_model.safetensors`, a plain PEFT adapter of the base
          backbone) and the reference to the base backbone, without the base weights. Where there is no reference, or
          the base weights changed, or with `include_backbone=True`, the base weights are saved too.
          `merge_adapter=True` saves the backbone with the adapter merged in instead (a plain checkpoint, without
          adapter); the model itself keeps its adapter (this needs memory for a merged copy of the adapted layers:
          call [`merge_backbone_adapter`] first to avoid it).

        Loading ([`from_pretrained`], or `AutoModel.from_pretrained(path, trust_remote_code=True)`) puts it all back
        together, and gives the same rewards as the saved model.

        A save is all-or-nothing: the checkpoint is written whole into a staging folder beside `save_directory`, then the
        two folders are swapped in one step (`renameat2(RENAME_EXCHANGE)` on Linux; elsewhere two renames, and the next
        load or save moves the previous checkpoint back if a save was killed between them). A save that fails or is
        killed at any instant leaves the previous or the new checkpoint whole at `save_directory`. Files of
        `save_directory` that the save does not write (the Trainer's `checkpoint-*` folders, `training_args.bin`,
        tokenizer files, a model card, ...) are kept, as hard links. Where `save_directory` is a mount point or its
        parent folder is read-only, the checkpoint is written in place file by file, with a warning.

        With `push_to_hub=True`, the folder is saved as above, then the model is uploaded with `push_to_hub` (to
        `repo_id`, by default the folder's name). Together with a `state_dict` or `variant`, or with
        `is_main_process=False`, the call goes to `PreTrainedModel.save_pretrained` unchanged.
        """
        self.config.auto_map = dict(self.AUTO_MAP)
        allow_raw_user_ids = kwargs.pop("allow_raw_user_ids", False)
        if push_to_hub:
            self._refuse_raw_user_ids_upload(allow_raw_user_ids)
        if not is_main_process or (push_to_hub and (state_dict is not None or "variant" in kwargs)):
            if is_main_process and (include_backbone is False or merge_adapter or self.has_backbone_adapter):
                raise ValueError(
                    "`push_to_hub=True` with a `state_dict` or `variant` goes through `PreTrainedModel.save_pretrained`, "
                    "which saves no backbone reference or adapter: save the model to a folder first, then upload it."
                )
            result = super().save_pretrained(
                save_directory,
                is_main_process=is_main_process,
                state_dict=state_dict,
                push_to_hub=push_to_hub,
                **kwargs,
            )
            if is_main_process:
                self._copy_code_files(save_directory)
            return result
        if push_to_hub:
            hub_arguments = {name: kwargs.pop(name) for name in self.PUSH_TO_HUB_ARGUMENTS if name in kwargs}
            repo_id = kwargs.pop("repo_id", None) or os.path.basename(os.path.normpath(os.fspath(save_directory)))
            self.save_pretrained(
                save_directory, include_backbone=include_backbone, merge_adapter=merge_adapter, **kwargs
            )
            return self.push_to_hub(
                repo_id,
                max_shard_size=kwargs.get("max_shard_size", "50GB"),
                allow_raw_user_ids=allow_raw_user_ids,
                **hub_arguments,
            )

        target = os.path.realpath(os.fspath(save_directory))
        if os.path.isfile(target):
            raise ValueError(f"`save_directory` ({save_directory}) should be a directory, not a file.")
        parent = os.path.dirname(target)
        os.makedirs(parent, exist_ok=True)
        reason = _why_not_swappable(target)
        if reason is not None:
            return self._save_in_place(
                target,
                reason,
                state_dict=state_dict,
                include_backbone=include_backbone,
                merge_adapter=merge_adapter,
                **kwargs,
            )
        _recover_interrupted_saves(parent, remove_leftovers=True)
        staging = _swap_folder_path(target, "staging")
        os.mkdir(staging)
        replaced = None
        try:
            self._write_checkpoint(
                staging,
                state_dict=state_dict,
                include_backbone=include_backbone,
                merge_adapter=merge_adapter,
                **kwargs,
            )
            if os.path.isdir(target):
                _carry_over(target, staging)
            _sync_tree(staging)
            replaced = _swap_into_place(staging, target)
            _sync_directory(parent)
        finally:
            for leftover in {staging, replaced} - {None}:
                if os.path.lexists(leftover):
                    shutil.rmtree(leftover, ignore_errors=True)
                if os.path.lexists(leftover):
                    logger.warning(f"Could not delete {leftover}; the next save into {parent} deletes it.")

    def _copy_code_files(self, folder: str) -> None:
        source = os.path.dirname(os.path.abspath(__file__))
        for name in self.CODE_FILES:
            shutil.copyfile(os.path.join(source, name), os.path.join(folder, name))

    def _write_checkpoint(
        self, folder: str, state_dict=None, include_backbone: bool | None = None, merge_adapter: bool = False, **kwargs
    ) -> None:
        """
        The files of a checkpoint: `PreTrainedModel.save_pretrained` into `folder` (of the weights chosen by
        `_checkpoint_contents`, with the config fields that describe them), the adapter folder, and the code files.
        """
        weights, adapter_state, fields = self._checkpoint_contents(state_dict, include_backbone, merge_adapter)
        previous = {name: getattr(self.config, name) for name in fields}
        for name, value in fields.items():
            setattr(self.config, name, value)
        try:
            super().save_pretrained(folder, state_dict=weights, **kwargs)
        finally:
            for name, value in previous.items():
                setattr(self.config, name, value)
        if adapter_state is not None:
            self._write_adapter(os.path.join(folder, BACKBONE_ADAPTER_FOLDER), adapter_state)
        self._copy_code_files(folder)

    def _checkpoint_contents(
        self, state_dict: dict | None, include_backbone: bool | None, merge_adapter: bool
    ) -> tuple[dict | None, dict | None, dict]:
        """
        What a save writes: the state dict for `model.safetensors` (`None`: the model's own, unchanged), the adapter's
        state dict in PEFT's format (`None`: no adapter) and the config fields that describe them.
        """
        if include_backbone not in (None, True, False):
            raise TypeError(f"`include_backbone` must be None, True or False, got {include_backbone!r}.")
        self._check_no_foreign_adapters()
        adapter = self.has_backbone_adapter
        if merge_adapter:
            if not adapter:
                raise ValueError(
                    "`merge_adapter=True` but this model has no backbone adapter: there is nothing to merge."
                )
            if include_backbone is False:
                raise ValueError(
                    "`merge_adapter=True` saves the backbone with the adapter merged in, which `include_backbone=False` "
                    "would leave out: pass one or the other."
                )
            if state_dict is not None:
                raise ValueError(
                    "`merge_adapter=True` merges the model's own weights and cannot save a given `state_dict`. Save "
                    "the merged model from one process with its full weights in memory, or call "
                    "`model.merge_backbone_adapter()` first."
                )
        if self.backbone is None:
            if include_backbone is False:
                raise ValueError("`include_backbone=False`, but this PAL model has no backbone (it scores features).")
            return state_dict, None, {"backbone_weights": "included"}
        if not adapter and include_backbone is not False:  # the whole model, as transformers saves it
            return state_dict, None, {"backbone_weights": "included"}

        full = state_dict if state_dict is not None else self.state_dict()
        pal = {key: value for key, value in full.items() if not key.startswith("backbone.")}
        backbone = {key[len("backbone.") :]: value for key, value in full.items() if key.startswith("backbone.")}
        base = self._base_weights(backbone)
        if merge_adapter:
            base.update(self._merged_adapter_weights())
            weights = {**pal, **{f"backbone.{key}": value for key, value in base.items()}}
            return weights, None, {"backbone_weights": "included", "backbone_adapter": None}
        by_reference = self._may_refer_to_backbone(base, include_backbone)
        weights = dict(pal) if by_reference else {**pal, **{f"backbone.{key}": value for key, value in base.items()}}
        adapter_state = None
        if adapter:
            from peft import get_peft_model_state_dict

            adapter_state = get_peft_model_state_dict(self.backbone, state_dict=backbone, adapter_name=_ADAPTER_NAME)
        return weights, adapter_state, {"backbone_weights": "reference" if by_reference else "included"}

    def can_refer_to_backbone(self) -> bool:
        """
        Whether a checkpoint of this model can hold a reference to its base backbone instead of the base weights
        (`save_pretrained(..., include_backbone=False)`): the model records where the backbone came from
        (`config.backbone_name_or_path`, set by [`from_backbone`]) and the base weights are still those (their
        fingerprint is unchanged; weights cast to another dtype count as unchanged). [`PalRewardTrainer`] asks this
        before it saves a frozen backbone by reference.
        """
        if self.backbone is None:
            return False
        state = {
            key[len("backbone.") :]: value for key, value in self.state_dict().items() if key.startswith("backbone.")
        }
        return self._backbone_reference_problem(self._base_weights(state)) is None

    def _base_weights(self, backbone_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The base weights of the backbone, under their plain names, from its state dict (adapter weights left out)."""
        if not self.has_backbone_adapter:
            return dict(backbone_state)
        base = {_base_key(key): value for key, value in backbone_state.items() if not _is_adapter_key(key)}
        if len(base) != sum(not _is_adapter_key(key) for key in backbone_state):
            raise RuntimeError(
                "Two base weights of the adapted backbone have the same plain name once PEFT's infixes are removed; "
                "this adapter layout is not supported. Save with `merge_adapter=True`."
            )
        return base

    def _backbone_reference_problem(self, base: dict[str, torch.Tensor]) -> str | None:
        """Why a checkpoint cannot refer to the backbone instead of holding its base weights `base`, if it cannot."""
        reference = self.config.backbone_name_or_path
        if not reference:
            return (
                "this model records no reference to its backbone (`config.backbone_name_or_path` is unset: it was not "
                "built with `PalRewardModel.from_backbone`, or its backbone cannot be loaded again identically)"
            )
        recorded = self.config.backbone_fingerprint
        current = weights_fingerprint(base) if recorded else None
        if recorded and current and current.split(":")[0] == recorded.split(":")[0] and current != recorded:
            return (
                f"the backbone's weights are no longer those of {reference} (they were trained or merged since it was "
                "loaded: their fingerprint changed)"
            )
        return None

    def _may_refer_to_backbone(self, base: dict[str, torch.Tensor], include_backbone: bool | None) -> bool:
        """
        Whether a checkpoint holds a reference to the base backbone instead of its weights `base` (plain names).
        `include_backbone=False` raises where it cannot (see `can_refer_to_backbone`); `None` (an adapter's default)
        then saves the base weights, and says why.
        """
        if include_backbone:
            return False
        problem = self._backbone_reference_problem(base)
        if problem is None:
            return True
        if include_backbone is False:
            raise ValueError(
                f"`include_backbone=False` saves a reference to the backbone instead of its weights, but {problem}. "
                "Save with `include_backbone=True`"
                + (
                    "."
                    if self.config.backbone_name_or_path
                    else ", or build the model with `PalRewardModel.from_backbone(name_or_path, ...)`, which records "
                    "the reference."
                )
            )
        log = logger.warning if self.config.backbone_name_or_path else logger.info
        log(f"The checkpoint holds the base backbone weights next to the adapter: {problem}.")
        return False

    def _write_adapter(self, folder: str, adapter_state: dict[str, torch.Tensor]) -> None:
        """Writes the backbone adapter in PEFT's format (config and weights), naming the base backbone it adapts."""
        from safetensors.torch import save_file

        os.makedirs(folder, exist_ok=True)
        tensors = {key: value.detach().cpu().contiguous() for key, value in adapter_state.items()}
        save_file(tensors, os.path.join(folder, ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
        peft_config = copy.deepcopy(self.backbone.peft_config[_ADAPTER_NAME])
        if self.config.backbone_name_or_path:
            peft_config.base_model_name_or_path = self.config.backbone_name_or_path
            peft_config.revision = self.config.backbone_revision
        peft_config.save_pretrained(folder)

    def _save_in_place(self, target: str, reason: str, **kwargs) -> None:
        """The save for a `save_directory` that cannot be swapped: written beside the old files, moved in one by one."""
        logger.warning(
            f"{target} {reason}, so it cannot be swapped for a new folder: the checkpoint is written into it file by "
            "file, and a save killed midway can leave a mix of old and new files there. Save into a subfolder to get "
            "all-or-nothing saves."
        )
        os.makedirs(target, exist_ok=True)
        for name in os.listdir(target):
            match = _IN_PLACE_STAGING_FOLDER.fullmatch(name)
            if match and (match["pid"] is None or _owner_has_ended(match["host"], match["pid"])):
                shutil.rmtree(os.path.join(target, name), ignore_errors=True)
        staging = os.path.join(target, f"_pal-staging-{_host_tag()}-{os.getpid()}-{secrets.token_hex(4)}")
        os.mkdir(staging)
        try:
            self._write_checkpoint(staging, **kwargs)
            _sync_tree(staging)
            written = set(os.listdir(staging))
            for name in written:
                destination = os.path.join(target, name)
                if os.path.isdir(destination) and not os.path.islink(destination):  # the adapter folder
                    shutil.rmtree(destination)
                os.replace(os.path.join(staging, name), destination)
            for name in os.listdir(target):  # e.g. the shards of a previous sharded save, or a stale adapter
                path = os.path.join(target, name)
                if name not in written and _is_checkpoint_file(name):
                    if os.path.isfile(path):
                        os.remove(path)
                    elif os.path.isdir(path) and not os.path.islink(path):
                        shutil.rmtree(path)
            _sync_directory(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """
        `PreTrainedModel.from_pretrained`, with clear errors for a checkpoint that is not a PAL model (use
        [`PalRewardModel.from_backbone`] to wrap a backbone), for corrupt or truncated weights, and for a user registry
        (`config.user_ids`) that does not match the user table of the weights: a user table is never re-initialised.
        A local checkpoint left missing by a save killed midway is first restored from its backup folder.

        Every weight comes from the checkpoint or from the backbone it refers to: a weight the checkpoint lacks, or one
        the model does not have, is an error, never a random initialisation. A checkpoint that refers to its backbone
        (`backbone_weights="reference"`, see [`save_pretrained`]) loads it from `backbone_name_or_path` at
        `backbone_revision` with `AutoModel.from_pretrained`; the arguments that concern the backbone (`dtype`, by
        default the one it was saved in, `attn_implementation`, `device_map`, `quantization_config`, `max_memory`,
        `offload_folder`) go there, and PAL's own parts follow the backbone's input device, in float32. A backbone
        adapter (`backbone_adapter`) is attached again with its saved weights (this needs `peft`).
        """
        config = kwargs.get("config")
        if isinstance(pretrained_model_name_or_path, (str, os.PathLike)):
            local = os.path.realpath(os.fspath(pretrained_model_name_or_path))
            if _is_missing_or_empty(local):
                _recover_interrupted_saves(os.path.dirname(local), checkpoint_name=os.path.basename(local))
        if config is None and os.path.isdir(str(pretrained_model_name_or_path)):
            config_file = os.path.join(pretrained_model_name_or_path, "config.json")
            if os.path.isfile(config_file):
                with open(config_file) as file:
                    model_type = json.load(file).get("model_type")
                if model_type != PalConfig.model_type:
                    raise ValueError(
                        f"{pretrained_model_name_or_path} holds a {model_type!r} checkpoint, not a PAL reward model "
                        f"(model_type {PalConfig.model_type!r}). To build a PAL model on top of it, use "
                        f"`PalRewardModel.from_backbone({str(pretrained_model_name_or_path)!r}, ...)`."
                    )
        output_loading_info = kwargs.pop("output_loading_info", False)
        ignore_mismatched_sizes = kwargs.pop("ignore_mismatched_sizes", False)
        location = {name: kwargs[name] for name in (*_HUB_KWARGS, "revision", "subfolder") if name in kwargs}
        saved_config = cls._checkpoint_config(pretrained_model_name_or_path, config, location)
        by_reference = getattr(saved_config, "backbone_weights", "included") == "reference"
        backbone = cls._load_referenced_backbone(saved_config, kwargs) if by_reference else None
        # Checkpoints saved before PAL's parts were modules name their weights differently (`LEGACY_KEY_MAPPING`).
        key_mapping = {**LEGACY_KEY_MAPPING, **(kwargs.pop("key_mapping", None) or {})}
        loading = _LOADING.set({"backbone_by_reference": by_reference})
        try:
            # Mismatched sizes are checked below, where the user table gets its own error.
            model, loading_info = super().from_pretrained(
                pretrained_model_name_or_path,
                *args,
                output_loading_info=True,
                ignore_mismatched_sizes=True,
                key_mapping=key_mapping,
                **kwargs,
            )
        except Exception as error:
            text = f"{type(error).__name__}: {error}"
            if any(
                word in text.lower()
                for word in ("safetensor", "deserializ", "header", "incomplete", "truncat", "invalid load key")
            ):
                raise OSError(
                    f"Could not read the weights of the PAL checkpoint at {pretrained_model_name_or_path}: the weights "
                    f"file is corrupt or truncated ({text}). Save the model again or re-download the checkpoint."
                ) from error
            raise
        finally:
            _LOADING.reset(loading)
        # transformers would undo the renaming when saving (writing the old names): saves use today's names.
        model._weight_conversions = None
        registry = "config.json" if config is None else "the `config` passed to `from_pretrained`"
        mismatched = {key: (tuple(saved), tuple(expected)) for key, saved, expected in loading_info["mismatched_keys"]}
        if USER_TABLE_KEY in mismatched:
            (rows, columns), (users, prototypes) = mismatched[USER_TABLE_KEY]
            detail = (
                f"{registry} registers {users} users but model.safetensors has {rows} rows in {USER_TABLE_KEY}"
                if rows != users
                else f"{registry} sets num_prototypes={prototypes} but model.safetensors has {columns} columns in "
                f"{USER_TABLE_KEY}"
            )
            raise ValueError(
                f"{detail} (checkpoint {pretrained_model_name_or_path}): the user registry and the user table must "
                "come from the same save, and a user table is never re-initialised. Use the config.json saved with "
                "these weights, or load the model that has the right users and save it again."
            )
        if USER_TABLE_KEY in loading_info["missing_keys"] and model.num_users > 0:
            raise ValueError(
                f"{registry} registers {model.num_users} users but the weights of {pretrained_model_name_or_path} have "
                f"no {USER_TABLE_KEY}: the user table would be random. Use the config.json saved with these weights."
            )
        if mismatched and not ignore_mismatched_sizes:
            details = "; ".join(
                f"{key}: {list(saved)} in the checkpoint, {list(expected)} in the model"
                for key, (saved, expected) in sorted(mismatched.items())
            )
            raise RuntimeError(
                f"Size mismatch between the weights of {pretrained_model_name_or_path} and its config ({details}). "
                "Use the config.json saved with these weights, or pass `ignore_mismatched_sizes=True` to re-initialise "
                "these weights."
            )
        model._check_loaded_weights(loading_info, pretrained_model_name_or_path, registry)
        if by_reference:
            model._attach_referenced_backbone(backbone)
        model._load_saved_adapter(pretrained_model_name_or_path, location)
        model.eval()
        return (model, loading_info) if output_loading_info else model

    @classmethod
    def _checkpoint_config(cls, pretrained_model_name_or_path, config, location: dict):
        """The config of the checkpoint being loaded (`None` if it cannot be read: `from_pretrained` then says why)."""
        if isinstance(config, PretrainedConfig):
            return config
        source = config if isinstance(config, (str, os.PathLike)) else pretrained_model_name_or_path
        try:
            return cls.config_class.from_pretrained(source, **location)
        except Exception:
            return None

    @staticmethod
    def _load_referenced_backbone(config: PalConfig, kwargs: dict) -> PreTrainedModel:
        """
        Loads the backbone a checkpoint refers to, with the loading arguments that concern it (taken out of `kwargs`):
        by default in the dtype it was saved in.
        """
        backbone_kwargs = {name: kwargs.pop(name) for name in _BACKBONE_LOADING_KWARGS if name in kwargs}
        if "torch_dtype" in backbone_kwargs:
            backbone_kwargs.setdefault("dtype", backbone_kwargs.pop("torch_dtype"))
        if backbone_kwargs.get("dtype") is None:
            saved_dtype = getattr(config, "dtype", None)
            if isinstance(saved_dtype, str) and saved_dtype != "auto":
                saved_dtype = getattr(torch, saved_dtype, None)
            backbone_kwargs["dtype"] = saved_dtype if isinstance(saved_dtype, torch.dtype) else "auto"
        backbone_kwargs.update({name: kwargs[name] for name in _HUB_KWARGS if name in kwargs})
        reference, revision = config.backbone_name_or_path, config.backbone_revision
        if revision is not None:
            backbone_kwargs["revision"] = revision
        where = f"{reference}" + (f" (revision {revision})" if revision else "")
        try:
            backbone, loading_info = AutoModel.from_pretrained(
                reference, config=copy.deepcopy(config.backbone_config), output_loading_info=True, **backbone_kwargs
            )
        except OSError as error:
            raise OSError(
                f"This PAL checkpoint does not hold its backbone weights: it refers to the backbone {where}, which "
                f"could not be loaded ({error}). Make that backbone available (download it, log in to the Hub, or "
                "pass `token=`), or load a checkpoint saved with its backbone "
                "(`model.save_pretrained(path, include_backbone=True)`)."
            ) from error
        if loading_info["missing_keys"]:
            missing = sorted(loading_info["missing_keys"])
            logger.warning(
                f"The backbone {where} lacks {len(missing)} weight(s) ({', '.join(missing[:5])}"
                f"{', ...' if len(missing) > 5 else ''}): transformers initialised them at random, as it did when the "
                "PAL model was built on it. Where the model reads them, its rewards differ from the saved model's; "
                "save it with `include_backbone=True` to keep them."
            )
        return backbone

    def _attach_referenced_backbone(self, backbone: PreTrainedModel) -> None:
        """
        Puts the backbone loaded from the checkpoint's reference in place, moves PAL's parts to its device, and checks
        that its weights are the ones the model was saved with (where the fingerprint can tell).
        """
        self.backbone = backbone
        self.config.backbone_config = backbone.config
        self._place_pal_parts()
        recorded = self.config.backbone_fingerprint
        if not recorded or getattr(backbone, "hf_quantizer", None) is not None:
            return
        current = weights_fingerprint(backbone.state_dict())
        if current is None:
            return
        if current.split(":")[0] != recorded.split(":")[0]:
            logger.info(
                f"The backbone was loaded in another dtype ({current.split(':')[0]}) than it had when the model was "
                f"built ({recorded.split(':')[0]}), so its weights cannot be checked against the recorded fingerprint."
            )
            self.config.backbone_fingerprint = current
        elif current != recorded:
            where = self.config.backbone_name_or_path + (
                f" (revision {self.config.backbone_revision})" if self.config.backbone_revision else ""
            )
            raise ValueError(
                f"The backbone loaded from {where} is not the one this PAL checkpoint was trained on: its weights "
                f"changed (fingerprint {current}, recorded {recorded}). The rewards would be wrong. Load the original "
                "backbone (pin `backbone_revision` in config.json to the revision the model was built on), or use a "
                "checkpoint saved with its backbone (`save_pretrained(..., include_backbone=True)`)."
            )

    def _check_loaded_weights(self, loading_info: dict, source, registry: str) -> None:
        """Raises on weights the checkpoint lacks (they would be random) or holds but the model has no place for."""
        missing = sorted(loading_info["missing_keys"])
        if self.config.num_user_posteriors == 0:
            # Checkpoints saved before posteriors were stored lack these buffers, which are empty then.
            missing = [key for key in missing if not key.startswith("users.posterior_")]
        if missing:
            shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            backbone_keys = [key for key in self.state_dict() if key.startswith("backbone.")]
            hint = ""
            if backbone_keys and set(backbone_keys) <= set(missing):
                reference = self.config.backbone_name_or_path
                hint = " The checkpoint holds no backbone weights at all" + (
                    f': to load them from {reference}, set `"backbone_weights": "reference"` in its config.json.'
                    if reference
                    else ", and its config names no backbone to load them from (`backbone_name_or_path`)."
                )
            raise ValueError(
                f"The weights of {source} lack {len(missing)} weight(s) of the model: {shown}. They would be "
                f"initialised at random and the model would not be the one that was saved.{hint} Load the checkpoint "
                f"with the {registry} saved with these weights, or save the model again with `save_pretrained`."
            )
        unexpected = sorted(loading_info["unexpected_keys"])
        if unexpected:
            shown = ", ".join(unexpected[:8]) + (f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else "")
            hint = ""
            if any(_is_adapter_key(key) or _PEFT_PREFIX in key for key in unexpected):
                hint = (
                    " They are weights of a PEFT adapter saved without its config: attach adapters with "
                    "`model.add_backbone_adapter(peft_config)`, whose `save_pretrained` records the adapter config and "
                    f"saves the adapter in `{BACKBONE_ADAPTER_FOLDER}/`."
                )
            raise ValueError(
                f"The weights of {source} hold {len(unexpected)} weight(s) the model has no place for: {shown}. They "
                f"would be dropped.{hint} Load the checkpoint with the {registry} saved with these weights."
            )

    def _load_saved_adapter(self, pretrained_model_name_or_path, location: dict) -> None:
        """Attaches the backbone adapter a checkpoint records (`config.backbone_adapter`) and loads its weights."""
        adapter_config = self.config.backbone_adapter
        if adapter_config is None:
            subfolder = os.path.join(location.get("subfolder") or "", BACKBONE_ADAPTER_FOLDER)
            if isinstance(pretrained_model_name_or_path, (str, os.PathLike)) and os.path.exists(
                os.path.join(pretrained_model_name_or_path, subfolder, ADAPTER_WEIGHTS_NAME)
            ):
                raise ValueError(
                    f"{pretrained_model_name_or_path} holds the weights of a backbone adapter ({subfolder}/), but its "
                    "config records no adapter (`backbone_adapter`): the adapter would be left out. Use the config.json "
                    "saved with these weights."
                )
            return
        self.config.backbone_adapter = None
        self._attach_backbone_adapter(adapter_config)
        self.load_backbone_adapter_weights(pretrained_model_name_or_path, **location)

    def load_backbone_adapter_weights(self, pretrained_model_name_or_path, **kwargs) -> None:
        """
        Loads the adapter weights of a PAL checkpoint (its `backbone_adapter/adapter_model.safetensors`, a local folder
        or a Hub repository; `kwargs` are download arguments such as `revision` or `token`) into the adapter attached to
        this model's backbone. `from_pretrained` does this itself; the trainer calls it when it resumes from a
        checkpoint or loads the best one, since `Trainer` loads `model.safetensors` only. Weights that are missing or
        that the adapter has no place for are an error.
        """
        if not self.has_backbone_adapter:
            raise ValueError(
                "This model's backbone has no adapter to load weights into: attach one with "
                "`model.add_backbone_adapter(peft_config)`, or load the checkpoint with `PalRewardModel.from_pretrained`."
            )
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file
        from transformers.utils import cached_file

        subfolder = os.path.join(kwargs.pop("subfolder", None) or "", BACKBONE_ADAPTER_FOLDER)
        try:
            weights_file = cached_file(
                pretrained_model_name_or_path, ADAPTER_WEIGHTS_NAME, subfolder=subfolder, **kwargs
            )
        except OSError as error:
            raise OSError(
                f"The model has a {self.config.backbone_adapter.get('peft_type')} adapter on its backbone, but the "
                f"adapter weights of {pretrained_model_name_or_path} ({subfolder}/{ADAPTER_WEIGHTS_NAME}) could not be "
                f"read ({error}). An adapter is never initialised at random: copy or download the whole checkpoint, "
                f"with its `{BACKBONE_ADAPTER_FOLDER}/` folder."
            ) from error
        result = set_peft_model_state_dict(self.backbone, load_file(weights_file), adapter_name=_ADAPTER_NAME)
        missing = sorted(key for key in result.missing_keys if _is_adapter_key(key))
        unexpected = sorted(result.unexpected_keys)
        if missing or unexpected:
            raise ValueError(
                f"The adapter weights of {pretrained_model_name_or_path} ({subfolder}/{ADAPTER_WEIGHTS_NAME}) do not "
                f"match the adapter on the backbone: missing {missing[:8]}, unexpected {unexpected[:8]}. They must come "
                "from the same save as its config: save the model again with `save_pretrained`."
            )

    # ------------------------------------------------------------------ users
    @property
    def num_users(self) -> int:
        return self.users.num_users

    def population_logits(self) -> torch.Tensor:
        """Logits whose softmax (at the model's temperature) is the population mixture."""
        return self.users.population_logits()

    def add_users(self, user_ids: Sequence[str]) -> list[int]:
        """
        Registers new users and returns their rows. Each new user starts at the population mixture. Users already
        registered keep their row and weights (their ids may be repeated in `user_ids`). Register users before an
        optimizer is built over the model's parameters: the user table is replaced by a larger one.

        On a registry of salted hashes (`config.hashed_user_ids`), raw ids are hashed with the salt set by
        [`set_user_id_salt`] (or [`hash_user_ids`]) before they are looked up or stored, so a known user keeps its row
        and only the hash of a new user is registered.
        """
        if isinstance(user_ids, str):
            user_ids = [user_ids]
        for user in user_ids:
            if not isinstance(user, str) or not user:
                raise ValueError(f"User ids must be non-empty strings, got {user!r}.")
        keys = self._registry_keys(user_ids, for_registration=True)
        registry = self._user_registry()
        new_users = list(dict.fromkeys(key for key in keys if key not in registry))
        if new_users:
            self.users.grow(len(new_users))
            self.config.user_ids = list(self.config.user_ids) + new_users
        registry = self._user_registry()
        return [registry[key] for key in keys]

    def _user_registry(self) -> dict[str, int]:
        """`{user id: row}`, rebuilt only when `config.user_ids` changes (lookups stay O(1) with millions of users)."""
        ids = self.config.user_ids
        cached = self.__dict__.get("_registry_cache")
        if cached is None or cached[0] is not ids or cached[1] != len(ids):
            cached = (ids, len(ids), _build_user_registry(ids))
            self.__dict__["_registry_cache"] = cached
        return cached[2]

    def _registry_keys(self, user_ids: Sequence[str | None], for_registration: bool = False) -> list[str | None]:
        """
        The registry key of each user id: the id itself on a registry of raw ids; on a registry of salted hashes, the
        id itself when it is already a registered hash, else its salted hash (which needs the salt). `None` (the
        population) stays `None`. O(1) per id.
        """
        if not getattr(self.config, "hashed_user_ids", False):
            return list(user_ids)
        registry = self._user_registry()
        salt = getattr(self, "user_id_salt", None)
        keys = []
        for user in user_ids:
            if user is None or user in registry:
                keys.append(user)
            elif salt is None:
                action = "register new users" if for_registration else "look users up"
                raise KeyError(
                    f"This model's user registry holds salted hashes of the user ids, not the ids, so it cannot "
                    f"{action} by raw id (got {user!r}). Call `model.set_user_id_salt(salt)` with the salt used when "
                    "the registry was hashed (`PalRewardTrainer(..., user_id_salt=...)` or the `PAL_USER_ID_SALT` "
                    "environment variable do this for a trainer); the salt is never stored with the model."
                )
            else:
                keys.append(hash_user_id(user, salt))
        return keys

    def is_registered(self, user_ids: Sequence[str]) -> list[bool]:
        """
        Whether each user id is registered. Use this rather than reading `config.user_ids`: on a registry of salted
        hashes, raw ids are hashed with the salt set by [`set_user_id_salt`] (without a salt, a raw id raises a
        `KeyError` that says how to set it). O(1) per id.
        """
        if isinstance(user_ids, str):
            user_ids = [user_ids]
        registry = self._user_registry()
        return [key is not None and key in registry for key in self._registry_keys(user_ids)]

    def user_rows(self, user_ids: Sequence[str | None], unknown_users: str = "error") -> torch.LongTensor:
        """
        Maps string user ids to rows of the user table. `None` means the population (row `-1`). An id that is not
        registered raises, unless `unknown_users="population"`, which scores it for the population mixture. On a
        registry of salted hashes, raw ids are hashed with the salt set by [`set_user_id_salt`].
        """
        if unknown_users not in ("error", "population"):
            raise ValueError(f"`unknown_users` must be 'error' or 'population', got {unknown_users!r}.")
        registry = self._user_registry()
        keys = self._registry_keys(user_ids)
        rows = []
        for index, (user, key) in enumerate(zip(user_ids, keys)):
            if key is None:
                rows.append(-1)
            elif key in registry:
                rows.append(registry[key])
            elif unknown_users == "population":
                rows.append(-1)
            else:
                known = ", ".join(repr(u) for u in self.config.user_ids[:5])
                more = "" if self.num_users <= 5 else f", ... ({self.num_users} users)"
                raise KeyError(
                    f"Unknown user {user!r} (row {index}). Registered users: [{known}{more}]. Fit a new user with "
                    "`PalRewardTrainer.adapt_users(...)`, register it with `model.add_users(...)`, or pass "
                    "`unknown_users='population'` to score unknown users with the population mixture."
                )
        return torch.tensor(rows, dtype=torch.long, device=self.users.logits.weight.device)

    def set_user_id_salt(self, salt: str | None) -> None:
        """
        Sets the salt of a registry of salted hashes (`config.hashed_user_ids`), so that users can be scored,
        registered and checked by their raw ids. The salt is kept in memory only, never saved. A registry hashed by
        [`hash_user_ids`] records a one-way check value of its salt, and a different salt raises a `ValueError`.
        `None` forgets the salt.
        """
        if salt is not None:
            if not isinstance(salt, str) or not salt:
                raise ValueError(f"The user id salt must be a non-empty string, got {type(salt).__name__}.")
            check = getattr(self.config, "user_id_salt_check", None)
            if getattr(self.config, "hashed_user_ids", False) and check is not None and check != salt_check(salt):
                raise ValueError(
                    "This salt is not the one the model's user registry was hashed with: raw user ids would not "
                    "match their hashes and known users would be registered again. Use the original salt."
                )
        self.user_id_salt = salt

    def push_to_hub(self, repo_id: str, *args, allow_raw_user_ids: bool = False, **kwargs):
        """
        `PreTrainedModel.push_to_hub`, refusing to upload a registry of raw user ids: hash it first
        ([`hash_user_ids`], or `pal_rm.hub.push_to_hub`, which hashes by default and writes the model card), or pass
        `allow_raw_user_ids=True` to publish the ids as they are.
        """
        self._refuse_raw_user_ids_upload(allow_raw_user_ids)
        return super().push_to_hub(repo_id, *args, **kwargs)

    def _refuse_raw_user_ids_upload(self, allow_raw_user_ids: bool) -> None:
        if not self.config.user_ids or self.config.hashed_user_ids:
            return
        if not allow_raw_user_ids:
            raise ValueError(
                f"This model's registry holds {self.num_users} raw user ids, which an upload would publish. Hash them "
                "first with `model.hash_user_ids(salt)` (keep the salt secret), or upload with "
                "`pal_rm.hub.push_to_hub(model, tokenizer, repo_id)`, which hashes by default; pass "
                "`allow_raw_user_ids=True` to publish the raw ids."
            )
        logger.warning(f"Uploading {self.num_users} raw user ids (`allow_raw_user_ids=True`).")

    def hash_user_ids(self, salt: str) -> None:
        """
        Replaces the user registry in place by salted hashes of the ids (`hash_user_id`), records a one-way check value
        of the salt in the config (`user_id_salt_check`) and sets the salt on the model ([`set_user_id_salt`]), so
        raw ids keep working for scoring, [`add_users`] and [`is_registered`] while no saved file holds them. Rows and
        weights do not move. Idempotent on a registry already hashed with this salt; a different salt raises a
        `ValueError`.

        Example:

        ```python
        >>> model.add_users(["alice", "bob"])
        >>> model.hash_user_ids(os.environ["PAL_USER_ID_SALT"])
        >>> model.config.user_ids[0].startswith("sha256:"), model.user_rows(["alice"]).tolist()
        (True, [0])
        ```
        """
        if not isinstance(salt, str) or not salt:
            raise ValueError(
                f"`hash_user_ids` needs a salt: a non-empty secret string kept apart from the model, got {salt!r}."
            )
        config = self.config
        if config.hashed_user_ids:  # already hashed: only check the salt (a registry without a check value cannot)
            self.set_user_id_salt(salt)
            return
        config.user_ids = [hash_user_id(user, salt) for user in config.user_ids]
        config.hashed_user_ids = True
        config.user_id_salt_check = salt_check(salt)
        self.user_id_salt = salt

    def refresh_population_mixture(self, rows: Sequence[int] | None = None) -> torch.Tensor:
        """Sets the population mixture to the mean mixture of the given rows (all registered users by default)."""
        return self.users.refresh(rows)

    def user_mixture_weights(self) -> torch.Tensor:
        """Mixture weights `(num_users, num_prototypes)` of every registered user."""
        return self.users.all_mixture_weights()

    @torch.no_grad()
    def truncate_users(self, num_users: int) -> None:
        """
        Unregisters every user after the first `num_users` (their rows and ids), undoing `add_users`: how a failed
        `adapt_users` leaves no user behind. Like `add_users`, call it before an optimizer holds the user table.
        """
        if not 0 <= num_users <= self.num_users:
            raise ValueError(f"`num_users` must be between 0 and {self.num_users}, got {num_users}.")
        if num_users == self.num_users:
            return
        self.users.truncate(num_users)
        self.config.user_ids = list(self.config.user_ids)[:num_users]
        self.config.num_user_posteriors = int(self.users.posterior_rows.numel())

    # ------------------------------------------------------------------ adaptation prior and posteriors
    def adaptation_prior(self) -> PalAdaptationPrior:
        """
        The prior of few-shot adaptation on a new user's mixture logits: `config.adaptation_prior` when it was learned
        (`PalRewardTrainer.fit_adaptation_prior`), else a Gaussian with the mean and spread of the registered users
        without a posterior (the users the model was trained on) at strength 1, with `learned=False`.
        """
        device = self.population_mixture.device
        prior = self.config.adaptation_prior
        if prior is not None:
            return PalAdaptationPrior(
                mean=torch.tensor(prior["mean"], dtype=torch.float32, device=device),
                std=torch.tensor(prior["std"], dtype=torch.float32, device=device),
                strength=float(prior["strength"]),
                learned=True,
                method=prior.get("method", "gaussian"),
                bandwidth=float(prior.get("bandwidth", 0.0)),
            )
        mean, std = self.population_prior_statistics(self.trained_user_rows())
        return PalAdaptationPrior(mean=mean, std=std, strength=1.0, learned=False)

    def trained_user_rows(self) -> list[int]:
        """Rows of the registered users without a few-shot posterior: the users the model was trained on."""
        trained = torch.ones(self.num_users, dtype=torch.bool)
        trained[self.users.posterior_rows.cpu()] = False
        return trained.nonzero().flatten().tolist()

    @torch.no_grad()
    def population_prior_statistics(
        self, rows: Sequence[int] | None = None, min_std: float = 0.05
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Mean and standard deviation `(K,)`, `(K,)` of the given users' mixture logits (all users by default), each user's
        logits centred first (a softmax does not change when a constant is added to every logit, so only the centred
        logits mean anything). The spread is at least `min_std`. Without two users: the population logits and 1.
        """
        device = self.population_mixture.device
        logits = full_tensor(self.users.logits.weight).float()
        if rows is not None:
            logits = logits[torch.as_tensor(list(rows), dtype=torch.long, device=logits.device)]
        if logits.shape[0] < 2:
            mean = self.population_logits().float()
            return (mean - mean.mean()).to(device), torch.ones_like(mean, device=device)
        centred = logits - logits.mean(-1, keepdim=True)
        return centred.mean(0).to(device), centred.std(0).clamp(min=min_std).to(device)

    def set_user_posteriors(
        self, rows: Sequence[int], logit_covariance: torch.Tensor, num_comparisons: Sequence[int]
    ) -> None:
        """Stores (or replaces) the posterior covariance of the mixture logits of the given user rows."""
        self.users.set_posteriors(rows, logit_covariance, num_comparisons)
        self.config.num_user_posteriors = int(self.users.posterior_rows.numel())

    def drop_user_posteriors(self, rows: Sequence[int]) -> None:
        """Forgets the stored posteriors of the given user rows (for example once the trainer trains those users)."""
        self.users.drop_posteriors(rows)
        self.config.num_user_posteriors = int(self.users.posterior_rows.numel())

    @torch.no_grad()
    def user_confidence(self, user_ids: Sequence[str] | str) -> PalUserConfidence:
        """
        How well the model knows each user: the number of comparisons its posterior was fitted on, its mixture and the
        mixture's entropy, and the posterior spread of the mixture weights and logits. Users fitted by
        `PalRewardTrainer.adapt_users` have a posterior (see `pal_rm.adaptation`); users the model was
        trained with do not (`num_comparisons=-1`, spreads NaN).

        Example:

        ```python
        >>> trainer.adapt_users(new_users)
        >>> confidence = model.user_confidence(["carol"])
        >>> confidence.num_comparisons, confidence.mixture_std
        ```
        """
        if isinstance(user_ids, str):
            user_ids = [user_ids]
        rows = self.user_rows(list(user_ids))
        temperature = self.users.temperature
        weights = self.users.mixture_weights(self.users.logits(rows).float())
        entropy = -(weights * weights.clamp(min=1e-12).log()).sum(-1)
        index = self.users.posterior_index(rows)
        k = self.config.num_prototypes
        has = index >= 0
        covariance = torch.full((rows.numel(), k, k), float("nan"), device=rows.device)
        counts = torch.full((rows.numel(),), -1, dtype=torch.long, device=rows.device)
        if has.any():
            covariance[has] = self.users.posterior_covariance[index[has]].to(rows.device)
            counts[has] = self.users.posterior_comparisons[index[has]].to(rows.device)
        # Delta method: d w / d z = (diag(w) - w w^T) / temperature.
        jacobian = (torch.diag_embed(weights) - weights.unsqueeze(-1) * weights.unsqueeze(-2)) / temperature
        weight_covariance = jacobian @ covariance @ jacobian.transpose(-1, -2)
        return PalUserConfidence(
            num_comparisons=counts.cpu(),
            mixture_weights=weights.cpu(),
            mixture_entropy=entropy.cpu(),
            mixture_std=weight_covariance.diagonal(dim1=-2, dim2=-1).clamp(min=0).sqrt().cpu(),
            logit_covariance=covariance.cpu(),
        )

    def reward_std(
        self,
        item_features: torch.Tensor,
        prompt_features: torch.Tensor | None,
        user_rows: torch.LongTensor,
    ) -> torch.Tensor:
        """
        Posterior standard deviation `(N,)` of each row's reward for its user (delta method on the stored posterior
        of the user's mixture logits); NaN for rows whose user has no stored posterior (see [`user_confidence`]).
        """
        index = self.users.posterior_index(user_rows)
        spread = torch.full((user_rows.numel(),), float("nan"), device=user_rows.device)
        has = index >= 0
        if not has.any():
            return spread
        with torch.enable_grad():
            logits = self.users.logits.weight[user_rows[has]].detach().float().clone().requires_grad_(True)
            weights = self.users.mixture_weights(logits)
            prompts = prompt_features[has] if prompt_features is not None else None
            rewards = self.rewards_from_features(item_features[has], prompts, weights).logits
            (gradient,) = torch.autograd.grad(rewards.sum(), logits)
        covariance = self.users.posterior_covariance[index[has]].to(gradient.device)
        variance = torch.einsum("nk,nkl,nl->n", gradient, covariance, gradient).clamp(min=0)
        spread[has] = variance.sqrt().to(spread.device)
        return spread

    def prototype_reward_differences(
        self, chosen_embeddings: torch.Tensor, rejected_embeddings: torch.Tensor, points: torch.Tensor
    ) -> torch.Tensor | None:
        """
        For similarities linear in the ideal point (`PalSimilarity.linear_in_ideal_point`: `neg_sq_l2`, `dot`), each
        pair's reward difference for each prototype alone `(num_pairs, K)`: the pair's difference for any mixture is
        then the mixture-weighted sum of these (the `||a||^2` terms of `neg_sq_l2` cancel between chosen and rejected).
        `None` for the other similarities.
        """
        if not self.similarity.linear_in_ideal_point:
            return None
        return self.similarity(chosen_embeddings.unsqueeze(1), points) - self.similarity(
            rejected_embeddings.unsqueeze(1), points
        )

    def pair_reward_differences(
        self,
        chosen_embeddings: torch.Tensor,
        rejected_embeddings: torch.Tensor,
        points: torch.Tensor,
        mixture_weights: torch.Tensor,
        prototype_differences: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        `r(chosen) - r(rejected)` `(num_pairs,)` from the item embeddings, the prototype points `(num_pairs, K, d)` and
        per-pair mixture weights `(num_pairs, K)`; pass [`prototype_reward_differences`] to skip the similarity.
        """
        if prototype_differences is not None:
            return (mixture_weights * prototype_differences).sum(-1)
        ideal = torch.einsum("bk,bkd->bd", mixture_weights, points)
        return self.similarity(chosen_embeddings, ideal) - self.similarity(rejected_embeddings, ideal)

    # ------------------------------------------------------------------ forward
    def check_features(self, features: torch.Tensor, name: str) -> torch.Tensor:
        """`features` `(batch_size, hidden_size)` in the heads' dtype; a `ValueError` naming `name` on another shape."""
        if features.dim() != 2 or features.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"`{name}` must have shape (batch_size, {self.config.hidden_size}) (the backbone's pooled width), got "
                f"{tuple(features.shape)}. Features must come from the same backbone and pooling as the model."
            )
        return features.to(self.item_head.layers[-1].weight.dtype)

    def encode(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
    ) -> torch.Tensor:
        """
        Runs the backbone and pools its last hidden states: `phi(x)`, of shape `(batch_size, hidden_size)`. Left-padded
        rows get position ids that start at their first token, so padding side does not change the reward. A two-tower
        image-text backbone embeds the texts (captions) with its text tower (`get_text_features`).
        """
        if self.backbone is None:
            raise ValueError(
                "This PAL model has no backbone (`backbone_config=None`): pass pooled `item_features` / "
                "`prompt_features` instead of token ids."
            )
        if self.is_image_model:
            kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
            if attention_mask is not None and bool((attention_mask[:, 0] == 0).any()):
                kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            return _pooled(self.backbone.get_text_features(**kwargs))
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        if attention_mask is not None and self._backbone_takes_position_ids():
            valid = attention_mask > 0
            if bool((~valid[:, 0]).any()):  # left padding: count positions from each row's first token
                kwargs["position_ids"] = (valid.long().cumsum(-1) - 1).clamp(min=0)
        hidden_states = self.backbone(**kwargs).last_hidden_state
        return pool_hidden_states(hidden_states, attention_mask, self.config.pooling)

    def encode_images(self, pixel_values: torch.FloatTensor) -> torch.Tensor:
        """
        The image embeddings `(batch_size, hidden_size)` of a two-tower image-text backbone (`get_image_features`) for
        `pixel_values` from its image processor: `phi(x)` of image items.
        """
        if not self.is_image_model:
            raise ValueError(
                f"This PAL model reads texts (its backbone is {self.config.backbone_config.model_type if self.backbone is not None else 'none'}), "
                "not images: pass `input_ids` (or `item_features`). Image items need a two-tower image-text backbone "
                "such as CLIP or SigLIP."
            )
        dtype = next(self.backbone.parameters()).dtype
        return _pooled(self.backbone.get_image_features(pixel_values=pixel_values.to(dtype)))

    def _backbone_takes_position_ids(self) -> bool:
        cached = self.__dict__.get("_takes_position_ids")
        if cached is None or cached[0] is not self.backbone:
            import inspect

            # A `PeftModel` forwards `**kwargs`: read the signature of the model it wraps.
            backbone = self.backbone.get_base_model() if self.has_backbone_adapter else self.backbone
            takes = "position_ids" in inspect.signature(backbone.forward).parameters
            cached = (self.backbone, takes)
            self.__dict__["_takes_position_ids"] = cached
        return cached[1]

    def _features(self, features, input_ids, attention_mask, token_type_ids, name: str) -> torch.Tensor | None:
        if features is not None:
            return self.check_features(features, f"{name}_features")
        if input_ids is None:
            return None
        if name == "item" and self.is_image_model:
            raise ValueError(IMAGE_MODEL_TAKES_IMAGES)
        input_ids, attention_mask, token_type_ids = self.frame_input_ids(
            input_ids, attention_mask, token_type_ids, name
        )
        return self.check_features(self.encode(input_ids, attention_mask, token_type_ids), f"{name}_features")

    def frame_input_ids(self, input_ids, attention_mask=None, token_type_ids=None, kind: str = "item"):
        """
        Brings token ids to the canonical form the model was trained on (see `sequence_framing`): adds the tokenizer's
        missing special tokens and, for items, the EOS token, so that TRL's model-as-reward path
        (`add_special_tokens=False`, no EOS), `pipeline` (special tokens, no EOS) and the trainer give the same reward
        for the same text. Sequences already in that form are returned unchanged. Returns `(input_ids,
        attention_mask, token_type_ids)`; `token_type_ids` becomes `None` (one segment) for rows that were framed.
        """
        framing = self.config.sequence_framing
        if framing is None:
            if not self.__dict__.get("_warned_no_framing"):
                self.__dict__["_warned_no_framing"] = True
                logger.warning(
                    "This PAL model does not know its tokenizer (`config.sequence_framing` is unset), so token ids are "
                    "scored as given: the reward of a text may then depend on how it was tokenized (special tokens, "
                    "EOS). Call `model.register_tokenizer(tokenizer)` once (the trainer and `score_texts` do it)."
                )
            return input_ids, attention_mask, token_type_ids
        pad_token_id = getattr(self.config.get_text_config(), "pad_token_id", None)
        framed, mask, changed = _frame_batch(input_ids, attention_mask, framing, kind, pad_token_id or 0)
        if not changed:
            return input_ids, attention_mask, token_type_ids
        return framed, mask, None

    def register_tokenizer(self, tokenizer) -> None:
        """
        Records the tokenizer this model reads texts with (its framing and a fingerprint of its vocabulary, in
        `config.sequence_framing`), or checks that `tokenizer` is that tokenizer. A tokenizer with another vocabulary
        (smaller or larger) is an error: token ids would silently mean other tokens. The trainer, `score_texts` and
        `PalRewardFunction` call it; `from_backbone` records the backbone's own tokenizer when it can load it.
        """
        if self.backbone is None:
            return
        vocab_size = getattr(self.config.get_text_config(), "vocab_size", None)
        model_type = self.config.backbone_config.model_type
        if vocab_size is not None and len(tokenizer) > vocab_size:
            raise ValueError(
                f"The tokenizer ({type(tokenizer).__name__}, {len(tokenizer)} tokens) does not match the backbone "
                f"({model_type}, vocabulary of {vocab_size}): it has more tokens than the backbone has embeddings. Use "
                "the tokenizer saved with the model (`AutoTokenizer.from_pretrained(model_path)`)."
            )
        framing = sequence_framing(tokenizer)
        recorded = self.config.sequence_framing
        if recorded is None:
            self.config.sequence_framing = framing
            return
        if recorded.get("tokenizer_fingerprint") != framing["tokenizer_fingerprint"]:
            raise ValueError(
                f"The tokenizer ({type(tokenizer).__name__}, {len(tokenizer)} tokens) does not match the backbone: this "
                f"model was trained with another tokenizer ({recorded.get('vocab_size')} tokens, fingerprint "
                f"{recorded.get('tokenizer_fingerprint')}, this one {framing['tokenizer_fingerprint']}). Use the "
                "tokenizer saved with the model (`AutoTokenizer.from_pretrained(model_path)`)."
            )

    def resolve_mixture_weights(self, user_ids=None, mixture_weights=None, batch_size: int = 1) -> torch.Tensor:
        """
        Mixture weights `(batch_size, num_prototypes)` for user rows (a `LongTensor`; `-1` is the population), string
        user ids, an explicit mixture (`(K,)` or `(batch_size, K)` on the simplex), or the population mixture.
        """
        device = self.population_mixture.device
        num_prototypes = self.config.num_prototypes
        if user_ids is not None and mixture_weights is not None:
            raise ValueError("Pass either `user_ids` or `mixture_weights`, not both.")
        if mixture_weights is not None:
            weights = torch.as_tensor(mixture_weights, dtype=torch.float32, device=device)
            if weights.dim() == 1:
                weights = weights.unsqueeze(0)
            if weights.dim() != 2 or weights.shape[-1] != num_prototypes:
                raise ValueError(
                    f"`mixture_weights` must have shape ({num_prototypes},) or (batch_size, {num_prototypes}), got "
                    f"{tuple(weights.shape)}."
                )
            if (weights < -1e-6).any() or not torch.allclose(weights.sum(-1), torch.ones(1, device=device), atol=1e-4):
                raise ValueError(
                    "`mixture_weights` must lie on the simplex (non-negative, each row summing to 1), got "
                    f"{weights.tolist()}."
                )
            return tile_rows(weights, batch_size, "mixture_weights")
        if user_ids is None:
            default = self.default_mixture if self.default_mixture is not None else self.population_mixture
            return default.to(device).unsqueeze(0).expand(batch_size, -1)
        if isinstance(user_ids, str):
            user_ids = [user_ids]
        if not isinstance(user_ids, torch.Tensor):
            user_ids = self.user_rows(list(user_ids))
        rows = tile_rows(user_ids.to(device).long().view(-1), batch_size, "user_ids")
        return self.users(rows)

    def prototype_points(self, prompt_features: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        """The K prototype points of each row, `(batch_size, K, d)`: fixed points (PAL-A) or maps of the prompt (PAL-B)."""
        return self.prototype_head(prompt_features, batch_size)

    def rewards_from_features(
        self,
        item_features: torch.Tensor,
        prompt_features: torch.Tensor | None = None,
        mixture_weights: torch.Tensor | None = None,
    ) -> PalRewardModelOutput:
        """Rewards from pooled features and per-row mixture weights `(batch_size, K)` (no backbone call)."""
        item_embeddings = self.item_head(item_features)
        batch_size = item_embeddings.shape[0]
        points = self.prototype_points(prompt_features, batch_size)
        weights = mixture_weights.to(points.dtype)
        ideal_points = torch.einsum("bk,bkd->bd", weights, points)
        rewards = self.similarity(item_embeddings, ideal_points)
        prototype_rewards = self.similarity(item_embeddings.unsqueeze(1), points)
        return PalRewardModelOutput(
            logits=rewards.unsqueeze(-1),
            prototype_rewards=prototype_rewards,
            mixture_weights=weights,
            item_embeddings=item_embeddings,
            ideal_points=ideal_points,
        )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        user_ids: torch.LongTensor | Sequence[str] | None = None,
        mixture_weights: torch.Tensor | None = None,
        prompt_input_ids: torch.LongTensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        prompt_token_type_ids: torch.LongTensor | None = None,
        item_features: torch.Tensor | None = None,
        prompt_features: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> PalRewardModelOutput | tuple:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
                Prompt + response tokens of the sequences to score, left or right padded. Sequences that lack the
                tokenizer's special tokens or the EOS token are brought to the canonical form first
                ([`~PalRewardModel.frame_input_ids`]), so the reward of a text does not depend on how it was tokenized.
            user_ids (`torch.LongTensor` of shape `(batch_size,)` or `(num_pairs,)`, or a list of `str`, *optional*):
                Rows of the user table (`-1`: the population mixture) or registered string ids. A tensor with fewer
                rows than the batch is tiled (TRL's chosen-then-rejected layout). `None`: the population mixture.
            mixture_weights (`torch.Tensor` of shape `(num_prototypes,)` or `(batch_size, num_prototypes)`, *optional*):
                An explicit point of the simplex to score for, instead of users.
            prompt_input_ids (`torch.LongTensor` of shape `(batch_size or num_pairs, prompt_length)`, *optional*):
                The prompts alone; required by PAL-B. Tiled like `user_ids` when there are fewer prompts than sequences.
            item_features (`torch.FloatTensor` of shape `(batch_size, hidden_size)`, *optional*):
                Pooled backbone features of the sequences, instead of `input_ids` (cached embeddings).
            prompt_features (`torch.FloatTensor` of shape `(batch_size or num_pairs, hidden_size)`, *optional*):
                Pooled backbone features of the prompts, instead of `prompt_input_ids`.
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`, *optional*):
                The images to score, from the backbone's image processor, for a two-tower image-text backbone (CLIP,
                SigLIP), instead of `input_ids`; the captions go in `prompt_input_ids`.
        """
        kwargs.pop("use_cache", None)
        kwargs.pop("labels", None)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if pixel_values is not None:
            if item_features is not None or input_ids is not None:
                raise ValueError("Pass the items once: `pixel_values`, `input_ids` or `item_features`.")
            item_features = self.encode_images(pixel_values)
        items = self._features(item_features, input_ids, attention_mask, token_type_ids, "item")
        if items is None:
            what = "`pixel_values`" if self.is_image_model else "`input_ids` (with `attention_mask`)"
            raise ValueError(f"Pass the items to score as {what} or `item_features`.")
        prompts = None
        if self.needs_prompt:  # PAL-A's ideal points do not depend on the prompt
            prompts = self._features(
                prompt_features, prompt_input_ids, prompt_attention_mask, prompt_token_type_ids, "prompt"
            )
            if prompts is None:
                raise ValueError(PAL_B_NEEDS_PROMPT)
        weights = self.resolve_mixture_weights(user_ids, mixture_weights, items.shape[0])
        output = self.rewards_from_features(items, prompts, weights)
        return output if return_dict else output.to_tuple()

    def set_default_mixture(self, user_id: str | None = None, mixture_weights=None) -> None:
        """
        Chooses what rows without a user are scored for: a registered user's mixture, an explicit point of the simplex,
        or (both `None`) the population mixture again. This is how single-sequence entry points (`pipeline`, TRL's
        model-as-reward path, PPO's `score`) score for one user. It is a runtime setting, not saved with the model.
        """
        if user_id is not None and mixture_weights is not None:
            raise ValueError("Pass either `user_id` or `mixture_weights`, not both.")
        if user_id is not None:
            row = self.user_rows([user_id])
            self.default_mixture = self.resolve_mixture_weights(row, None, 1)[0].detach()
        elif mixture_weights is not None:
            self.default_mixture = self.resolve_mixture_weights(None, mixture_weights, 1)[0].detach()
        else:
            self.default_mixture = None

    def score(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """
        The classic PPO reward-head contract (`trl.experimental.utils.get_reward`): per-token rewards `(batch, length,
        1)` from the backbone's last hidden states, where position t holds the reward of the sequence ending at t.
        Exact for PAL-A with `pooling="last"`; scores for the default mixture (see `set_default_mixture`).
        """
        if self.needs_prompt:
            raise ValueError(PAL_B_NEEDS_PROMPT)
        if self.config.pooling != "last":
            raise ValueError(
                f"`score(hidden_states)` rewards every token as the end of a sequence, which matches the model only for "
                f"`pooling='last'` (this model pools with {self.config.pooling!r}). Use `forward` or `score_texts`."
            )
        embeddings = self.item_head(hidden_states.to(self.item_head.layers[-1].weight.dtype))
        weights = self.resolve_mixture_weights(None, None, 1).to(embeddings.dtype)
        ideal_point = torch.einsum("bk,bkd->bd", weights, self.prototype_head(None, 1))[0]
        return self.similarity(embeddings, ideal_point).unsqueeze(-1)

    # ------------------------------------------------------------------ text API (see `PalTextScorer`)
    def text_scorer(self, tokenizer, max_length: int | None = None, batch_size: int = 32) -> "PalTextScorer":
        """A [`PalTextScorer`]: this model reading texts with `tokenizer` (checked against the model's tokenizer)."""
        return PalTextScorer(self, tokenizer, max_length=max_length, batch_size=batch_size)

    def image_scorer(self, processor, batch_size: int = 32, convert_to_rgb: bool = False) -> "PalImageScorer":
        """A [`PalImageScorer`]: this image model reading images and captions with `processor` (checked)."""
        return PalImageScorer(self, processor, batch_size=batch_size, convert_to_rgb=convert_to_rgb)

    def score_images(
        self,
        processor,
        prompts: Sequence[str] | None,
        images: Sequence,
        users: Sequence[str | None] | str | None = None,
        mixture_weights: torch.Tensor | None = None,
        batch_size: int = 32,
        unknown_users: str = "error",
        return_prototype_rewards: bool = False,
        convert_to_rgb: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """
        Rewards `(N,)` of `images[i]` as a response to the caption `prompts[i]` for `users[i]` (a registered id;
        `None`: the population), for one user for every row, for an explicit mixture, or for the population mixture
        ([`PalImageScorer.score`]); the image counterpart of [`score_texts`], for a two-tower image-text backbone.
        Images are PIL images, file paths, encoded bytes, `{"bytes", "path"}` dicts (a `datasets.Image(decode=False)`
        column) or `(height, width, 3)` uint8 arrays, and must be RGB: other modes (grayscale, RGBA, palette) are an
        error unless `convert_to_rgb=True`. `prompts` may be `None` for PAL-A, whose ideal points ignore the caption.

        Example:

        ```python
        >>> processor = AutoProcessor.from_pretrained("openai/clip-vit-base-patch32")
        >>> rewards = model.score_images(processor, ["a red fox"] * 2, [image_a, image_b], users="alice")
        ```
        """
        return self.image_scorer(processor, batch_size, convert_to_rgb).score(
            prompts,
            images,
            users=users,
            mixture_weights=mixture_weights,
            unknown_users=unknown_users,
            return_prototype_rewards=return_prototype_rewards,
        )

    def encode_texts(
        self,
        tokenizer,
        texts: Sequence[str],
        batch_size: int = 32,
        max_length: int | None = None,
        show_progress: bool = False,
        deduplicate: bool = True,
    ) -> torch.Tensor:
        """
        Pooled backbone features `(len(texts), hidden_size)` of texts, in float32 on the CPU ([`PalTextScorer.encode`]:
        batched by length, truncated from the left, each distinct text encoded once unless `deduplicate=False`).
        """
        scorer = self.text_scorer(tokenizer, max_length, batch_size)
        return scorer.encode(texts, show_progress=show_progress, deduplicate=deduplicate)

    def score_texts(
        self,
        tokenizer,
        prompts: Sequence,
        responses: Sequence,
        users: Sequence[str | None] | str | None = None,
        mixture_weights: torch.Tensor | None = None,
        batch_size: int = 32,
        max_length: int | None = None,
        unknown_users: str = "error",
        return_prototype_rewards: bool = False,
        allow_empty_responses: bool = False,
        return_uncertainty: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """
        Rewards `(N,)` of `responses[i]` to `prompts[i]` for `users[i]` (a registered id; `None`: the population), for
        one user for every row (`users="alice"`), for an explicit mixture, or for the population mixture
        ([`PalTextScorer.score`]). Prompts and responses are plain strings or conversations (lists of `{"role",
        "content"}` messages). An empty response is an error unless `allow_empty_responses=True` (a policy may generate
        one during RL).

        `return_prototype_rewards=True` also returns each row's reward for each prototype `(N, K)`;
        `return_uncertainty=True` also returns (last) the posterior standard deviation of each reward `(N,)` for users
        fitted by `adapt_users` (NaN for rows without such a user: trained users, the population, explicit mixtures).

        Example:

        ```python
        >>> rewards = model.score_texts(tokenizer, ["Write a haiku."] * 2, ["Short.", "A long answer..."], users="alice")
        ```
        """
        return self.text_scorer(tokenizer, max_length, batch_size).score(
            prompts,
            responses,
            users=users,
            mixture_weights=mixture_weights,
            unknown_users=unknown_users,
            return_prototype_rewards=return_prototype_rewards,
            allow_empty_responses=allow_empty_responses,
            return_uncertainty=return_uncertainty,
        )


class PalTextScorer:
    """
    A PAL model reading texts with its tokenizer: the one place where prompt/response pairs (strings or conversations)
    become the texts the backbone reads ([`format_preference_texts`]), texts become token ids in the model's canonical
    framing, truncated from the left ([`tokenize_texts`]), and token ids become pooled features, batched by length
    with every distinct text encoded once. [`PalRewardModel.score_texts`], [`PalRewardModel.encode_texts`],
    `PalRewardFunction`, best-of-n, the trainer and the feature store read texts through it.

    Args:
        model ([`PalRewardModel`]): the reward model (with a backbone).
        tokenizer: the tokenizer saved with the model; another vocabulary is an error ([`PalRewardModel.register_tokenizer`]).
        max_length (`int`, *optional*): truncation length in tokens (from the left, so the end of a response survives a
            long prompt). Defaults to the smallest of 512 and the tokenizer's and the backbone's limits.
        batch_size (`int`, *optional*, defaults to 32): texts per backbone call.

    Example:

    ```python
    >>> scorer = PalTextScorer(model, tokenizer)
    >>> rewards = scorer.score(["Write a haiku."] * 2, ["Short.", "A long answer..."], users="alice")
    ```
    """

    def __init__(self, model: "PalRewardModel", tokenizer, max_length: int | None = None, batch_size: int = 32):
        if model.backbone is None:
            raise ValueError("This PAL model has no backbone: it scores pooled features, not texts.")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        model.register_tokenizer(tokenizer)
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length or default_max_length(tokenizer, model.config)
        self.batch_size = batch_size

    def format_pair(self, prompt, response, row: int | None = None, allow_empty: bool = False) -> tuple[str, str]:
        """`(prompt_text, item_text)` of one response, as the backbone reads it (see [`format_preference_texts`])."""
        return format_preference_texts(self.tokenizer, prompt, response, row=row, allow_empty=allow_empty)

    def format_pairs(self, prompts: Sequence, responses: Sequence, allow_empty: bool = False) -> list[tuple[str, str]]:
        """[`format_pair`] of every row; rows are named in errors by their position."""
        prompts, responses = list(prompts), list(responses)
        if len(prompts) != len(responses):
            raise ValueError(f"Got {len(prompts)} prompts and {len(responses)} responses; they must pair up.")
        return [
            self.format_pair(p, r, row=i, allow_empty=allow_empty) for i, (p, r) in enumerate(zip(prompts, responses))
        ]

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of texts in the model's canonical framing, truncated from the left to `max_length`."""
        return tokenize_texts(self.tokenizer, texts, self.model.config.sequence_framing, self.max_length)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], show_progress: bool = False, deduplicate: bool = True) -> torch.Tensor:
        """
        Pooled backbone features `(len(texts), hidden_size)` of texts, in float32 on the CPU: each distinct text is
        encoded once, in batches of texts of similar length. `deduplicate=False` encodes every text given (processes
        that must make the same number of backbone calls, as under FSDP, pad their share with repeats).
        """
        model, tokenizer = self.model, self.tokenizer
        texts = list(texts)
        distinct = list(dict.fromkeys(texts)) if deduplicate else texts
        if len(distinct) < len(texts):
            position = {text: i for i, text in enumerate(distinct)}
            return self.encode(distinct, show_progress=show_progress)[[position[text] for text in texts]]
        pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # A two-tower text tower may pool a fixed position (SigLIP pools the last one), so captions are padded to
        # `max_length` as its processor pads them: a caption's features never depend on the rest of its batch.
        pad_to = self.max_length if model.is_image_model else None
        order = sorted(range(len(texts)), key=lambda index: len(texts[index]))
        device = model.item_head.layers[-1].weight.device

        def encode_batch(index: list[int]) -> torch.Tensor:
            ids = self.tokenize([texts[i] for i in index])
            return model.encode(*pad_token_ids(ids, pad_token_id or 0, device, length=pad_to))

        return encode_in_batches(model, order, self.batch_size, encode_batch, "texts", show_progress)

    def pair_features(
        self, prompts: Sequence, responses: Sequence, allow_empty: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        `(item_features, prompt_features)` of prompt/response pairs on the model's device, each distinct text encoded
        once; `prompt_features` is `None` for a model whose ideal points do not depend on the prompt (PAL-A).
        """
        return self._features_of_pairs(self.format_pairs(prompts, responses, allow_empty=allow_empty))

    def _features_of_pairs(self, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.model.is_image_model:
            raise ValueError(IMAGE_MODEL_TAKES_IMAGES)
        use_prompts = self.model.needs_prompt
        texts = [item for _, item in pairs] + ([prompt for prompt, _ in pairs] if use_prompts else [])
        features = self.encode(texts).to(self.model.item_head.layers[-1].weight.device)
        return features[: len(pairs)], features[len(pairs) :] if use_prompts else None

    @torch.no_grad()
    def score(
        self,
        prompts: Sequence,
        responses: Sequence,
        users: Sequence[str | None] | str | None = None,
        mixture_weights: torch.Tensor | None = None,
        unknown_users: str = "error",
        return_prototype_rewards: bool = False,
        allow_empty_responses: bool = False,
        return_uncertainty: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Rewards `(N,)` of `responses[i]` to `prompts[i]`: see [`PalRewardModel.score_texts`]."""
        model = self.model
        pairs = self.format_pairs(prompts, responses, allow_empty=allow_empty_responses)
        if isinstance(users, str):
            users = [users] * len(pairs)
        user_rows = None
        if users is not None:
            users = list(users)
            if len(users) != len(pairs):
                raise ValueError(f"Got {len(users)} users for {len(pairs)} responses; pass one user per response.")
            user_rows = model.user_rows(users, unknown_users=unknown_users)
        item_features, prompt_features = self._features_of_pairs(pairs)
        output = model(
            item_features=item_features,
            prompt_features=prompt_features,
            user_ids=user_rows,
            mixture_weights=mixture_weights,
        )
        rewards = output.logits.squeeze(-1).float().cpu()
        extras = [output.prototype_rewards.float().cpu()] if return_prototype_rewards else []
        if return_uncertainty:
            rows = user_rows if user_rows is not None else torch.full((len(pairs),), -1, dtype=torch.long)
            spread = model.reward_std(item_features, prompt_features, rows.to(item_features.device)).cpu()
            without = rows.cpu()[spread.isnan()]
            if (without >= 0).any():
                logger.warning_once(
                    "`score_texts(return_uncertainty=True)`: some users have no posterior (they were trained with the "
                    "model, not fitted by `adapt_users`); their reward spread is NaN."
                )
            extras.append(spread)
        return (rewards, *extras) if extras else rewards


IMAGE_KEY_PREFIX = b"pal-rm image\x00"


def load_image(image, where: str = "", convert_to_rgb: bool = False):
    """
    One image as an RGB `PIL.Image.Image`, from a PIL image, a file path, encoded bytes, a `{"bytes", "path"}` dict (a
    `datasets.Image(decode=False)` cell) or a `(height, width, 3)` uint8 array. An image that cannot be decoded is a
    `ValueError` naming `where`; so is one that is not RGB (grayscale, RGBA, palette, CMYK, ...) unless
    `convert_to_rgb=True`, which converts it (transparent pixels composited on white).
    """
    import io

    from PIL import Image, UnidentifiedImageError

    source = image
    try:
        if isinstance(image, dict):
            if image.get("bytes") is not None:
                image = Image.open(io.BytesIO(image["bytes"]))
            elif image.get("path"):
                image = Image.open(image["path"])
            else:
                raise ValueError("the dict has neither `bytes` nor `path`")
        elif isinstance(image, (bytes, bytearray)):
            image = Image.open(io.BytesIO(image))
        elif isinstance(image, (str, os.PathLike)):
            image = Image.open(image)
        elif hasattr(image, "__array_interface__") and not isinstance(image, Image.Image):
            import numpy as np

            array = np.asarray(image)
            if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
                raise ValueError(
                    f"an array image must be (height, width, 3) uint8 RGB, got {array.shape} {array.dtype}"
                )
            image = Image.fromarray(array)
        elif not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL image, a path, bytes or an array, got {type(image).__name__}")
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, TypeError, SyntaxError) as error:
        shown = f" ({source!r:.80})" if isinstance(source, (str, os.PathLike)) else ""
        raise ValueError(f"Image {where}{shown} could not be read as an image: {error}.") from None
    if image.mode != "RGB":
        if not convert_to_rgb:
            raise ValueError(
                f"Image {where} is a {image.mode!r} image ({_MODE_NAMES.get(image.mode, 'not RGB')}); PAL scores RGB "
                "images, so that a grayscale or transparent image never changes meaning silently. Convert it first "
                "(`image.convert('RGB')`), or pass `convert_to_rgb=True`."
            )
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, rgba).convert("RGB")
        else:
            image = image.convert("RGB")
    return image


_MODE_NAMES = {
    "L": "grayscale",
    "LA": "grayscale with transparency",
    "1": "black and white",
    "I": "32-bit grayscale",
    "I;16": "16-bit grayscale",
    "F": "floating-point grayscale",
    "P": "palette",
    "PA": "palette with transparency",
    "RGBA": "RGB with transparency",
    "CMYK": "CMYK",
    "YCbCr": "YCbCr",
    "HSV": "HSV",
}


def image_key(image) -> bytes:
    """The key of an RGB image by its content (SHA-1 of its size and pixels, 20 bytes): the same pixels in any file
    format or path have one key, and it never equals the key of a text."""
    digest = hashlib.sha1(IMAGE_KEY_PREFIX)
    digest.update(f"{image.width}x{image.height}".encode())
    digest.update(image.tobytes())
    return digest.digest()


class PalImageScorer:
    """
    A PAL model on a two-tower image-text backbone (CLIP, SigLIP) reading images and captions with the backbone's
    processor: the image counterpart of [`PalTextScorer`]. Images are decoded and checked ([`load_image`]: RGB only
    unless `convert_to_rgb=True`), keyed by their content ([`image_key`]) so that each distinct image is encoded once,
    turned into `pixel_values` by `processor.image_processor` and embedded by the image tower
    ([`PalRewardModel.encode_images`]); captions go through a [`PalTextScorer`] on `processor.tokenizer` and the text
    tower. [`PalRewardModel.score_images`], the trainer and the feature store read images through it.

    Args:
        model ([`PalRewardModel`]): an image model (`model.is_image_model`).
        processor: the backbone's processor (`AutoProcessor.from_pretrained(backbone)`), with `image_processor` and
            `tokenizer`; one whose images do not have the backbone's size, or whose tokenizer has another vocabulary,
            is an error.
        batch_size (`int`, *optional*, defaults to 32): images per backbone call.
        convert_to_rgb (`bool`, *optional*, defaults to `False`): convert grayscale, RGBA and palette images to RGB
            instead of refusing them.
    """

    def __init__(self, model: "PalRewardModel", processor, batch_size: int = 32, convert_to_rgb: bool = False):
        if model.backbone is None or not model.is_image_model:
            raise ValueError(
                "`PalImageScorer` needs a PAL model on a two-tower image-text backbone (CLIP, SigLIP); this one reads "
                "texts (use `score_texts`) or pooled features."
            )
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        image_processor = getattr(processor, "image_processor", None)
        tokenizer = getattr(processor, "tokenizer", None)
        if image_processor is None or tokenizer is None:
            raise ValueError(
                f"An image PAL model needs the backbone's processor, with an image processor and a tokenizer (for "
                f"example `AutoProcessor.from_pretrained(backbone)`), got {type(processor).__name__}."
            )
        self.model = model
        self.processor = processor
        self.image_processor = image_processor
        self.text_scorer = PalTextScorer(model, tokenizer, batch_size=batch_size)
        self.batch_size = batch_size
        self.convert_to_rgb = convert_to_rgb
        self._check_image_size()

    def _check_image_size(self) -> None:
        from PIL import Image

        vision = self.model.config.backbone_config.vision_config
        pixels = self.image_processor([Image.new("RGB", (8, 8))], return_tensors="pt")["pixel_values"]
        expected = (getattr(vision, "num_channels", 3), vision.image_size, vision.image_size)
        if tuple(pixels.shape[1:]) != expected:
            raise ValueError(
                f"The processor's image processor ({type(self.image_processor).__name__}) makes images of shape "
                f"{tuple(pixels.shape[1:])}, but the backbone ({self.model.config.backbone_config.model_type}) takes "
                f"{expected}: it is not this backbone's processor. Use `AutoProcessor.from_pretrained` on the "
                "backbone (or on the saved PAL model)."
            )

    def load_images(self, images: Sequence, name: str = "images") -> list:
        """Every image decoded and checked ([`load_image`]); errors name the position in `name`."""
        if isinstance(images, (str, bytes, os.PathLike, dict)) or hasattr(images, "getpixel"):
            raise TypeError(f"`{name}` must be a list of images, got one {type(images).__name__}.")
        return [load_image(image, f"{name}[{i}]", self.convert_to_rgb) for i, image in enumerate(images)]

    @torch.no_grad()
    def encode(self, images: Sequence, show_progress: bool = False, deduplicate: bool = True) -> torch.Tensor:
        """
        Image embeddings `(len(images), hidden_size)` in float32 on the CPU. Each distinct image (by content) is
        encoded once unless `deduplicate=False`. Images are decoded and checked first ([`load_images`]).
        """
        images = self.load_images(images)
        if deduplicate:
            keys = [image_key(image) for image in images]
            first = {}
            for index, key in enumerate(keys):
                first.setdefault(key, index)
            if len(first) < len(images):
                position = {key: i for i, key in enumerate(first)}
                distinct = self.encode([images[i] for i in first.values()], show_progress, deduplicate=False)
                return distinct[[position[key] for key in keys]]
        model = self.model
        device = model.item_head.layers[-1].weight.device

        def encode_batch(index: list[int]) -> torch.Tensor:
            pixels = self.image_processor([images[i] for i in index], return_tensors="pt")["pixel_values"]
            return model.encode_images(pixels.to(device))

        return encode_in_batches(
            model, list(range(len(images))), self.batch_size, encode_batch, "images", show_progress
        )

    def encode_prompts(self, prompts: Sequence[str], show_progress: bool = False) -> torch.Tensor:
        """Caption embeddings `(len(prompts), hidden_size)` from the text tower, float32 on the CPU."""
        prompts = list(prompts)
        for row, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"Prompt {row} is {prompt!r}: every image needs a non-empty caption for PAL-B.")
        return self.text_scorer.encode(prompts, show_progress=show_progress)

    def pair_features(
        self, prompts: Sequence[str] | None, images: Sequence
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`(item_features, prompt_features)` on the model's device; `prompt_features` is `None` for PAL-A."""
        device = self.model.item_head.layers[-1].weight.device
        items = self.encode(images).to(device)
        if not self.model.needs_prompt:
            return items, None
        if prompts is None:
            raise ValueError(PAL_B_NEEDS_PROMPT)
        prompts = list(prompts)
        if len(prompts) != len(items):
            raise ValueError(f"Got {len(prompts)} prompts and {len(items)} images; they must pair up.")
        return items, self.encode_prompts(prompts).to(device)

    @torch.no_grad()
    def score(
        self,
        prompts: Sequence[str] | None,
        images: Sequence,
        users: Sequence[str | None] | str | None = None,
        mixture_weights: torch.Tensor | None = None,
        unknown_users: str = "error",
        return_prototype_rewards: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Rewards `(N,)` of `images[i]` for the caption `prompts[i]`: see [`PalRewardModel.score_images`]."""
        model = self.model
        images = list(images)
        if prompts is not None:
            prompts = list(prompts)
            if len(prompts) != len(images):
                raise ValueError(f"Got {len(prompts)} prompts and {len(images)} images; they must pair up.")
        if isinstance(users, str):
            users = [users] * len(images)
        user_rows = None
        if users is not None:
            users = list(users)
            if len(users) != len(images):
                raise ValueError(f"Got {len(users)} users for {len(images)} images; pass one user per image.")
            user_rows = model.user_rows(users, unknown_users=unknown_users)
        item_features, prompt_features = self.pair_features(prompts, images)
        output = model(
            item_features=item_features,
            prompt_features=prompt_features,
            user_ids=user_rows,
            mixture_weights=mixture_weights,
        )
        rewards = output.logits.squeeze(-1).float().cpu()
        if return_prototype_rewards:
            return rewards, output.prototype_rewards.float().cpu()
        return rewards


def encode_in_batches(model, order: list[int], batch_size: int, encode_batch, what: str, show_progress: bool = False):
    """
    Features `(len(order), hidden_size)` in float32 on the CPU, row `i` for item `i`: `encode_batch(positions)` on
    batches of `batch_size` positions taken in `order`, with the model in eval mode (restored after) and a progress bar
    over batches. A non-finite feature is a `ValueError` naming the positions of the `what` it came from.
    """
    features = torch.empty(len(order), model.config.hidden_size, dtype=torch.float32)
    was_training = model.training
    model.eval()
    batches = range(0, len(order), batch_size)
    if show_progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"Encoding {what}", unit="batch")
    try:
        for start in batches:
            index = order[start : start + batch_size]
            pooled = encode_batch(index)
            if not torch.isfinite(pooled).all():
                bad = [index[row] for row in (~torch.isfinite(pooled).all(-1)).nonzero().flatten().tolist()]
                raise ValueError(
                    f"The backbone returned non-finite features (NaN or inf) for {what} {bad[:10]} (positions in "
                    "the list given). Check the backbone's dtype (float16 overflows easily) and weights."
                )
            features[torch.tensor(index)] = pooled.float().cpu()
    finally:
        model.train(was_training)
    return features


def _build_user_registry(user_ids: Sequence[str]) -> dict[str, int]:
    """`{user id: row}` of a registry: built once per change of the registry, never per lookup."""
    return {user: row for row, user in enumerate(user_ids)}


def hash_user_id(user_id: str, salt: str) -> str:
    """The salted hash that replaces `user_id` in a registry saved with hashed user ids."""
    import hashlib

    return "sha256:" + hashlib.sha256(f"{salt}\x00{user_id}".encode()).hexdigest()[:32]


def salt_check(salt: str) -> str:
    """
    A one-way check value of a user id salt (PBKDF2-SHA256, 100,000 iterations), stored in the config of a hashed
    registry so that a wrong salt is detected; the salt itself is never stored.
    """
    import hashlib

    digest = hashlib.pbkdf2_hmac("sha256", salt.encode(), b"pal-rm user id salt check", 100_000)
    return "pbkdf2-sha256:" + digest.hex()[:32]


def default_max_length(tokenizer, config) -> int:
    """The truncation length used when none is given: the smallest of 512, the tokenizer's and the backbone's limits."""
    limits = [512]
    model_max_length = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max_length, int) and 0 < model_max_length < 1_000_000:
        limits.append(model_max_length)
    positions = getattr(config.get_text_config(), "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        limits.append(positions)
    return min(limits)


def pad_token_ids(sequences: Sequence[Sequence[int]], pad_token_id: int, device=None, length: int | None = None):
    """Right-pads lists of token ids into `(input_ids, attention_mask)` tensors, to the longest or to `length`."""
    longest = max((len(ids) for ids in sequences), default=0)
    longest = max(longest, length or 0)
    input_ids = torch.full((len(sequences), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.as_tensor(list(ids), dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return input_ids.to(device), attention_mask.to(device)


def render_messages(tokenizer, messages, add_generation_prompt: bool = False) -> str:
    """A conversation as text: the tokenizer's chat template if it has one, else `role: content` lines."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return "".join(f"{message['role']}: {message['content']}\n" for message in messages)


def _is_conversation(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def format_preference_texts(tokenizer, prompt, response, row=None, allow_empty: bool = False) -> tuple[str, str]:
    """
    `(prompt_text, item_text)` for one response: the item is the prompt followed by the response, as the backbone
    reads it, ending with the tokenizer's EOS token when it has one (TRL's `RewardTrainer` convention; see
    `sequence_framing` for how the model brings token ids from other paths to the same form). Conversations are
    rendered with the tokenizer's chat template. Raises `ValueError` naming the row on empty or ill-typed texts.
    """
    where = f" (row {row})" if row is not None else ""
    if prompt is None:
        prompt = ""
    if _is_conversation(response) or (_is_conversation(prompt) and prompt):
        if isinstance(prompt, str) or isinstance(response, str):
            raise ValueError(
                f"Prompt and response must both be conversations or both be strings{where}, got "
                f"{type(prompt).__name__} and {type(response).__name__}."
            )
        if not allow_empty and (not response or not any(str(m["content"]).strip() for m in response)):
            raise ValueError(f"Empty response{where}: every response needs some text.")
        prompt_text = render_messages(tokenizer, prompt, add_generation_prompt=True) if prompt else ""
        return prompt_text, _append_eos(tokenizer, render_messages(tokenizer, prompt + response))
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise ValueError(
            f"Prompt and response must be strings or lists of messages{where}, got {type(prompt).__name__} and "
            f"{type(response).__name__}."
        )
    if not allow_empty and not response.strip():
        raise ValueError(f"Empty response{where}: every response needs some text.")
    return prompt, _append_eos(tokenizer, prompt + response)


def _append_eos(tokenizer, text: str) -> str:
    eos = getattr(tokenizer, "eos_token", None)
    if eos and not text.endswith(eos):
        text = text + eos
    return text


__all__ = [
    "PalCosineSimilarity",
    "PalDotSimilarity",
    "PalMLP",
    "PalNegL2Similarity",
    "PalNegSquaredL2Similarity",
    "PalPreTrainedModel",
    "PalPrototypeMaps",
    "PalPrototypePoints",
    "PalRewardModel",
    "PalRewardModelOutput",
    "PalSimilarity",
    "PalImageScorer",
    "PalTextScorer",
    "PalUsers",
    "register_prototypes",
    "register_similarity",
    "default_max_length",
    "format_preference_texts",
    "frame_token_ids",
    "image_key",
    "load_image",
    "sequence_framing",
    "tokenize_texts",
]
