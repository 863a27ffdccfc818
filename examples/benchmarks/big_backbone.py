# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
"""
Memory of wrapping a big backbone: peak RSS of `PalRewardModel.from_backbone(folder, dtype=torch.bfloat16)` against
`AutoModel.from_pretrained(folder, dtype=torch.bfloat16)` of the same backbone, each in its own interpreter, and of
the way `from_backbone` worked before (a random backbone built from the config, then replaced: `rebuild`).

The backbone is a randomly initialised Llama (about 270M parameters by default, saved once in bfloat16 under
`outputs/benchmarks/random-llama`): no download. `from_backbone` loads it once and builds no throwaway random
backbone, so the ratio should be close to 1 (target: at most 1.1). It also reports the dtypes of the backbone and of
PAL's own parts (float32).

```bash
python examples/benchmarks/big_backbone.py            # ~1 minute on 2 cores, ~2 GB of disk and memory
python examples/benchmarks/big_backbone.py --smoke    # a tiny Llama, seconds
```

Writes `outputs/benchmarks/big_backbone.json`.
"""

import argparse
import json
import os
import resource
import subprocess
import sys

from _common import OUTPUT_DIR, machine, markdown_table, write_json

SIZES = {
    "default": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 16, "vocab_size": 32000},
    "smoke": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": 1000},
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def make_backbone(folder: str, size: dict) -> int:
    """Saves a random Llama backbone in bfloat16 to `folder` (once) and returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaModel

    marker = os.path.join(folder, "parameters.json")
    if os.path.exists(marker):
        with open(marker) as file:
            return json.load(file)["parameters"]
    heads = size["hidden_size"] // 64
    config = LlamaConfig(num_attention_heads=heads, num_key_value_heads=min(4, heads), **size)
    torch.manual_seed(0)
    model = LlamaModel(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    parameters = sum(p.numel() for p in model.parameters())
    with open(marker, "w") as file:
        json.dump({"parameters": parameters}, file)
    return parameters


def measure(kind: str, folder: str) -> dict:
    """Loads the backbone one way in this (fresh) interpreter and reports peak RSS and dtypes."""
    import torch
    from transformers import AutoModel

    baseline = peak_rss_mb()
    if kind == "automodel":
        model = AutoModel.from_pretrained(folder, dtype=torch.bfloat16)
        return {"peak_rss_mb": peak_rss_mb(), "rss_before_mb": baseline, "backbone_dtype": str(model.dtype)}
    import pal_rm  # noqa: F401
    from pal_rm import PalConfig, PalRewardModel

    if kind == "rebuild":  # what `from_backbone` did before: a random backbone from the config, then the real one
        backbone = AutoModel.from_pretrained(folder, dtype=torch.bfloat16)
        model = PalRewardModel(PalConfig(backbone_config=backbone.config, variant="b", num_prototypes=4))
        model.backbone = backbone
        return {"peak_rss_mb": peak_rss_mb(), "rss_before_mb": baseline, "backbone_dtype": str(backbone.dtype)}

    model = PalRewardModel.from_backbone(folder, dtype=torch.bfloat16, variant="b", num_prototypes=4)
    pal_dtypes = sorted({str(p.dtype) for n, p in model.named_parameters() if not n.startswith("backbone.")})
    return {
        "peak_rss_mb": peak_rss_mb(),
        "rss_before_mb": baseline,
        "backbone_dtype": str(model.backbone.dtype),
        "pal_parameter_dtypes": pal_dtypes,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=OUTPUT_DIR)
    parser.add_argument("--smoke", action="store_true", help="A tiny Llama (seconds).")
    parser.add_argument("--measure", choices=("automodel", "from_backbone", "rebuild"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, args.folder)))
        return None

    size_name = "smoke" if args.smoke else "default"
    folder = os.path.join(args.output_dir, f"random-llama-{size_name}")
    parameters = make_backbone(folder, SIZES[size_name])
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    results = {}
    for kind in ("automodel", "from_backbone", "rebuild"):
        output = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--measure", kind, "--folder", folder],
            check=True,
            capture_output=True,
            text=True,
            env=env,
        ).stdout
        results[kind] = json.loads(output.strip().splitlines()[-1])
    ratio = results["from_backbone"]["peak_rss_mb"] / results["automodel"]["peak_rss_mb"]
    rebuild_ratio = results["rebuild"]["peak_rss_mb"] / results["automodel"]["peak_rss_mb"]
    payload = {
        "benchmark": "big_backbone",
        "smoke": args.smoke,
        "backbone": {"architecture": "LlamaModel (random)", "parameters": parameters, "dtype": "bfloat16"},
        "results": results,
        "peak_rss_ratio": ratio,
        "rebuild_peak_rss_ratio": rebuild_ratio,
        "target_peak_rss_ratio": 1.1,
        "machine": machine(),
        "command": "python examples/benchmarks/big_backbone.py" + (" --smoke" if args.smoke else ""),
    }
    path = write_json("big_backbone", payload, args.output_dir)
    rows = [
        [kind, f"{results[kind]['peak_rss_mb']:.0f}", results[kind]["backbone_dtype"]]
        for kind in ("automodel", "from_backbone", "rebuild")
    ]
    print(markdown_table(["load", "peak RSS (MB)", "backbone dtype"], rows))
    print(
        f"\nBackbone: random Llama, {parameters / 1e6:.0f}M parameters in bfloat16. Peak RSS ratio {ratio:.3f} "
        f"(target <= 1.1); building a random backbone first, as before, {rebuild_ratio:.3f}. PAL parts: {results['from_backbone']['pal_parameter_dtypes']}. Wrote {path}."
    )
    return payload


if __name__ == "__main__":
    main()
