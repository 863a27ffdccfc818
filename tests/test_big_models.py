"""Big backbones: `from_backbone` loads the backbone once and passes loading options through; PAL's parts stay float32."""

import pytest
import torch
from conftest import make_word_tokenizer, tiny_backbone_config
from transformers import AutoModel

from pal_rm import PalRewardModel

WORDS = "hello world the quick brown fox a lazy dog"


@pytest.fixture()
def backbone_folder(tmp_path):
    tokenizer = make_word_tokenizer([WORDS])
    torch.manual_seed(0)
    AutoModel.from_config(tiny_backbone_config("gpt2", len(tokenizer))).save_pretrained(tmp_path / "backbone")
    tokenizer.save_pretrained(tmp_path / "backbone")
    return str(tmp_path / "backbone")


def test_from_backbone_builds_no_second_backbone(backbone_folder, monkeypatch):
    built = []
    original = AutoModel.from_config
    monkeypatch.setattr(
        AutoModel, "from_config", lambda *args, **kwargs: built.append(args) or original(*args, **kwargs)
    )
    model = PalRewardModel.from_backbone(backbone_folder, variant="b", num_prototypes=2)
    assert built == []  # no throwaway random backbone
    pretrained = AutoModel.from_pretrained(backbone_folder)
    for name, value in pretrained.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[name], value), name  # pretrained weights, not re-initialised
    assert model.config.sequence_framing is not None  # the backbone's tokenizer is recorded


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pal_parts_stay_float32_on_a_half_precision_backbone(backbone_folder, tmp_path, dtype):
    model = PalRewardModel.from_backbone(
        backbone_folder, dtype=dtype, variant="b", num_prototypes=2, similarity="cosine"
    )
    model.add_users(["alice"])
    assert model.backbone.get_input_embeddings().weight.dtype == dtype
    pal_parameters = {name: p for name, p in model.named_parameters() if not name.startswith("backbone.")}
    assert pal_parameters and all(p.dtype == torch.float32 for p in pal_parameters.values()), {
        name: p.dtype for name, p in pal_parameters.items()
    }
    assert model.population_mixture.dtype == torch.float32
    tokenizer = make_word_tokenizer([WORDS])
    rewards = model.score_texts(tokenizer, ["hello world "] * 2, ["the quick fox", "a lazy dog"], users="alice")
    model.save_pretrained(tmp_path / "pal")
    assert model.dtype == dtype  # what save_pretrained records in config.json
    for reloaded in (
        PalRewardModel.from_pretrained(tmp_path / "pal", dtype="auto"),
        PalRewardModel.from_pretrained(tmp_path / "pal", dtype=dtype),
    ):
        assert reloaded.backbone.get_input_embeddings().weight.dtype == dtype
    assert (
        reloaded.user_weights.weight.dtype == torch.float32
        and reloaded.item_head.layers[-1].weight.dtype == torch.float32
    )
    torch.testing.assert_close(model.user_weights.weight, reloaded.user_weights.weight, rtol=0, atol=0)
    again = reloaded.score_texts(tokenizer, ["hello world "] * 2, ["the quick fox", "a lazy dog"], users="alice")
    torch.testing.assert_close(again, rewards, rtol=0, atol=0)


def test_loading_options_reach_the_backbone(backbone_folder):
    model = PalRewardModel.from_backbone(backbone_folder, attn_implementation="eager", variant="a")
    assert model.backbone.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="`dtype` is given twice"):
        PalRewardModel.from_backbone(backbone_folder, backbone_kwargs={"dtype": torch.float16}, dtype=torch.float16)
