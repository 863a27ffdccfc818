"""One reward per text: every entry point reaches the canonical token form (issue 8)."""

import pytest
import torch
from conftest import make_word_tokenizer, tiny_model
from tokenizers import processors
from transformers import pipeline

from pal_rm import PalRewardFunction
from pal_rm.modeling_pal import frame_token_ids, sequence_framing

WORDS = "hello world yes no the quick brown fox jumps over a lazy dog what is this say something nice please"
PROMPTS = ["hello world ", "what is this ", "say something nice ", "please say yes "]
COMPLETIONS = ["the quick brown fox", "a lazy dog", "yes", "no no no jumps over"]


def bert_style_tokenizer():
    """A word-level tokenizer that frames every text as `[CLS] ... [SEP]`, like BERT's."""
    tokenizer = make_word_tokenizer([WORDS])
    tokenizer.add_special_tokens({"cls_token": "[CLS]", "sep_token": "[SEP]"})
    cls, sep = tokenizer.convert_tokens_to_ids(["[CLS]", "[SEP]"])
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return tokenizer


TOKENIZERS = {"plain": lambda: make_word_tokenizer([WORDS]), "bert_style": bert_style_tokenizer}


def pal_a(kind, tokenizer):
    model = tiny_model(kind, vocab_size=len(tokenizer), variant="a", num_prototypes=2).eval()
    model.add_users(["alice"])
    with torch.no_grad():
        model.user_weights.weight[0] = torch.tensor([3.0, -3.0])
        model.population_mixture.copy_(torch.tensor([0.3, 0.7]))
    model.register_tokenizer(tokenizer)
    return model


@pytest.mark.parametrize("tokenizer_name", list(TOKENIZERS))
def test_framing_of_tokenizers(tokenizer_name):
    tokenizer = TOKENIZERS[tokenizer_name]()
    framing = sequence_framing(tokenizer)
    eos = tokenizer.convert_tokens_to_ids("[EOS]")
    assert framing["eos_token_id"] == eos
    if tokenizer_name == "plain":
        assert framing["prefix_ids"] == [] and framing["suffix_ids"] == []
    else:
        assert framing["prefix_ids"] == [tokenizer.cls_token_id] and framing["suffix_ids"] == [tokenizer.sep_token_id]
    content = tokenizer("the lazy dog", add_special_tokens=False)["input_ids"]
    framed = frame_token_ids(content, framing)
    assert framed == framing["prefix_ids"] + content + [eos] + framing["suffix_ids"]
    assert frame_token_ids(framed, framing) == framed  # idempotent
    assert frame_token_ids(content, framing, kind="prompt") == framing["prefix_ids"] + content + framing["suffix_ids"]
    truncated = frame_token_ids(content, framing, max_length=len(framing["prefix_ids"] + framing["suffix_ids"]) + 2)
    assert truncated == framing["prefix_ids"] + content[-1:] + [eos] + framing["suffix_ids"]  # left truncation


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
@pytest.mark.parametrize("tokenizer_name", list(TOKENIZERS))
def test_every_token_form_gives_the_score_texts_reward(kind, tokenizer_name):
    """TRL's model-as-reward path (no special tokens, no EOS), a pipeline-style call (special tokens, no EOS), left
    padding and the trainer's own form all give `score_texts`' reward."""
    tokenizer = TOKENIZERS[tokenizer_name]()
    model = pal_a(kind, tokenizer)
    expected = model.score_texts(tokenizer, PROMPTS, COMPLETIONS, users="alice")
    texts = [p + c for p, c in zip(PROMPTS, COMPLETIONS)]
    for tokenizer_kwargs in (
        {"add_special_tokens": False, "padding_side": "right"},  # TRL's GRPO/RLOO model-as-reward path
        {"add_special_tokens": True, "padding_side": "right"},  # pipeline
        {"add_special_tokens": True, "padding_side": "left"},
        {"add_special_tokens": True, "padding_side": "right", "eos": True},  # TRL's RewardTrainer form
    ):
        kwargs = dict(tokenizer_kwargs)
        inputs = [t + tokenizer.eos_token for t in texts] if kwargs.pop("eos", False) else texts
        encoded = tokenizer(inputs, padding=True, return_tensors="pt", **kwargs)
        with torch.no_grad():
            rewards = model(**encoded, user_ids=["alice"] * len(texts)).logits.squeeze(-1)
        torch.testing.assert_close(rewards, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_pipeline_reward_equals_score_texts(tmp_path, kind):
    tokenizer = bert_style_tokenizer()
    model = pal_a(kind, tokenizer)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    scorer = pipeline("text-classification", model=str(tmp_path), tokenizer=str(tmp_path))
    texts = [p + c for p, c in zip(PROMPTS, COMPLETIONS)]
    scores = torch.tensor([result["score"] for result in scorer(texts)])
    expected = model.score_texts(tokenizer, PROMPTS, COMPLETIONS)  # population reward, as the pipeline scores
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)


def test_ppo_get_reward_on_canonical_sequences_equals_score_texts():
    """PPO's reward contract (`trl.experimental.utils.get_reward`: the backbone, then `score` per token) gives
    `score_texts`' reward for sequences in the canonical form (ending with EOS; padding distinct from EOS)."""
    from trl.experimental.utils import get_reward

    from pal_rm.modeling_pal import tokenize_texts

    tokenizer = make_word_tokenizer([WORDS])
    model = pal_a("gpt2", tokenizer)
    items = [p + c + tokenizer.eos_token for p, c in zip(PROMPTS, COMPLETIONS)]
    ids = tokenize_texts(tokenizer, items, model.config.sequence_framing, max_length=64)
    width = max(len(row) for row in ids)
    query_responses = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in ids])
    _, final_rewards, _ = get_reward(model, query_responses, tokenizer.pad_token_id, context_length=1)
    expected = model.score_texts(tokenizer, PROMPTS, COMPLETIONS)
    torch.testing.assert_close(final_rewards.squeeze(-1), expected, rtol=1e-5, atol=1e-5)


def test_other_tokenizer_is_an_error():
    tokenizer = make_word_tokenizer([WORDS])
    model = pal_a("gpt2", tokenizer)
    smaller = make_word_tokenizer(["hello world"])
    with pytest.raises(ValueError, match="does not match the backbone: this model was trained with another tokenizer"):
        model.score_texts(smaller, ["hello "], ["world"])
    larger = make_word_tokenizer([WORDS + " " + " ".join(f"w{i}" for i in range(80))])
    with pytest.raises(ValueError, match="more tokens than the backbone has embeddings"):
        model.score_texts(larger, ["hello "], ["world"])
    with pytest.raises(ValueError, match="another tokenizer"):
        PalRewardFunction(model, smaller)


def test_unregistered_tokenizer_warns_once(caplog):
    tokenizer = make_word_tokenizer([WORDS])
    model = tiny_model("gpt2", vocab_size=len(tokenizer), variant="a").eval()
    encoded = tokenizer(["hello world"], return_tensors="pt")
    from transformers.utils import logging

    logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            model(**encoded)
            model(**encoded)
    finally:
        logging.disable_propagation()
    assert sum("does not know its tokenizer" in record.message for record in caplog.records) == 1
