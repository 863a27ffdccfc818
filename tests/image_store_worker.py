"""
One process of the multi-process image test (`tests/test_multiprocess.py`), started by `accelerate launch` on the CPU:
encodes the same image column, a chunk at a time, into a `FeatureStore` shared out across processes, and writes the
rows, the table and how many images this process put through the backbone to `<output_dir>/rank<process index>.json`.

Also importable: `encode(...)` does the same in the calling process (the one-process reference).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import tiny_clip  # noqa: E402  (sets HF_HUB_OFFLINE first)


def encode(cache_dir: str, distributed: bool) -> dict:
    import numpy as np
    import torch
    from datasets import Dataset, Features
    from datasets import Image as ImageFeature
    from PIL import Image

    from pal_rm import PalConfig, PalRewardModel
    from pal_rm.cache import FeatureStore, ImageColumn

    backbone, processor = tiny_clip()
    torch.manual_seed(0)
    model = PalRewardModel(PalConfig(backbone_config=backbone, variant="a", num_prototypes=2, preference_dim=8)).eval()

    rng = np.random.default_rng(0)
    distinct = [Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)) for _ in range(7)]
    column = [distinct[i] for i in (0, 1, 2, 0, 3, 4, 1, 5, 6, 2, 6)]  # repeats within and across chunks
    data = Dataset.from_dict({"chosen_image": column}, features=Features({"chosen_image": ImageFeature()}))
    store = FeatureStore(cache_dir)
    rows = store.encode_image_rows(
        model, processor, ImageColumn(data, "chosen_image"), chunk_size=3, distributed=distributed, show_progress=False
    )
    return {"rows": rows, "table": store.table.tolist(), "num_encoded": store.num_encoded, "distinct": len(distinct)}


def main(output_dir: str) -> None:
    from accelerate import PartialState

    state = PartialState(cpu=True)
    result = encode(os.path.join(output_dir, "cache"), distributed=True)
    result["num_processes"] = state.num_processes
    with open(os.path.join(output_dir, f"rank{state.process_index}.json"), "w") as file:
        json.dump(result, file)


if __name__ == "__main__":
    main(sys.argv[1])
