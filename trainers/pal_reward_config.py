# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
from dataclasses import dataclass, field

from trl import RewardConfig


@dataclass
class PalRewardConfig(RewardConfig):
    r"""
    Configuration for [`PalRewardTrainer`]: TRL's [`~trl.RewardConfig`] plus the fields PAL needs. Only the new fields
    are listed here; every other field is TRL's / transformers'.

    Parameters:
        user_column (`str`, *optional*, defaults to `"user_id"`):
            Column of the preference dataset that names the user of each comparison.
        train_backbone (`bool`, *optional*, defaults to `False`):
            The one setting that picks how the backbone is used. `False` (the paper's setting): the backbone is frozen,
            every unique text is encoded once and the heads are trained on cached features. `True`: PAL trains on
            tokens and the backbone trains with it: its PEFT adapter only when it has one (`peft_config=` of the
            trainer, or `model.add_backbone_adapter`), its base weights frozen; otherwise the whole backbone.
        embedding_cache_dir (`str`, *optional*):
            Folder where the frozen-backbone features are kept between runs (one safetensors file per backbone, written
            atomically by the main process; with several machines, a folder they all see). `None`: in memory only.
        encode_batch_size (`int`, *optional*, defaults to `64`):
            Batch size of the backbone when texts (or images) are encoded for the cache.
        convert_images_to_rgb (`bool`, *optional*, defaults to `False`):
            For an image model (a CLIP / SigLIP backbone, `chosen_image` / `rejected_image` columns): convert
            grayscale, RGBA and palette images to RGB. `False`: such an image is an error naming its row.
        feature_dtype (`str`, *optional*, defaults to `"float32"`):
            Storage precision of the frozen-backbone feature table (held once per process, and in
            `embedding_cache_dir`): `"float32"`, or `"float16"` / `"bfloat16"` for half the memory. Features are
            computed in float32, stored once in this dtype and given to the heads as float32; a feature that overflows
            `float16` is an error.
        backbone_learning_rate, adapter_learning_rate, head_learning_rate, prototype_learning_rate,
        user_learning_rate, logit_scale_learning_rate (`float`, *optional*):
            Learning rates of the parameter groups: the backbone (full fine-tuning), the backbone's PEFT adapter (LoRA;
            its base weights stay frozen), the item map `f` and PAL-B's prototype maps, PAL-A's prototype points, the
            user mixture logits and the cosine logit scale. `None`: `learning_rate`.
        loss_type (`str`, *optional*, defaults to `"sigmoid"`):
            `"sigmoid"`: the Bradley-Terry negative log-likelihood on reward differences; `"hinge"`: the hinge variant.
        norm_bound (`float`, *optional*):
            Radius B of the ball the ideal points are pushed into, with penalty `norm_bound_coefficient * max(0,
            ||a|| - B)`. `None`: no penalty.
        unknown_users (`str`, *optional*, defaults to `"error"`):
            What evaluation does with users that are not registered: `"error"`, or `"population"` to score them with
            the population mixture.
        adapt_steps, adapt_learning_rate, adapt_prior_strength:
            Defaults of [`PalRewardTrainer.adapt_users`]: full-batch Adam steps and learning rate (of the Gaussian
            prior's MAP fit), and a Gaussian prior strength to use instead of the learned prior (`None`, the default:
            the prior chosen on validation data by `fit_adaptation_prior`).
        fit_adaptation_prior (`bool`, *optional*, defaults to `True`):
            At the end of `train`, learn the population prior of [`PalRewardTrainer.adapt_users`] from the trained
            users' mixture logits, its form and strength chosen on the `eval_dataset` (seen users fitted again from
            part of their validation comparisons). Stored in `model.config.adaptation_prior`.
        user_table_update (`str`, *optional*, defaults to `"auto"`):
            How the user table is trained. `"sparse"`: per-batch row-wise Adam(W) that touches only the rows of the
            batch's users (O(batch) per step with any number of users; each user's Adam moments advance only on the
            steps that hold its comparisons, see [`~pal_rm.trainers.SparseUserTableAdam`]). `"dense"`: the optimizer
            updates the whole table every step. `"auto"`: sparse on one process or DDP with an Adam optimizer built by
            the trainer and no fp16 scaling, dense otherwise (DeepSpeed, FSDP, fp16, another optimizer).
        hash_user_ids (`bool`, *optional*, defaults to `True`):
            When the trainer uploads to the Hub (`push_to_hub=True`, or `trainer.push_to_hub()`), replace the user ids
            of the model's registry by salted hashes first, so that no uploaded file holds a raw id. The salt is the
            `user_id_salt` argument of [`PalRewardTrainer`] or the `PAL_USER_ID_SALT` environment variable, never a
            field here (these arguments are uploaded as `training_args.bin`). `False` uploads the raw ids.

    > [!NOTE]
    > Defaults that differ from [`~trl.RewardConfig`]: `activation_checkpointing=False` (the deprecated
    > `gradient_checkpointing`) and `bf16=False` (the default
    > frozen backbone trains small heads on cached features, where neither helps), `max_length=None` (sequences are
    > truncated from the left to the backbone's limit instead of being dropped), `learning_rate=1e-3`,
    > `num_train_epochs=20`, `per_device_train_batch_size=64`, `report_to="none"`, `save_strategy="no"` and
    > `save_total_limit=2` (checkpoints of a LoRA or fully trained 7B backbone are large; a frozen backbone's only hold PAL's weights and a
    > reference to the backbone).
    """

    user_column: str = field(default="user_id", metadata={"help": "Column that names the user of each comparison."})
    train_backbone: bool = field(
        default=False,
        metadata={"help": "Train the backbone too. False: freeze it and train the heads on cached features."},
    )
    embedding_cache_dir: str | None = field(
        default=None, metadata={"help": "Folder that keeps frozen-backbone features between runs."}
    )
    encode_batch_size: int = field(default=64, metadata={"help": "Backbone batch size when encoding texts."})
    convert_images_to_rgb: bool = field(
        default=False,
        metadata={"help": "Convert grayscale, RGBA and palette images to RGB (image models); False: refuse them."},
    )
    feature_dtype: str = field(
        default="float32",
        metadata={"help": "Storage dtype of the frozen-backbone feature table: float32, float16 or bfloat16."},
    )
    backbone_learning_rate: float | None = field(
        default=1e-5, metadata={"help": "Learning rate of the backbone (when `train_backbone`)."}
    )
    adapter_learning_rate: float | None = field(
        default=1e-4,
        metadata={
            "help": "Learning rate of the backbone's PEFT adapter (LoRA), when it has one and `train_backbone`."
        },
    )
    head_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Learning rate of the item map and PAL-B prototype maps (None: learning_rate)."},
    )
    prototype_learning_rate: float | None = field(
        default=5e-3, metadata={"help": "Learning rate of PAL-A's prototype points."}
    )
    user_learning_rate: float | None = field(default=5e-3, metadata={"help": "Learning rate of the user logits."})
    logit_scale_learning_rate: float | None = field(
        default=1e-2, metadata={"help": "Learning rate of the cosine similarity's logit scale."}
    )
    loss_type: str = field(default="sigmoid", metadata={"help": "'sigmoid' (Bradley-Terry NLL) or 'hinge'."})
    norm_bound: float | None = field(default=None, metadata={"help": "Radius of the ball for the ideal points."})
    norm_bound_coefficient: float = field(default=1.0, metadata={"help": "Weight of the norm-bound penalty."})
    unknown_users: str = field(
        default="error", metadata={"help": "Evaluation on unregistered users: 'error' or 'population'."}
    )
    adapt_steps: int = field(default=300, metadata={"help": "Full-batch steps of `adapt_users`."})
    adapt_learning_rate: float = field(default=0.1, metadata={"help": "Learning rate of `adapt_users`."})
    adapt_prior_strength: float | None = field(
        default=None,
        metadata={"help": "Gaussian prior strength for adapt_users instead of the learned prior (None: learned)."},
    )
    fit_adaptation_prior: bool = field(
        default=True,
        metadata={"help": "After training, learn the adaptation prior (strength chosen on the eval_dataset)."},
    )
    user_table_update: str = field(
        default="auto",
        metadata={
            "help": "How the user table is trained: 'sparse' (per-batch row-wise Adam on the batch's users), 'dense' "
            "(the optimizer updates the whole table every step) or 'auto' (sparse where it applies)."
        },
    )
    hash_user_ids: bool = field(
        default=True,
        metadata={
            "help": "Upload salted hashes of the user ids, never the raw ids (salt: the trainer's `user_id_salt` or "
            "the PAL_USER_ID_SALT environment variable). False uploads the raw ids."
        },
    )

    # Defaults that differ from RewardConfig
    learning_rate: float = field(default=1e-3, metadata={"help": "Default learning rate of every group."})
    num_train_epochs: float = field(default=20.0, metadata={"help": "Total number of training epochs."})
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Pairs per device per step."})
    per_device_eval_batch_size: int = field(default=256, metadata={"help": "Pairs per device per eval step."})
    # transformers 5 renamed gradient checkpointing to activation checkpointing; `gradient_checkpointing` stays a
    # deprecated alias (TRL defaults it to True). Both unset: off.
    activation_checkpointing: bool | None = field(
        default=None, metadata={"help": "Activation (gradient) checkpointing of the backbone. Default: off."}
    )
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Deprecated alias of `activation_checkpointing` (transformers 5)."}
    )
    bf16: bool | None = field(default=False, metadata={"help": "bf16 mixed precision."})
    max_length: int | None = field(
        default=None, metadata={"help": "Truncation length (from the left). None: the backbone's limit, at most 512."}
    )
    report_to: None | str | list[str] = field(default="none", metadata={"help": "Integrations to report to."})
    save_strategy: str = field(default="no", metadata={"help": "Checkpoint saving strategy."})
    save_total_limit: int | None = field(
        default=2,
        metadata={
            "help": "Checkpoints kept in output_dir (the oldest are deleted; the best one is kept with "
            "`load_best_model_at_end`). None: all."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.loss_type not in ("sigmoid", "hinge"):
            raise ValueError(f"`loss_type` must be 'sigmoid' or 'hinge', got {self.loss_type!r}.")
        if self.unknown_users not in ("error", "population"):
            raise ValueError(f"`unknown_users` must be 'error' or 'population', got {self.unknown_users!r}.")
        if self.user_table_update not in ("auto", "sparse", "dense"):
            raise ValueError(
                f"`user_table_update` must be 'auto', 'sparse' or 'dense', got {self.user_table_update!r}."
            )
        if self.feature_dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(
                f"`feature_dtype` must be 'float32', 'float16' or 'bfloat16', got {self.feature_dtype!r}."
            )
        if self.adapt_prior_strength is not None and not self.adapt_prior_strength > 0:
            raise ValueError(f"`adapt_prior_strength` must be positive or None, got {self.adapt_prior_strength!r}.")
        if self.norm_bound is not None and self.norm_bound <= 0:
            raise ValueError(f"`norm_bound` must be positive, got {self.norm_bound!r}.")
