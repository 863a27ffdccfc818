# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
"""
Train and evaluate a PAL personalized reward model, next to a one-reward-for-everyone Bradley-Terry baseline trained
the same way on the same data.

Runs unchanged under `python`, `accelerate launch` and `torchrun`:

```bash
accelerate launch trainers/train_pal.py --config hub_configs/pal-demo.yaml
python trainers/train_pal.py --config hub_configs/pal-demo.yaml --num_prototypes 2 --output_dir outputs/k2
```

Steps: load the dataset (seen-user train/validation/test and unseen-user few-shot/test splits); train PAL on the seen
users; fit the unseen users from their few-shot comparisons (`adapt_users`); evaluate seen-user and unseen-user
accuracy; train the baseline; print a table; save the model, the tokenizer and a model card.

Your own data: any TRL preference dataset with a user column, from the Hub, a local folder or local files, as TRL's
`reward.py` reads it:

```bash
python trainers/train_pal.py --config hub_configs/pal-own-data.yaml --dataset_name data/my-preferences
python trainers/train_pal.py --dataset_name org/prefs --dataset_config default --user_column worker \
    --dataset_test_split test --dataset_unseen_train_split new_users_train --dataset_unseen_test_split new_users_test
python trainers/train_pal.py --dataset_name train.parquet,validation.parquet,test.parquet
```

Only the train split is required: without an unseen-user pair of splits there is no adaptation, without a test split
seen-user accuracy is reported on the validation split (said so in the log and in `results.json`), and without either
no held-out accuracy is reported. The test split is never used during training.

Image preferences (rows of `prompt`, `chosen_image`, `rejected_image` and a user column, such as the Pick-a-Filter
loader's) train on a frozen two-tower image-text backbone, each image and caption encoded once and cached:

```bash
python trainers/train_pal.py --config hub_configs/pal-pick-a-filter.yaml
python trainers/train_pal.py --dataset_name data/my-image-preferences --model_name_or_path openai/clip-vit-base-patch32
```

LoRA on an LLM backbone (TRL's `ModelConfig` flags; the adapter goes on the backbone only) and resuming a run:

```bash
python trainers/train_pal.py --config hub_configs/pal-own-data.yaml --model_name_or_path Qwen/Qwen2.5-1.5B \
    --dtype bfloat16 --train_backbone true --use_peft --lora_r 16 --lora_target_modules q_proj v_proj \
    --save_strategy steps --save_steps 500
python trainers/train_pal.py ... --resume_from_checkpoint true   # the last complete checkpoint of output_dir
```

With `--push_to_hub true` the model is uploaded to `hub_model_id` with its user ids replaced by salted hashes: set the
salt in the `PAL_USER_ID_SALT` environment variable (the run stops before training without it), or pass
`--hash_user_ids false` to upload the raw ids. The salt is written nowhere.
"""

import dataclasses
import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

from datasets import DatasetDict
from transformers import AutoProcessor, AutoTokenizer, set_seed
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging
from trl import ModelConfig, TrlParser, get_peft_config, get_quantization_config

from pal_rm import PalConfig, PalRewardModel
from pal_rm.data import SPLIT_NAMES
from pal_rm.hub import resolve_user_id_salt
from pal_rm.trainers import PalRewardConfig, PalRewardTrainer, choose_num_prototypes
from pal_rm.utils import MINILM, resolve_model_path

logger = logging.get_logger(__name__)

BUILTIN_DATASETS = ("demo", "persona", "summary", "summary_lore", "prism", "personalllm", "pick_a_filter")
# Local data files and the `datasets` builder that reads them.
DATA_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


# The splits a run uses, by role: seen users (train, validation, test) and unseen users (few-shot, test).
@dataclass
class PalScriptArguments:
    """What to train on and what to run around the training."""

    dataset_name: str = field(
        default="demo",
        metadata={
            "help": "A loader of `pal_rm.data` ('demo' (built-in, offline), 'persona', 'summary' (Li et al. protocol), "
            "'summary_lore' (LoRe protocol), 'prism', 'personalllm' or 'pick_a_filter' (images: needs a CLIP or "
            "SigLIP --model_name_or_path)), or your own TRL "
            "preference dataset with a user column: a Hub id, a local folder (one split per data file, named after "
            "the file: train.jsonl, validation.jsonl, test.jsonl, ...; or a `save_to_disk` folder), or local "
            ".jsonl/.json/.parquet/.csv files (one file: the train split; several, comma-separated: one split each, "
            "named after the file)."
        },
    )
    dataset_config: str | None = field(
        default=None, metadata={"help": "Configuration of a Hub dataset (the `name` of `datasets.load_dataset`)."}
    )
    dataset_path: str | None = field(
        default=None,
        metadata={
            "help": "Data location for the loader: the persona jsonl folder, or the source of a Hub loader (summary, "
            "PRISM, PersonalLLM, Pick-a-Pic v1 for pick_a_filter: a Hub id or a local copy)."
        },
    )
    dataset_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments of the loader, or of `datasets.load_dataset` for your own data (for example "
            "`data_files` or `revision`); a dict in YAML, JSON on the command line."
        },
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split of the seen users' training data."})
    dataset_validation_split: str | None = field(
        default=None,
        metadata={"help": "Split evaluated during training (model selection). Default: 'validation' if present."},
    )
    dataset_test_split: str | None = field(
        default=None,
        metadata={"help": "Split of the seen users' final evaluation, never used in training. Default: 'test'."},
    )
    dataset_unseen_train_split: str | None = field(
        default=None,
        metadata={
            "help": "Few-shot comparisons of new users, fitted after training (`adapt_users`). Default: "
            "'unseen_train' if present; none: no adaptation."
        },
    )
    dataset_unseen_test_split: str | None = field(
        default=None,
        metadata={"help": "Test comparisons of the new users. Default: 'unseen_test' if present."},
    )
    dataset_seed: int = field(default=0, metadata={"help": "Seed of the dataset generator / splits."})
    compare_baseline: bool = field(
        default=True, metadata={"help": "Also train the one-reward-for-everyone Bradley-Terry baseline."}
    )
    adapt_unseen_users: bool = field(default=True, metadata={"help": "Fit and evaluate the unseen users."})
    choose_num_prototypes: int | None = field(
        default=None,
        metadata={
            "help": "Choose K among 1..N by the seen users' validation accuracy (the smallest on ties), then train "
            "that K as the run's model; overrides --num_prototypes."
        },
    )
    sanity_checks: bool = field(
        default=True, metadata={"help": "Run `pal_rm.sanity`'s user-swap and label-flip checks on the trained model."}
    )


@dataclass
class PalModelArguments(ModelConfig):
    """
    The PAL model: TRL's `ModelConfig` for the backbone (`model_name_or_path`, `model_revision`, `dtype`,
    `attn_implementation`, 4/8-bit loading, and LoRA: `use_peft`, `lora_r`, `lora_alpha`, `lora_dropout`,
    `lora_target_modules`, `lora_modules_to_save`, `use_rslora`, `use_dora`), plus PAL's heads (see `PalConfig`).
    LoRA goes on the backbone only and trains on tokens, so `--use_peft` needs `--train_backbone true`.
    """

    model_name_or_path: str = field(
        default=MINILM,
        metadata={
            "help": "Backbone: a Hub id, a folder, or 'packaged:<package>/<folder>' (default: packaged MiniLM)."
        },
    )
    lora_task_type: str | None = field(
        default=None, metadata={"help": "Ignored by PAL: the adapter goes on the backbone, whatever its task type."}
    )

    variant: str = field(default="b", metadata={"help": "'a' (prototype points) or 'b' (prompt-dependent)."})
    num_prototypes: int = field(default=4, metadata={"help": "Number of prototypes K."})
    preference_dim: int = field(default=64, metadata={"help": "Dimension of the preference space."})
    head_hidden_dims: list[int] = field(default_factory=list, metadata={"help": "Hidden widths of the heads."})
    head_activation: str = field(default="gelu", metadata={"help": "Activation of the heads."})
    similarity: str = field(default="neg_sq_l2", metadata={"help": "neg_sq_l2, neg_l2, cosine or dot."})
    pooling: str | None = field(default=None, metadata={"help": "last, mean or cls (default: by backbone type)."})
    mixture_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of the user mixtures."})

    def __post_init__(self):
        super().__post_init__()
        # TRL turns one module name into a string, which PEFT reads as a regular expression over full module names:
        # `--lora_target_modules c_attn` would match nothing. One name stays a list (`all-linear` is PEFT's keyword).
        if isinstance(self.lora_target_modules, str) and self.lora_target_modules != "all-linear":
            self.lora_target_modules = [self.lora_target_modules]


def load_preference_dataset(script_args: PalScriptArguments) -> DatasetDict:
    """
    The `DatasetDict` named by the script arguments: a built-in loader's (splits train, validation, test, unseen_train,
    unseen_test) or your own data's, with the splits it has (see `select_splits`).
    """
    from pal_rm import data

    kwargs = script_args.dataset_kwargs or {}
    if isinstance(kwargs, str):
        kwargs = json.loads(kwargs)
    name = script_args.dataset_name
    if name == "demo":
        return data.load_demo_preferences(seed=script_args.dataset_seed, **kwargs)
    if name == "persona":
        if script_args.dataset_path is None:
            raise ValueError("The persona dataset needs `dataset_path`: the folder of Anthropic persona jsonl files.")
        return data.load_persona_preferences(script_args.dataset_path, seed=script_args.dataset_seed, **kwargs)
    if name == "summary":
        source = script_args.dataset_path or "openai/summarize_from_feedback"
        return data.load_summary_preferences(source=source, seed=script_args.dataset_seed, **kwargs)
    if name == "summary_lore":
        source = script_args.dataset_path or "openai/summarize_from_feedback"
        return data.load_summary_lore_preferences(source=source, seed=script_args.dataset_seed, **kwargs)
    if name == "prism":
        source = script_args.dataset_path or "HannahRoseKirk/prism-alignment"
        return data.load_prism_preferences(source=source, seed=script_args.dataset_seed, **kwargs)
    if name == "personalllm":
        source = script_args.dataset_path or "namkoong-lab/PersonalLLM"
        return data.load_personalllm_preferences(source=source, seed=script_args.dataset_seed, **kwargs)
    if name == "pick_a_filter":
        source = script_args.dataset_path or "yuvalkirstain/pickapic_v1"
        return data.load_pick_a_filter_preferences(source=source, seed=script_args.dataset_seed, **kwargs)
    return load_own_dataset(name, script_args.dataset_config, kwargs)


def load_own_dataset(name: str, config_name: str | None = None, load_kwargs: dict | None = None) -> DatasetDict:
    """
    A preference dataset of your own, as a `DatasetDict`: `name` is a Hub id (read with `datasets.load_dataset(name,
    config_name)`), a local folder, or local data files (comma-separated).

    A local folder written by `save_to_disk` is read with `load_from_disk`. Otherwise each data file at the top of the
    folder is one split named after the file (`train.jsonl`, `unseen_train.jsonl`, shards `train-00000-of-00002.parquet`
    join their split); `datasets`' own folder conventions would merge `unseen_train.jsonl` into the train split. A
    folder without data files at its top (one sub-folder per split, ...) is read with `datasets.load_dataset(folder)`.
    One data file is the train split; several are one split each, named after the files. `load_kwargs` go to
    `datasets.load_dataset` (with `data_files` given, the files and splits are the caller's).
    """
    from datasets import load_dataset, load_from_disk

    load_kwargs = dict(load_kwargs or {})
    if load_kwargs.get("streaming") or "split" in load_kwargs:
        raise ValueError(
            "`dataset_kwargs` may not set `streaming` or `split`: PAL reads the whole dataset (every unique text is "
            "encoded once) and picks its splits with --dataset_train_split, --dataset_validation_split, "
            "--dataset_test_split, --dataset_unseen_train_split and --dataset_unseen_test_split."
        )
    paths = [path.strip() for path in name.split(",") if path.strip()]
    if "data_files" in load_kwargs:
        loaded = load_dataset(name, name=config_name, **load_kwargs)
    elif len(paths) == 1 and os.path.isdir(paths[0]):
        folder = paths[0]
        if os.path.exists(os.path.join(folder, "dataset_dict.json")) or os.path.exists(
            os.path.join(folder, "state.json")
        ):
            loaded = load_from_disk(folder)
        else:
            files = sorted(
                os.path.join(folder, entry)
                for entry in os.listdir(folder)
                if os.path.isfile(os.path.join(folder, entry)) and _data_file_extension(entry) is not None
            )
            if files:
                loaded = load_dataset(_builder_of(files), data_files=_files_by_split(files), **load_kwargs)
            else:
                loaded = load_dataset(folder, name=config_name, **load_kwargs)
    elif any(os.path.isfile(path) or _data_file_extension(path) is not None for path in paths):
        missing = [path for path in paths if not os.path.isfile(path)]
        if missing:
            raise FileNotFoundError(f"`dataset_name` names data files that do not exist: {missing}.")
        data_files = {"train": paths} if len(paths) == 1 else _files_by_split(paths)
        loaded = load_dataset(_builder_of(paths), data_files=data_files, **load_kwargs)
    else:
        loaded = load_dataset(name, name=config_name, **load_kwargs)
    if not isinstance(loaded, DatasetDict):
        raise ValueError(
            f"Reading {name!r} gave a {type(loaded).__name__}, not a `DatasetDict` of splits; PAL needs the whole "
            "dataset in memory (no streaming)."
        )
    return loaded


def _data_file_extension(path: str) -> str | None:
    lowered = path.lower()
    return next((extension for extension in DATA_FILE_BUILDERS if lowered.endswith(extension)), None)


def _builder_of(files: list[str]) -> str:
    """The `datasets` builder that reads every one of `files`; an error for unknown or mixed formats."""
    builders = {DATA_FILE_BUILDERS.get(_data_file_extension(path)) for path in files}
    if None in builders:
        unknown = [path for path in files if _data_file_extension(path) is None]
        raise ValueError(
            f"Unsupported data files {unknown}: local data must be {', '.join(DATA_FILE_BUILDERS)} files (or a folder "
            "of them)."
        )
    if len(builders) > 1:
        raise ValueError(f"The data files {files} mix formats ({sorted(builders)}); use one format for every split.")
    return builders.pop()


def _files_by_split(files: list[str]) -> dict[str, list[str]]:
    """`{split: files}`, the split named after each file (shards `train-00000-of-00002.parquet` join `train`)."""
    splits: dict[str, list[str]] = {}
    for path in files:
        base = os.path.basename(path)
        stem = base[: -len(_data_file_extension(base))]
        split = re.sub(r"-\d+-of-\d+$", "", stem)
        if not re.fullmatch(r"\w+", split):
            raise ValueError(
                f"The data file {path!r} would be split {split!r}, which is not a valid split name (letters, digits "
                "and underscores). Rename the file (train.jsonl, validation.jsonl, test.jsonl, unseen_train.jsonl, "
                "unseen_test.jsonl, ...) or pass `data_files` in --dataset_kwargs."
            )
        splits.setdefault(split, []).append(path)
    return splits


def select_splits(dataset: DatasetDict, script_args: PalScriptArguments, user_column: str, unknown_users: str):
    """
    The splits of the run, renamed to their roles (`SPLIT_NAMES`): train (required), validation and test (optional),
    unseen_train and unseen_test (optional, together). Each role takes the split named by its `--dataset_*_split`
    argument, else the split named after the role when the dataset has one. A named split that does not exist, a missing
    user or response column, one unseen-user split without the other, or evaluation users the model will not know are
    errors that name what the dataset has.
    """
    available = list(dataset)
    chosen = {}
    for role in SPLIT_NAMES:
        requested = getattr(script_args, f"dataset_{role}_split")
        if requested is None:
            if role in available:
                chosen[role] = role
            continue
        if requested not in available:
            raise ValueError(
                f"The dataset {script_args.dataset_name!r} has no split {requested!r} (`--dataset_{role}_split`); its "
                f"splits are {available}. Name one of them with `--dataset_{role}_split`."
            )
        chosen[role] = requested
    if ("unseen_train" in chosen) != ("unseen_test" in chosen):
        have, lack = ("unseen_train", "unseen_test") if "unseen_train" in chosen else ("unseen_test", "unseen_train")
        raise ValueError(
            f"Unseen users need two splits, few-shot comparisons to fit them and test comparisons to evaluate them; "
            f"the run has {have} ({chosen[have]!r}) but no {lack}. Name it with `--dataset_{lack}_split` (splits: "
            f"{available}), or drop the unseen-user splits."
        )
    splits = DatasetDict({role: dataset[split] for role, split in chosen.items()})
    for role, split in splits.items():
        columns = split.column_names
        if user_column not in columns:
            raise ValueError(
                f"Split {chosen[role]!r} of {script_args.dataset_name!r} has no user column {user_column!r} "
                f"(columns: {columns}). Name the column that says which user made each comparison with `--user_column`."
            )
        pairs = ({"chosen", "rejected"}, set(FEATURE_COLUMNS), set(IMAGE_COLUMNS))
        if not any(pair <= set(columns) for pair in pairs):
            raise ValueError(
                f"Split {chosen[role]!r} of {script_args.dataset_name!r} has no `chosen` and `rejected` columns "
                f"(columns: {columns}). PAL trains on TRL preference data: `prompt` (optional), `chosen`, `rejected` "
                "and a user column (or `prompt`, `chosen_image` and `rejected_image` for images); rename the columns "
                "first."
            )
    if unknown_users == "error":
        known = set(splits["train"][user_column])
        for role in ("validation", "test", "unseen_test"):
            if role not in splits:
                continue
            if role == "unseen_test":
                known = known | set(splits["unseen_train"][user_column])
            unknown = sorted(set(splits[role][user_column]) - known)
            if unknown:
                where = "the unseen_train split" if role == "unseen_test" else "the train split"
                raise ValueError(
                    f"Split {chosen[role]!r} ({role}) has {len(unknown)} users with no comparison in {where} (e.g. "
                    f"{unknown[:3]}): the model cannot score users it has not fitted. Put their few-shot comparisons "
                    "in the unseen-user splits, or pass `--unknown_users population` to score them with the "
                    "population mixture."
                )
    logger.info("Splits: " + ", ".join(f"{role} = {split!r}" for role, split in chosen.items()))
    return splits


def evaluation_split(dataset: DatasetDict) -> str | None:
    """The split that seen-user accuracy is reported on: test, else validation (logged), else none (logged)."""
    if "test" in dataset:
        return "test"
    if "validation" in dataset:
        logger.warning(
            "The dataset has no test split: seen-user accuracy is reported on the validation split, which also "
            "served for evaluation during training (an optimistic figure). Add a test split for an unbiased one."
        )
        return "validation"
    logger.warning("The dataset has neither a validation nor a test split: no held-out seen-user accuracy.")
    return None


def without_evaluation_during_training(training_args: PalRewardConfig, dataset: DatasetDict) -> PalRewardConfig:
    """The training arguments, with evaluation during training turned off (and said so) when there is no validation
    split; an error if `load_best_model_at_end` needs it."""
    if "validation" in dataset or training_args.eval_strategy == "no":
        return training_args
    if training_args.load_best_model_at_end:
        raise ValueError(
            "`load_best_model_at_end` selects a checkpoint on the validation split, but the dataset has none. Add a "
            "validation split (`--dataset_validation_split`); the test split is never used for selection."
        )
    logger.warning(
        f"The dataset has no validation split: `eval_strategy={training_args.eval_strategy.value!r}` is turned off "
        "(the test split is never evaluated during training)."
    )
    return dataclasses.replace(training_args, eval_strategy="no")


def model_card_dataset_name(script_args: PalScriptArguments) -> str:
    """What the model card says the model was trained on: the loader or Hub id, never a local path."""
    name = script_args.dataset_name
    if name in BUILTIN_DATASETS or not any(os.path.exists(path.strip()) for path in name.split(",")):
        return name
    return "local data (" + ", ".join(os.path.basename(path.strip().rstrip(os.sep)) for path in name.split(",")) + ")"


def _accuracy(metrics: dict, prefix: str) -> float:
    return metrics[f"{prefix}_accuracy"]


def resume_argument(value: str | bool | None) -> str | bool | None:
    """`--resume_from_checkpoint` as `Trainer.train` takes it: a checkpoint folder, or `True` (the argument `true`)
    for the last checkpoint of `output_dir`."""
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "1", "0", ""):
        return value.strip().lower() in ("true", "yes", "1")
    return value


def run_experiment(
    trainer: PalRewardTrainer,
    dataset,
    script_args,
    save_before_adaptation: str | None = None,
    resume_from_checkpoint: str | bool | None = None,
) -> dict[str, float]:
    """Trains (resuming from a checkpoint when asked), adapts unseen users, evaluates; returns seen/unseen accuracies
    (and the split of the seen ones). With `save_before_adaptation`, the trained model is saved there before the unseen
    users are fitted."""
    trainer.train(resume_from_checkpoint=resume_from_checkpoint or None)
    results = {}
    split = evaluation_split(dataset)
    if split is not None:
        metrics = trainer.evaluate(dataset[split], metric_key_prefix=split)
        results["seen_accuracy"] = _accuracy(metrics, split)
        results["seen_user_accuracy_mean"] = metrics[f"{split}_user_accuracy_mean"]
        results["seen_accuracy_split"] = split
    if script_args.adapt_unseen_users and "unseen_train" in dataset:
        if save_before_adaptation is not None:  # a failure while adapting never loses the trained model
            trainer.save_model(save_before_adaptation)
        trainer.adapt_users(dataset["unseen_train"])  # with K = 1 this registers them with the one mixture
        metrics = trainer.evaluate(dataset["unseen_test"], metric_key_prefix="unseen_test")
        results["unseen_accuracy"] = _accuracy(metrics, "unseen_test")
        results["unseen_user_accuracy_mean"] = metrics["unseen_test_user_accuracy_mean"]
    return results


def run_sanity_checks(trainer: PalRewardTrainer, tokenizer, dataset) -> dict[str, dict]:
    """`pal_rm.sanity`'s two checks: seen users swapped on the test split, label flips on the unseen users' shots."""
    from pal_rm.sanity import label_flip_check, user_swap_check

    checks = {}
    split = "test" if "test" in dataset else "validation" if "validation" in dataset else None
    if split is not None:
        checks["user_swap"] = user_swap_check(trainer.model, tokenizer, dataset[split], trainer.args.user_column)
    if "unseen_train" in dataset and trainer.model.config.num_prototypes > 1:
        checks["label_flip"] = label_flip_check(trainer, dataset["unseen_train"])
    return checks


def print_sanity_checks(checks: dict[str, dict]) -> None:
    if "user_swap" in checks:
        swap = checks["user_swap"]
        verdict = "FLAGGED: users look interchangeable" if swap["interchangeable"] else "ok"
        print(
            f"\nSanity check (user swap): giving each seen user another user's mixture moves test accuracy "
            f"{swap['accuracy']:.3f} -> {swap['swapped_accuracy']:.3f} ({verdict})."
        )
    if "label_flip" in checks:
        flip = checks["label_flip"]
        verdict = "FLAGGED: comparisons barely move a user" if flip["insensitive"] else "ok"
        print(
            f"Sanity check (label flip): fitting the unseen users on flipped labels flips "
            f"{flip['flipped_predictions']:.0%} of their predictions, mixture shift {flip['mixture_shift']:.2f} "
            f"({verdict})."
        )


def main(script_args: PalScriptArguments, model_args: PalModelArguments, training_args: PalRewardConfig):
    start = time.time()
    set_seed(training_args.seed)
    # the main process first: it downloads the data and writes any `datasets` cache (Pick-a-Filter's images), which the
    # other processes then read instead of writing the same files at the same time
    with training_args.main_process_first(desc="loading the dataset"):
        loaded = load_preference_dataset(script_args)
    dataset = select_splits(loaded, script_args, training_args.user_column, training_args.unknown_users)
    training_args = without_evaluation_during_training(training_args, dataset)
    feature_dim = feature_dataset_dim(dataset, model_args, training_args)
    head_kwargs = {
        "preference_dim": model_args.preference_dim,
        "head_hidden_dims": model_args.head_hidden_dims,
        "head_activation": model_args.head_activation,
    }
    images = holds_images(dataset)
    if images:
        check_image_arguments(model_args, training_args)
    if feature_dim is None:
        backbone_path = resolve_model_path(model_args.model_name_or_path)
        # an image model reads images and captions with its backbone's processor (CLIP, SigLIP)
        tokenizer = (AutoProcessor if images else AutoTokenizer).from_pretrained(backbone_path)
        backbone_kwargs = backbone_loading_kwargs(model_args)
        peft_config = get_peft_config(model_args)
    else:  # heads on precomputed features: no backbone, no tokenizer
        tokenizer, peft_config = None, None

    def build_model(variant, num_prototypes, similarity, **kwargs):
        if feature_dim is not None:
            config = PalConfig(
                feature_dim=feature_dim,
                variant=variant,
                num_prototypes=num_prototypes,
                similarity=similarity,
                **head_kwargs,
                **kwargs,
            )
            return PalRewardModel(config)
        return PalRewardModel.from_backbone(
            backbone_path,
            variant=variant,
            num_prototypes=num_prototypes,
            similarity=similarity,
            pooling=model_args.pooling,
            **backbone_kwargs,
            **head_kwargs,
            **kwargs,
        )

    k_choice = None
    if script_args.choose_num_prototypes:
        if dataset.get("validation") is None:
            raise ValueError("`--choose_num_prototypes` needs a validation split of the seen users.")

        def model_init(k):
            return build_model(
                model_args.variant, k, model_args.similarity, mixture_temperature=model_args.mixture_temperature
            )

        choice = choose_num_prototypes(
            model_init,
            dataclasses.replace(training_args, output_dir=os.path.join(training_args.output_dir, "choose_k")),
            dataset["train"],
            dataset["validation"],
            max_num_prototypes=script_args.choose_num_prototypes,
            processing_class=tokenizer,
            peft_config=peft_config,
        )
        k_choice = {"chosen": choice.num_prototypes, "validation_accuracy": choice.validation_accuracy}
        del choice
        model_args.num_prototypes = k_choice["chosen"]
        if training_args.process_index == 0:
            accuracies = ", ".join(f"K={k}: {v:.3f}" for k, v in k_choice["validation_accuracy"].items())
            print(f"Chose K={k_choice['chosen']} on the validation split ({accuracies}).")
    model = build_model(
        model_args.variant,
        model_args.num_prototypes,
        model_args.similarity,
        mixture_temperature=model_args.mixture_temperature,
    )

    def make_trainer(model, args, embedding_cache=None):
        return PalRewardTrainer(
            model,
            args,
            train_dataset=dataset["train"],
            eval_dataset=dataset.get("validation"),
            processing_class=tokenizer,
            embedding_cache=embedding_cache,
            peft_config=peft_config,
        )

    resume = resume_argument(training_args.resume_from_checkpoint)
    trainer = make_trainer(model, training_args)
    if trainer.accelerator.is_main_process:
        print(trainer.trainable_parameters_summary)
    name = f"PAL-{model_args.variant.upper()} (K={model_args.num_prototypes})"
    table = {
        name: run_experiment(
            trainer,
            dataset,
            script_args,
            save_before_adaptation=training_args.output_dir,
            resume_from_checkpoint=resume,
        )
    }
    trainer.save_model(training_args.output_dir)
    sanity = {}
    if script_args.sanity_checks and (feature_dim is not None or images):
        logger.warning(
            "The sanity checks score texts; this run trains on "
            f"{'precomputed features' if feature_dim is not None else 'images'}, so they are skipped."
        )
    elif script_args.sanity_checks:
        sanity = run_sanity_checks(trainer, tokenizer, dataset)

    if script_args.compare_baseline:
        # One reward for everyone: a single prototype, so every user (seen or not) gets the same reward.
        set_seed(training_args.seed)
        baseline = build_model("a", 1, "dot")
        # The baseline is not published (only the PAL model is pushed), but its folder lies inside the uploaded
        # output_dir, so it holds hashed user ids whenever the PAL model does.
        baseline_args = dataclasses.replace(
            training_args,
            output_dir=os.path.join(training_args.output_dir, "baseline"),
            unknown_users="population",
            push_to_hub=False,
        )
        if training_args.push_to_hub and training_args.hash_user_ids:
            baseline.hash_user_ids(resolve_user_id_salt())
        baseline_trainer = make_trainer(baseline, baseline_args, embedding_cache=trainer.embedding_cache)
        # A resumed run resumes the baseline too when it had reached a checkpoint, and trains it afresh otherwise.
        baseline_resume = None
        if resume and os.path.isdir(baseline_args.output_dir) and get_last_checkpoint(baseline_args.output_dir):
            baseline_resume = True  # its last complete checkpoint
        table["Bradley-Terry (one reward for everyone)"] = run_experiment(
            baseline_trainer, dataset, script_args, resume_from_checkpoint=baseline_resume
        )

    if trainer.accelerator.is_main_process:
        trainer.create_model_card(
            dataset_name=model_card_dataset_name(script_args), eval_results=next(iter(table.values()))
        )
        with open(os.path.join(training_args.output_dir, "results.json"), "w") as file:
            json.dump(
                {
                    "results": table,
                    "sanity_checks": sanity,
                    "num_prototypes_choice": k_choice,
                    "wall_time_seconds": time.time() - start,
                },
                file,
                indent=2,
            )
        print_table(table, dataset, training_args.user_column)
        print_sanity_checks(sanity)
        output_dir = os.path.abspath(training_args.output_dir)
        print(f"\nSaved to {output_dir} in {time.time() - start:.0f} s. Load it back with:\n")
        reader = "AutoProcessor" if images else "AutoTokenizer"
        print(f"    import pal_rm; from transformers import AutoModel, {reader}")
        load = f"    model = AutoModel.from_pretrained({output_dir!r})"
        if tokenizer is not None:
            load += f"; {'processor' if images else 'tokenizer'} = {reader}.from_pretrained({output_dir!r})"
        print(load)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=model_card_dataset_name(script_args))


FEATURE_COLUMNS = ("chosen_features", "rejected_features")
IMAGE_COLUMNS = ("chosen_image", "rejected_image")


def holds_images(dataset: DatasetDict) -> bool:
    """Whether the dataset holds image preference rows (`prompt`, `chosen_image`, `rejected_image`): PAL then trains
    on a frozen two-tower image-text backbone (CLIP, SigLIP) read with its processor, its image and caption features
    encoded once and cached."""
    return any(set(IMAGE_COLUMNS) & set(part.column_names) for part in dataset.values())


def backbone_training_arguments(model_args: PalModelArguments, training_args: PalRewardConfig) -> list[str]:
    """The arguments given that train or read a backbone's hidden states (`--use_peft`, `--train_backbone`,
    `--pooling`): none applies when PAL trains its heads on fixed features, precomputed or from a frozen image
    backbone."""
    given = {
        "--use_peft": model_args.use_peft,
        "--train_backbone": training_args.train_backbone,
        "--pooling": model_args.pooling is not None,
    }
    return [name for name, set_ in given.items() if set_]


def check_image_arguments(model_args: PalModelArguments, training_args: PalRewardConfig) -> None:
    """Settings an image run cannot honour are an error, not ignored."""
    if model_args.model_name_or_path == MINILM:
        raise ValueError(
            "The dataset holds images, so PAL needs a two-tower image-text backbone: pass `--model_name_or_path` a "
            "CLIP or SigLIP model (for example laion/CLIP-ViT-H-14-laion2B-s32B-b79K, the PAL paper's), not the "
            "default text backbone."
        )
    given = backbone_training_arguments(model_args, training_args)
    if given:
        raise ValueError(
            f"The dataset holds images: PAL trains its heads on the frozen image backbone's cached features, so "
            f"{given} cannot apply. Drop those arguments."
        )


def feature_dataset_dim(dataset: DatasetDict, model_args: PalModelArguments, training_args: PalRewardConfig):
    """
    The feature width of a dataset of precomputed features (`chosen_features`, `rejected_features` and, for PAL-B,
    `prompt_features` columns, as `pal_rm.cache.featurize_preferences` or a feature loader writes them), or `None`
    for a dataset of texts. PAL then trains its heads on the features alone (`PalConfig(feature_dim=...)`); settings
    that need a backbone are an error rather than ignored.
    """
    featured = {split: set(FEATURE_COLUMNS) <= set(part.column_names) for split, part in dataset.items()}
    if not any(featured.values()):
        return None
    if not all(featured.values()):
        raise ValueError(
            f"Some splits hold features and others texts ({featured}): train on one kind of data. Encode the texts "
            "with `pal_rm.cache.featurize_preferences`, or drop the feature splits."
        )
    widths = {len(part[0][FEATURE_COLUMNS[0]]) for part in dataset.values() if len(part)}
    if len(widths) != 1:
        raise ValueError(f"The splits' `chosen_features` have different widths {sorted(widths)}.")
    given = ["--model_name_or_path"] if model_args.model_name_or_path != MINILM else []
    given += backbone_training_arguments(model_args, training_args)
    if given:
        raise ValueError(
            f"The dataset holds precomputed features, so PAL trains its heads on them without a backbone, and "
            f"{given} cannot apply. Drop those arguments, or train on the texts."
        )
    width = widths.pop()
    logger.info(f"Training on precomputed features of width {width} (no backbone).")
    return width


def backbone_loading_kwargs(model_args: PalModelArguments) -> dict[str, Any]:
    """`from_backbone` arguments from TRL's `ModelConfig` fields: dtype, attention, quantization, revision."""
    kwargs: dict[str, Any] = {}
    if model_args.dtype not in (None, "auto"):
        kwargs["dtype"] = model_args.dtype
    if model_args.attn_implementation is not None:
        kwargs["attn_implementation"] = model_args.attn_implementation
    quantization_config = get_quantization_config(model_args)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if model_args.model_revision not in (None, "main"):
        kwargs["backbone_kwargs"] = {"revision": model_args.model_revision}
    if model_args.lora_target_parameters is not None:
        raise ValueError(
            "`--lora_target_parameters` is not supported by PAL; name modules with --lora_target_modules."
        )
    return kwargs


def print_table(table: dict[str, dict[str, float]], dataset, user_column: str = "user_id") -> None:
    train = dataset["train"]
    line = f"\nSeen users: {len(set(train[user_column]))} ({len(train)} train"
    line += "".join(f" / {len(dataset[split])} {split}" for split in ("validation", "test") if split in dataset)
    line += " comparisons)"
    if "unseen_test" in dataset:
        line += (
            f"; unseen users: {len(set(dataset['unseen_test'][user_column]))} ({len(dataset['unseen_train'])} "
            f"few-shot / {len(dataset['unseen_test'])} test comparisons)"
        )
    print(line + "\n")
    split = next((row["seen_accuracy_split"] for row in table.values() if "seen_accuracy_split" in row), None)
    seen_header = "seen-user accuracy" + (f" ({split})" if split not in (None, "test") else "")
    name_width = max(len(name) for name in table) + 2
    print(f"{'model':<{name_width}}{seen_header:>{len(seen_header) + 2}}{'unseen-user accuracy':>22}")
    for name, results in table.items():
        seen, unseen = results.get("seen_accuracy"), results.get("unseen_accuracy")
        seen = f"{seen:.3f}" if seen is not None else "-"
        unseen = f"{unseen:.3f}" if unseen is not None else "-"
        print(f"{name:<{name_width}}{seen:>{len(seen_header) + 2}}{unseen:>22}")


def make_parser(subparsers=None) -> TrlParser:
    dataclass_types = (PalScriptArguments, PalModelArguments, PalRewardConfig)
    if subparsers is not None:
        return subparsers.add_parser("pal", help="Train a PAL reward model", dataclass_types=dataclass_types)
    return TrlParser(dataclass_types)


if __name__ == "__main__":
    parser = make_parser()
    script_args, model_args, training_args = parser.parse_args_and_config()
    main(script_args, model_args, training_args)
