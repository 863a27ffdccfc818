# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
"""
PersonalLLM benchmark (`namkoong-lab/PersonalLLM`, see `pal_rm.data.personalllm`): eight responses per prompt, scored
by ten public reward models; each simulated user weighs the reward models (Dirichlet(0.1) weights over standardised
scores) and compares their best and worst response of a prompt, as in LoRe's PersonalLLM setup. Seen users train on
their comparisons of the `train` split's prompts, new users are fitted on `--unseen_shots` of them; evaluation uses
the `test` split's prompts. Models: one reward for everyone, one independent head per user, LoRe (rank and penalty
chosen on validation), PAL-A and PAL-B with K = 2, all on the frozen backbone's features.

By default it runs offline, end to end, on the small fixture in the real schema that the tests use (a check that the
pipeline works, not a result). With network, the real data (1,000 seen users with 47 comparisons each, 500 new users
with 9, 50 evaluation comparisons per user):

```bash
python examples/benchmarks/personalllm.py                                  # offline fixture, seconds
python examples/benchmarks/personalllm.py --source namkoong-lab/PersonalLLM \\
    --backbone HuggingFaceTB/SmolLM2-135M-Instruct
```

Writes `outputs/benchmarks/personalllm.json`.
"""

import argparse
import os
import time

from _common import OUTPUT_DIR, feature_models, lore_results, machine, markdown_table, training_args, write_json
from transformers import AutoTokenizer

from pal_rm import PalRewardModel
from pal_rm.cache import FeatureStore, featurize_preferences
from pal_rm.data import load_personalllm_preferences
from pal_rm.utils import MINILM, resolve_model_path

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "personalllm")
FIXTURE_SIZES = {  # the fixture has 24 training and 8 test prompts
    "num_users": 8,
    "num_unseen_users": 4,
    "pairs_per_user": 16,
    "validation_pairs_per_user": 2,
    "test_pairs_per_user": 6,
    "unseen_shots": 4,
    "unseen_test_pairs": 6,
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=os.path.normpath(FIXTURE), help="Hub id or local copy of the data.")
    parser.add_argument("--backbone", default=MINILM)
    parser.add_argument("--unseen_shots", type=int, default=None, help="Default: 9 (4 on the fixture).")
    parser.add_argument("--pairs", default="best_worst", choices=("best_worst", "random"))
    parser.add_argument("--epochs", type=float, default=None, help="Default: 2 on the real data, 30 on the fixture.")
    parser.add_argument("--max_length", type=int, default=512, help="Tokens per text (the end of it is kept).")
    parser.add_argument("--preference_dim", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache_dir", default="outputs/cache")
    parser.add_argument("--output_dir", default=OUTPUT_DIR)
    parser.add_argument("--smoke", action="store_true", help="The fixture with 2 epochs.")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    fixture = os.path.abspath(args.source) == os.path.abspath(FIXTURE)
    sizes_kwargs = dict(FIXTURE_SIZES) if fixture else {}
    if args.unseen_shots is not None:
        sizes_kwargs["unseen_shots"] = args.unseen_shots
    if args.epochs is None:
        args.epochs = 30 if fixture else 2
    if args.smoke:
        args.epochs = 2
    dataset = load_personalllm_preferences(args.source, pairs=args.pairs, seed=args.seed, **sizes_kwargs)
    shots = sizes_kwargs.get("unseen_shots", 9)
    sizes = {split: len(dataset[split]) for split in dataset}
    users = {split: len(set(dataset[split]["user_id"])) for split in dataset}
    print(f"Sizes: {sizes}; users: {users}")

    backbone = resolve_model_path(args.backbone)
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    encoder = PalRewardModel.from_backbone(backbone, variant="b", num_prototypes=1).eval()
    features = featurize_preferences(
        dataset, encoder, tokenizer, cache=FeatureStore(args.cache_dir), max_length=args.max_length
    )

    def arguments(run):
        return training_args(os.path.join(args.output_dir, "runs", f"personalllm-{run}"), args.epochs, args.seed)

    head_kwargs = {"preference_dim": args.preference_dim}
    models = feature_models(features, arguments, head_kwargs, (shots,), args.seed)
    models["LoRe (low-rank basis)"] = lore_results(features, shots=(shots,), seed=args.seed)
    rows = [
        [name, result["validation_accuracy"], result["seen_accuracy"], result["unseen_accuracy"][shots]]
        for name, result in models.items()
    ]
    print(f"\n## PersonalLLM ({'offline fixture' if fixture else args.source})\n")
    print(markdown_table(["model", "seen (validation)", "seen (test)", f"unseen ({shots} shots)"], rows))
    results = {
        "machine": machine(),
        "command": "python examples/benchmarks/personalllm.py" + (" --smoke" if args.smoke else ""),
        "source": "fixture" if fixture else args.source,
        "backbone": args.backbone,
        "config": {k: v for k, v in vars(args).items() if k != "output_dir"},
        "data": sizes_kwargs,
        "sizes": sizes,
        "users": users,
        "models": models,
        "wall_time_seconds": time.perf_counter() - start,
    }
    path = write_json("personalllm", results, args.output_dir)
    print(f"\nWrote {path} ({results['wall_time_seconds']:.0f} s).")
    return results


if __name__ == "__main__":
    main()
