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

With `--push_to_hub true` the model is uploaded to `hub_model_id` with its user ids replaced by salted hashes: set the
salt in the `PAL_USER_ID_SALT` environment variable (the run stops before training without it), or pass
`--hash_user_ids false` to upload the raw ids. The salt is written nowhere.
"""

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from transformers import AutoTokenizer, set_seed
from trl import TrlParser

from pal_rm import PalRewardModel
from pal_rm.hub import resolve_user_id_salt
from pal_rm.trainers import PalRewardConfig, PalRewardTrainer
from pal_rm.utils import MINILM, resolve_model_path


@dataclass
class PalScriptArguments:
    """What to train on and what to run around the training."""

    dataset_name: str = field(
        default="demo",
        metadata={"help": "Which loader of `pal_rm.data`: 'demo' (built-in, offline), 'persona' or 'summary'."},
    )
    dataset_path: str | None = field(
        default=None,
        metadata={
            "help": "Data location for the loader: the persona jsonl folder, or the summary source (Hub id/path)."
        },
    )
    dataset_kwargs: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "Keyword arguments of the loader (a dict in YAML, JSON on the command line)."}
    )
    dataset_seed: int = field(default=0, metadata={"help": "Seed of the dataset generator / splits."})
    compare_baseline: bool = field(
        default=True, metadata={"help": "Also train the one-reward-for-everyone Bradley-Terry baseline."}
    )
    adapt_unseen_users: bool = field(default=True, metadata={"help": "Fit and evaluate the unseen users."})
    sanity_checks: bool = field(
        default=True, metadata={"help": "Run `pal_rm.sanity`'s user-swap and label-flip checks on the trained model."}
    )


@dataclass
class PalModelArguments:
    """The PAL model: backbone and heads (see `PalConfig`)."""

    model_name_or_path: str = field(
        default=MINILM,
        metadata={
            "help": "Backbone: a Hub id, a folder, or 'packaged:<package>/<folder>' (default: packaged MiniLM)."
        },
    )
    variant: str = field(default="b", metadata={"help": "'a' (prototype points) or 'b' (prompt-dependent)."})
    num_prototypes: int = field(default=4, metadata={"help": "Number of prototypes K."})
    preference_dim: int = field(default=64, metadata={"help": "Dimension of the preference space."})
    head_hidden_dims: list[int] = field(default_factory=list, metadata={"help": "Hidden widths of the heads."})
    head_activation: str = field(default="gelu", metadata={"help": "Activation of the heads."})
    similarity: str = field(default="neg_sq_l2", metadata={"help": "neg_sq_l2, neg_l2, cosine or dot."})
    pooling: str | None = field(default=None, metadata={"help": "last, mean or cls (default: by backbone type)."})
    mixture_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of the user mixtures."})


def load_preference_dataset(script_args: PalScriptArguments):
    """The `DatasetDict` named by the script arguments (splits: train, validation, test, unseen_train, unseen_test)."""
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
    raise ValueError(f"Unknown `dataset_name` {name!r}; choose 'demo', 'persona' or 'summary'.")


def _accuracy(metrics: dict, prefix: str) -> float:
    return metrics[f"{prefix}_accuracy"]


def run_experiment(trainer: PalRewardTrainer, dataset, script_args) -> dict[str, float]:
    """Trains, adapts unseen users, evaluates; returns seen/unseen accuracies."""
    trainer.train()
    results = {"seen_accuracy": _accuracy(trainer.evaluate(dataset["test"], metric_key_prefix="test"), "test")}
    results["seen_user_accuracy_mean"] = _mean(trainer.per_user_accuracy["test"])
    if script_args.adapt_unseen_users and "unseen_train" in dataset:
        if trainer._pal_model.config.num_prototypes > 1:
            trainer.adapt_users(dataset["unseen_train"])
        metrics = trainer.evaluate(dataset["unseen_test"], metric_key_prefix="unseen_test")
        results["unseen_accuracy"] = _accuracy(metrics, "unseen_test")
        results["unseen_user_accuracy_mean"] = _mean(trainer.per_user_accuracy["unseen_test"])
    return results


def run_sanity_checks(trainer: PalRewardTrainer, tokenizer, dataset) -> dict[str, dict]:
    """`pal_rm.sanity`'s two checks: seen users swapped on the test split, label flips on the unseen users' shots."""
    from pal_rm.sanity import label_flip_check, user_swap_check

    checks = {"user_swap": user_swap_check(trainer.model, tokenizer, dataset["test"], trainer.args.user_column)}
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


def _mean(values: dict) -> float:
    return sum(values.values()) / max(len(values), 1)


def main(script_args: PalScriptArguments, model_args: PalModelArguments, training_args: PalRewardConfig):
    start = time.time()
    set_seed(training_args.seed)
    dataset = load_preference_dataset(script_args)
    backbone_path = resolve_model_path(model_args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(backbone_path)
    head_kwargs = {
        "preference_dim": model_args.preference_dim,
        "head_hidden_dims": model_args.head_hidden_dims,
        "head_activation": model_args.head_activation,
        "pooling": model_args.pooling,
    }
    model = PalRewardModel.from_backbone(
        backbone_path,
        variant=model_args.variant,
        num_prototypes=model_args.num_prototypes,
        similarity=model_args.similarity,
        mixture_temperature=model_args.mixture_temperature,
        **head_kwargs,
    )

    def make_trainer(model, args, embedding_cache=None):
        return PalRewardTrainer(
            model,
            args,
            train_dataset=dataset["train"],
            eval_dataset=dataset["validation"],
            processing_class=tokenizer,
            embedding_cache=embedding_cache,
        )

    trainer = make_trainer(model, training_args)
    name = f"PAL-{model_args.variant.upper()} (K={model_args.num_prototypes})"
    table = {name: run_experiment(trainer, dataset, script_args)}
    trainer.save_model(training_args.output_dir)
    sanity = run_sanity_checks(trainer, tokenizer, dataset) if script_args.sanity_checks else {}

    if script_args.compare_baseline:
        # One reward for everyone: a single prototype, so every user (seen or not) gets the same reward.
        set_seed(training_args.seed)
        baseline = PalRewardModel.from_backbone(
            backbone_path, variant="a", num_prototypes=1, similarity="dot", **head_kwargs
        )
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
        table["Bradley-Terry (one reward for everyone)"] = run_experiment(baseline_trainer, dataset, script_args)

    if trainer.accelerator.is_main_process:
        trainer.create_model_card(dataset_name=script_args.dataset_name, eval_results=next(iter(table.values())))
        with open(os.path.join(training_args.output_dir, "results.json"), "w") as file:
            json.dump(
                {"results": table, "sanity_checks": sanity, "wall_time_seconds": time.time() - start}, file, indent=2
            )
        print_table(table, dataset)
        print_sanity_checks(sanity)
        output_dir = os.path.abspath(training_args.output_dir)
        print(f"\nSaved to {output_dir} in {time.time() - start:.0f} s. Load it back with:\n")
        print("    import pal_rm; from transformers import AutoModel, AutoTokenizer")
        print(
            f"    model = AutoModel.from_pretrained({output_dir!r}); tokenizer = AutoTokenizer.from_pretrained({output_dir!r})"
        )
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)


def print_table(table: dict[str, dict[str, float]], dataset) -> None:
    print(
        f"\nSeen users: {len(set(dataset['train']['user_id']))} ({len(dataset['train'])} train / "
        f"{len(dataset['test'])} test comparisons); unseen users: {len(set(dataset['unseen_test']['user_id']))} "
        f"({len(dataset['unseen_train'])} few-shot / {len(dataset['unseen_test'])} test comparisons)\n"
    )
    name_width = max(len(name) for name in table) + 2
    print(f"{'model':<{name_width}}{'seen-user accuracy':>20}{'unseen-user accuracy':>22}")
    for name, results in table.items():
        unseen = results.get("unseen_accuracy")
        unseen = f"{unseen:.3f}" if unseen is not None else "-"
        print(f"{name:<{name_width}}{results['seen_accuracy']:>20.3f}{unseen:>22}")


def make_parser(subparsers=None) -> TrlParser:
    dataclass_types = (PalScriptArguments, PalModelArguments, PalRewardConfig)
    if subparsers is not None:
        return subparsers.add_parser("pal", help="Train a PAL reward model", dataclass_types=dataclass_types)
    return TrlParser(dataclass_types)


if __name__ == "__main__":
    parser = make_parser()
    script_args, model_args, training_args = parser.parse_args_and_config()
    main(script_args, model_args, training_args)
