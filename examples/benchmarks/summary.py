# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
"""
Reddit TL;DR benchmark: the semi-synthetic protocol of Li et al. (2024) that the PAL paper used (see
`pal_rm.data.summary`): the 10 workers with most comparisons are the seen users, ranks 3-5 prefer the shorter summary
and the others the longer one; unseen users are validation-split workers with >= 100 comparisons, fitted on 10 comparisons each.
Models: one reward for everyone, one independent head per user, the per-group oracle, PAL-A and PAL-B with K = 2, on
the frozen backbone's features.

By default it runs offline, end to end, on the small fixture in the real schema that the tests use (a check that the
pipeline works, not a result). With network, the real data:

```bash
python examples/benchmarks/summary.py                                         # offline fixture, seconds
python examples/benchmarks/summary.py --source openai/summarize_from_feedback --drop_ties false \\
    --backbone HuggingFaceTB/SmolLM2-135M-Instruct --min_unseen_comparisons 100
```

The real run expects 20,969 train / 2,330 validation / 4,921 test seen-user comparisons (`--drop_ties false`, as the
PAL reference code; it prints the sizes it got) and encodes about 60k texts once (hours on 2 CPU cores, minutes on a
GPU; the features are cached in `--cache_dir`). Writes `outputs/benchmarks/summary.json`.
"""

import argparse
import os
import time

from _common import (
    OUTPUT_DIR,
    independent_results,
    machine,
    markdown_table,
    one_reward_results,
    oracle_results,
    pal_model,
    pal_results,
    train,
    training_args,
    write_json,
)
from transformers import AutoTokenizer, set_seed

from pal_rm import PalRewardModel
from pal_rm.cache import FeatureStore, featurize_preferences
from pal_rm.data import load_summary_preferences
from pal_rm.utils import MINILM, resolve_model_path

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "summarize_from_feedback")
EXPECTED_SIZES = {"train": 20969, "validation": 2330, "test": 4921}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=os.path.normpath(FIXTURE), help="Hub id or local copy of the data.")
    parser.add_argument("--backbone", default=MINILM)
    parser.add_argument("--drop_ties", type=lambda v: v.lower() in ("1", "true", "yes"), default=True)
    parser.add_argument("--min_unseen_comparisons", type=int, default=None, help="Default: 100 (6 on the fixture).")
    parser.add_argument("--unseen_shots", type=int, default=None, help="Default: 10 (3 on the fixture).")
    parser.add_argument("--epochs", type=float, default=None, help="Default: 2 on the real data, 30 on the fixture.")
    parser.add_argument("--preference_dim", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache_dir", default="outputs/cache")
    parser.add_argument("--output_dir", default=OUTPUT_DIR)
    parser.add_argument("--smoke", action="store_true", help="The fixture with 2 epochs.")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    fixture = os.path.abspath(args.source) == os.path.abspath(FIXTURE)
    if args.min_unseen_comparisons is None:
        args.min_unseen_comparisons = 6 if fixture else 100
    if args.unseen_shots is None:
        args.unseen_shots = 3 if fixture else 10
    if args.epochs is None:
        args.epochs = 30 if fixture else 2
    if args.smoke:
        args.epochs = 2
    data_kwargs = {"drop_ties": args.drop_ties, "min_unseen_comparisons": args.min_unseen_comparisons}
    data_kwargs["unseen_shots"] = args.unseen_shots
    if fixture:
        data_kwargs["validation_fraction"] = 0.2
    dataset = load_summary_preferences(args.source, seed=args.seed, **data_kwargs)
    sizes = {split: len(dataset[split]) for split in dataset}
    print(f"Sizes: {sizes}" + ("" if fixture else f" (the PAL paper: {EXPECTED_SIZES})"))

    backbone = resolve_model_path(args.backbone)
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    encoder = PalRewardModel.from_backbone(backbone, variant="b", num_prototypes=1).eval()
    features = featurize_preferences(dataset, encoder, tokenizer, cache=FeatureStore(args.cache_dir))
    feature_dim = encoder.config.hidden_size
    head_kwargs = {"preference_dim": args.preference_dim}
    shots = (args.unseen_shots,)

    def arguments(name):
        return training_args(os.path.join(args.output_dir, "runs", f"summary-{name}"), args.epochs, args.seed)

    models = {
        "one reward for everyone": one_reward_results(features, feature_dim, arguments("bt"), head_kwargs, shots),
        "independent head per user": independent_results(features, shots),
        "per-group oracle": oracle_results(features, feature_dim, 2, arguments("oracle"), head_kwargs),
    }
    for variant in ("a", "b"):
        set_seed(args.seed)
        trainer = train(pal_model(feature_dim, variant, 2, **head_kwargs), features, arguments(f"pal-{variant}"))
        models[f"PAL-{variant.upper()} K=2"] = pal_results(trainer, features, shots)
    rows = []
    for name, result in models.items():
        unseen = result.get("unseen_accuracy", {}).get(args.unseen_shots, result.get("unseen_accuracy_true_mixture"))
        rows.append([name, result["seen_accuracy"], unseen])
    print(f"\n## Reddit TL;DR ({'offline fixture' if fixture else args.source})\n")
    print(markdown_table(["model", "seen (test)", f"unseen ({args.unseen_shots} shots)"], rows))
    results = {
        "machine": machine(),
        "command": "python examples/benchmarks/summary.py" + (" --smoke" if args.smoke else ""),
        "source": "fixture" if fixture else args.source,
        "backbone": args.backbone,
        "config": {k: v for k, v in vars(args).items() if k != "output_dir"},
        "sizes": sizes,
        "expected_sizes_full_data": EXPECTED_SIZES,
        "models": models,
        "wall_time_seconds": time.perf_counter() - start,
    }
    path = write_json("summary", results, args.output_dir)
    print(f"\nWrote {path} ({results['wall_time_seconds']:.0f} s).")


if __name__ == "__main__":
    main()
