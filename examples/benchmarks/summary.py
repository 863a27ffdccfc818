# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
"""
Reddit TL;DR benchmark, with one of two protocols (see `pal_rm.data.summary`):

- `--protocol li` (default): the semi-synthetic protocol of Li et al. (2024) that the PAL paper used: the 10 workers
  with most comparisons are the seen users, ranks 3-5 prefer the shorter summary and the others the longer one;
  unseen users are validation-split workers with >= 100 comparisons, fitted on 10 comparisons each.
- `--protocol lore`: the protocol of LoRe (Bose et al. 2025): the workers' real choices; a seeded half of the workers
  of both HF splits are seen users (at most 150 train comparisons each, tested on their validation-split
  comparisons), the others unseen users fitted on at most 50 comparisons each (`--unseen_shots`).

Models: one reward for everyone, one independent head per user, the per-group oracle (Li protocol only: LoRe's users
have no known groups), PAL-A and PAL-B with K = 2, on the frozen backbone's features.

By default it runs offline, end to end, on the small fixture in the real schema that the tests use (a check that the
pipeline works, not a result). With network, the real data:

```bash
python examples/benchmarks/summary.py                                         # offline fixture, seconds
python examples/benchmarks/summary.py --source openai/summarize_from_feedback --drop_ties false \\
    --backbone HuggingFaceTB/SmolLM2-135M-Instruct --min_unseen_comparisons 100
python examples/benchmarks/summary.py --protocol lore                         # offline LoRe fixture
python examples/benchmarks/summary.py --protocol lore --source openai/summarize_from_feedback \\
    --backbone HuggingFaceTB/SmolLM2-135M-Instruct
```

The real Li run expects 20,969 train / 2,330 validation / 4,921 test seen-user comparisons (`--drop_ties false`, as
the PAL reference code; it prints the sizes it got) and encodes about 60k texts once (hours on 2 CPU cores, minutes on
a GPU; the features are cached in `--cache_dir`). Writes `outputs/benchmarks/summary.json` (Li) or
`outputs/benchmarks/summary-lore.json` (LoRe).
"""

import argparse
import os
import time

from _common import OUTPUT_DIR, feature_models, machine, markdown_table, training_args, write_json
from transformers import AutoTokenizer

from pal_rm import PalRewardModel
from pal_rm.cache import FeatureStore, featurize_preferences
from pal_rm.data import load_summary_lore_preferences, load_summary_preferences
from pal_rm.utils import MINILM, resolve_model_path

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures")
FIXTURE = os.path.join(FIXTURES, "summarize_from_feedback")
LORE_FIXTURE = os.path.join(FIXTURES, "summarize_from_feedback_lore")
EXPECTED_SIZES = {"train": 20969, "validation": 2330, "test": 4921}
PROTOCOLS = ("li", "lore")


def load_data(args, fixture: bool):
    """The dataset of `args.protocol`, with the benchmark's defaults for the fixture or the real data."""
    if args.protocol == "li":
        if args.min_unseen_comparisons is None:
            args.min_unseen_comparisons = 6 if fixture else 100
        if args.unseen_shots is None:
            args.unseen_shots = 3 if fixture else 10
        data_kwargs = {"drop_ties": args.drop_ties, "min_unseen_comparisons": args.min_unseen_comparisons}
        data_kwargs["unseen_shots"] = args.unseen_shots
        if fixture:
            data_kwargs["validation_fraction"] = 0.2
        return load_summary_preferences(args.source, seed=args.seed, **data_kwargs)
    if args.unseen_shots is None:
        args.unseen_shots = 3 if fixture else 50
    data_kwargs = {"seen_train_comparisons": args.seen_train_comparisons, "unseen_shots": args.unseen_shots}
    if fixture:
        data_kwargs["validation_fraction"] = 0.2
    return load_summary_lore_preferences(args.source, seed=args.seed, **data_kwargs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", choices=PROTOCOLS, default="li", help="Li et al. (length rule) or LoRe.")
    parser.add_argument("--source", default=None, help="Hub id or local copy of the data. Default: the fixture.")
    parser.add_argument("--backbone", default=MINILM)
    parser.add_argument("--drop_ties", type=lambda v: v.lower() in ("1", "true", "yes"), default=True, help="Li.")
    parser.add_argument(
        "--min_unseen_comparisons", type=int, default=None, help="Li. Default: 100 (6 on the fixture)."
    )
    parser.add_argument("--seen_train_comparisons", type=int, default=150, help="LoRe: most per seen user.")
    parser.add_argument(
        "--unseen_shots", type=int, default=None, help="Default: 10 (Li) or 50 (LoRe); 3 on the fixtures."
    )
    parser.add_argument("--epochs", type=float, default=None, help="Default: 2 on the real data, 30 on the fixture.")
    parser.add_argument("--preference_dim", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache_dir", default="outputs/cache")
    parser.add_argument("--output_dir", default=OUTPUT_DIR)
    parser.add_argument("--smoke", action="store_true", help="The fixture with 2 epochs.")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    default_fixture = os.path.normpath(FIXTURE if args.protocol == "li" else LORE_FIXTURE)
    args.source = args.source or default_fixture
    fixture = os.path.abspath(args.source) == os.path.abspath(default_fixture)
    if args.epochs is None:
        args.epochs = 30 if fixture else 2
    if args.smoke:
        args.epochs = 2
    dataset = load_data(args, fixture)
    sizes = {split: len(dataset[split]) for split in dataset}
    expected = "" if fixture or args.protocol == "lore" else f" (the PAL paper: {EXPECTED_SIZES})"
    print(f"Sizes: {sizes}{expected}")

    backbone = resolve_model_path(args.backbone)
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    encoder = PalRewardModel.from_backbone(backbone, variant="b", num_prototypes=1).eval()
    features = featurize_preferences(dataset, encoder, tokenizer, cache=FeatureStore(args.cache_dir))
    name = "summary" if args.protocol == "li" else "summary-lore"

    def arguments(run):
        return training_args(os.path.join(args.output_dir, "runs", f"{name}-{run}"), args.epochs, args.seed)

    num_groups = 2 if args.protocol == "li" else None
    head_kwargs = {"preference_dim": args.preference_dim}
    models = feature_models(features, arguments, head_kwargs, (args.unseen_shots,), args.seed, num_groups=num_groups)
    rows = []
    for model, result in models.items():
        unseen = result.get("unseen_accuracy", {}).get(args.unseen_shots, result.get("unseen_accuracy_true_mixture"))
        rows.append([model, result["seen_accuracy"], unseen])
    protocol = "Li et al. protocol" if args.protocol == "li" else "LoRe protocol"
    print(f"\n## Reddit TL;DR, {protocol} ({'offline fixture' if fixture else args.source})\n")
    print(markdown_table(["model", "seen (test)", f"unseen ({args.unseen_shots} shots)"], rows))
    command = "python examples/benchmarks/summary.py" + (" --protocol lore" if args.protocol == "lore" else "")
    results = {
        "machine": machine(),
        "command": command + (" --smoke" if args.smoke else ""),
        "protocol": args.protocol,
        "source": "fixture" if fixture else args.source,
        "backbone": args.backbone,
        "config": {k: v for k, v in vars(args).items() if k != "output_dir"},
        "sizes": sizes,
        "models": models,
        "wall_time_seconds": time.perf_counter() - start,
    }
    if args.protocol == "li":
        results["expected_sizes_full_data"] = EXPECTED_SIZES
    path = write_json(name, results, args.output_dir)
    print(f"\nWrote {path} ({results['wall_time_seconds']:.0f} s).")


if __name__ == "__main__":
    main()
