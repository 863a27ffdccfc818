# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
"""PAL reward model configuration.

This file is copied next to the weights by `save_pretrained`, so it only uses relative imports and the stable public
transformers API.
"""

from collections import Counter

from transformers import (
    CONFIG_MAPPING,
    MODEL_FOR_MASKED_LM_MAPPING,
    MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION_MAPPING,
    AutoConfig,
    PretrainedConfig,
)
from transformers.activations import ACT2FN
from transformers.utils import logging

logger = logging.get_logger(__name__)

# The names `variant` and `similarity` may take: the keys of `modeling_pal.PROTOTYPE_CLASSES` and
# `modeling_pal.SIMILARITY_CLASSES`, which register their classes here (`register_prototypes`, `register_similarity`).
VARIANTS = ["a", "b"]
SIMILARITIES = ["neg_sq_l2", "neg_l2", "cosine", "dot"]
POOLINGS = ("last", "mean", "cls", "projection")
# transformers' activations (`ACT2FN`), and "identity" (transformers' "linear").
ACTIVATIONS = ("identity", *ACT2FN)
BACKBONE_WEIGHTS = ("included", "reference")


def is_image_text_backbone(backbone_config) -> bool:
    """
    Whether `backbone_config` is a two-tower image-text model (CLIP, SigLIP, ALIGN, ...: transformers' zero-shot image
    classification models, with `get_image_features` and `get_text_features`). PAL's items are then images and its
    prompts captions.
    """
    return backbone_config is not None and type(backbone_config) in MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION_MAPPING


def image_text_widths(backbone_config) -> tuple[int, int]:
    """`(image width, text width)` of a two-tower backbone's embeddings: its `projection_dim` (CLIP), else the vision
    tower's hidden size and the text tower's `projection_size` or hidden size (SigLIP)."""
    projection = getattr(backbone_config, "projection_dim", None)
    if projection is not None:
        return projection, projection
    text = backbone_config.get_text_config()
    image = backbone_config.vision_config.hidden_size
    return image, getattr(text, "projection_size", None) or text.hidden_size


def _default_pooling(backbone_config) -> str:
    """`projection` for two-tower image-text backbones, `mean` for bidirectional encoders (BERT-like), `last` non-pad
    token for everything else (decoders)."""
    if is_image_text_backbone(backbone_config):
        return "projection"
    if getattr(backbone_config, "is_decoder", False):
        return "last"
    return "mean" if type(backbone_config) in MODEL_FOR_MASKED_LM_MAPPING else "last"


def _check_adaptation_prior(prior: dict | None, num_prototypes: int) -> dict | None:
    if prior is None:
        return None
    if not isinstance(prior, dict) or not {"mean", "std", "strength"} <= set(prior):
        raise ValueError(
            f"`adaptation_prior` must be a dict with `mean`, `std` and `strength`, got {prior!r}. It is written by "
            "`PalRewardTrainer.fit_adaptation_prior`; remove it from config.json to fall back to the default prior."
        )
    mean, std, strength = prior["mean"], prior["std"], prior["strength"]
    if not (isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == num_prototypes):
        raise ValueError(
            f"`adaptation_prior` needs `mean` and `std` as lists of num_prototypes={num_prototypes} numbers, got "
            f"{mean!r} and {std!r}."
        )
    values = [*mean, *std, strength]
    if not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf") for v in values
    ):
        raise ValueError(f"`adaptation_prior` holds a value that is not a finite number: {prior!r}.")
    if min(std) <= 0 or strength <= 0:
        raise ValueError(f"`adaptation_prior` needs positive `std` and `strength`, got {std!r} and {strength!r}.")
    method = prior.get("method", "gaussian")
    bandwidth = prior.get("bandwidth", 0.0)
    if method not in ("empirical", "gaussian"):
        raise ValueError(f"`adaptation_prior['method']` must be 'empirical' or 'gaussian', got {method!r}.")
    if not isinstance(bandwidth, (int, float)) or not 0 <= bandwidth < float("inf"):
        raise ValueError(f"`adaptation_prior['bandwidth']` must be a number >= 0, got {bandwidth!r}.")
    return {
        "method": method,
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "strength": float(strength),
        "bandwidth": float(bandwidth),
        "selection": prior.get("selection"),
    }


class PalConfig(PretrainedConfig):
    r"""
    Configuration of a [`PalRewardModel`]: a personalized reward model (PAL, Chen et al., ICLR 2025) made of a backbone
    (any `AutoModel`), an item map `f` from the pooled backbone feature to a `preference_dim`-dimensional preference
    space, `num_prototypes` shared prototypes, and one row of mixture logits per registered user.

    Args:
        backbone_config (`PretrainedConfig` or `dict`, *optional*):
            Configuration of the backbone, built with `AutoModel.from_config`. `None` builds a backbone-free model that
            only takes pooled features (`item_features`, `prompt_features`); then `feature_dim` is required.
        variant (`str`, *optional*, defaults to `"a"`):
            `"a"`: prototypes are points of the preference space and the reward depends on the response only.
            `"b"`: prototypes are maps `g_k` of the prompt feature, so the ideal point depends on the prompt.
        num_prototypes (`int`, *optional*, defaults to 2):
            Number of shared prototypes K. Each user is a convex combination of them (K numbers per user).
        preference_dim (`int`, *optional*, defaults to 128):
            Dimension d of the learned preference space.
        head_hidden_dims (`list[int]`, *optional*, defaults to `[]`):
            Hidden layer widths of the item map `f` (and of each prototype map `g_k` of PAL-B). Empty: a linear map.
        head_activation (`str`, *optional*, defaults to `"gelu"`):
            Activation between hidden layers: a name of transformers' `ACT2FN` (`"relu"`, `"gelu"`, `"silu"`,
            `"tanh"`, ...) or `"identity"`.
        head_dropout (`float`, *optional*, defaults to 0.0):
            Dropout before every linear layer of the heads.
        similarity (`str`, *optional*, defaults to `"neg_sq_l2"`):
            Reward of a response given an ideal point: `"neg_sq_l2"` (-||f(x) - a||^2), `"neg_l2"` (-||f(x) - a||),
            `"cosine"` (s * cos(f(x), a) with a learnable logit scale s) or `"dot"` (<f(x), a>).
        pooling (`str`, *optional*):
            How token states become one vector: `"last"` non-pad token, `"mean"` over tokens or `"cls"` (first token).
            Defaults to `"mean"` for bidirectional encoders and `"last"` otherwise. A two-tower image-text backbone
            (CLIP, SigLIP) has its own pooled embeddings (`get_image_features` of the item image, `get_text_features` of
            the prompt caption): its pooling is `"projection"`, the only one it takes.
        mixture_temperature (`float`, *optional*, defaults to 1.0):
            Temperature tau of the softmax that maps a user's logits to mixture weights.
        logit_scale_init (`float`, *optional*, defaults to `1 / 0.07`):
            Initial value of the logit scale s of the `"cosine"` similarity (stored as log s).
        logit_scale_max (`float`, *optional*, defaults to 100.0):
            The logit scale is clamped at this value.
        feature_dim (`int`, *optional*):
            Width H of pooled features. Read from `backbone_config.hidden_size` when there is a backbone (never set both
            to different values); required when `backbone_config` is `None`.
        user_ids (`list[str]`, *optional*, defaults to `[]`):
            The user registry: row `i` of the user table belongs to `user_ids[i]`. Grow it with
            [`PalRewardModel.add_users`].
        hashed_user_ids (`bool`, *optional*, defaults to `False`):
            Whether `user_ids` holds salted hashes of the user ids (see [`PalRewardModel.hash_user_ids`]).
        sequence_framing (`dict`, *optional*):
            The tokenizer this model reads texts with, recorded by [`PalRewardModel.register_tokenizer`]: the special
            tokens it puts around a text (`prefix_ids`, `suffix_ids`), the EOS token appended to responses
            (`eos_token_id`), its size and a fingerprint of its vocabulary. Token ids from any entry point are brought
            to this canonical form, and another tokenizer is refused. `None` until a tokenizer is first used.
        user_id_salt_check (`str`, *optional*):
            A one-way check value of the salt of a hashed registry, so that a wrong salt is detected. The salt itself
            is never stored.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialisation of the user logits.
        backbone_name_or_path (`str`, *optional*):
            Where the backbone's pretrained weights come from (a Hub id or a local folder), recorded by
            [`PalRewardModel.from_backbone`]. A checkpoint that does not hold the backbone weights loads them from here.
        backbone_revision (`str`, *optional*):
            The revision (branch, tag or commit) of `backbone_name_or_path`, when one was given.
        backbone_weights (`str`, *optional*, defaults to `"included"`):
            Where a saved checkpoint keeps the backbone weights: `"included"` (in `model.safetensors`, next to PAL's
            weights) or `"reference"` (not saved: loaded from `backbone_name_or_path` at `backbone_revision`). Written by
            [`PalRewardModel.save_pretrained`], which chooses it (see its `include_backbone` argument).
        backbone_adapter (`dict`, *optional*):
            The PEFT config (`peft_config.to_dict()`) of the adapter (for example LoRA) on the backbone, recorded by
            [`PalRewardModel.add_backbone_adapter`]. A checkpoint then holds the adapter weights in its
            `backbone_adapter/` folder (PEFT's format), and loading re-attaches them. `None`: no adapter.
        backbone_fingerprint (`str`, *optional*):
            A checksum of a sample of the backbone weights as loaded from `backbone_name_or_path` (with their dtypes),
            recorded by [`PalRewardModel.from_backbone`]. Saving by reference checks that the backbone still has these
            weights (not trained, merged or cast since), and loading by reference that the referenced weights are
            still the same.
        adaptation_prior (`dict`, *optional*):
            The population prior of few-shot adaptation of new users on their mixture logits: `{"method": "empirical"
            | "gaussian", "mean": [K floats], "std": [K floats], "strength": float, "bandwidth": float, "selection":
            dict | None}`. `"empirical"`: the trained users' logits blurred by `bandwidth * std`; `"gaussian"`:
            `N(mean, diag(std^2) / strength)`, `mean` and `std` those of the trained users' centred logits. The method
            and its setting were chosen by simulating few-shot adaptation of seen users on their validation
            comparisons (`selection` records the candidates, their scores and the split). Written by
            `PalRewardTrainer.fit_adaptation_prior` (called at the end of `train`). `None`: not learned yet.
        num_user_posteriors (`int`, *optional*, defaults to 0):
            How many users have a stored posterior (the users fitted by `adapt_users`): the size of the
            `user_posterior_*` buffers, so that a checkpoint loads them. Maintained by the model.

    Example:

    ```python
    >>> from transformers import BertConfig
    >>> from pal_rm import PalConfig, PalRewardModel

    >>> config = PalConfig(backbone_config=BertConfig(num_hidden_layers=1), variant="b", num_prototypes=4)
    >>> model = PalRewardModel(config)
    >>> model.add_users(["alice", "bob"])
    ```
    """

    model_type = "pal_rm"
    sub_configs = {"backbone_config": AutoConfig}

    def __init__(
        self,
        backbone_config=None,
        variant: str = "a",
        num_prototypes: int = 2,
        preference_dim: int = 128,
        head_hidden_dims=None,
        head_activation: str = "gelu",
        head_dropout: float = 0.0,
        similarity: str = "neg_sq_l2",
        pooling=None,
        mixture_temperature: float = 1.0,
        logit_scale_init: float = 1 / 0.07,
        logit_scale_max: float = 100.0,
        feature_dim=None,
        user_ids=None,
        hashed_user_ids: bool = False,
        sequence_framing: dict | None = None,
        user_id_salt_check: str | None = None,
        initializer_range: float = 0.02,
        backbone_name_or_path: str | None = None,
        backbone_revision: str | None = None,
        backbone_weights: str = "included",
        backbone_adapter: dict | None = None,
        backbone_fingerprint: str | None = None,
        adaptation_prior: dict | None = None,
        num_user_posteriors: int = 0,
        **kwargs,
    ):
        if isinstance(backbone_config, dict):
            backbone_config = dict(backbone_config)
            if "model_type" not in backbone_config:
                raise ValueError("`backbone_config` given as a dict must contain `model_type`.")
            backbone_config = AutoConfig.for_model(**backbone_config)
        self.backbone_config = backbone_config

        variant = str(variant).lower()
        if variant not in VARIANTS:
            raise ValueError(f"`variant` must be {' or '.join(repr(name) for name in VARIANTS)}, got {variant!r}.")
        if not isinstance(num_prototypes, int) or isinstance(num_prototypes, bool) or num_prototypes < 1:
            raise ValueError(f"`num_prototypes` must be an integer >= 1, got {num_prototypes!r}.")
        if not isinstance(preference_dim, int) or preference_dim < 1:
            raise ValueError(f"`preference_dim` must be an integer >= 1, got {preference_dim!r}.")
        head_hidden_dims = list(head_hidden_dims or [])
        if any((not isinstance(width, int)) or width < 1 for width in head_hidden_dims):
            raise ValueError(f"`head_hidden_dims` must be a list of positive integers, got {head_hidden_dims!r}.")
        if head_activation not in ACTIVATIONS:
            raise ValueError(f"`head_activation` must be one of {ACTIVATIONS}, got {head_activation!r}.")
        if not 0.0 <= head_dropout < 1.0:
            raise ValueError(f"`head_dropout` must be in [0, 1), got {head_dropout!r}.")
        if similarity not in SIMILARITIES:
            raise ValueError(f"`similarity` must be one of {SIMILARITIES}, got {similarity!r}.")
        if mixture_temperature <= 0:
            raise ValueError(f"`mixture_temperature` must be > 0, got {mixture_temperature!r}.")
        if logit_scale_init <= 0 or logit_scale_max < logit_scale_init:
            raise ValueError(
                f"`logit_scale_init` must be > 0 and <= `logit_scale_max`, got {logit_scale_init!r} and "
                f"{logit_scale_max!r}."
            )

        if backbone_config is not None:
            hidden_size = getattr(backbone_config, "hidden_size", None)
            if is_image_text_backbone(backbone_config):
                hidden_size = image_text_widths(backbone_config)[0]
                if pooling not in (None, "projection"):
                    raise ValueError(
                        f"`pooling={pooling!r}` does not apply to a two-tower image-text backbone "
                        f"({backbone_config.model_type}): it pools with its own projections (`pooling='projection'`)."
                    )
            elif pooling == "projection":
                raise ValueError(
                    "`pooling='projection'` is for two-tower image-text backbones (CLIP, SigLIP); "
                    f"{backbone_config.model_type} takes 'last', 'mean' or 'cls'."
                )
            if feature_dim is not None and hidden_size is not None and feature_dim != hidden_size:
                raise ValueError(
                    f"`feature_dim={feature_dim}` disagrees with the backbone's hidden_size={hidden_size}. Leave "
                    "`feature_dim` unset when a backbone is given: it is read from the backbone config."
                )
            feature_dim = None
            if pooling is None:
                pooling = _default_pooling(backbone_config)
        else:
            if feature_dim is None or feature_dim < 1:
                raise ValueError(
                    "A PalConfig without `backbone_config` takes pooled features directly and needs "
                    f"`feature_dim` (a positive integer), got {feature_dim!r}."
                )
            pooling = pooling or "mean"
        if pooling not in POOLINGS:
            raise ValueError(f"`pooling` must be one of {POOLINGS}, got {pooling!r}.")

        user_ids = [str(user) for user in (user_ids or [])]
        if len(set(user_ids)) != len(user_ids):
            counts = Counter(user_ids)
            duplicates = [user for user, count in counts.items() if count > 1]
            shown = ", ".join(repr(user) for user in duplicates[:10])
            if len(duplicates) > 10:
                shown += f" and {len(duplicates) - 10} more"
            raise ValueError(
                f"`user_ids` contains duplicates: {shown}. Every user id must be unique (row `i` of the user table "
                "belongs to `user_ids[i]`); remove the repeated ids from the registry (`user_ids` in config.json)."
            )

        self.variant = variant
        self.num_prototypes = num_prototypes
        self.preference_dim = preference_dim
        self.head_hidden_dims = head_hidden_dims
        self.head_activation = head_activation
        self.head_dropout = float(head_dropout)
        self.similarity = similarity
        self.pooling = pooling
        self.mixture_temperature = float(mixture_temperature)
        self.logit_scale_init = float(logit_scale_init)
        self.logit_scale_max = float(logit_scale_max)
        self.feature_dim = feature_dim
        self.user_ids = user_ids
        self.hashed_user_ids = bool(hashed_user_ids)
        if sequence_framing is not None:
            missing = {"prefix_ids", "suffix_ids", "eos_token_id", "tokenizer_fingerprint"} - set(sequence_framing)
            if missing:
                raise ValueError(f"`sequence_framing` lacks {sorted(missing)}; set it with `register_tokenizer`.")
            sequence_framing = dict(sequence_framing)
        self.sequence_framing = sequence_framing
        self.user_id_salt_check = user_id_salt_check
        self.initializer_range = initializer_range

        if backbone_weights not in BACKBONE_WEIGHTS:
            raise ValueError(f"`backbone_weights` must be one of {BACKBONE_WEIGHTS}, got {backbone_weights!r}.")
        if backbone_weights == "reference" and (backbone_config is None or not backbone_name_or_path):
            raise ValueError(
                "`backbone_weights='reference'` says the checkpoint holds no backbone weights, but "
                f"`backbone_name_or_path` is {backbone_name_or_path!r}"
                + (" and there is no `backbone_config`" if backbone_config is None else "")
                + ": there is nothing to load the backbone from, and it is never initialised at random. Set "
                "`backbone_name_or_path` in config.json to the backbone the model was built on (a Hub id or a local "
                "folder), or save the model again with its backbone (`save_pretrained(..., include_backbone=True)`)."
            )
        if backbone_adapter is not None:
            if not isinstance(backbone_adapter, dict) or "peft_type" not in backbone_adapter:
                raise ValueError(
                    "`backbone_adapter` must be a PEFT config as a dict (`peft_config.to_dict()`, with `peft_type`), got "
                    f"{backbone_adapter!r}. Attach adapters with `PalRewardModel.add_backbone_adapter(peft_config)`."
                )
            if backbone_config is None:
                raise ValueError("`backbone_adapter` needs a backbone: this config has no `backbone_config`.")
            backbone_adapter = dict(backbone_adapter)
        self.backbone_name_or_path = backbone_name_or_path
        self.backbone_revision = backbone_revision
        self.backbone_weights = backbone_weights
        self.backbone_adapter = backbone_adapter
        self.backbone_fingerprint = backbone_fingerprint
        self.adaptation_prior = _check_adaptation_prior(adaptation_prior, num_prototypes)
        if (
            not isinstance(num_user_posteriors, int)
            or isinstance(num_user_posteriors, bool)
            or num_user_posteriors < 0
        ):
            raise ValueError(f"`num_user_posteriors` must be an integer >= 0, got {num_user_posteriors!r}.")
        self.num_user_posteriors = num_user_posteriors

        kwargs["num_labels"] = 1
        kwargs["problem_type"] = "regression"
        kwargs.pop("id2label", None)
        kwargs.pop("label2id", None)
        super().__init__(**kwargs)

    @property
    def item_modality(self) -> str:
        """`"image"` for a two-tower image-text backbone (items are images, prompts are captions), else `"text"`."""
        return "image" if is_image_text_backbone(self.backbone_config) else "text"

    @property
    def hidden_size(self) -> int:
        """Width H of the pooled features (the backbone's hidden size; an image-text backbone's image embedding)."""
        if self.backbone_config is not None:
            if is_image_text_backbone(self.backbone_config):
                return image_text_widths(self.backbone_config)[0]
            return self.backbone_config.hidden_size
        return self.feature_dim

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    def get_text_config(self, *args, **kwargs):
        """The backbone's config (an image-text backbone's text config), so that TRL and transformers set
        `pad_token_id` and friends where they are read."""
        if self.backbone_config is not None:
            if is_image_text_backbone(self.backbone_config):
                return self.backbone_config.get_text_config(*args, **kwargs)
            return self.backbone_config
        return self


# Loaded as a checkpoint's remote code (`trust_remote_code=True`, pal_rm not imported), make the model type known to
# `AutoConfig`, so that a later `AutoTokenizer.from_pretrained(checkpoint)` (which reads config.json) does not stop at
# an interactive trust-remote-code prompt. When pal_rm is installed, its own registration takes precedence.
if PalConfig.model_type not in CONFIG_MAPPING:
    AutoConfig.register(PalConfig.model_type, PalConfig)


__all__ = ["PalConfig"]
