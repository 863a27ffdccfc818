# Offline before anything imports transformers.
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import BertConfig, GPT2Config, LlamaConfig, PreTrainedTokenizerFast  # noqa: E402

import pal_rm  # noqa: E402, F401
from pal_rm import PalConfig, PalRewardModel  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One intra-op thread per xdist worker: two workers with two threads each on two cores thrash.
    torch.set_num_threads(1)


SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[EOS]"]
BACKBONES = ["gpt2", "bert"]


def make_word_tokenizer(texts) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the words of `texts`, built in code (no download)."""
    splitter = pre_tokenizers.Whitespace()
    words = sorted({word for text in texts for word, _ in splitter.pre_tokenize_str(text)})
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = splitter
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


# A small demo dataset (kwargs of `load_demo_preferences`) for end-to-end runs of train_pal.py.
SMALL_DEMO = {
    "users_per_group": 2,
    "num_mixture_users": 0,
    "pairs_per_user": 16,
    "num_unseen_users": 2,
    "unseen_shots": 8,
    "unseen_test_pairs": 8,
}


def tiny_backbone_config(kind: str, vocab_size: int, num_layers: int = 1):
    if kind == "gpt2":
        return GPT2Config(
            n_layer=num_layers,
            n_embd=32,
            n_head=2,
            vocab_size=vocab_size,
            n_positions=256,
            bos_token_id=2,
            eos_token_id=2,
        )
    if kind == "llama":
        return LlamaConfig(
            num_hidden_layers=num_layers,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=vocab_size,
            max_position_embeddings=256,
            pad_token_id=0,  # `[PAD]` of `make_word_tokenizer`
        )
    return BertConfig(
        num_hidden_layers=num_layers,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=vocab_size,
        max_position_embeddings=256,
    )


def tiny_clip(image_size: int = 32, projection_dim: int = 16):
    """`(CLIPConfig, CLIPProcessor)` of a tiny two-tower CLIP read with MiniLM's tokenizer (packaged, offline) and a
    CLIP image processor resizing to `image_size`."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPProcessor

    from pal_rm.utils import MINILM, resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(MINILM))
    layers = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 2}
    text = {**layers, "vocab_size": len(tokenizer), "max_position_embeddings": 64, "pad_token_id": 0}
    text.update(bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
    vision = {**layers, "image_size": image_size, "patch_size": 8}
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)
    crop = {"height": image_size, "width": image_size}
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=crop)
    return config, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def tiny_model(kind: str = "gpt2", vocab_size: int = 64, seed: int = 0, **config_kwargs) -> PalRewardModel:
    torch.manual_seed(seed)
    defaults = {"num_prototypes": 3, "preference_dim": 8}
    config = PalConfig(backbone_config=tiny_backbone_config(kind, vocab_size), **{**defaults, **config_kwargs})
    return PalRewardModel(config)


def tiny_policy(tokenizer):
    """A 1-layer GPT-2 causal LM over `tokenizer`'s vocabulary: a policy for TRL's online trainers."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=1,
        n_embd=16,
        n_head=2,
        vocab_size=len(tokenizer),
        n_positions=64,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2LMHeadModel(config)


@pytest.fixture(scope="session")
def demo_dataset():
    from pal_rm.data import load_demo_preferences

    return load_demo_preferences(seed=0)


@pytest.fixture(scope="session")
def small_demo_dataset():
    from pal_rm.data import load_demo_preferences

    return load_demo_preferences(
        users_per_group=3, num_mixture_users=0, pairs_per_user=40, num_unseen_users=4, unseen_shots=10, seed=1
    )


@pytest.fixture(scope="session")
def demo_tokenizer(demo_dataset):
    texts = []
    for split in demo_dataset.values():
        texts += list(split["prompt"]) + list(split["chosen"]) + list(split["rejected"])
    return make_word_tokenizer(texts)


@pytest.fixture(scope="session")
def word_tokenizer():
    return make_word_tokenizer(["the quick brown fox jumps over a lazy dog hello world yes no what is this"])


@pytest.fixture(scope="session")
def minilm_path():
    from pal_rm.utils import MINILM, resolve_model_path

    return resolve_model_path(MINILM)
