"""`FeatureStore`: pooled features of texts, keyed once, held once, encoded once, optionally on disk."""

import logging
import os

import pytest
import torch
from conftest import tiny_model
from datasets import Dataset
from safetensors import safe_open
from safetensors.torch import save_file

from pal_rm.cache import FeatureStore, backbone_fingerprint
from pal_rm.trainers import PalRewardConfig, PalRewardTrainer

TEXTS = ["the quick fox", "a lazy dog", "what is this"]


def count_encoding(model) -> list[list[str]]:
    """The texts of every `model.encode_texts` call from now on."""
    calls = []
    encode_texts = model.encode_texts

    def counted(tokenizer, texts, **kwargs):
        calls.append(list(texts))
        return encode_texts(tokenizer, texts, **kwargs)

    model.encode_texts = counted
    return calls


def test_store_deduplicates_by_text():
    store = FeatureStore()
    assert store.add(["a", "b"], torch.tensor([[1.0], [2.0]])) == [0, 1]
    assert store.missing(["a", "c", "c"]) == ["c"]
    assert store.add(["b", "c"], torch.tensor([[2.0], [3.0]])) == [1, 2]
    assert store.table.squeeze(-1).tolist() == [1.0, 2.0, 3.0]


def test_lookup_of_unknown_texts_raises_and_adds_nothing():
    store = FeatureStore()
    store.add(["a"], torch.tensor([[1.0, 1.0]]))
    with pytest.raises(KeyError, match=r"2 of the 3 texts have no row in the feature store \(the first: 'b'\)"):
        store.rows(["a", "b", "c"])
    assert len(store) == 1 and store.missing(["b", "c"]) == ["b", "c"] and store.rows(["a", "a"]) == [0, 0]
    with pytest.raises(ValueError, match=r"one row per text: got shape \(0,\) for 1 texts"):
        store.add(["b"], torch.empty(0))  # adding is never a lookup either
    assert len(store) == 1


def test_appended_rows_have_no_text_and_are_not_written(tmp_path, word_tokenizer):
    model = tiny_model(vocab_size=len(word_tokenizer))
    store = FeatureStore(tmp_path)
    assert store.append(torch.ones(2, 32)) == [0, 1] and store.fingerprint is None and store.path is None
    assert store.encode_rows(model, word_tokenizer, TEXTS, show_progress=False) == [2, 3, 4]
    with safe_open(store.path, framework="pt") as file:
        assert file.get_tensor("features").shape == (3, 32)  # the rows of texts only
    again = FeatureStore(tmp_path)
    again.append(torch.zeros(1, 32))  # before the store has a fingerprint: the file's rows come after
    calls = count_encoding(model)
    assert again.encode_rows(model, word_tokenizer, TEXTS, show_progress=False) == [1, 2, 3] and not calls
    assert torch.equal(again.table[1:], store.table[2:])


def test_store_on_disk_is_reused(tmp_path, small_demo_dataset, demo_tokenizer):
    model = tiny_model("bert", vocab_size=len(demo_tokenizer))
    texts = small_demo_dataset["train"]["chosen"][:10]
    first = FeatureStore(tmp_path / "cache")
    features = first.encode(model, demo_tokenizer, texts, show_progress=False)
    second = FeatureStore(tmp_path / "cache")
    again = second.encode(model, demo_tokenizer, texts, show_progress=False)
    assert second.num_encoded == 0 and torch.equal(features, again)
    with torch.no_grad():
        model.backbone.embeddings.word_embeddings.weight.add_(1.0)  # other weights: other key
    third = FeatureStore(tmp_path / "cache")
    third.encode(model, demo_tokenizer, texts, show_progress=False)
    assert third.num_encoded == len(set(texts))
    for path in (tmp_path / "cache").glob("*.safetensors"):
        path.write_bytes(b"garbage")
    fourth = FeatureStore(tmp_path / "cache")  # a corrupt cache is rebuilt, not trusted
    rebuilt = fourth.encode(model, demo_tokenizer, texts, show_progress=False)
    assert fourth.num_encoded == len(set(texts)) and rebuilt.shape == features.shape


def test_round_trip_on_disk_encodes_nothing(tmp_path, word_tokenizer):
    model = tiny_model("bert", vocab_size=len(word_tokenizer))
    calls = count_encoding(model)
    first = FeatureStore(tmp_path, dtype="bfloat16")
    rows = first.encode_rows(model, word_tokenizer, TEXTS + TEXTS[:1], show_progress=False)
    assert rows == [0, 1, 2, 0] and calls == [TEXTS]  # each text once
    assert os.listdir(tmp_path) == [os.path.basename(first.path)]  # no temporary file left
    assert first.path.endswith(f"{first.fingerprint}.bfloat16.safetensors")
    with safe_open(first.path, framework="pt") as file:
        assert file.metadata()["fingerprint"] == first.fingerprint

    second = FeatureStore(tmp_path, dtype="bfloat16", fingerprint=first.fingerprint)  # read now, whole
    assert len(second) == 3 and torch.equal(second.table, first.table)
    assert second.rows(TEXTS[::-1]) == [2, 1, 0]
    third = FeatureStore(tmp_path, dtype="bfloat16")  # takes the model's fingerprint, reads the file
    assert third.encode_rows(model, word_tokenizer, TEXTS[::-1], show_progress=False) == [2, 1, 0]
    assert third.fingerprint == first.fingerprint == backbone_fingerprint(model, word_tokenizer)
    assert len(calls) == 1 and third.num_encoded == 0
    third.encode_rows(model, word_tokenizer, ["a new text", "what is this"], show_progress=False)
    assert calls[1:] == [["a new text"]]  # only the miss; the file now holds 4 rows
    assert len(FeatureStore(tmp_path, dtype="bfloat16", fingerprint=first.fingerprint)) == 4


def corrupt(path: str, kind: str) -> None:
    with safe_open(path, framework="pt") as file:
        metadata = file.metadata()
        tensors = {name: file.get_tensor(name) for name in file.keys()}
    if kind == "garbage":
        with open(path, "wb") as file:
            file.write(b"garbage")
        return
    if kind == "keys and features disagree":
        tensors["keys"] = tensors["keys"][:-1]
    elif kind == "float16 features":
        tensors["features"] = tensors["features"].half()
    elif kind == "another backbone":
        metadata = {**metadata, "fingerprint": "0123456789abcdef"}
    elif kind == "a text twice":
        tensors["keys"][1] = tensors["keys"][0]
    elif kind == "no keys":
        del tensors["keys"]
    save_file(tensors, path, metadata=metadata)


@pytest.mark.parametrize(
    "kind",
    ["garbage", "keys and features disagree", "float16 features", "another backbone", "a text twice", "no keys"],
)
def test_corrupt_file_is_a_warning_and_is_rebuilt(tmp_path, caplog, word_tokenizer, kind):
    model = tiny_model(vocab_size=len(word_tokenizer))
    first = FeatureStore(tmp_path)
    features = first.encode(model, word_tokenizer, TEXTS, show_progress=False)
    corrupt(first.path, kind)
    calls = count_encoding(model)
    with caplog.at_level(logging.WARNING, logger="pal_rm.cache"):
        store = FeatureStore(tmp_path)
        again = store.encode(model, word_tokenizer, TEXTS, show_progress=False)
    assert f"Ignoring the unreadable embedding cache {first.path}" in caplog.text
    assert "it will be rebuilt" in caplog.text
    assert calls == [TEXTS] and torch.equal(again, features)  # re-encoded, not trusted
    assert len(FeatureStore(tmp_path, fingerprint=first.fingerprint)) == 3  # and written again, sound


def test_store_of_one_backbone_refuses_another(tmp_path, word_tokenizer):
    model = tiny_model(vocab_size=len(word_tokenizer))
    store = FeatureStore(tmp_path)
    store.encode_rows(model, word_tokenizer, TEXTS, show_progress=False)
    other = tiny_model(vocab_size=len(word_tokenizer), seed=1)
    with pytest.raises(ValueError, match="features of two backbones never mix. Give each backbone a `FeatureStore`"):
        store.encode_rows(other, word_tokenizer, ["a new text"], show_progress=False)
    assert len(store) == 3 and store.fingerprint == backbone_fingerprint(model, word_tokenizer)
    with pytest.raises(ValueError, match="features of two backbones never mix"):  # max length is part of it
        store.encode_rows(model, word_tokenizer, TEXTS, max_length=8, show_progress=False)
    # A trainer given the store of another backbone says so before encoding anything.
    data = Dataset.from_dict({"user_id": ["a", "b"], "prompt": ["what is this"] * 2, "chosen": TEXTS[:1] * 2})
    data = data.add_column("rejected", TEXTS[1:2] * 2)
    args = PalRewardConfig(str(tmp_path / "out"), use_cpu=True, disable_tqdm=True)
    with pytest.raises(ValueError, match="features of two backbones never mix"):
        PalRewardTrainer(other, args, train_dataset=data, processing_class=word_tokenizer, embedding_cache=store)
    assert len(store) == 3


def test_features_are_held_once(tmp_path, word_tokenizer):
    model = tiny_model(vocab_size=len(word_tokenizer), variant="b")
    store = FeatureStore(tmp_path, dtype="float16")
    for text in TEXTS:  # grown three times
        store.encode_rows(model, word_tokenizer, [text], show_progress=False)
    read = FeatureStore(tmp_path, dtype="float16", fingerprint=store.fingerprint)
    for held in (store, read):
        tensors = [value for value in vars(held).values() if isinstance(value, torch.Tensor)]
        assert tensors == [held.table]  # no other tensor of features
        assert held.table.untyped_storage().nbytes() == held.nbytes == 3 * 32 * 2  # nor spare rows behind it
    copy = store.encode(model, word_tokenizer, TEXTS, show_progress=False)
    assert copy.dtype == torch.float32 and copy.data_ptr() != store.table.data_ptr()  # a copy for the caller

    # A frozen-backbone trainer's collator reads the trainer's store itself.
    data = Dataset.from_dict({"user_id": ["a", "b"], "prompt": ["what is this"] * 2, "chosen": TEXTS[:1] * 2})
    data = data.add_column("rejected", TEXTS[1:2] * 2)
    args = PalRewardConfig(str(tmp_path / "out"), use_cpu=True, disable_tqdm=True, feature_dtype="float16")
    trainer = PalRewardTrainer(model, args, train_dataset=data, processing_class=word_tokenizer)
    held = trainer.embedding_cache
    assert trainer.data_collator.features is trainer.feature_store is held and len(held) == 3
    assert held.table.untyped_storage().nbytes() == held.nbytes == 3 * 32 * 2
    batch = trainer.data_collator([trainer.train_dataset[0]])
    assert torch.equal(batch["item_features"], held.table[:2].float())
