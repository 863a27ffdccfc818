# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
"""
PRISM benchmark (`HannahRoseKirk/prism-alignment`, see `pal_rm.data.prism`): participants rating LLM responses in
their own multi-turn conversations. In every turn the participant's chosen (highest-rated) response is compared with
each other response (ties dropped), the prompt being the conversation so far; participants with >= 6 such
conversations are the users, a seeded 80% of them seen; each user's conversations are split into test (50%),
validation (10%, seen users) and training (the few-shot data of unseen users, of which `--unseen_shots` comparisons
are used). Models: one reward for everyone, one independent head per user, PAL-A and PAL-B with K = 2, on the frozen
backbone's features (no per-group oracle: the participants have no known groups).

By default it runs offline, end to end, on the small fixture in the real schema that the tests use (a check that the
pipeline works, not a result). With network, the real data:

```bash
python examples/benchmarks/prism.py                                           # offline fixture, seconds
python examples/benchmarks/prism.py --source HannahRoseKirk/prism-alignment \\
    --backbone HuggingFaceTB/SmolLM2-135M-Instruct
```

The real run has at most 41,199 comparisons before ties and the user threshold (68,371 rated responses in 27,172
turns); it prints the sizes it got. Writes `outputs/benchmarks/prism.json`.
"""

import argparse
import os
import time

from _common import OUTPUT_DIR, feature_models, machine, markdown_table, training_args, write_json
from transformers import AutoTokenizer

from pal_rm import PalRewardModel
from pal_rm.cache import FeatureStore, featurize_preferences
from pal_rm.data import load_prism_preferences
from pal_rm.utils import MINILM, resolve_model_path

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "prism_alignment")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=os.path.normpath(FIXTURE), help="Hub id or local copy of the data.")
    parser.add_argument("--backbone", default=MINILM)
    parser.add_argument("--min_conversations", type=int, default=6)
    parser.add_argument("--drop_ties", type=lambda v: v.lower() in ("1", "true", "yes"), default=True)
    parser.add_argument("--unseen_shots", type=int, default=None, help="Default: 10 (3 on the fixture).")
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
    if args.unseen_shots is None:
        args.unseen_shots = 3 if fixture else 10
    if args.epochs is None:
        args.epochs = 30 if fixture else 2
    if args.smoke:
        args.epochs = 2
    dataset = load_prism_preferences(
        args.source,
        min_conversations=args.min_conversations,
        unseen_shots=args.unseen_shots,
        drop_ties=args.drop_ties,
        seed=args.seed,
    )
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
        return training_args(os.path.join(args.output_dir, "runs", f"prism-{run}"), args.epochs, args.seed)

    head_kwargs = {"preference_dim": args.preference_dim}
    models = feature_models(features, arguments, head_kwargs, (args.unseen_shots,), args.seed)
    rows = [
        [name, result["validation_accuracy"], result["seen_accuracy"], result["unseen_accuracy"][args.unseen_shots]]
        for name, result in models.items()
    ]
    print(f"\n## PRISM ({'offline fixture' if fixture else args.source})\n")
    print(markdown_table(["model", "seen (validation)", "seen (test)", f"unseen ({args.unseen_shots} shots)"], rows))
    results = {
        "machine": machine(),
        "command": "python examples/benchmarks/prism.py" + (" --smoke" if args.smoke else ""),
        "source": "fixture" if fixture else args.source,
        "backbone": args.backbone,
        "config": {k: v for k, v in vars(args).items() if k != "output_dir"},
        "sizes": sizes,
        "users": users,
        "models": models,
        "wall_time_seconds": time.perf_counter() - start,
    }
    path = write_json("prism", results, args.output_dir)
    print(f"\nWrote {path} ({results['wall_time_seconds']:.0f} s).")


if __name__ == "__main__":
    main()
