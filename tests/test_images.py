"""Image preference models: PAL on two-tower image-text backbones (tiny random CLIP and SigLIP built in code)."""

import io
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from datasets import Dataset
from PIL import Image
from transformers import (
    AutoModel,
    AutoTokenizer,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPProcessor,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipProcessor,
)

from pal_rm import PalConfig, PalRewardModel
from pal_rm.cache import FeatureStore, image_backbone_fingerprint
from pal_rm.data import load_color_filter_preferences
from pal_rm.modeling_pal import image_key, load_image
from pal_rm.trainers import PalRewardConfig, PalRewardTrainer
from pal_rm.utils import MINILM, resolve_model_path

IMAGE_SIZE = 32
LAYERS = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 2}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model_path(MINILM))


def backbone_config(kind: str, tokenizer):
    text = {**LAYERS, "vocab_size": len(tokenizer), "max_position_embeddings": 24, "pad_token_id": 0}
    vision = {**LAYERS, "image_size": IMAGE_SIZE, "patch_size": 8}
    if kind == "clip":
        text.update(bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
        return CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)
    return SiglipConfig(text_config=text, vision_config=vision)


def processor_for(kind: str, tokenizer, image_size: int = IMAGE_SIZE):
    if kind == "clip":
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        )
        return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    image_processor = SiglipImageProcessor(size={"height": image_size, "width": image_size})
    return SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def image_model(kind: str, tokenizer, variant: str = "b", seed: int = 0, **kwargs) -> PalRewardModel:
    torch.manual_seed(seed)
    config = PalConfig(
        backbone_config=backbone_config(kind, tokenizer), variant=variant, num_prototypes=2, preference_dim=8, **kwargs
    )
    return PalRewardModel(config).eval()


def random_images(count: int, seed: int = 0, size=(40, 48)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(count)]


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("variant", ["a", "b"])
def test_image_model_scores_saves_and_loads(kind, variant, tokenizer, tmp_path):
    model = image_model(kind, tokenizer, variant)
    model.add_users(["alice", "bob"])
    processor = processor_for(kind, tokenizer)
    assert model.is_image_model and model.config.pooling == "projection"
    images, prompts = random_images(3), ["a red circle", "two blue squares on a striped background", "a cat"]
    rewards = model.score_images(processor, prompts, images, users=["alice", "bob", None])
    assert rewards.shape == (3,) and torch.isfinite(rewards).all()
    # the same image given as encoded bytes, a datasets cell or a file path scores the same
    path = tmp_path / "image.png"
    images[0].save(path)
    same = model.score_images(
        processor, prompts[:1] * 3, [png_bytes(images[0]), {"bytes": None, "path": str(path)}, str(path)], "alice"
    )
    torch.testing.assert_close(same, rewards[:1].expand(3))
    # a caption's features do not depend on the other captions of its batch
    alone = model.score_images(processor, prompts[1:2], images[1:2], users=["bob"])
    torch.testing.assert_close(alone, rewards[1:2], rtol=1e-5, atol=1e-5)
    if variant == "b":  # PAL-B's ideal points depend on the caption
        other = model.score_images(processor, ["something else entirely"], images[:1], users=["alice"])
        assert not torch.allclose(other, rewards[:1])

    model.save_pretrained(tmp_path / "checkpoint")
    loaded = PalRewardModel.from_pretrained(tmp_path / "checkpoint").eval()
    assert loaded.is_image_model
    torch.testing.assert_close(loaded.score_images(processor, prompts, images, users=["alice", "bob", None]), rewards)


REMOTE_CODE_SCRIPT = textwrap.dedent(
    """
    import sys, json, torch

    class BlockPalRm:
        def find_spec(self, name, path=None, target=None):
            if name == "pal_rm" or name.startswith("pal_rm."):
                raise ImportError("pal_rm is blocked in this process")

    sys.meta_path.insert(0, BlockPalRm())
    from transformers import AutoModel

    folder, inputs_path = sys.argv[1], sys.argv[2]
    inputs = torch.load(inputs_path)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    with torch.no_grad():
        print(json.dumps(model(**inputs).logits.squeeze(-1).tolist()))
    """
)


def test_image_model_loads_as_remote_code_without_pal_rm(tokenizer, tmp_path):
    model = image_model("clip", tokenizer, "b")
    model.add_users(["alice", "bob"])
    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder)
    processor = processor_for("clip", tokenizer)
    pixels = processor.image_processor(random_images(2), return_tensors="pt")["pixel_values"]
    captions = processor.tokenizer(["a red circle", "a blue square"], padding=True, return_tensors="pt")
    inputs = {
        "pixel_values": pixels,
        "prompt_input_ids": captions["input_ids"],
        "prompt_attention_mask": captions["attention_mask"],
        "user_ids": torch.tensor([0, 1]),
    }
    torch.save(inputs, tmp_path / "inputs.pt")
    with torch.no_grad():
        expected = model(**inputs).logits.squeeze(-1).tolist()
    (tmp_path / "load.py").write_text(REMOTE_CODE_SCRIPT)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, str(tmp_path / "load.py"), str(folder), str(tmp_path / "inputs.pt")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_allclose(eval(result.stdout.strip().splitlines()[-1]), expected, rtol=1e-5, atol=1e-5)


def small_filter_data():
    return load_color_filter_preferences(
        users_per_group=2,
        num_mixture_users=1,
        pairs_per_user=10,
        num_unseen_users=2,
        unseen_shots=4,
        unseen_test_pairs=4,
        seed=0,
    )


def image_args(tmp_path, **overrides) -> PalRewardConfig:
    defaults = {
        "num_train_epochs": 2,
        "per_device_train_batch_size": 8,
        "learning_rate": 1e-2,
        "report_to": "none",
        "disable_tqdm": True,
        "use_cpu": True,
        "logging_steps": 100,
    }
    return PalRewardConfig(str(tmp_path / "out"), **{**defaults, **overrides})


def test_trainer_trains_evaluates_and_adapts_on_image_rows(tokenizer, tmp_path):
    data = small_filter_data()
    model = image_model("clip", tokenizer, "b")
    processor = processor_for("clip", tokenizer)
    store = FeatureStore()
    trainer = PalRewardTrainer(
        model,
        image_args(tmp_path),
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        processing_class=processor,
        embedding_cache=store,
    )
    # every image and every distinct caption of train + validation went through the backbone once
    captions = set(data["train"]["prompt"]) | set(data["validation"]["prompt"])
    num_images = 2 * (len(data["train"]) + len(data["validation"]))
    assert store.num_encoded == num_images + len(captions)
    before = model.user_weights.weight.detach().clone()
    trainer.train()
    assert not torch.equal(before, model.user_weights.weight)
    metrics = trainer.evaluate(data["test"], metric_key_prefix="test")
    assert 0 <= metrics["test_accuracy"] <= 1
    result = trainer.adapt_users(data["unseen_train"])
    assert sorted(result["users"]) == sorted(set(data["unseen_train"]["user_id"]))
    # the trained model scores new images for the adapted users through the public API
    row = data["unseen_test"][0]
    rewards = model.score_images(
        processor, [row["prompt"]] * 2, [row["chosen_image"], row["rejected_image"]], row["user_id"]
    )
    assert torch.isfinite(rewards).all()
    # the checkpoint holds the processor next to the model
    trainer.save_model()
    assert os.path.exists(tmp_path / "out" / "processor_config.json")


def test_feature_store_keys_images_by_content(tokenizer, tmp_path):
    model = image_model("clip", tokenizer, "a")
    processor = processor_for("clip", tokenizer)
    images = random_images(3)
    store = FeatureStore(cache_dir=str(tmp_path / "cache"))
    rows = store.encode_image_rows(model, processor, images, show_progress=False)
    assert rows == [0, 1, 2] and store.num_encoded == 3
    # the same pixels from PNG bytes, or again, are not encoded again
    again = store.encode_image_rows(model, processor, [png_bytes(images[1]), images[0]], show_progress=False)
    assert again == [1, 0] and store.num_encoded == 3
    expected = model.image_scorer(processor).encode(images)
    torch.testing.assert_close(store.table, expected)
    # the file is read back by a store for the same backbone and processor
    reread = FeatureStore(cache_dir=str(tmp_path / "cache"), fingerprint=store.fingerprint)
    assert reread.encode_image_rows(model, processor, images[::-1], show_progress=False) == [2, 1, 0]
    assert reread.num_encoded == 0
    # another image processor (another resize) makes other features: another fingerprint
    other = processor_for("clip", tokenizer)
    other.image_processor.resample = 0
    assert image_backbone_fingerprint(model, other) != store.fingerprint
    assert image_key(images[0]) == image_key(load_image(png_bytes(images[0])))


def test_images_are_read_and_encoded_a_chunk_at_a_time(tokenizer, tmp_path, monkeypatch):
    """A dataset's image column is read lazily (undecoded cells) and encoded in chunks: the same rows and features as
    all at once, each image once across chunks, the file written once, errors naming the absolute position."""
    from datasets import Features, Value
    from datasets import Image as ImageFeature

    from pal_rm.cache import ImageColumn

    model = image_model("clip", tokenizer, "a")
    processor = processor_for("clip", tokenizer)
    images = random_images(4)
    column = [images[0], images[1], images[0], images[2], images[3], images[1]]  # repeats across chunks
    data = Dataset.from_dict(
        {"chosen_image": column, "user": list("abcdef")},
        features=Features({"chosen_image": ImageFeature(), "user": Value("string")}),
    )
    lazy = ImageColumn(data, "chosen_image")
    assert len(lazy) == 6 and set(lazy[1:3][0]) == {"bytes", "path"}  # undecoded cells
    whole = FeatureStore()
    expected = whole.encode_image_rows(model, processor, column, show_progress=False)
    saves = []
    monkeypatch.setattr(FeatureStore, "save", lambda self: saves.append(len(self)))
    chunked = FeatureStore(cache_dir=str(tmp_path / "cache"))
    rows = chunked.encode_image_rows(model, processor, lazy, chunk_size=2, show_progress=False)
    assert rows == expected == [0, 1, 0, 2, 3, 1] and chunked.num_encoded == 4
    torch.testing.assert_close(chunked.table, whole.table)
    assert saves == [4]  # once, at the end
    for chunk_size in (0, 2.5, "2"):
        with pytest.raises(ValueError, match="`chunk_size` must be an integer >= 1"):
            FeatureStore().encode_image_rows(model, processor, column, chunk_size=chunk_size)
    broken = [*images[:3], b"not an image"]
    with pytest.raises(ValueError, match=r"chosen_image\[3\].*could not be read as an image"):
        FeatureStore().encode_image_rows(model, processor, broken, chunk_size=2, name="chosen_image")


# ------------------------------------------------------------------ bad input


def test_images_that_fail_to_decode_or_are_not_rgb_are_errors(tokenizer, tmp_path):
    model = image_model("clip", tokenizer, "a")
    processor = processor_for("clip", tokenizer)
    rgb = random_images(1)[0]
    with pytest.raises(ValueError, match=r"images\[1\].*could not be read as an image"):
        model.score_images(processor, None, [rgb, b"not an image"])
    with pytest.raises(ValueError, match=r"could not be read as an image"):
        model.score_images(processor, None, [str(tmp_path / "missing.png")])
    for mode, name in (("L", "grayscale"), ("RGBA", "RGB with transparency"), ("P", "palette")):
        with pytest.raises(ValueError, match=rf"'{mode}' image \({name}.*convert_to_rgb=True"):
            model.score_images(processor, None, [rgb.convert(mode)])
    converted = model.score_images(processor, None, [rgb.convert("L"), rgb.convert("RGBA")], convert_to_rgb=True)
    gray = model.score_images(processor, None, [rgb.convert("L").convert("RGB"), rgb])
    torch.testing.assert_close(converted, gray)
    with pytest.raises(ValueError, match=r"\(height, width, 3\) uint8"):
        model.score_images(processor, None, [np.zeros((4, 4), dtype=np.float32)])


def test_mismatched_processor_and_text_items_are_errors(tokenizer):
    model = image_model("clip", tokenizer, "b")
    with pytest.raises(ValueError, match=r"makes images of shape \(3, 48, 48\).*takes \(3, 32, 32\)"):
        model.score_images(processor_for("clip", tokenizer, image_size=48), ["a"], random_images(1))
    with pytest.raises(ValueError, match="with an image processor and a tokenizer"):
        model.score_images(tokenizer, ["a"], random_images(1))
    with pytest.raises(ValueError, match="scores images"):
        model.score_texts(tokenizer, ["a prompt"], ["a response"])
    with pytest.raises(ValueError, match="scores images"):
        model(input_ids=torch.tensor([[101, 2000, 102]]), prompt_input_ids=torch.tensor([[101, 2000, 102]]))
    with pytest.raises(ValueError, match="caption"):
        model.score_images(processor_for("clip", tokenizer), ["  "], random_images(1))
    with pytest.raises(ValueError, match="needs the prompt"):
        model.score_images(processor_for("clip", tokenizer), None, random_images(1))


def test_trainer_refuses_text_rows_for_image_models_and_images_for_text_models(tokenizer, tmp_path):
    data = small_filter_data()["train"].select(range(4))
    processor = processor_for("clip", tokenizer)
    texts = Dataset.from_dict(
        {"user_id": ["u"] * 2, "prompt": ["p", "q"], "chosen": ["a", "b"], "rejected": ["c", "d"]}
    )
    with pytest.raises(ValueError, match="an image model scores images, not texts"):
        PalRewardTrainer(
            image_model("clip", tokenizer), image_args(tmp_path), train_dataset=texts, processing_class=processor
        )
    text_model = PalRewardModel.from_backbone(resolve_model_path(MINILM), variant="a", num_prototypes=2)
    with pytest.raises(ValueError, match="holds images .* but this PAL model reads texts"):
        PalRewardTrainer(text_model, image_args(tmp_path), train_dataset=data, processing_class=tokenizer)
    with pytest.raises(ValueError, match="`train_backbone=True` and `peft_config` are not supported"):
        PalRewardTrainer(
            image_model("clip", tokenizer),
            image_args(tmp_path, train_backbone=True),
            train_dataset=data,
            processing_class=processor,
        )
    grayscale = data.map(lambda row: {"chosen_image": row["chosen_image"].convert("L")})
    with pytest.raises(ValueError, match="grayscale"):
        PalRewardTrainer(
            image_model("clip", tokenizer), image_args(tmp_path), train_dataset=grayscale, processing_class=processor
        )
    trainer = PalRewardTrainer(
        image_model("clip", tokenizer),
        image_args(tmp_path, convert_images_to_rgb=True),
        train_dataset=grayscale,
        processing_class=processor,
    )
    assert len(trainer.train_dataset) == 4


def test_pal_b_needs_towers_of_one_width(tokenizer):
    config = backbone_config("siglip", tokenizer)
    config.text_config.projection_size = 16
    with pytest.raises(ValueError, match="embeds images in 32 and texts in 16 dimensions"):
        PalRewardModel(PalConfig(backbone_config=config, variant="b"))
    assert PalRewardModel(PalConfig(backbone_config=config, variant="a")).config.hidden_size == 32
    with pytest.raises(ValueError, match="pools with its own projections"):
        PalConfig(backbone_config=config, pooling="mean")
    assert AutoModel.from_config(config) is not None


def test_model_card_of_an_image_model_shows_score_images(tokenizer):
    from pal_rm.hub import create_model_card

    card = create_model_card(image_model("clip", tokenizer, "b"))
    assert "model.score_images(processor, captions, images" in card and "score_texts" not in card
    assert "items are images" in card and "pipeline_tag: text-classification" not in card
    assert "chosen_image, rejected_image" in card
