# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
"""Embedding cache: with a frozen backbone, every unique text goes through the backbone once.

Keys are `(backbone fingerprint, pooling, max length, text)`. The cache lives in memory and, given a folder, on disk as
one safetensors file (plus a JSON index) per backbone/pooling/max-length, written atomically.
"""

import hashlib
import json
import os
import tempfile

import torch
from safetensors.torch import load_file, save_file
from transformers.utils import logging

logger = logging.get_logger(__name__)


def backbone_hash(model, max_length: int | None) -> str:
    """
    A short hash that changes when the backbone (config, name, weights), the pooling, the max length or the tokenizer
    (its recorded framing and vocabulary fingerprint) change.
    """
    config = model.config
    digest = hashlib.sha256()
    digest.update(json.dumps(config.backbone_config.to_dict(), sort_keys=True, default=str).encode())
    digest.update(str(getattr(config.backbone_config, "_name_or_path", "")).encode())
    digest.update(f"{config.pooling}|{max_length}|{json.dumps(config.sequence_framing, sort_keys=True)}".encode())
    with torch.no_grad():
        for name, tensor in model.backbone.state_dict().items():
            flat = tensor.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 256)][:256].float().cpu()
            digest.update(name.encode())
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def _text_key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


class EmbeddingCache:
    """
    Pooled backbone features of texts, computed once.

    Example:

    ```python
    >>> cache = EmbeddingCache(cache_dir="~/.cache/pal_rm")
    >>> features = cache.encode(model, tokenizer, ["a text", "another"])  # (2, hidden_size)
    ```
    """

    def __init__(self, cache_dir: str | None = None):
        self.cache_dir = os.path.expanduser(cache_dir) if cache_dir else None
        self._stores: dict[str, dict[str, torch.Tensor]] = {}
        self.num_encoded = 0

    def _store(self, fingerprint: str) -> dict[str, torch.Tensor]:
        if fingerprint not in self._stores:
            self._stores[fingerprint] = self._load(fingerprint)
        return self._stores[fingerprint]

    def _paths(self, fingerprint: str) -> tuple[str, str]:
        return (
            os.path.join(self.cache_dir, f"{fingerprint}.safetensors"),
            os.path.join(self.cache_dir, f"{fingerprint}.json"),
        )

    def _load(self, fingerprint: str) -> dict[str, torch.Tensor]:
        if self.cache_dir is None:
            return {}
        tensor_path, index_path = self._paths(fingerprint)
        if not (os.path.exists(tensor_path) and os.path.exists(index_path)):
            return {}
        try:
            with open(index_path) as file:
                keys = json.load(file)
            features = load_file(tensor_path)["features"]
            if features.shape[0] != len(keys):
                raise ValueError("index and features disagree")
            if not torch.isfinite(features).all():
                raise ValueError("it holds NaN or inf values")
        except Exception as error:  # a corrupt cache is rebuilt, never trusted
            logger.warning(f"Ignoring the unreadable embedding cache {tensor_path} ({error}); it will be rebuilt.")
            return {}
        return dict(zip(keys, features))

    def _save(self, fingerprint: str) -> None:
        if self.cache_dir is None:
            return
        os.makedirs(self.cache_dir, exist_ok=True)
        store = self._stores[fingerprint]
        keys = list(store)
        tensor_path, index_path = self._paths(fingerprint)
        with tempfile.TemporaryDirectory(dir=self.cache_dir) as tmp:
            save_file({"features": torch.stack([store[k] for k in keys]).contiguous()}, os.path.join(tmp, "f"))
            with open(os.path.join(tmp, "i"), "w") as file:
                json.dump(keys, file)
            os.replace(os.path.join(tmp, "f"), tensor_path)
            os.replace(os.path.join(tmp, "i"), index_path)

    def encode(
        self,
        model,
        tokenizer,
        texts,
        batch_size: int = 64,
        max_length: int | None = None,
        show_progress: bool = True,
    ) -> torch.Tensor:
        """Features `(len(texts), hidden_size)` (float32, CPU); only texts never seen before reach the backbone."""
        from .modeling_pal import default_max_length

        model.register_tokenizer(tokenizer)
        max_length = max_length or default_max_length(tokenizer, model.config)
        fingerprint = backbone_hash(model, max_length)
        store = self._store(fingerprint)
        keys = [_text_key(text) for text in texts]
        missing = list(dict.fromkeys(key for key in keys if key not in store))
        if missing:
            by_key = dict(zip(keys, texts))
            features = model.encode_texts(
                tokenizer,
                [by_key[key] for key in missing],
                batch_size=batch_size,
                max_length=max_length,
                show_progress=show_progress,
            )
            store.update(zip(missing, features))
            self.num_encoded += len(missing)
            self._save(fingerprint)
        if not keys:
            return torch.empty(0, model.config.hidden_size)
        return torch.stack([store[key] for key in keys])


def featurize_preferences(
    dataset,
    model,
    tokenizer,
    cache: EmbeddingCache | None = None,
    batch_size: int = 64,
    max_length: int | None = None,
    show_progress: bool = True,
):
    """
    Replaces the texts of a preference dataset by the frozen backbone's pooled features, so that PAL heads (a
    `PalRewardModel` built with `PalConfig(feature_dim=...)` and no backbone) and feature-based baselines train on
    exactly the features a frozen-backbone `PalRewardTrainer` would compute.

    `dataset` is a `Dataset` or `DatasetDict` with `prompt`, `chosen` and `rejected` (plain text or conversations,
    formatted as the trainer formats them). The result has `chosen_features`, `rejected_features` and
    `prompt_features` in place of the texts; every other column is kept. Each unique text is encoded once (across all
    splits), through `cache`.
    """
    from datasets import Dataset, DatasetDict

    from .modeling_pal import format_preference_texts

    if model.backbone is None:
        raise ValueError("`featurize_preferences` needs a model with a backbone to encode the texts.")
    splits = dataset if isinstance(dataset, DatasetDict) else {"data": dataset}
    formatted = {}
    for name, split in splits.items():
        missing = [column for column in ("prompt", "chosen", "rejected") if column not in split.column_names]
        if missing:
            raise ValueError(f"The {name} split has no {missing} column(s): it needs prompt, chosen and rejected.")
        rows = []
        for row, example in enumerate(split):
            prompt_text, chosen_text = format_preference_texts(
                tokenizer, example["prompt"], example["chosen"], row=row
            )
            _, rejected_text = format_preference_texts(tokenizer, example["prompt"], example["rejected"], row=row)
            rows.append((prompt_text, chosen_text, rejected_text))
        formatted[name] = rows
    texts = list(dict.fromkeys(text for rows in formatted.values() for row in rows for text in row))
    cache = cache if cache is not None else EmbeddingCache()
    features = cache.encode(
        model, tokenizer, texts, batch_size=batch_size, max_length=max_length, show_progress=show_progress
    ).numpy()
    index = {text: i for i, text in enumerate(texts)}
    output = {}
    for name, split in splits.items():
        rows = formatted[name]
        columns = {
            column: split[column] for column in split.column_names if column not in ("prompt", "chosen", "rejected")
        }
        for position, column in enumerate(("prompt_features", "chosen_features", "rejected_features")):
            columns[column] = features[[index[row[position]] for row in rows]].tolist() if rows else []
        output[name] = Dataset.from_dict(columns)
    return DatasetDict(output) if isinstance(dataset, DatasetDict) else output["data"]


__all__ = ["EmbeddingCache", "backbone_hash", "featurize_preferences"]
