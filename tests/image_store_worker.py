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

import conftest  # noqa: E402, F401  (sets HF_HUB_OFFLINE first)


def encode(cache_dir: str, distributed: bool) -> dict:
    import numpy as np
    import torch
    from datasets import Dataset, Features
    from datasets import Image as ImageFeature
    from PIL import Image
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPProcessor

    from pal_rm import PalConfig, PalRewardModel
    from pal_rm.cache import FeatureStore, ImageColumn
    from pal_rm.utils import MINILM, resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(MINILM))
    layers = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 2}
    text = {**layers, "vocab_size": len(tokenizer), "max_position_embeddings": 24, "pad_token_id": 0}
    text.update(bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
    backbone = CLIPConfig(
        text_config=text, vision_config={**layers, "image_size": 32, "patch_size": 8}, projection_dim=16
    )
    torch.manual_seed(0)
    model = PalRewardModel(PalConfig(backbone_config=backbone, variant="a", num_prototypes=2, preference_dim=8)).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)

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
