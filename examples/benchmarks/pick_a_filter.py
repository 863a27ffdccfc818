# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
"""
Pick-a-Filter benchmark (the PAL paper's image benchmark, see `pal_rm.data.pick_a_filter`): Pick-a-Pic v1's real
text-to-image preferences, its users split at random into a group that prefers cool (blue) tones and one that prefers
warm (red) tones, and a share beta (`--mix_ratio`) of the comparisons given the group's winning filter on the chosen
image or its losing filter on the rejected one. Every image and caption goes once through a frozen two-tower backbone
(`pal_rm.cache.featurize_image_preferences`), and all models train on those features, as the PAL paper trains on
OpenCLIP ViT-H/14 embeddings. Models: one reward for everyone, one independent head per user, the per-group oracle
(PAL-B with every user's group given), LoRe (rank and penalty chosen on validation), PAL-A and PAL-B with K = 2.

By default it runs offline, end to end, on the small fixture in Pick-a-Pic v1's schema that the tests use, with a tiny
CLIP with random weights (a check that the pipeline works, not a result). With network, the real data and the paper's
encoder:

```bash
python examples/benchmarks/pick_a_filter.py                                   # offline fixture, seconds
python examples/benchmarks/pick_a_filter.py --source yuvalkirstain/pickapic_v1 --source_split validation \\
    --backbone laion/CLIP-ViT-H-14-laion2B-s32B-b79K --mix_ratio 0.4
python examples/benchmarks/pick_a_filter.py --build_rows 2000                 # + the loader's build speed, 1 minute
```

`--build_rows N` also times the loader itself (decoding, filtering and re-encoding the images) on N comparisons of
invented 512x512 JPEGs (Pick-a-Pic's size), read from disk, in one process and in `--build_processes` processes.
`--memory_images N` measures the peak memory of encoding N distinct 512x512 images of a dataset column with the
frozen backbone (`FeatureStore.encode_image_rows` on an `ImageColumn`, as the trainer and
`featurize_image_preferences` do), a chunk of 512 (the default), of 2,048 and of all N images at a time, each in a
fresh process.

Writes `outputs/benchmarks/pick_a_filter.json`.
"""

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter

import numpy as np
from _common import OUTPUT_DIR, feature_models, lore_results, machine, markdown_table, training_args, write_json
from datasets import Dataset, Features, load_from_disk
from datasets import Image as DatasetImage
from images import build_backbone
from PIL import Image
from transformers import AutoProcessor

from pal_rm import PalRewardModel
from pal_rm.cache import FeatureStore, ImageColumn, featurize_image_preferences
from pal_rm.data import PICKAPIC_V1_SOURCE, load_pick_a_filter_preferences

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "pickapic_v1")
RANDOM_CLIP = "random-clip"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--source", default=os.path.normpath(FIXTURE), help=f"Hub id (e.g. {PICKAPIC_V1_SOURCE}) or copy."
    )
    parser.add_argument("--source_split", default="train")
    parser.add_argument("--mix_ratio", type=float, default=0.4, help="beta: the share of filtered comparisons.")
    parser.add_argument(
        "--backbone", default=RANDOM_CLIP, help="A CLIP / SigLIP model; default: a tiny CLIP with random weights."
    )
    parser.add_argument("--unseen_shots", type=int, default=None, help="Default: 10 (4 on the fixture).")
    parser.add_argument("--epochs", type=float, default=None, help="Default: 10 on the real data, 30 on the fixture.")
    parser.add_argument("--preference_dim", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache_dir", default="outputs/cache", help="Feature store of a real backbone.")
    parser.add_argument("--output_dir", default=OUTPUT_DIR)
    parser.add_argument("--smoke", action="store_true", help="The fixture with 2 epochs.")
    parser.add_argument("--build_rows", type=int, default=0, help="Also time the loader on this many comparisons.")
    parser.add_argument("--build_processes", type=int, default=2)
    parser.add_argument("--memory_images", type=int, default=0, help="Also measure encoding memory on N images.")
    parser.add_argument("--memory_child", nargs=2, help=argparse.SUPPRESS)  # (dataset folder, chunk size)
    args = parser.parse_args(argv)
    if args.memory_child:
        return encode_in_chunks(*args.memory_child)
    start = time.perf_counter()
    fixture = os.path.abspath(args.source) == os.path.abspath(FIXTURE)
    shots = args.unseen_shots or (4 if fixture else 10)
    if args.epochs is None:
        args.epochs = 30 if fixture else 10
    if args.smoke:
        args.epochs = 2
    dataset = load_pick_a_filter_preferences(
        args.source, source_split=args.source_split, mix_ratio=args.mix_ratio, unseen_shots=shots, seed=args.seed
    )
    sizes = {split: len(dataset[split]) for split in dataset}
    users = {split: len(set(dataset[split]["user_id"])) for split in dataset}
    filtered = dict(Counter(value for split in dataset.values() for value in split["filtered"]))
    print(f"Sizes: {sizes}; users: {users}; filtered images: {filtered}")

    with tempfile.TemporaryDirectory() as folder:
        random_backbone = args.backbone == RANDOM_CLIP
        backbone = build_backbone(folder, args.seed) if random_backbone else args.backbone
        processor = AutoProcessor.from_pretrained(backbone)
        encoder = PalRewardModel.from_backbone(backbone, variant="b", num_prototypes=1).eval()
        store = FeatureStore() if random_backbone else FeatureStore(args.cache_dir)
        features = featurize_image_preferences(dataset, encoder, processor, cache=store)

    def arguments(run):
        return training_args(os.path.join(args.output_dir, "runs", f"pick_a_filter-{run}"), args.epochs, args.seed)

    head_kwargs = {"preference_dim": args.preference_dim}
    models = feature_models(features, arguments, head_kwargs, (shots,), args.seed, num_groups=2)
    models["LoRe (low-rank basis)"] = lore_results(features, shots=(shots,), seed=args.seed)
    rows = []
    for name, result in models.items():
        unseen = result.get("unseen_accuracy", {}).get(shots, result.get("unseen_accuracy_true_mixture"))
        rows.append([name, result["validation_accuracy"], result["seen_accuracy"], unseen])
    print(f"\n## Pick-a-Filter, beta = {args.mix_ratio} ({'offline fixture' if fixture else args.source})\n")
    print(markdown_table(["model", "seen (validation)", "seen (test)", f"unseen ({shots} shots)"], rows))
    print("\nThe per-group oracle's unseen column uses each new user's true group, not their shots.")
    results = {
        "machine": machine(),
        "command": "python examples/benchmarks/pick_a_filter.py" + (" --smoke" if args.smoke else ""),
        "source": "fixture" if fixture else f"{args.source} ({args.source_split})",
        "backbone": "CLIP, random weights (2 layers, width 64), frozen" if random_backbone else args.backbone,
        "config": {k: v for k, v in vars(args).items() if k != "output_dir"},
        "sizes": sizes,
        "users": users,
        "filtered_images": filtered,
        "shots": shots,
        "models": models,
    }
    if args.build_rows:
        results["build_throughput"] = build_throughput(args.build_rows, args.mix_ratio, args.build_processes)
    if args.memory_images:
        results["encoding_memory"] = encoding_memory(args.memory_images)
    results["wall_time_seconds"] = time.perf_counter() - start
    path = write_json("pick_a_filter", results, args.output_dir)
    print(f"\nWrote {path} ({results['wall_time_seconds']:.0f} s).")
    return results


def invented_jpeg(rng: np.random.Generator) -> bytes:
    """A noisy two-colour gradient, 512x512, as JPEG bytes: about 90 KB, like a generated picture."""
    ramp = np.linspace(0, 1, 512)[:, None, None]
    top, bottom = rng.integers(0, 256, size=(2, 3))
    pixels = top * (1 - ramp) + bottom * ramp + rng.normal(0, 12, (512, 512, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def build_throughput(num_rows: int, mix_ratio: float, processes: int) -> dict:
    """Comparisons per second of `load_pick_a_filter_preferences` on `num_rows` invented comparisons of 512x512 JPEGs
    (ten prompts per user), read from a `save_to_disk` folder, in one process and in `processes`; no run reuses
    another's cache."""
    rng = np.random.default_rng(0)
    pool = [invented_jpeg(rng) for _ in range(64)]
    num_users = max(2, num_rows // 10)  # ten prompts per user, one comparison each
    labels = rng.integers(0, 2, num_rows).astype(float)
    rows = {
        "caption": [f"prompt {i % num_users}-{i // num_users}" for i in range(num_rows)],
        "user_id": [i % num_users for i in range(num_rows)],
        "label_0": labels.tolist(),
        "label_1": (1 - labels).tolist(),
        "jpg_0": [pool[i] for i in rng.integers(0, len(pool), num_rows)],
        "jpg_1": [pool[i] for i in rng.integers(0, len(pool), num_rows)],
    }
    timings = {}
    source = Dataset.from_dict(rows)
    with tempfile.TemporaryDirectory() as folder:
        for num_proc in sorted({1, processes}):
            # a copy per run: `datasets` caches the built splits next to the source's files, and no run may reuse them
            source.save_to_disk(os.path.join(folder, f"source-{num_proc}"))
            source = load_from_disk(os.path.join(folder, f"source-{num_proc}"))
            begin = time.perf_counter()
            built = load_pick_a_filter_preferences(source, mix_ratio=mix_ratio, num_proc=num_proc)
            seconds = time.perf_counter() - begin
            count = sum(len(split) for split in built.values())
            timings[f"{num_proc} process{'es' if num_proc > 1 else ''}"] = {
                "comparisons": count,
                "seconds": seconds,
                "comparisons_per_second": count / seconds,
            }
    print(f"\nLoader build speed, {num_rows} comparisons of 512x512 JPEGs at beta {mix_ratio}:")
    for name, values in timings.items():
        print(f"  {name}: {values['comparisons_per_second']:.0f} comparisons/s ({values['seconds']:.1f} s)")
    return timings


def encoding_memory(num_images: int) -> dict:
    """Peak memory of encoding `num_images` distinct invented 512x512 images of a dataset column, by chunk size, each
    chunk size in a fresh process (`--memory_child`)."""
    rng = np.random.default_rng(1)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        rows = {"image": [{"bytes": invented_jpeg(rng), "path": None} for _ in range(num_images)]}
        Dataset.from_dict(rows, features=Features({"image": DatasetImage()})).save_to_disk(
            os.path.join(folder, "data")
        )
        for chunk_size in sorted({512, 2048, num_images}):
            command = [sys.executable, os.path.abspath(__file__), "--memory_child", os.path.join(folder, "data")]
            completed = subprocess.run([*command, str(chunk_size)], capture_output=True, text=True, check=True)
            results[f"chunks of {chunk_size}"] = json.loads(completed.stdout.strip().splitlines()[-1])
    decoded = num_images * 512 * 512 * 3 / 2**30
    print(f"\nEncoding {num_images} images of 512x512 ({decoded:.1f} GiB of pixels), peak resident memory:")
    for name, values in results.items():
        print(f"  {name}: {values['peak_gib']:.2f} GiB ({values['before_gib']:.2f} GiB before encoding)")
    return results


def encode_in_chunks(folder: str, chunk_size: str) -> dict:
    """The child of `encoding_memory`: encodes the folder's image column with a tiny random CLIP; prints the peak
    resident memory before and after, in GiB (Linux's `VmHWM`: unlike `ru_maxrss`, it starts afresh at `exec`, so the
    parent's memory does not count)."""

    def peak_gib() -> float:
        with open("/proc/self/status") as status:
            line = next(line for line in status if line.startswith("VmHWM:"))
        return int(line.split()[1]) / 2**20  # kB

    data = load_from_disk(folder)
    with tempfile.TemporaryDirectory() as backbone_folder:
        backbone = build_backbone(backbone_folder, seed=0)
        processor = AutoProcessor.from_pretrained(backbone)
        model = PalRewardModel.from_backbone(backbone, variant="a", num_prototypes=1).eval()
    before = peak_gib()
    store = FeatureStore()
    begin = time.perf_counter()
    store.encode_image_rows(
        model, processor, ImageColumn(data, "image"), chunk_size=int(chunk_size), show_progress=False
    )
    result = {
        "before_gib": before,
        "peak_gib": peak_gib(),
        "seconds": time.perf_counter() - begin,
        "encoded": store.num_encoded,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
