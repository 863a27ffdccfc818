# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
"""
What a PAL checkpoint costs on disk and to load, for each way it can keep its backbone: the full model
(`save_pretrained(path)`), PAL's weights and a reference to a frozen backbone (`include_backbone=False`, what the
trainer's checkpoints hold), PAL's weights and a LoRA adapter on the referenced base backbone (the default with an
adapter), and the adapter merged into a full backbone (`merge_adapter=True`). For each: size on disk, save and load
time, and whether the reloaded model gives bit-identical rewards (the merged one: compared with the adapter merged in
memory by `merge_backbone_adapter()`, and the rounding that merging into bfloat16 weights causes).

The backbone is the random bfloat16 Llama of `big_backbone.py` (about 270M parameters, saved once under
`outputs/benchmarks/random-llama-default`): no download. The LoRA adapter (rank 16 on `q_proj` and `v_proj`) gets
random weights, as after training.

```bash
python examples/benchmarks/checkpoints.py            # ~1 minute on 2 cores, ~3 GB of disk
python examples/benchmarks/checkpoints.py --smoke    # a tiny Llama, seconds
```

Writes `outputs/benchmarks/checkpoints.json`.
"""

import argparse
import copy
import os
import shutil
import tempfile
import time

from _common import OUTPUT_DIR, machine, markdown_table, write_json
from big_backbone import SIZES, make_backbone

# `big_backbone.py`'s smoke Llama only loads; this one also runs (one attention head per key/value head).
SMOKE_SIZE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": 1000}


def folder_size_mb(folder: str) -> float:
    total = sum(os.path.getsize(os.path.join(root, name)) for root, _, files in os.walk(folder) for name in files)
    return total / 2**20


def make_smoke_backbone(folder: str) -> int:
    """Saves a tiny random Llama in bfloat16 to `folder` and returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    model = LlamaModel(LlamaConfig(num_attention_heads=4, num_key_value_heads=4, **SMOKE_SIZE)).to(torch.bfloat16)
    model.save_pretrained(folder)
    return sum(parameter.numel() for parameter in model.parameters())


def main(argv=None):
    import torch
    from peft import LoraConfig

    import pal_rm  # noqa: F401
    from pal_rm import PalRewardModel

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=OUTPUT_DIR)
    parser.add_argument("--smoke", action="store_true", help="A tiny Llama (seconds).")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank.")
    args = parser.parse_args(argv)

    if args.smoke:
        backbone_folder = os.path.join(args.output_dir, "random-llama-checkpoints-smoke")
        parameters = make_smoke_backbone(backbone_folder)
    else:  # the backbone of `big_backbone.py`, shared with it
        backbone_folder = os.path.join(args.output_dir, "random-llama-default")
        parameters = make_backbone(backbone_folder, SIZES["default"])
    torch.manual_seed(0)
    model = PalRewardModel.from_backbone(backbone_folder, dtype=torch.bfloat16, variant="b", num_prototypes=4)
    model.add_users([f"user_{index}" for index in range(100)])
    vocab_size = model.config.backbone_config.vocab_size
    input_ids = torch.randint(1, vocab_size, (8, 48))
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "prompt_input_ids": input_ids[:, :16],
        "prompt_attention_mask": torch.ones(8, 16, dtype=torch.long),
        "user_ids": torch.arange(8),
    }

    def rewards(pal_model):
        pal_model.eval()
        with torch.no_grad():
            return pal_model(**inputs).logits.float().squeeze(-1)

    rows = []
    work = tempfile.mkdtemp(prefix="pal-checkpoints-")
    try:

        def measure(layout: str, expected=None, **save_kwargs) -> None:
            """Saves, reloads and compares rewards with `expected` (by default the saved model's)."""
            folder = os.path.join(work, layout)
            start = time.perf_counter()
            model.save_pretrained(folder, **save_kwargs)
            save_seconds = time.perf_counter() - start
            start = time.perf_counter()
            loaded = PalRewardModel.from_pretrained(folder)
            load_seconds = time.perf_counter() - start
            got = rewards(loaded)
            reference = rewards(model)
            difference = (got - (reference if expected is None else expected)).abs().max().item()
            rows.append(
                {
                    "layout": layout,
                    "size_mb": folder_size_mb(folder),
                    "save_seconds": save_seconds,
                    "load_seconds": load_seconds,
                    "bit_identical": difference == 0.0,
                    "max_reward_difference": difference,
                    "max_difference_to_unmerged": (got - reference).abs().max().item(),
                    "reward_scale": reference.abs().max().item(),
                }
            )
            shutil.rmtree(folder)

        measure("full")
        measure("reference", include_backbone=False)
        model.add_backbone_adapter(
            LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=["q_proj", "v_proj"])
        )
        with torch.no_grad():  # as after training: LoRA B is no longer zero
            for name, parameter in model.named_parameters():
                if ".lora_B." in name:
                    parameter.normal_(0.0, 0.02)
        adapter_parameters = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
        measure("lora_adapter")
        merged = copy.deepcopy(model)
        merged.merge_backbone_adapter()
        measure("lora_merged", expected=rewards(merged), merge_adapter=True)  # against an in-memory merge
        del merged
    finally:
        shutil.rmtree(work, ignore_errors=True)

    payload = {
        "benchmark": "checkpoints",
        "smoke": args.smoke,
        "backbone": {"architecture": "LlamaModel (random)", "parameters": parameters, "dtype": "bfloat16"},
        "lora": {"rank": args.rank, "target_modules": ["q_proj", "v_proj"], "parameters": adapter_parameters},
        "users": 100,
        "results": rows,
        "machine": machine(),
        "command": "python examples/benchmarks/checkpoints.py" + (" --smoke" if args.smoke else ""),
    }
    path = write_json("checkpoints", payload, args.output_dir)
    table = [
        [
            row["layout"],
            f"{row['size_mb']:.2f}",
            f"{row['save_seconds']:.2f}",
            f"{row['load_seconds']:.2f}",
            "yes" if row["bit_identical"] else f"no (max difference {row['max_reward_difference']:.2e})",
        ]
        for row in rows
    ]
    print(markdown_table(["checkpoint", "size (MB)", "save (s)", "load (s)", "bit-identical rewards"], table))
    merged_row = rows[-1]
    print(
        f"\nThe merged checkpoint's rewards equal those of `merge_backbone_adapter()` in memory "
        f"({'bit-identical' if merged_row['bit_identical'] else 'differ'}); merging into bfloat16 weights moves them "
        f"by up to {merged_row['max_difference_to_unmerged']:.3g} from the unmerged model's (rewards up to "
        f"{merged_row['reward_scale']:.3g} in magnitude)."
    )
    print(
        f"\nBackbone: random Llama, {parameters / 1e6:.0f}M parameters in bfloat16; LoRA rank {args.rank} on q_proj "
        f"and v_proj ({adapter_parameters / 1e6:.2f}M parameters); 100 users. Wrote {path}."
    )
    return payload


if __name__ == "__main__":
    main()
