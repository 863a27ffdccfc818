# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
"""Choosing the number of prototypes K on the seen users' validation split."""

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass

from accelerate.logging import get_logger
from datasets import Dataset
from transformers import set_seed

from pal_rm.cache import FeatureStore
from pal_rm.modeling_pal import PalRewardModel

from .pal_reward_config import PalRewardConfig
from .pal_reward_trainer import PalRewardTrainer

logger = get_logger(__name__)


@dataclass
class NumPrototypesChoice:
    """
    The result of [`choose_num_prototypes`]: the chosen K, the seen-user validation accuracy of every K tried, and the
    trainer of the chosen model (trained, with its adaptation prior learned on the same validation split).
    """

    num_prototypes: int
    validation_accuracy: dict[int, float]
    trainer: PalRewardTrainer


def choose_num_prototypes(
    model_init: Callable[[int], PalRewardModel],
    args: PalRewardConfig,
    train_dataset: Dataset,
    eval_dataset: Dataset,
    max_num_prototypes: int = 6,
    tolerance: float = 0.0,
    processing_class=None,
    embedding_cache: FeatureStore | None = None,
    **trainer_kwargs,
) -> NumPrototypesChoice:
    """
    Trains one PAL model for each K = 1..`max_num_prototypes` (`model_init(K)` builds it) on `train_dataset` and picks K
    by the seen users' accuracy on `eval_dataset` (a validation split, never test): the smallest K whose accuracy is
    within `tolerance` of the best (exact ties go to the smaller K). With a frozen backbone, the texts are encoded once
    and shared by all K (one `FeatureStore`, by default in `args.embedding_cache_dir`). Each run writes under `args.output_dir/k{K}` and saves no checkpoint.

    Example:

    ```python
    >>> choice = choose_num_prototypes(
    ...     lambda k: PalRewardModel.from_backbone(path, variant="b", num_prototypes=k), args, train, validation,
    ...     processing_class=tokenizer,
    ... )
    >>> choice.num_prototypes, choice.validation_accuracy
    ```
    """
    if max_num_prototypes < 1:
        raise ValueError(f"`max_num_prototypes` must be >= 1, got {max_num_prototypes}.")
    if eval_dataset is None or len(eval_dataset) == 0:
        raise ValueError("Choosing K needs a validation split of the seen users (`eval_dataset`).")
    if tolerance < 0:
        raise ValueError(f"`tolerance` must be >= 0, got {tolerance}.")
    cache = embedding_cache
    if cache is None:
        cache = FeatureStore(args.embedding_cache_dir, dtype=args.feature_dtype)
    accuracy: dict[int, float] = {}
    trainers: dict[int, PalRewardTrainer] = {}
    for k in range(1, max_num_prototypes + 1):
        set_seed(args.seed)
        run_args = dataclasses.replace(
            args,
            output_dir=os.path.join(args.output_dir, f"k{k}"),
            save_strategy="no",
            push_to_hub=False,
            load_best_model_at_end=False,
        )
        model = model_init(k)
        if model.config.num_prototypes != k:
            raise ValueError(f"`model_init({k})` built a model with {model.config.num_prototypes} prototypes.")
        trainer = PalRewardTrainer(
            model,
            run_args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            embedding_cache=cache,
            **trainer_kwargs,
        )
        trainer.train()
        accuracy[k] = trainer.evaluate(eval_dataset, metric_key_prefix="validation")["validation_accuracy"]
        logger.info(f"K={k}: validation accuracy {accuracy[k]:.4f}")
        trainers[k] = trainer
        best = max(accuracy.values())
        # keep only the trainers that can still be chosen (their models hold a backbone reference and a user table)
        for other in [j for j in trainers if accuracy[j] < best - tolerance]:
            del trainers[other]
    best = max(accuracy.values())
    chosen = min(k for k in accuracy if accuracy[k] >= best - tolerance)
    logger.info(f"Chose K={chosen} (validation accuracy {accuracy[chosen]:.4f}; best {best:.4f}).")
    return NumPrototypesChoice(num_prototypes=chosen, validation_accuracy=accuracy, trainer=trainers[chosen])


__all__ = ["NumPrototypesChoice", "choose_num_prototypes"]
