# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
"""`PalRewardTrainer`: TRL's `RewardTrainer` for personalized PAL reward models."""

import contextlib
import dataclasses
import functools
import json
import os
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import torch
from accelerate.logging import get_logger
from accelerate.utils import str_to_bool
from datasets import Dataset, IterableDataset
from transformers import AutoProcessor, AutoTokenizer, PreTrainedTokenizerBase, Trainer, set_seed
from transformers.data.data_collator import DataCollatorMixin
from transformers.trainer import TRAINER_STATE_NAME, TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import CONFIG_NAME
from trl import RewardTrainer
from trl.data_utils import extract_prompt
from trl.models import get_act_offloading_ctx_manager
from trl.trainer.utils import disable_dropout_in_model, pad

from pal_rm.adaptation import NotEnoughValidationData, embed_pairs, fit_users
from pal_rm.adaptation import fit_adaptation_prior as _fit_adaptation_prior
from pal_rm.cache import (
    FeatureStore,
    ImageColumn,
    backbone_fingerprint,
    distributed_state,
    image_backbone_fingerprint,
    resolve_feature_dtype,
)
from pal_rm.hub import missing_salt_message, resolve_user_id_salt, save_model_card
from pal_rm.losses import norm_bound_penalty, preference_loss
from pal_rm.metrics import per_user_accuracy, personalized_preference_metrics
from pal_rm.modeling_pal import PalRewardModel, format_preference_texts

from .pal_reward_config import PalRewardConfig
from .sparse_user_table import SparseUserTableAdam

logger = get_logger(__name__)

PROCESSED_FEATURE_COLUMNS = ("chosen_index", "rejected_index", "prompt_index", "user_index")
PROCESSED_TOKEN_COLUMNS = ("chosen_ids", "rejected_ids", "prompt_ids", "user_index")
# The items of image preference rows (with `prompt`, the caption, and the user column).
IMAGE_COLUMNS = ("chosen_image", "rejected_image")


@dataclass
class DataCollatorForPersonalizedPreference(DataCollatorMixin):
    """
    Collates processed personalized preference examples into one batch of `2 * num_pairs` sequences (chosen first,
    then rejected, as TRL's `DataCollatorForPreference`), with the user of each pair repeated for both halves.

    Examples hold either cached-feature indices (`chosen_index`, `rejected_index`, `prompt_index` into `features`, a
    [`~pal_rm.cache.FeatureStore`] whose rows are given as float32 whatever its storage dtype) or
    token ids (`chosen_ids`, `rejected_ids`, `prompt_ids`), plus `user_index` (a row of the user table, `-1` for the
    population) and optionally `margin`. Prompts stay one per pair; the model tiles them over the two halves.

    Example:

    ```python
    >>> collator = DataCollatorForPersonalizedPreference(pad_token_id=0)
    >>> collator([
    ...     {"chosen_ids": [1, 2, 3], "rejected_ids": [4, 5], "prompt_ids": [1], "user_index": 0},
    ...     {"chosen_ids": [6, 7], "rejected_ids": [8], "prompt_ids": [6], "user_index": 1},
    ... ])
    {'input_ids': tensor([[1, 2, 3], [6, 7, 0], [4, 5, 0], [8, 0, 0]]),
     'attention_mask': tensor([[1, 1, 1], [1, 1, 0], [1, 1, 0], [1, 0, 0]]),
     'user_ids': tensor([0, 1, 0, 1]),
     'prompt_input_ids': tensor([[1], [6]]),
     'prompt_attention_mask': tensor([[1], [1]])}
    ```
    """

    pad_token_id: int = 0
    features: FeatureStore | None = None
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        first = examples[0]
        output = {}
        if "chosen_index" in first:
            if self.features is None:
                raise ValueError("Examples hold cached-feature indices but the collator has no `features` table.")
            table = self.features.table
            rows = [example["chosen_index"] for example in examples] + [
                example["rejected_index"] for example in examples
            ]
            output["item_features"] = table[torch.tensor(rows)].float()
        else:
            sequences = [torch.tensor(example["chosen_ids"]) for example in examples]
            sequences += [torch.tensor(example["rejected_ids"]) for example in examples]
            output["input_ids"] = pad(
                sequences,
                padding_value=self.pad_token_id,
                padding_side="right",
                pad_to_multiple_of=self.pad_to_multiple_of,
            )
            output["attention_mask"] = pad(
                [torch.ones_like(ids) for ids in sequences],
                padding_value=0,
                padding_side="right",
                pad_to_multiple_of=self.pad_to_multiple_of,
            )
        users = torch.tensor([example["user_index"] for example in examples], dtype=torch.long)
        output["user_ids"] = torch.cat([users, users])
        if first.get("prompt_index", -1) is not None and first.get("prompt_index", -1) >= 0:
            prompt_rows = torch.tensor([example["prompt_index"] for example in examples])
            output["prompt_features"] = self.features.table[prompt_rows].float()
        elif first.get("prompt_ids"):
            prompts = [torch.tensor(example["prompt_ids"]) for example in examples]
            output["prompt_input_ids"] = pad(prompts, padding_value=self.pad_token_id, padding_side="right")
            output["prompt_attention_mask"] = pad(
                [torch.ones_like(ids) for ids in prompts], padding_value=0, padding_side="right"
            )
        if "margin" in first:
            output["margin"] = torch.tensor([example["margin"] for example in examples], dtype=torch.float)
        return output


class PalRewardTrainer(RewardTrainer):
    """
    Trainer for personalized PAL reward models ([`pal_rm.PalRewardModel`]).

    It takes TRL preference data (standard or conversational, implicit or explicit prompt) with a user column
    (`args.user_column`, default `"user_id"`), registers the users of the training data, and minimises the
    Bradley-Terry loss on PAL's rewards. With the backbone frozen (the default) every unique text is encoded once and the
    heads train on cached features. Parameter groups get their own learning rates (see [`PalRewardConfig`]), metrics are
    TRL's plus per-user accuracy (`trainer.per_user_accuracy`) and `mixture_entropy`, and [`adapt_users`] fits new users
    from a few comparisons each.

    User ids never reach the Hub in the clear unless asked for: a trainer that uploads (`args.push_to_hub=True`, or
    [`push_to_hub`] called) first replaces the model's registry, in place, by salted hashes of the ids
    ([`pal_rm.PalRewardModel.hash_user_ids`]), so the checkpoints, the saved model, the model card and the uploaded
    files only hold hashes. The salt is `user_id_salt` or the `PAL_USER_ID_SALT` environment variable; it is kept in
    memory and written nowhere. A pushing trainer without a salt raises at construction, before any training;
    `PalRewardConfig(hash_user_ids=False)` uploads the raw ids instead. The model keeps its salt, so raw ids still work
    for scoring, further training and [`adapt_users`]; a checkpoint saved by such a trainer holds hashes, and looks
    users up by raw id after `model.set_user_id_salt(salt)`. A model whose registry is already hashed is trained
    further with the same salt: its known users keep their rows.

    Example:

    ```python
    >>> from pal_rm import PalRewardModel
    >>> from pal_rm.trainers import PalRewardConfig, PalRewardTrainer

    >>> model = PalRewardModel.from_backbone("sentence-transformers/all-MiniLM-L6-v2", variant="b", num_prototypes=4)
    >>> trainer = PalRewardTrainer(model, PalRewardConfig("pal-out"), train_dataset=dataset, processing_class=tokenizer)
    >>> trainer.train()
    >>> trainer.adapt_users(new_users_dataset)
    ```
    """

    _tag_names = ["trl", "reward-trainer", "pal-rm", "personalized-reward-model"]
    _name = "PAL Reward"

    def __init__(
        self,
        model: PalRewardModel | str,
        args: PalRewardConfig | None = None,
        data_collator=None,
        train_dataset: Dataset | None = None,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        optimizer_cls_and_kwargs=None,
        preprocess_logits_for_metrics=None,
        quantization_config=None,
        peft_config=None,
        embedding_cache: FeatureStore | None = None,
        user_id_salt: str | None = None,
    ):
        if args is None:
            args = PalRewardConfig("pal-reward-model")
        elif not isinstance(args, PalRewardConfig):
            raise TypeError(f"`args` must be a `PalRewardConfig`, got {type(args).__name__}.")
        if train_dataset is None:
            raise ValueError("`train_dataset` is required.")
        for name, dataset in [("train", train_dataset)] + list(
            eval_dataset.items() if isinstance(eval_dataset, dict) else [("eval", eval_dataset)]
        ):
            _check_map_style(dataset, name)
        _check_launch()
        # The raw validation split, for `fit_adaptation_prior` at the end of `train` (the trainer's own copy is
        # tokenized or indexed into the feature table).
        self._raw_eval_dataset = eval_dataset
        model_init_kwargs = args.model_init_kwargs
        if isinstance(model, str):
            if quantization_config is not None:
                raise ValueError(
                    "`quantization_config` quantizes a backbone, not a saved PAL model (whose heads and user table must "
                    "stay float32). Build the model with `PalRewardModel.from_backbone(name, quantization_config=...)` "
                    "and pass it to the trainer."
                )
            model = PalRewardModel.from_pretrained(model, **(model_init_kwargs or {}))
            model_init_kwargs = None  # used here: RewardTrainer would warn that they are ignored
        elif quantization_config is not None:
            raise ValueError(
                "`quantization_config` applies when the trainer loads the model; this one is built already. Pass it to "
                "`PalRewardModel.from_backbone(name, quantization_config=...)` instead."
            )
        if not isinstance(model, PalRewardModel):
            raise TypeError(
                f"`model` must be a `PalRewardModel` (or the path of a saved one), got {type(model).__name__}. Build one "
                "with `PalRewardModel.from_backbone(name_or_path, ...)`; a LoRA adapter goes on its backbone with "
                "`peft_config=` (or `model.add_backbone_adapter`), never around the whole PAL model."
            )
        if args.chat_template_path is not None and not str(args.chat_template_path).endswith((".jinja", ".j2")):
            raise ValueError(
                "`chat_template_path` may only name a `.jinja`/`.j2` template file for a PAL model: cloning another "
                "tokenizer's chat template adds tokens and resizes the backbone's embeddings, which a PAL model's "
                "framing and feature cache do not follow. Save the template to a .jinja file and pass that."
            )

        # The salt maps raw user ids to a hashed registry. It stays in memory: never in `args` (uploaded as
        # `training_args.bin`) nor in any other file.
        self._user_id_salt = resolve_user_id_salt(user_id_salt or getattr(model, "user_id_salt", None))
        if self._user_id_salt is not None and model.config.hashed_user_ids:
            model.set_user_id_salt(self._user_id_salt)
        if args.push_to_hub:  # hashed before anything is saved: checkpoints are pushed during training
            self._hash_user_ids_for_upload(model, args)

        if model.backbone is not None and model.is_image_model:
            processing_class = self._prepare_processor(model, processing_class, args, peft_config)
        elif model.backbone is not None:
            processing_class = self._prepare_tokenizer(model, processing_class, args)
            self._set_backbone_trainable(model, args, peft_config)
        elif args.train_backbone or peft_config is not None:
            raise ValueError(
                "`train_backbone=True` and `peft_config` need a model with a backbone; this one takes pooled features."
            )
        if model.config.head_dropout > 0 and args.disable_dropout:
            logger.warning(
                f"`disable_dropout=True` (TRL's default) turns off the heads' dropout (`head_dropout="
                f"{model.config.head_dropout}`) along with the backbone's; set `disable_dropout=False` to keep it."
            )

        self._pal_model = model
        if embedding_cache is None:
            embedding_cache = FeatureStore(args.embedding_cache_dir, dtype=args.feature_dtype)
        self.embedding_cache = embedding_cache
        self.feature_store = self._new_feature_store(model, processing_class, args)
        self.per_user_accuracy: dict[str, dict[str, float]] = {}
        self._current_eval_prefix = "eval"
        self._eval_pairs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

        # Users of the training data are registered before any optimizer sees the user table, in sorted order: the
        # same users give the same rows whatever the order of the data (a checkpoint resumes by user id).
        self.train_users = self._users_of(train_dataset, args, "train")
        model.add_users(sorted(self.train_users))
        self.trainable_parameters_summary = model.trainable_parameters_summary()
        logger.info(self.trainable_parameters_summary)

        if data_collator is None:
            tokenizer = getattr(processing_class, "tokenizer", processing_class)
            data_collator = DataCollatorForPersonalizedPreference(
                pad_token_id=tokenizer.pad_token_id if tokenizer is not None else 0,
                features=self.feature_store,
                pad_to_multiple_of=args.pad_to_multiple_of,
            )

        # RewardTrainer's own set-up, on the PAL model built above: its dataset rules, seed, `eos_token`/`pad_token`,
        # `.jinja` chat template, `disable_dropout`, activation offloading, metrics and tags all apply. The datasets
        # are prepared by `_prepare_dataset` below (every process at once: the texts to encode are split across
        # processes and gathered). The PEFT adapter is already on the backbone, so RewardTrainer gets no
        # `peft_config` (it would wrap the whole PAL model).
        trainer_kwargs = {
            "model": model,
            "args": args,
            "data_collator": data_collator,
            "train_dataset": train_dataset,
            "eval_dataset": eval_dataset,
            "processing_class": processing_class,
            "compute_metrics": compute_metrics,
            "callbacks": callbacks,
            "optimizers": optimizers,
            "optimizer_cls_and_kwargs": optimizer_cls_and_kwargs,
            "preprocess_logits_for_metrics": preprocess_logits_for_metrics,
        }
        saved_model_init_kwargs, args.model_init_kwargs = args.model_init_kwargs, model_init_kwargs
        try:
            if processing_class is not None and not model.is_image_model:
                super().__init__(**trainer_kwargs)
            else:
                self._init_without_tokenizer(**trainer_kwargs)
        finally:
            args.model_init_kwargs = saved_model_init_kwargs
        if args.push_to_hub and not args.hash_user_ids:
            self._warn_raw_user_ids()

    def _init_without_tokenizer(self, **trainer_kwargs) -> None:
        """
        RewardTrainer's set-up for a model without a text tokenizer (`RewardTrainer.__init__` needs one for its pad and
        EOS tokens): a model without backbone (it scores pooled features) or an image model (its processing class is
        the backbone's processor). The same steps, those about tokens left out. `tests/test_reward_config_contract.py`
        checks that both paths honour every `RewardConfig` field.
        """
        args, model = trainer_kwargs["args"], trainer_kwargs["model"]
        processing_class = trainer_kwargs["processing_class"]
        for name in ("eos_token", "pad_token", "chat_template_path"):
            if getattr(args, name) is not None:
                reason = (
                    "an image model reads its captions with the backbone's processor as it is"
                    if model.is_image_model
                    else "this PAL model (pooled features) has none"
                )
                raise ValueError(f"`{name}` applies to a tokenizer, and {reason}.")
        set_seed(args.seed)
        if args.disable_dropout:
            disable_dropout_in_model(model)
        prepare = functools.partial(self._prepare_dataset, processing_class=processing_class, args=args)
        trainer_kwargs["train_dataset"] = prepare(trainer_kwargs["train_dataset"], dataset_name="train")
        eval_dataset = trainer_kwargs["eval_dataset"]
        if isinstance(eval_dataset, dict):
            eval_dataset = {name: prepare(data, dataset_name=name) for name, data in eval_dataset.items()}
        elif eval_dataset is not None:
            eval_dataset = prepare(eval_dataset, dataset_name="eval")
        trainer_kwargs["eval_dataset"] = eval_dataset
        Trainer.__init__(self, **trainer_kwargs)
        if args.n_gpu > 1:
            raise ValueError(
                f"{type(self).__name__} does not support `nn.DataParallel`: launch with `accelerate launch` or "
                "`torchrun`, or make one GPU visible with `CUDA_VISIBLE_DEVICES`."
            )
        self.can_return_loss = True
        self.label_names = []
        if args.activation_offloading:
            self.maybe_activation_offload_context = get_act_offloading_ctx_manager(model=self.model)
        else:
            self.maybe_activation_offload_context = contextlib.nullcontext()
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._total_train_tokens = 0
        self._tp_size = 1
        self.model.add_model_tags(self._tag_names)

    @staticmethod
    def _prepare_tokenizer(model: PalRewardModel, processing_class, args: PalRewardConfig):
        """The tokenizer with `args.eos_token` / `args.pad_token` applied (as RewardTrainer applies them), registered
        with the model as its canonical text form."""
        if processing_class is None:
            processing_class = AutoTokenizer.from_pretrained(
                model.config.get_text_config()._name_or_path, trust_remote_code=args.trust_remote_code
            )
        for name in ("eos_token", "pad_token"):
            token = getattr(args, name)
            if token is not None and token not in processing_class.get_vocab():
                raise ValueError(
                    f"`{name}={token!r}` is not in the vocabulary of the tokenizer ({type(processing_class).__name__})."
                )
        if args.eos_token is not None:
            processing_class.eos_token = args.eos_token
        pad_token = args.pad_token or processing_class.pad_token or processing_class.eos_token
        if pad_token is None:
            raise ValueError("The tokenizer has neither a pad token nor an EOS token; set `tokenizer.pad_token`.")
        processing_class.pad_token = pad_token
        if args.eos_token is not None and model.num_users == 0:
            # A model not trained yet (`from_backbone` recorded its backbone's tokenizer): this run chooses the EOS.
            model.config.sequence_framing = None
        model.register_tokenizer(processing_class)
        model.config.get_text_config().pad_token_id = processing_class.pad_token_id
        return processing_class

    @staticmethod
    def _prepare_processor(model: PalRewardModel, processor, args: PalRewardConfig, peft_config):
        """
        The processor of an image model (a two-tower image-text backbone): `AutoProcessor` of the backbone when none
        is given, checked against the backbone ([`~pal_rm.modeling_pal.PalImageScorer`]), its tokenizer registered as
        the model's text form. The backbone stays frozen: image models train their heads on cached features.
        """
        if args.train_backbone or peft_config is not None:
            raise ValueError(
                "Image PAL models (CLIP / SigLIP backbones) train their heads on frozen, cached image and caption "
                "features; `train_backbone=True` and `peft_config` are not supported for them. Leave both unset."
            )
        if processor is None:
            processor = AutoProcessor.from_pretrained(
                model.config.backbone_name_or_path or model.config.backbone_config._name_or_path,
                trust_remote_code=args.trust_remote_code,
            )
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is not None and tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.image_scorer(processor, convert_to_rgb=args.convert_images_to_rgb)  # checks the processor
        model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
        model.set_backbone_trainable(False)
        return processor

    @staticmethod
    def _set_backbone_trainable(model: PalRewardModel, args: PalRewardConfig, peft_config) -> None:
        """
        What of the backbone trains. `train_backbone=False`: nothing (frozen features, cached). `train_backbone=True`:
        the whole backbone, or, when it carries a PEFT adapter (from `peft_config` or loaded with the model), the
        adapter only, its base weights frozen.
        """
        if peft_config is not None:
            if not args.train_backbone:
                raise ValueError(
                    "`peft_config` puts a LoRA (PEFT) adapter on the backbone to train it on tokens, which needs "
                    "`train_backbone=True`. Set it, or drop `peft_config` to train the heads on frozen features."
                )
            model.add_backbone_adapter(peft_config)
        model.set_backbone_trainable(args.train_backbone)

    # ------------------------------------------------------------------ data
    @staticmethod
    def _users_of(dataset: Dataset, args: PalRewardConfig, name: str) -> list[str]:
        column = args.user_column
        if column not in dataset.column_names:
            raise ValueError(
                f"The {name} dataset has no user column {column!r} (columns: {dataset.column_names}). Add a column "
                f"naming the user of each comparison, or set `PalRewardConfig(user_column=...)`."
            )
        users = _column_list(dataset, column)
        for row, user in enumerate(users):
            if user is None or (isinstance(user, str) and not user.strip()):
                raise ValueError(
                    f"Row {row} of the {name} dataset has a missing or empty user id ({user!r}) in column {column!r}. "
                    "Every comparison needs the (non-empty string) id of the user who made it."
                )
            if not isinstance(user, str):
                raise ValueError(
                    f"User ids must be strings: row {row} of the {name} dataset has {user!r} "
                    f"({type(user).__name__}) in column {column!r}. Convert the column first, for example "
                    f"`dataset.cast_column({column!r}, datasets.Value('string'))`."
                )
        return list(dict.fromkeys(users))

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        columns = dataset.column_names
        if set(PROCESSED_FEATURE_COLUMNS) <= set(columns) or set(PROCESSED_TOKEN_COLUMNS) <= set(columns):
            return dataset
        model = self._pal_model
        users = self._users_of(dataset, args, dataset_name)
        unknown = [user for user, registered in zip(users, model.is_registered(users)) if not registered]
        if unknown and args.unknown_users == "error":
            raise ValueError(
                f"The {dataset_name} dataset has {len(unknown)} users the model does not know (e.g. {unknown[:3]}). "
                "Fit them first with `trainer.adapt_users(dataset_with_their_comparisons)`, or set "
                "`PalRewardConfig(unknown_users='population')` to score them with the population mixture."
            )
        user_index = model.user_rows(_column_list(dataset, args.user_column), unknown_users="population").tolist()
        output = {"user_index": user_index}
        if "margin" in columns:
            margin = _column_tensor(dataset, "margin", torch.float32)
            _check_finite(margin, "margin", dataset_name)
            output["margin"] = margin.tolist()

        if "chosen_features" in columns and "rejected_features" in columns:
            table = self.feature_store
            chosen = _check_finite(
                _column_tensor(dataset, "chosen_features", torch.float32), "chosen_features", dataset_name
            )
            rejected = _check_finite(
                _column_tensor(dataset, "rejected_features", torch.float32), "rejected_features", dataset_name
            )
            model.check_features(chosen, "chosen_features")
            model.check_features(rejected, "rejected_features")
            prompt = (
                _check_finite(
                    _column_tensor(dataset, "prompt_features", torch.float32), "prompt_features", dataset_name
                )
                if "prompt_features" in columns
                else None
            )
            same = (chosen == rejected).all(-1)
            _check_distinct(same, dataset_name, "identical `chosen_features` and `rejected_features`")
            output["chosen_index"] = table.append(chosen)
            output["rejected_index"] = table.append(rejected)
            if prompt is not None:
                output["prompt_index"] = table.append(prompt)
            elif model.needs_prompt:
                raise ValueError(f"The {dataset_name} dataset has no `prompt_features`, which PAL-B needs.")
            else:
                output["prompt_index"] = [-1] * len(dataset)
            return Dataset.from_dict(output)

        if model.is_image_model or set(IMAGE_COLUMNS) & set(columns):
            return self._prepare_image_dataset(dataset, processing_class, args, dataset_name, output)
        if model.backbone is None:
            raise ValueError(
                f"The {dataset_name} dataset holds texts but this PAL model has no backbone; give it pooled features "
                "(`chosen_features`, `rejected_features`, `prompt_features` columns) or use a model with a backbone."
            )
        prompts, items_chosen, items_rejected = self._format_texts(
            dataset, processing_class, dataset_name, args.dataset_num_proc
        )
        use_prompts = model.needs_prompt

        if not args.train_backbone:
            texts = items_chosen + items_rejected + (prompts if use_prompts else [])
            rows = self._encode_items(texts, processing_class, args)
            num_rows = len(items_chosen)
            output["chosen_index"] = rows[:num_rows]
            output["rejected_index"] = rows[num_rows : 2 * num_rows]
            output["prompt_index"] = rows[2 * num_rows :] if use_prompts else [-1] * num_rows
            return Dataset.from_dict(output)

        scorer = model.text_scorer(processing_class, max_length=args.max_length)
        output["chosen_ids"] = scorer.tokenize(items_chosen)
        output["rejected_ids"] = scorer.tokenize(items_rejected)
        output["prompt_ids"] = scorer.tokenize(prompts) if use_prompts else [[] for _ in prompts]
        return Dataset.from_dict(output)

    def _prepare_image_dataset(self, dataset, processor, args, dataset_name: str, output: dict) -> Dataset:
        """
        Image preference rows (`prompt`: the caption, `chosen_image`, `rejected_image`, a user column) as rows of the
        feature store: each distinct image (by its pixels) and caption encoded once by the frozen two-tower backbone.
        """
        model = self._pal_model
        columns = dataset.column_names
        if not model.is_image_model:
            raise ValueError(
                f"The {dataset_name} dataset holds images ({[c for c in IMAGE_COLUMNS if c in columns]}) but this PAL "
                "model reads texts. Build it on a two-tower image-text backbone (CLIP, SigLIP): "
                "`PalRewardModel.from_backbone('openai/clip-vit-base-patch32', ...)`."
            )
        missing = [column for column in IMAGE_COLUMNS if column not in columns]
        if missing:
            texts = ""
            if {"chosen", "rejected"} <= set(columns):
                texts = " It has text columns `chosen` / `rejected`: an image model scores images, not texts."
            raise ValueError(
                f"The {dataset_name} dataset has no {missing} column (columns: {columns}). An image PAL model trains on "
                f"`prompt` (the caption), `chosen_image`, `rejected_image` and a user column.{texts}"
            )
        with self._backbone_on_device(args):  # once for both columns (and the captions below)
            for column in IMAGE_COLUMNS:  # read and decoded a chunk at a time, never the whole column
                images = ImageColumn(dataset, column)
                output[column.replace("_image", "_index")] = self._encode_items(
                    images, processor, args, images=True, name=f"{dataset_name} dataset, {column}"
                )
        same = torch.tensor(output["chosen_index"]) == torch.tensor(output["rejected_index"])
        _check_distinct(same, dataset_name, "the same chosen and rejected image")
        if model.needs_prompt:
            if "prompt" not in columns:
                raise ValueError(
                    f"The {dataset_name} dataset has no `prompt` column; PAL-B's ideal points depend on the caption of "
                    "each comparison. Add the captions as `prompt` (or use PAL-A)."
                )
            prompts = _column_list(dataset, "prompt")
            for row, prompt in enumerate(prompts):
                if not isinstance(prompt, str) or not prompt.strip():
                    raise ValueError(
                        f"Row {row} of the {dataset_name} dataset has the prompt {prompt!r}; PAL-B needs the caption "
                        "(a non-empty string) of every comparison."
                    )
            with self._backbone_on_device(args):
                output["prompt_index"] = self._encode_items(prompts, processor.tokenizer, args)
        else:
            output["prompt_index"] = [-1] * len(dataset)
        return Dataset.from_dict(output)

    def _new_feature_store(self, model: PalRewardModel, processing_class, args: PalRewardConfig) -> FeatureStore:
        """
        The store the collator reads features from. With a frozen backbone it is the embedding cache itself (the
        [`~pal_rm.cache.FeatureStore`] of that backbone), so every feature is held once per process (and shared with
        any trainer given the same store); with a trained backbone or no backbone, a store of its own for
        pooled-feature columns.
        """
        if self.embedding_cache.dtype != resolve_feature_dtype(args.feature_dtype):
            raise ValueError(
                f"The embedding cache stores {self.embedding_cache.dtype} features but `feature_dtype` is "
                f"{args.feature_dtype!r}. Build the cache with `FeatureStore(..., dtype=args.feature_dtype)`."
            )
        self._backbone_fingerprint = None
        if model.backbone is not None and model.is_image_model:
            self._backbone_fingerprint = image_backbone_fingerprint(model, processing_class, args.max_length)
            return self.embedding_cache
        if model.backbone is not None and not args.train_backbone:
            self._backbone_fingerprint = backbone_fingerprint(model, processing_class, args.max_length)
            return self.embedding_cache
        return FeatureStore(dtype=args.feature_dtype)

    def _encode_items(
        self, items: Sequence, processing_class, args: PalRewardConfig, images: bool = False, name: str = "images"
    ) -> list[int]:
        """
        Rows of `items` (texts, or images with `images=True` and the processor) in the feature store, encoding with
        the frozen backbone the items no row holds yet. Under several processes every process calls this with the
        same items: each unique item goes through the backbone in one process only and the features are gathered, so
        every process holds the same table (see [`~pal_rm.cache.FeatureStore.encode_rows`]).
        """
        model = self._pal_model
        encode = {
            "batch_size": args.encode_batch_size,
            "show_progress": not args.disable_tqdm,
            "distributed": True,
            "lockstep": self._backbone_is_sharded(),
            "fingerprint": self._backbone_fingerprint,
        }
        needed = images or bool(self.feature_store.missing(items))  # images are keyed only once decoded
        with self._backbone_on_device(args, needed), self.full_pal_parameters():
            if images:
                return self.embedding_cache.encode_image_rows(
                    model, processing_class, items, convert_to_rgb=args.convert_images_to_rgb, name=name, **encode
                )
            return self.embedding_cache.encode_rows(
                model, processing_class, items, max_length=args.max_length, **encode
            )

    @contextlib.contextmanager
    def _backbone_on_device(self, args: PalRewardConfig, needed: bool = True):
        """The model on `args.device` while its backbone encodes (when `needed`, and unless its parameters are sharded:
        they stay where the sharding put them), and back where it was afterwards. Nested uses move it once."""
        model = self._pal_model
        move = needed and not self._backbone_is_sharded()
        device = model.item_head.layers[-1].weight.device
        if move:
            model.to(args.device)
        try:
            yield
        finally:
            if move:
                model.to(device)

    def _format_texts(
        self, dataset, processing_class, dataset_name, num_proc: int | None = None
    ) -> tuple[list[str], list[str], list[str]]:
        """`(prompts, chosen items, rejected items)` as the backbone reads them (`format_preference_texts`); raises on
        missing columns, empty or ill-typed texts and rows whose two responses are the same, naming the rows. With
        `num_proc` (`args.dataset_num_proc`) the rows are formatted by that many processes (`Dataset.map`)."""
        columns = dataset.column_names
        for column in ("chosen", "rejected"):
            if column not in columns:
                raise ValueError(
                    f"The {dataset_name} dataset has no {column!r} column (columns: {columns}). PAL trains on TRL "
                    "preference data: `prompt` (optional), `chosen`, `rejected` and a user column."
                )
        keep = [column for column in ("prompt", "chosen", "rejected") if column in columns]
        kwargs = {"processing_class": processing_class, "needs_prompt": self._pal_model.needs_prompt}
        kwargs["dataset_name"] = dataset_name
        if num_proc is not None and num_proc > 1 and len(dataset) > 1:
            formatted = dataset.select_columns(keep).map(
                _format_row,
                with_indices=True,
                fn_kwargs=kwargs,
                num_proc=min(num_proc, len(dataset)),
                remove_columns=keep,
                desc=f"Formatting the {dataset_name} dataset",
                load_from_cache_file=False,
            )
            prompts, items_chosen, items_rejected = (
                _column_list(formatted, name) for name in ("pal_prompt", "pal_chosen", "pal_rejected")
            )
        else:
            prompts, items_chosen, items_rejected = [], [], []
            for row, example in enumerate(dataset.select_columns(keep)):
                texts = _format_row(example, row, **kwargs)
                prompts.append(texts["pal_prompt"])
                items_chosen.append(texts["pal_chosen"])
                items_rejected.append(texts["pal_rejected"])
        same = torch.tensor([c == r for c, r in zip(items_chosen, items_rejected)], dtype=torch.bool)
        _check_distinct(same, dataset_name, "the same chosen and rejected response")
        return prompts, items_chosen, items_rejected

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = list(set(PROCESSED_FEATURE_COLUMNS + PROCESSED_TOKEN_COLUMNS)) + ["margin"]

    @property
    def pal_model(self) -> PalRewardModel:
        """The PAL model being trained, unwrapped (`self.model` may be wrapped by DDP, FSDP or DeepSpeed)."""
        return self._pal_model

    # ------------------------------------------------------------------ optimisation
    def parameter_groups(self, model: torch.nn.Module | None = None) -> list[dict]:
        """
        Parameter groups with their own learning rates: the backbone (or its adapter), and each of PAL's parts in the
        group it declares (its `parameter_group`: `"heads"` for the item map and PAL-B's prototype maps,
        `"prototypes"` for PAL-A's points, `"user_weights"` for the user table, `"logit_scale"` for the similarity's
        parameters). A parameter belongs to the outermost part that holds it; one outside every part is a head.
        """
        model = model if model is not None else self.model
        args = self.args
        decay_names = set(self.get_decay_parameter_names(model))
        rates = {
            "backbone": args.backbone_learning_rate,
            "adapter": args.adapter_learning_rate,
            "heads": args.head_learning_rate,
            "prototypes": args.prototype_learning_rate,
            "user_weights": args.user_learning_rate,
            "logit_scale": args.logit_scale_learning_rate,
        }
        parts = []  # (prefix, group) of PAL's parts, outermost first
        for prefix, module in model.named_modules():
            group = getattr(module, "parameter_group", None)
            if group is None or any(prefix.startswith(outer) for outer, _ in parts):
                continue
            if group not in rates or group in ("backbone", "adapter"):
                raise ValueError(
                    f"The part {prefix!r} ({type(module).__name__}) declares `parameter_group={group!r}`, which has no "
                    f"learning rate: use one of 'heads', 'prototypes', 'user_weights', 'logit_scale'."
                )
            parts.append((f"{prefix}.", group))
        grouped: dict[tuple[str, bool], list] = defaultdict(list)
        sparse_table = getattr(self, "_sparse_user_table", None)
        for name, parameter in model.named_parameters():
            if not parameter.requires_grad and (sparse_table is None or parameter is not sparse_table.table):
                continue
            if name.startswith("backbone."):
                group = "adapter" if self._pal_model.has_backbone_adapter else "backbone"
            else:
                group = next((group for prefix, group in parts if name.startswith(prefix)), "heads")
            decay = name in decay_names and group in ("backbone", "adapter", "heads")
            grouped[(group, decay)].append(parameter)
        return [
            {
                "params": parameters,
                "lr": rates[group] if rates[group] is not None else args.learning_rate,
                "weight_decay": args.weight_decay if decay else 0.0,
                "name": group,
            }
            for (group, decay), parameters in grouped.items()
        ]

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            optimizer_kwargs.pop("lr", None)
            groups = [{k: v for k, v in group.items() if k != "name"} for group in self.parameter_groups(model)]
            self.optimizer = optimizer_cls(groups, lr=self.args.learning_rate, **optimizer_kwargs)
            self._optimizer_built_here = True
        return self.optimizer

    def _sparse_user_table_update(self) -> SparseUserTableAdam | None:
        """
        The per-batch user-table update for this run (`args.user_table_update`), or `None` for dense updates by the
        optimizer. `"auto"` takes it wherever it applies and says why not otherwise; `"sparse"` raises where it cannot.
        """
        mode = self.args.user_table_update
        table = self._pal_model.user_weights.weight
        if mode == "dense" or self._pal_model.num_users == 0 or not table.requires_grad:
            return None  # nothing to train sparsely (no user, or a table frozen by the caller)
        reasons = []
        distributed_type = str(self.accelerator.distributed_type)
        if any(name in distributed_type for name in ("DEEPSPEED", "FSDP", "MEGATRON", "XLA")):
            reasons.append(f"{distributed_type} manages the parameters itself")
        if self.accelerator.scaler is not None:
            reasons.append("fp16 gradient scaling applies to dense gradients only")
        if self.optimizer is not None and not getattr(self, "_optimizer_built_here", False):
            reasons.append("the optimizer was given to the trainer")
        optimizer_name = getattr(self.args.optim, "value", self.args.optim)
        if not str(optimizer_name).startswith("adam"):
            reasons.append(f"`optim={optimizer_name!r}` is not Adam")
        if not reasons:
            return SparseUserTableAdam(self._pal_model, self.accelerator)
        reasons = "; ".join(reasons)
        if mode == "sparse":
            raise ValueError(
                f"`user_table_update='sparse'` cannot run here: {reasons}. Use `user_table_update='dense'` (or "
                "'auto', which picks dense updates in this setting)."
            )
        logger.info(f"The user table gets dense updates from the optimizer ({reasons}).")
        return None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        margin = inputs.pop("margin", None)
        outputs = model(**inputs)
        chosen, rejected = torch.chunk(outputs.logits.squeeze(-1), chunks=2)
        loss = preference_loss(self.args.loss_type, chosen, rejected, margin)
        if self.args.norm_bound is not None:
            loss = loss + self.args.norm_bound_coefficient * norm_bound_penalty(
                outputs.ideal_points, self.args.norm_bound
            )
        if self.args.center_rewards_coefficient is not None:
            loss = loss + self.args.center_rewards_coefficient * torch.mean((chosen + rejected) ** 2)

        with torch.no_grad():
            differences = (chosen - rejected).detach()
            if mode == "eval":
                # Kept per pair and reduced once per evaluation (`log`): exact, whatever the batch sizes.
                gather = self.accelerator.gather_for_metrics
                users = inputs["user_ids"][: chosen.shape[0]]
                self._eval_pairs.append(
                    (
                        gather(differences).float().cpu(),
                        gather(users).cpu(),
                        gather(outputs.logits.detach()).float().cpu(),
                    )
                )
            else:
                # Sums over the logging window, so `accuracy`, `margin` and `mean_reward` are pair-weighted.
                gather = self.accelerator.gather
                all_differences = gather(differences).float()
                all_rewards = gather(outputs.logits.detach()).float()
                metrics = self._metrics[mode]
                metrics["correct"].append(((all_differences > 0).float() + 0.5 * (all_differences == 0)).sum().item())
                metrics["pairs"].append(all_differences.numel())
                metrics["margin_sum"].append(all_differences.sum().item())
                metrics["reward_sum"].append(all_rewards.sum().item())
                metrics["rewards"].append(all_rewards.numel())
                metrics["min_reward"].append(all_rewards.min().item())
                metrics["max_reward"].append(all_rewards.max().item())
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        if mode == "eval":
            metrics = self._evaluation_metrics() if self._eval_pairs else {}
            self._eval_pairs = []
            metrics = {f"{self._current_eval_prefix}_{key}": value for key, value in metrics.items()}
        else:
            values = self._metrics[mode]
            metrics = {}
            if values["pairs"]:
                pairs, rewards = sum(values["pairs"]), sum(values["rewards"])
                metrics = {
                    "min_reward": min(values["min_reward"]),
                    "mean_reward": sum(values["reward_sum"]) / rewards,
                    "max_reward": max(values["max_reward"]),
                    "accuracy": sum(values["correct"]) / pairs,
                    "margin": sum(values["margin_sum"]) / pairs,
                }
            if metrics:  # once per logging step, not per training step: a softmax over the whole user table
                metrics["mixture_entropy"] = self._mixture_entropy()
        logs.update(metrics)
        super(RewardTrainer, self).log(logs, start_time)
        self._metrics[mode].clear()

    def _evaluation_metrics(self) -> dict[str, float]:
        """Metrics of one evaluation from all its pairs (`pal_rm.metrics.personalized_preference_metrics`)."""
        differences = torch.cat([d for d, _, _ in self._eval_pairs])
        users = torch.cat([u for _, u, _ in self._eval_pairs])
        rewards = torch.cat([r for _, _, r in self._eval_pairs])
        results = personalized_preference_metrics(differences.numpy(), users.numpy())
        user_ids = self._pal_model.config.user_ids
        per_user = per_user_accuracy(differences.numpy(), users.numpy())
        self.per_user_accuracy[self._current_eval_prefix] = {
            (user_ids[row] if row >= 0 else "<population>"): value for row, value in per_user.items()
        }
        return {
            "min_reward": rewards.min().item(),
            "mean_reward": rewards.mean().item(),
            "max_reward": rewards.max().item(),
            "accuracy": results["accuracy"],
            "margin": differences.mean().item(),
            "user_accuracy_mean": results["user_accuracy_mean"],
            "user_accuracy_min": results["user_accuracy_min"],
            "log_loss": results["log_loss"],
            "calibration_error": results["calibration_error"],
        }

    @torch.no_grad()
    def _mixture_entropy(self) -> float:
        """Mean entropy of the registered users' mixtures (0: every user on one prototype; log K: uniform)."""
        with self.full_pal_parameters([self._pal_model.user_weights.weight]):
            weights = self._pal_model.user_mixture_weights()
        return -(weights * weights.clamp(min=1e-12).log()).sum(-1).mean().item()

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """
        TRL's evaluation, with every metric computed once from all the pairs (exact whatever the batch sizes, by
        `pal_rm.metrics.personalized_preference_metrics`): `accuracy` (pair-weighted; a tie counts half), `margin`,
        `mean_reward`/`min_reward`/`max_reward`, `user_accuracy_mean`/`_min`, `log_loss` and `calibration_error`. The
        per-user table is in `self.per_user_accuracy[metric_key_prefix]`.
        """
        self._eval_pairs = []
        self._current_eval_prefix = metric_key_prefix
        return super().evaluate(
            eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix
        )

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """
        Trains, then sets the model's population mixture to the mean mixture of the training users. The user table
        gets per-batch (sparse) updates unless `args.user_table_update` or the setup rules them out.

        `resume_from_checkpoint` (a checkpoint folder, or `True` for the last one in `output_dir`) resumes as
        `Trainer.train` does, after checking that the checkpoint's user registry is this run's: users are registered
        in sorted order, so the same users in any data order get the same rows; other users are an error, never rows
        handed to the wrong users.
        """
        if resume_from_checkpoint is True:
            resume_from_checkpoint = self._last_complete_checkpoint()
        if resume_from_checkpoint:
            self._check_checkpoint_registry(resume_from_checkpoint)
        self._replicate_user_table()
        model = self._pal_model
        trained_rows = model.user_rows(self.train_users).tolist()
        if model.config.num_user_posteriors and set(trained_rows) & set(model.users.posterior_rows.tolist()):
            logger.info("Training users that `adapt_users` fitted: their few-shot posteriors are dropped.")
            model.drop_user_posteriors(trained_rows)
        self._sparse_user_table = self._sparse_user_table_update()
        if self._sparse_user_table is not None:
            self._sparse_user_table.attach()
            self.add_callback(self._sparse_user_table)
        try:
            output = super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            if self._sparse_user_table is not None:
                self.remove_callback(self._sparse_user_table)
                self._sparse_user_table.detach()
                self._sparse_user_table = None
        with self.full_pal_parameters():
            model.refresh_population_mixture(trained_rows)
        if self.args.fit_adaptation_prior and model.config.num_prototypes > 1:
            self.fit_adaptation_prior()
        return output

    def _last_complete_checkpoint(self) -> str:
        """
        The last checkpoint of `output_dir` that was written to the end (its `trainer_state.json`, written last, reads
        back), for `resume_from_checkpoint=True`. A checkpoint cut short by a killed run is skipped, with a warning.
        """
        output_dir = self.args.output_dir
        checkpoints = []
        if os.path.isdir(output_dir):
            checkpoints = [
                os.path.join(output_dir, name)
                for name in os.listdir(output_dir)
                if re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-\d+", name)
                and os.path.isdir(os.path.join(output_dir, name))
            ]
        checkpoints.sort(key=lambda path: int(path.rsplit("-", 1)[1]), reverse=True)
        for checkpoint in checkpoints:
            try:
                with open(os.path.join(checkpoint, TRAINER_STATE_NAME), encoding="utf-8") as file:
                    json.load(file)
            except (OSError, ValueError):
                logger.warning(f"{checkpoint} was not written to the end (a run stopped while saving it); skipped.")
                continue
            return checkpoint
        raise ValueError(
            f"`resume_from_checkpoint=True` but {output_dir} holds no complete checkpoint ({PREFIX_CHECKPOINT_DIR}-N "
            "folder with a trainer_state.json). Train without resuming, or name a checkpoint folder."
        )

    def _check_checkpoint_registry(self, checkpoint: str) -> None:
        """Raises unless the checkpoint to resume from registers the same users, in the same rows, as this run."""
        path = os.path.join(checkpoint, CONFIG_NAME)
        if not os.path.isfile(path):
            return  # Trainer says what is wrong with the folder
        with open(path, encoding="utf-8") as file:
            saved = json.load(file).get("user_ids")
        if saved is None:
            raise ValueError(
                f"{checkpoint} holds no PAL user registry (`user_ids` in its config.json): it is not a checkpoint of a "
                "PAL model, and cannot be resumed by `PalRewardTrainer`."
            )
        current = list(self._pal_model.config.user_ids)
        if saved == current:
            return
        missing, extra = sorted(set(saved) - set(current)), sorted(set(current) - set(saved))
        if not missing and not extra:
            problem = "the same users in other rows (the model came with users registered in another order)"
        else:
            problem = (
                f"{len(missing)} users of the checkpoint that this run does not have (e.g. {missing[:3]}) and "
                f"{len(extra)} users this run has that the checkpoint does not (e.g. {extra[:3]})"
            )
        raise ValueError(
            f"Cannot resume from {checkpoint}: its user table rows belong to other users than this run's; it has "
            f"{problem}. Resume with the training data (and model) the checkpoint was trained with; loading it "
            "anyway would give users each other's weights."
        )

    # ------------------------------------------------------------------ several processes
    @contextlib.contextmanager
    def full_pal_parameters(self, parameters: list[torch.nn.Parameter] | None = None):
        """
        A context in which every process holds PAL's own parameters whole (the item map, prototypes, user table and
        logit scale; or only `parameters`), whatever shards them: DeepSpeed ZeRO-3 partitions are gathered, and an
        FSDP2-wrapped model unshards its root parameters (the backbone's FSDP2 units unshard in their own forward). PAL's
        steps outside `forward` run inside it: the population refresh, [`adapt_users`], encoding new texts, the
        `mixture_entropy` metric. It does nothing when nothing is sharded (one process, DDP, ZeRO-1/2). Enter it from
        every process: gathering is collective. Re-entrant.
        """
        model = self._pal_model
        depth = getattr(self, "_full_parameters_depth", 0)
        if depth:
            yield
            return
        self._full_parameters_depth = depth + 1
        try:
            if parameters is None:
                parameters = [p for name, p in model.named_parameters() if not name.startswith("backbone.")]
            partitioned = [parameter for parameter in parameters if hasattr(parameter, "ds_id")]
            if partitioned:  # DeepSpeed ZeRO-3
                import deepspeed

                with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
                    yield
            elif _is_fsdp2_module(model) and any(hasattr(parameter, "full_tensor") for parameter in parameters):
                model.unshard()
                try:
                    yield
                finally:
                    model.reshard()
            else:
                yield
        finally:
            self._full_parameters_depth = depth

    def _backbone_is_sharded(self) -> bool:
        """Whether the backbone's parameters are split across processes (FSDP2 `DTensor`s or ZeRO-3 partitions)."""
        backbone = self._pal_model.backbone
        if backbone is None:
            return False
        return any(hasattr(p, "ds_id") or hasattr(p, "full_tensor") for p in backbone.parameters())

    def _replicate_user_table(self) -> None:
        """
        Under FSDP2 the user table is kept whole on every process, in float32, rather than sharded: it is added to the
        FSDP plugin's ignored modules (so `fully_shard` neither shards nor casts it) and its gradient is averaged across
        processes by a hook, as FSDP does for the parameters it manages. Rows can then be read and added after
        training without any collective. ZeRO-3 and a hand-sharded table are handled by [`full_pal_parameters`].
        """
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        if not self.is_fsdp_enabled or plugin is None or getattr(plugin, "fsdp_version", 1) != 2:
            return
        model = self._pal_model
        table = model.user_weights
        weight = table.weight
        if getattr(weight, "_pal_replicated", False) or hasattr(weight, "full_tensor"):
            return
        ignored = plugin.ignored_modules
        if ignored is None:
            plugin.ignored_modules = [table]
        elif isinstance(ignored, str):  # a regular expression over module names, as accelerate reads it
            plugin.ignored_modules = [m for name, m in model.named_modules() if re.fullmatch(ignored, name)] + [table]
        else:
            plugin.ignored_modules = [*ignored, table]
        table.to(self.accelerator.device)
        weight = table.weight
        weight.register_hook(average_across_processes)
        weight._pal_replicated = True
        logger.info("FSDP2: the user table is replicated on every process (ignored by `fully_shard`), not sharded.")

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """
        `Trainer.save_model`. Under DeepSpeed ZeRO-3, once [`adapt_users`] has grown the user table after wrapping (a
        new table, whole on every process, that ZeRO-3 does not partition and DeepSpeed's consolidated save cannot
        handle), the weights are gathered here instead, one module at a time as DeepSpeed does.
        """
        if not self._user_table_outside_zero3():
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        self._save(output_dir, state_dict=self._gathered_state_dict())
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _user_table_outside_zero3(self) -> bool:
        model = self._pal_model
        return (
            self.is_deepspeed_enabled
            and not hasattr(model.user_weights.weight, "ds_id")
            and any(hasattr(parameter, "ds_id") for parameter in model.parameters())
        )

    def _gathered_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The model's full state dict on the saving process (`None` elsewhere), ZeRO-3 partitions gathered module by
        module. Collective: call it from every process."""
        import deepspeed

        state_dict = {} if self.args.should_save else None
        for prefix, module in self._pal_model.named_modules():
            parameters = dict(module.named_parameters(recurse=False))
            partitioned = [parameter for parameter in parameters.values() if hasattr(parameter, "ds_id")]
            with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
                if state_dict is None:
                    continue
                key = f"{prefix}." if prefix else ""
                for name, parameter in parameters.items():
                    state_dict[key + name] = parameter.detach().cpu().clone()
                for name, buffer in module.named_buffers(recurse=False):
                    if buffer is not None and name not in module._non_persistent_buffers_set:
                        state_dict[key + name] = buffer.detach().cpu().clone()
        return state_dict

    def _broadcast_user_rows(self, first_row: int, num_rows: int) -> None:
        """Copies rows of the user table from the main process to every other one, so all end bit-identical."""
        if self.accelerator.num_processes == 1:
            return
        weight = self._pal_model.user_weights.weight
        with torch.no_grad():
            rows = weight[first_row : first_row + num_rows].detach().clone().contiguous()
            torch.distributed.broadcast(rows, src=0)
            weight[first_row : first_row + num_rows] = rows

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
        eval_results: dict | None = None,
        **kwargs,
    ) -> None:
        """Writes PAL's model card (`pal_rm.hub.create_model_card`) to `output_dir/README.md`, with `eval_results` or
        the last ones given (`self.model_card_results`)."""
        if not self.is_world_process_zero():
            return
        if eval_results is not None:
            self.model_card_results = eval_results
        save_model_card(
            self._pal_model,
            self.args.output_dir,
            eval_results=getattr(self, "model_card_results", None),
            dataset_name=dataset_name,
            repo_id=self.args.hub_model_id,
        )

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs,
    ):
        """
        `Trainer.push_to_hub` (saves the model to `output_dir` and uploads that folder, except `_*` and `checkpoint-*`)
        with PAL's model card, after replacing the model's user ids by salted hashes in place, so that no uploaded file
        holds a raw id. The salt is the trainer's `user_id_salt` or the `PAL_USER_ID_SALT` environment variable; without
        one this raises before anything is uploaded. `PalRewardConfig(hash_user_ids=False)` uploads the raw ids (with a
        warning). Keyword arguments go to [`create_model_card`] (for example `dataset_name`).
        """
        model = self._pal_model
        self._hash_user_ids_for_upload(model, self.args)
        if not self.args.hash_user_ids:
            self._warn_raw_user_ids()
        return super().push_to_hub(
            commit_message=commit_message, blocking=blocking, token=token, revision=revision, private=private, **kwargs
        )

    def _hash_user_ids_for_upload(self, model: PalRewardModel, args: PalRewardConfig) -> None:
        """Hashes the registry in place with the trainer's salt when `args.hash_user_ids` (a `ValueError` without a
        salt, unless the registry is already hashed)."""
        if not args.hash_user_ids:
            return
        if self._user_id_salt is None:
            if model.config.hashed_user_ids:  # nothing raw to hash; new users need the salt and say so
                return
            raise ValueError(missing_salt_message("A `PalRewardTrainer` that uploads to the Hub"))
        model.hash_user_ids(self._user_id_salt)

    def _warn_raw_user_ids(self) -> None:
        if not self._pal_model.config.hashed_user_ids:
            logger.warning(
                "`hash_user_ids=False`: the raw user ids of the model's registry are uploaded to the Hub (in "
                "`config.json` and every pushed checkpoint), readable by anyone who can read the repository."
            )

    # ------------------------------------------------------------------ new users
    def adapt_users(
        self,
        dataset: Dataset,
        steps: int | None = None,
        learning_rate: float | None = None,
        prior_strength: float | None = None,
    ) -> dict[str, Any]:
        """
        Few-shot localization of new users: registers every user of `dataset` the model does not know and fits only
        their mixture logits (K numbers each), all users at once, by Bayes' rule under the model's population prior
        (`model.config.adaptation_prior`, learned by [`fit_adaptation_prior`] at the end of `train`; see
        `pal_rm.adaptation`). The log-posterior of a user's logits `z` is

            sum_{pairs j of the user} log sigmoid(r_z(chosen_j) - r_z(rejected_j))  +  log prior(z)

        (a sum: every comparison adds evidence while the prior keeps a fixed weight). With the empirical prior (the
        trained users' logits, kernel-blurred) the user gets the posterior-mean mixture, computed exactly on particles;
        with the Gaussian prior `N(mean, diag(std^2) / strength)`, the MAP estimate
        ([`~pal_rm.losses.map_adaptation_objective`], full-batch Adam, the trainer's `loss_type`). Without a learned
        prior, the Gaussian with the trained users' mean and spread at strength 1 (logged). Each new user also gets its
        posterior covariance (see `model.user_confidence`). Everything else (backbone, heads, prototypes, every known
        user) is frozen and left bit-identical.

        The responses are encoded once: from the embedding cache with a frozen backbone, or with the current (trained)
        backbone when `train_backbone=True`. The call is all-or-nothing: if it raises (bad rows, non-finite features
        or loss), no user is left registered.

        Args:
            prior_strength (`float`, *optional*): fit with the Gaussian prior at this strength (the learned mean and
                spread) instead of the learned prior.

        Returns a dict with the new users, their rows, their numbers of comparisons, the final objective per
        comparison and the training accuracy on `dataset`.
        """
        args = self.args
        steps = args.adapt_steps if steps is None else steps
        learning_rate = args.adapt_learning_rate if learning_rate is None else learning_rate
        prior_strength = args.adapt_prior_strength if prior_strength is None else prior_strength
        model = self._pal_model
        users = self._users_of(dataset, args, "adaptation")
        known = {user for user, registered in zip(users, model.is_registered(users)) if registered}
        new_users = [user for user in users if user not in known]
        if not new_users:
            logger.warning("`adapt_users`: every user of the dataset is already registered; nothing to fit.")
            return {"users": [], "rows": [], "loss": float("nan"), "accuracy": float("nan")}
        num_users_before = model.num_users
        was_training = model.training
        try:
            with self.full_pal_parameters():
                prior = model.adaptation_prior()
                prior_rows = model.trained_user_rows()  # before the new users are registered
                rows = model.add_users(new_users)
                result = self._fit_new_users(
                    dataset, new_users, rows, steps, learning_rate, prior, prior_strength, prior_rows
                )
                self._broadcast_user_rows(rows[0], len(new_users))
        except BaseException:
            model.truncate_users(num_users_before)  # all-or-nothing: no half-fitted user stays registered
            raise
        finally:
            model.train(was_training)
        return result

    def fit_adaptation_prior(
        self, dataset: Dataset | None = None, candidates: dict[str, tuple[float, ...]] | None = None
    ) -> dict | None:
        """
        Learns the population prior of [`adapt_users`] (see [`pal_rm.adaptation.fit_adaptation_prior`]): from the
        training users' mixture logits, an empirical (kernel) or Gaussian prior whose bandwidth or strength is chosen by
        fitting seen users again from part of their comparisons in `dataset` (default: the trainer's `eval_dataset`; a
        validation split, never test) and scoring the rest. Stored in `model.config.adaptation_prior` (saved with the
        model and shown in its model card). Called at the end of `train` when `args.fit_adaptation_prior`. Without a
        validation split nothing is chosen: a warning says so and adaptation uses a Gaussian with the trained users'
        mean and spread at strength 1.
        """
        model = self._pal_model
        if model.config.num_prototypes < 2:
            return None
        if dataset is None:
            dataset = self._raw_eval_dataset
            if isinstance(dataset, dict):
                dataset = dataset.get("validation", dataset.get("eval", next(iter(dataset.values()), None)))
        if dataset is None:
            logger.warning(
                "No validation split (`eval_dataset`): the strength of the adaptation prior is not chosen on data; "
                "`adapt_users` uses the trained users' mean and spread of mixture logits at strength 1. Pass "
                "`eval_dataset` or call `trainer.fit_adaptation_prior(validation_dataset)`."
            )
            return None
        args = self.args
        with self.full_pal_parameters():
            features = self._adaptation_features(dataset, 0)
            if features["users"].numel() == 0:
                logger.warning(
                    "`fit_adaptation_prior`: the validation split holds no comparison of a trained user, so the "
                    "adaptation prior is not chosen on data; `adapt_users` uses a Gaussian with the trained users' "
                    "mean and spread at strength 1."
                )
                return None
            pairs = embed_pairs(model, features["chosen"], features["rejected"], features["prompt"])
            try:
                prior = _fit_adaptation_prior(
                    model,
                    pairs,
                    features["users"],
                    model.user_rows(self.train_users).tolist(),
                    candidates=candidates,
                    margin=features["margin"],
                    loss_type=args.loss_type,
                    steps=args.adapt_steps,
                    learning_rate=args.adapt_learning_rate,
                    seed=args.seed,
                )
            except NotEnoughValidationData as error:
                logger.warning(f"{error} `adapt_users` keeps the trained users' mean and spread at strength 1.")
                return None
        return prior

    def _adaptation_features(self, dataset: Dataset, first_row: int) -> dict[str, torch.Tensor]:
        """Per-comparison features of the new users' rows of `dataset` (rows of known users are skipped)."""
        model, args = self._pal_model, self.args
        device = model.item_head.layers[-1].weight.device
        if args.train_backbone:
            # No feature cache with a trained backbone: encode each unique text once with the backbone as it is now.
            user_index = model.user_rows(_column_list(dataset, args.user_column), unknown_users="population")
            keep = (user_index >= first_row).nonzero().flatten().tolist()
            dataset = dataset.select(keep)
            prompts, chosen, rejected = self._format_texts(
                dataset, self.processing_class, "adaptation", args.dataset_num_proc
            )
            scorer = model.text_scorer(self.processing_class, args.max_length, args.encode_batch_size)
            n = len(chosen)
            table = scorer.encode(
                chosen + rejected + (prompts if model.needs_prompt else []), show_progress=not args.disable_tqdm
            )
            features = {"chosen": table[:n], "rejected": table[n : 2 * n], "users": user_index[keep].cpu()}
            features["prompt"] = table[2 * n :] if model.needs_prompt else None
            processed = dataset
        else:
            processed = self._prepare_dataset(dataset, self.processing_class, args, "adaptation")
            users = _column_tensor(processed, "user_index", torch.long)
            keep = (users >= first_row).nonzero().flatten()
            table = self.feature_store.table
            features = {
                "chosen": table[_column_tensor(processed, "chosen_index", torch.long)[keep]].float(),
                "rejected": table[_column_tensor(processed, "rejected_index", torch.long)[keep]].float(),
                "prompt": table[_column_tensor(processed, "prompt_index", torch.long)[keep]].float()
                if model.needs_prompt
                else None,
                "users": users[keep],
            }
        margin = None
        if "margin" in processed.column_names:
            margin = _check_finite(_column_tensor(processed, "margin", torch.float32), "margin", "adaptation")
            margin = margin if args.train_backbone else margin[keep]
        features["margin"] = margin
        for name in ("chosen", "rejected", "prompt"):
            if features[name] is not None:
                _check_finite(features[name], f"{name} features", "adaptation")
        return {name: value.to(device) if value is not None else None for name, value in features.items()}

    def _fit_new_users(
        self, dataset, new_users, rows, steps, learning_rate, prior, prior_strength, prior_rows
    ) -> dict[str, Any]:
        model, args = self._pal_model, self.args
        first_row = rows[0]
        features = self._adaptation_features(dataset, first_row)
        if not prior.learned and model.config.num_prototypes > 1:  # with K = 1 every user has the one mixture
            logger.warning(
                "`adapt_users`: the model has no learned adaptation prior (`config.adaptation_prior`); using the "
                "trained users' mean and spread of mixture logits at strength 1. Train with an `eval_dataset` (or call "
                "`trainer.fit_adaptation_prior(validation_dataset)`) to choose the strength on data."
            )
        if prior_strength is not None:
            prior = dataclasses.replace(prior, strength=float(prior_strength), method="gaussian")
        model.eval()
        pairs = embed_pairs(model, features["chosen"], features["rejected"], features["prompt"])
        fit = fit_users(
            model,
            pairs,
            features["users"] - first_row,
            len(new_users),
            prior,
            margin=features["margin"],
            loss_type=args.loss_type,
            steps=steps,
            learning_rate=learning_rate,
            show_progress=not args.disable_tqdm,
            seed=args.seed,
            prior_rows=prior_rows,
        )
        with torch.no_grad():
            model.user_weights.weight[first_row : first_row + len(new_users)] = fit.logits.to(
                model.user_weights.weight.dtype
            )
            model.set_user_posteriors(rows, fit.covariance, fit.num_comparisons.tolist())
        logger.info(
            f"Adapted {len(new_users)} new users on {len(pairs)} comparisons (train accuracy {fit.accuracy:.3f}, "
            f"{prior.method} prior)."
        )
        return {
            "users": new_users,
            "rows": rows,
            "num_comparisons": fit.num_comparisons.tolist(),
            "loss": fit.loss,
            "accuracy": fit.accuracy,
        }

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """
        `Trainer._save`, except that a frozen backbone without adapter is saved as a reference, not as weights
        (`PalRewardModel.save_pretrained(..., include_backbone=False)`): checkpoints hold PAL's weights only, and the
        backbone loads from `config.backbone_name_or_path`. When the model is pushed to the Hub and that reference is a
        local folder, which does not exist there, the backbone weights are saved instead (an adapter's base included).
        """
        model = self._pal_model
        reference = model.config.backbone_name_or_path
        include_backbone = None
        if model.backbone is not None and reference:
            if self.args.push_to_hub and os.path.exists(reference):
                include_backbone = True
            elif (
                not model.has_backbone_adapter
                and not any(parameter.requires_grad for parameter in model.backbone.parameters())
                and model.can_refer_to_backbone()
            ):
                include_backbone = False
        if include_backbone is None or not self.args.should_save:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        model.save_pretrained(output_dir, state_dict=state_dict, include_backbone=include_backbone)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """`Trainer._load_from_checkpoint`, plus the weights of the backbone adapter (in `backbone_adapter/`)."""
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._load_backbone_adapter_weights(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        """`Trainer._load_best_model`, plus the weights of the backbone adapter (in `backbone_adapter/`)."""
        super()._load_best_model()
        self._load_backbone_adapter_weights(self.state.best_model_checkpoint)

    def _load_backbone_adapter_weights(self, checkpoint: str) -> None:
        # DeepSpeed and FSDP restore their own checkpoint states, adapter included.
        if self._pal_model.has_backbone_adapter and not (self.is_deepspeed_enabled or self.is_fsdp_enabled):
            self._pal_model.load_backbone_adapter_weights(checkpoint)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """`Trainer.training_step`, refusing a non-finite loss (NaN or inf) instead of training on it."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            raise FloatingPointError(
                f"The training loss is {loss.item()} at step {self.state.global_step}: the rewards are no longer "
                "finite. Lower the learning rates, check the data for extreme values, or turn off mixed precision."
            )
        return loss


def _check_launch() -> None:
    """Refuses launches that would train wrongly without saying so."""
    distributed_state()  # several processes that form no group: an error, not N separate trainings
    if str_to_bool(os.environ.get("ACCELERATE_USE_FSDP", "false")) and str_to_bool(
        os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")
    ):
        raise ValueError(
            "FSDP's `cpu_ram_efficient_loading` loads the weights on the main process only and expects the others to "
            "receive them when the model is wrapped, but a PAL model encodes its texts and builds its heads and user "
            "table before that, on every process. In the accelerate config, set `fsdp_cpu_ram_efficient_loading: "
            "false` (hub_configs/accelerate/fsdp2.yaml does)."
        )


def average_across_processes(gradient: torch.Tensor) -> torch.Tensor:
    """The mean of `gradient` over all processes (a gradient hook for a parameter that FSDP leaves replicated)."""
    gradient = gradient.clone()
    torch.distributed.all_reduce(gradient)
    return gradient / torch.distributed.get_world_size()


def _is_fsdp2_module(model: torch.nn.Module) -> bool:
    """Whether `fully_shard` (FSDP2) wrapped `model` itself."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _format_row(example: dict, row: int, processing_class, needs_prompt: bool, dataset_name: str) -> dict[str, str]:
    """One preference row as the backbone reads it: `{"pal_prompt", "pal_chosen", "pal_rejected"}` texts."""
    if "prompt" not in example and needs_prompt:
        if not isinstance(example["chosen"], (str, list)) or not isinstance(example["rejected"], (str, list)):
            raise ValueError(f"Row {row} of the {dataset_name} dataset: `chosen`/`rejected` must be texts.")
        example = {**example, **extract_prompt(example)}
    prompt = example.get("prompt") or ""
    if needs_prompt and not prompt:
        raise ValueError(
            f"Row {row} of the {dataset_name} dataset has no prompt; PAL-B's ideal points depend on the prompt. Add a "
            "`prompt` column (or use PAL-A)."
        )
    prompt_text, chosen_text = format_preference_texts(processing_class, prompt, example["chosen"], row=row)
    _, rejected_text = format_preference_texts(processing_class, prompt, example["rejected"], row=row)
    return {"pal_prompt": prompt_text, "pal_chosen": chosen_text, "pal_rejected": rejected_text}


def _check_map_style(dataset, name: str) -> None:
    """Refuses an `IterableDataset` (streamed data) and anything that is not a `datasets.Dataset`, saying what to do."""
    if dataset is None:
        return
    if isinstance(dataset, IterableDataset):
        raise ValueError(
            f"The {name} dataset is an `IterableDataset` (streamed). PAL needs the whole dataset before training: it "
            "registers every user in the user table before the optimizer is built and encodes each unique text once. "
            "Load it without `streaming=True`, or materialise it with `Dataset.from_generator(lambda: "
            "(yield from iterable_dataset), features=iterable_dataset.features)`."
        )
    if not isinstance(dataset, Dataset):
        raise TypeError(f"The {name} dataset must be a `datasets.Dataset`, got {type(dataset).__name__}.")


def _check_finite(values: torch.Tensor, column: str, dataset_name: str) -> torch.Tensor:
    """Raises when `values` (one row per comparison) holds NaN or inf, naming the rows."""
    finite = torch.isfinite(values)
    if finite.dim() > 1:
        finite = finite.flatten(1).all(-1)
    if not bool(finite.all()):
        rows = (~finite).nonzero().flatten().tolist()
        raise ValueError(
            f"Column {column!r} of the {dataset_name} dataset holds NaN or inf in {len(rows)} rows (rows "
            f"{rows[:10]}{', ...' if len(rows) > 10 else ''}). Fix or drop those rows; training on them would make every "
            "reward NaN."
        )
    return values


def _check_distinct(same: torch.Tensor, dataset_name: str, what: str) -> None:
    """Raises when a comparison pits a response against itself (it carries no preference), naming the rows."""
    if bool(same.any()):
        rows = same.nonzero().flatten().tolist()
        raise ValueError(
            f"{len(rows)} rows of the {dataset_name} dataset have {what} (rows {rows[:10]}"
            f"{', ...' if len(rows) > 10 else ''}): such a comparison states no preference. Drop them first, for "
            "example `dataset.filter(lambda row: row['chosen'] != row['rejected'])`."
        )


def _column_tensor(dataset: Dataset, column: str, dtype: torch.dtype) -> torch.Tensor:
    """A column as one tensor, read through Arrow/NumPy (not row by row)."""
    values = dataset.select_columns([column]).with_format("arrow")[:].column(column).combine_chunks()
    if values.null_count == 0 and pa.types.is_primitive(values.type):
        return torch.tensor(values.to_numpy(zero_copy_only=False), dtype=dtype)
    is_list = pa.types.is_list(values.type) or pa.types.is_large_list(values.type)
    if values.null_count == 0 and (is_list or pa.types.is_fixed_size_list(values.type)):
        # A feature column (one vector per row): flattened in one go when every row has the same length (NumPy's
        # formatting would convert it row by row, seconds for a million rows).
        flat = values.flatten()
        if len(values) and len(flat) % len(values) == 0 and flat.null_count == 0 and pa.types.is_primitive(flat.type):
            width = len(flat) // len(values)
            if not is_list or _uniform_list_lengths(values, width):
                return torch.tensor(flat.to_numpy(zero_copy_only=False).reshape(len(values), width), dtype=dtype)
    return torch.as_tensor(dataset.select_columns([column]).with_format("numpy")[:][column], dtype=dtype)


def _uniform_list_lengths(values: "pa.ListArray", width: int) -> bool:
    """Whether every row of a list array holds `width` values."""
    offsets = values.offsets.to_numpy(zero_copy_only=False)
    return bool((offsets[1:] - offsets[:-1] == width).all())


def _column_list(dataset: Dataset, column: str) -> list:
    """A column as a Python list, read in one go (not row by row)."""
    return dataset.select_columns([column])[:][column]


__all__ = ["DataCollatorForPersonalizedPreference", "FeatureStore", "PalRewardTrainer"]
