# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
"""
Image preferences, offline: PAL on a frozen two-tower image-text backbone against one reward for everyone.

The data is `pal_rm.data.load_color_filter_preferences`: procedurally drawn images with warm and cool colour filters
applied as in Pick-a-Filter, two groups of users preferring one filter or the other, mixture users in between, and a
preference for bigger shapes that everyone shares. The backbone is a tiny CLIP with random weights, built in code and
frozen, read through its real image processor (resize, crop, normalisation) and tokenizer (the packaged MiniLM's, for
the captions). So this is a check that the image pipeline works end to end (images -> processor -> image tower ->
feature store -> PAL's heads -> rewards -> few-shot new users) and that PAL separates the two groups where one reward
cannot; it says nothing about image understanding, which random weights do not have.

Models: one reward for everyone (PAL-A with one prototype and `dot`), PAL-A and PAL-B with K = 2; the "true model"
row is the accuracy of the simulation's own rewards, the ceiling. Unseen users are fitted on 1, 2, 5, 10 and 20 of
their comparisons. Settings were fixed before the run (no search); "PAL" is chosen on seen-user validation accuracy.

```bash
python examples/benchmarks/images.py            # about 2 minutes on 2 cores
python examples/benchmarks/images.py --smoke    # seconds
```

Writes `outputs/benchmarks/images.json`.
"""

import argparse
import os
import tempfile
import time
from collections import Counter

import torch
from _common import OUTPUT_DIR, machine, markdown_table, pal_results, select_by_validation, training_args, write_json
from transformers import (
    AutoTokenizer,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    PrinterCallback,
    set_seed,
)

from pal_rm import PalRewardModel
from pal_rm.cache import FeatureStore
from pal_rm.data import load_color_filter_preferences
from pal_rm.trainers import PalRewardTrainer
from pal_rm.utils import MINILM, resolve_model_path

SHOTS = (1, 2, 5, 10, 20)


def build_backbone(folder: str, seed: int, image_size: int = 32) -> str:
    """A tiny CLIP with random weights and its processor (a CLIP image processor and MiniLM's tokenizer), saved in
    `folder` as a pretrained backbone would be."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(MINILM))
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    text = {"vocab_size": len(tokenizer), "max_position_embeddings": 64, "pad_token_id": tokenizer.pad_token_id}
    text.update(bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
    layers = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = CLIPConfig(
        text_config={**text, **layers},
        vision_config={**layers, "image_size": image_size, "patch_size": 8},
        projection_dim=64,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=float, default=30)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--preference_dim", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default=OUTPUT_DIR)
    parser.add_argument("--smoke", action="store_true", help="Tiny data and 2 epochs.")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    data_kwargs = {}
    if args.smoke:
        data_kwargs = {"users_per_group": 2, "num_mixture_users": 2, "pairs_per_user": 10, "num_unseen_users": 2}
        data_kwargs.update(unseen_shots=4, unseen_test_pairs=4)
        args.epochs = 2
    dataset = load_color_filter_preferences(seed=args.seed, **data_kwargs)
    sizes = {split: len(dataset[split]) for split in dataset}
    label_scale = 3.0  # the loader's default
    ceiling = {
        split: float(torch.sigmoid(label_scale * torch.tensor(dataset[split]["true_margin"]).abs()).mean())
        for split in ("test", "unseen_test")
    }
    fewest_shots = min(Counter(dataset["unseen_train"]["user_id"]).values())
    shots = tuple(n for n in SHOTS if n <= fewest_shots)

    with tempfile.TemporaryDirectory() as folder:
        backbone = build_backbone(folder, args.seed)
        store = FeatureStore()  # every image and caption is encoded once, for all the models

        def run(name, **config):
            set_seed(args.seed)
            model = PalRewardModel.from_backbone(backbone, preference_dim=args.preference_dim, **config)
            run_args = training_args(
                os.path.join(args.output_dir, "runs", f"images-{name}"),
                args.epochs,
                args.seed,
                learning_rate=args.learning_rate,
                per_device_train_batch_size=32,
            )
            trainer = PalRewardTrainer(
                model,
                run_args,
                train_dataset=dataset["train"],
                eval_dataset=dataset["validation"],
                embedding_cache=store,
            )
            trainer.remove_callback(PrinterCallback)
            trainer.train()
            return pal_results(trainer, dataset, shots, adapt=config.get("num_prototypes", 2) > 1)

        models = {"one reward for everyone": run("bt", variant="a", num_prototypes=1, similarity="dot")}
        for variant in ("a", "b"):
            models[f"PAL-{variant.upper()} K=2"] = run(f"pal-{variant}", variant=variant, num_prototypes=2)
        encoded = store.num_encoded
    selected = select_by_validation({name: models[name] for name in models if name.startswith("PAL")})

    header = ["model", "seen (test)"] + [f"unseen, {n}-shot" for n in shots]
    rows = [
        [name, values["seen_accuracy"]] + [values["unseen_accuracy"][n] for n in shots]
        for name, values in models.items()
    ]
    rows.append(["true model (ceiling)", ceiling["test"]] + [ceiling["unseen_test"]] * len(shots))
    print("\n## Image preferences (warm / cool filters, tiny random CLIP frozen)\n")
    print(markdown_table(header, rows))
    results = {
        "machine": machine(),
        "command": "python examples/benchmarks/images.py" + (" --smoke" if args.smoke else ""),
        "config": {k: v for k, v in vars(args).items() if k != "output_dir"},
        "data": {"sizes": sizes, **data_kwargs},
        "backbone": "CLIP, random weights (2 layers, width 64, 32x32 images, 8x8 patches), frozen",
        "shots": list(shots),
        "images_and_captions_encoded": encoded,
        "models": models,
        "selected_pal": selected,
        "true_model_accuracy": ceiling,
        "wall_time_seconds": time.perf_counter() - start,
    }
    path = write_json("images", results, args.output_dir)
    print(f"\nWrote {path} ({results['wall_time_seconds']:.0f} s).")
    return results


if __name__ == "__main__":
    main()
