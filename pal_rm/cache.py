# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
"""Embedding cache: with a frozen backbone, every unique text goes through the backbone once in the whole job.

Features live in one [`FeatureTable`] per backbone (a single 2-D tensor, float32 or half precision) that the trainer's
collator reads directly. Keys are `(backbone fingerprint, pooling, max length, text)`. Given a folder, the table is also
kept on disk as one safetensors file per backbone/pooling/max-length/dtype (features and the SHA-1 of each text),
written atomically by the main process. Under `accelerate launch` / `torchrun`, [`EmbeddingCache.encode_rows`] with
`distributed=True` splits the texts to encode across the processes and gathers the features, so that every process
ends with the same table.
"""

import hashlib
import json
import os
import tempfile
from collections.abc import Hashable, Sequence

import torch
from safetensors.torch import load_file, save_file
from transformers.utils import logging

logger = logging.get_logger(__name__)

FEATURE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Features sent per process and per collective call when gathering encoded texts: bounds the transient memory.
GATHER_CHUNK_BYTES = 64 * 1024 * 1024


def resolve_feature_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """`torch.float32`, `torch.float16` or `torch.bfloat16` from a dtype or its name; anything else is an error."""
    if isinstance(dtype, str):
        if dtype not in FEATURE_DTYPES:
            raise ValueError(f"`feature_dtype` must be one of {list(FEATURE_DTYPES)}, got {dtype!r}.")
        return FEATURE_DTYPES[dtype]
    if dtype not in FEATURE_DTYPES.values():
        raise ValueError(f"`feature_dtype` must be one of {list(FEATURE_DTYPES)}, got {dtype!r}.")
    return dtype


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


def text_key(text: str) -> bytes:
    """The key of a text in a [`FeatureTable`] of an [`EmbeddingCache`]: its SHA-1 digest (20 bytes)."""
    return hashlib.sha1(text.encode("utf-8")).digest()


class FeatureTable:
    """
    Pooled backbone features held once: one `(num_rows, hidden_size)` tensor (in `dtype`, on the CPU) whose rows the
    processed datasets address by index. Rows added with keys (text digests) are deduplicated and can be looked up;
    rows added without keys (pooled-feature columns) are appended as they come.

    Example:

    ```python
    >>> table = FeatureTable(dtype=torch.float16)
    >>> table.add(torch.randn(2, 384), keys=["a text", "another"])
    [0, 1]
    >>> table.missing(["another", "new", "new"]), table.table.shape, table.nbytes
    (['new'], torch.Size([2, 384]), 1536)
    ```
    """

    def __init__(self, dtype: str | torch.dtype = torch.float32):
        self.dtype = resolve_feature_dtype(dtype)
        self._table: torch.Tensor | None = None
        self._rows: dict[Hashable, int] = {}
        self._keys: list[Hashable | None] = []

    def __len__(self) -> int:
        return 0 if self._table is None else self._table.shape[0]

    @property
    def table(self) -> torch.Tensor:
        """The features, `(len(self), hidden_size)` in `self.dtype` (empty before the first row is added)."""
        return self._table if self._table is not None else torch.empty(0, dtype=self.dtype)

    @property
    def nbytes(self) -> int:
        """Memory held by the features, in bytes."""
        return 0 if self._table is None else self._table.numel() * self._table.element_size()

    def missing(self, keys: Sequence[Hashable]) -> list[Hashable]:
        """The keys without a row, each once, in order of first appearance."""
        return [key for key in dict.fromkeys(keys) if key not in self._rows]

    def rows(self, keys: Sequence[Hashable]) -> list[int]:
        """The row of each key (a `KeyError` for a key without one)."""
        try:
            return [self._rows[key] for key in keys]
        except KeyError as error:
            raise KeyError(
                f"The feature table has no row for key {error.args[0]!r}; add its features first."
            ) from None

    def add(self, features: torch.Tensor, keys: Sequence[Hashable] | None = None) -> list[int]:
        """
        Appends rows and returns the row of each input row. With `keys`, rows whose key is already known (or repeated
        in `keys`) are not added again and `features` is only read for the new keys (pass `torch.empty(0)` to look
        known keys up). Features are cast to `self.dtype`; a value that becomes NaN or inf is an error.
        """
        if keys is None:
            checked = self.checked(features)  # before the table grows: a bad row leaves it as it was
            self._extend(features.shape[0], features.shape[-1] if features.dim() == 2 else None).copy_(checked)
            return list(range(len(self) - features.shape[0], len(self)))
        positions = {}
        for position, key in enumerate(keys):
            if key not in self._rows and key not in positions:
                positions[key] = position
        if positions:
            checked = self.checked(features[torch.tensor(list(positions.values()), dtype=torch.long)])
            self._extend(len(positions), checked.shape[-1], list(positions)).copy_(checked)
        return [self._rows[key] for key in keys]

    def checked(self, features: torch.Tensor) -> torch.Tensor:
        """`features` in `self.dtype` on the CPU; an error when a value is (or becomes, by the cast) NaN or inf."""
        converted = features.detach().to(device="cpu", dtype=self.dtype)
        finite = torch.isfinite(converted)
        if not bool(finite.all()):
            rows = (~finite.flatten(1).all(-1)).nonzero().flatten().tolist() if converted.dim() > 1 else []
            overflow = bool(torch.isfinite(features).all())
            cause = (
                f"the values exceed the range of {self.dtype}; use `feature_dtype='bfloat16'` or `'float32'`"
                if overflow
                else "the backbone or the data gave NaN or inf"
            )
            raise ValueError(f"Features of {len(rows)} rows (e.g. rows {rows[:10]}) are not finite: {cause}.")
        return converted

    def _extend(self, num_rows: int, hidden_size: int | None, keys: Sequence[Hashable] | None = None) -> torch.Tensor:
        """Grows the table by `num_rows` rows (registered under `keys`) and returns them, uninitialised, to fill."""
        if num_rows == 0:
            return torch.empty(0, hidden_size or 0, dtype=self.dtype)
        old = self._table
        if old is not None and hidden_size is not None and hidden_size != old.shape[1]:
            raise ValueError(
                f"Features of width {hidden_size} cannot join a feature table of width {old.shape[1]}: all features "
                "of one trainer must come from the same backbone and pooling."
            )
        if hidden_size is None:
            raise ValueError("Features must be a 2-D tensor (rows, hidden_size).")
        start = len(self)
        table = torch.empty(start + num_rows, hidden_size, dtype=self.dtype)
        if old is not None:
            table[:start] = old
        self._table = table  # the old table is released here: one copy at rest, two only while growing
        if keys is None:
            self._keys.extend([None] * num_rows)
        else:
            for offset, key in enumerate(keys):
                self._rows[key] = start + offset
            self._keys.extend(keys)
        return table[start:]

    def keyed_rows(self) -> tuple[list[Hashable], torch.Tensor]:
        """The keys of the keyed rows and those rows' features (the table itself when every row is keyed)."""
        if len(self._rows) == len(self):
            return list(self._keys), self.table
        rows = [row for row, key in enumerate(self._keys) if key is not None]
        return [self._keys[row] for row in rows], self.table[torch.tensor(rows, dtype=torch.long)]


class EmbeddingCache:
    """
    Pooled backbone features of texts, computed once: one [`FeatureTable`] per backbone fingerprint, in memory and,
    given `cache_dir`, on disk.

    `dtype` is the storage precision of the tables (`"float32"`, or `"float16"` / `"bfloat16"` for half the memory);
    features are computed in float32 and cast once. `num_encoded` counts the texts this process put through the
    backbone.

    Under several processes (`accelerate launch`, `torchrun`), pass `distributed=True` to [`encode_rows`] /
    [`encode`] from every process with the same texts: the texts that no table holds yet are split across the
    processes (balanced by length), each process encodes its share, and the features are gathered so that every
    process holds the whole table once. The main process alone writes the cache file; the others wait for it. The
    cache folder must then be one that every process sees (shared storage, like `output_dir`).

    Example:

    ```python
    >>> cache = EmbeddingCache(cache_dir="~/.cache/pal_rm")
    >>> features = cache.encode(model, tokenizer, ["a text", "another"])  # (2, hidden_size), float32
    ```
    """

    def __init__(self, cache_dir: str | None = None, dtype: str | torch.dtype = torch.float32):
        self.cache_dir = os.path.expanduser(cache_dir) if cache_dir else None
        self.dtype = resolve_feature_dtype(dtype)
        self._tables: dict[str, FeatureTable] = {}
        self.num_encoded = 0

    def _path(self, fingerprint: str) -> str:
        suffix = "" if self.dtype == torch.float32 else f".{str(self.dtype).removeprefix('torch.')}"
        return os.path.join(self.cache_dir, f"{fingerprint}{suffix}.safetensors")

    def _load(self, fingerprint: str) -> FeatureTable:
        table = FeatureTable(self.dtype)
        if self.cache_dir is None:
            return table
        path = self._path(fingerprint)
        if not os.path.exists(path):
            return table
        try:
            stored = load_file(path)
            features, digests = stored["features"], stored["keys"]
            if features.dim() != 2 or digests.shape != (features.shape[0], 20):
                raise ValueError("its keys and features disagree")
            if features.dtype != self.dtype:
                raise ValueError(f"it holds {features.dtype} features, not {self.dtype}")
            if not torch.isfinite(features).all():
                raise ValueError("it holds NaN or inf values")
        except Exception as error:  # a corrupt cache is rebuilt, never trusted
            logger.warning(f"Ignoring the unreadable embedding cache {path} ({error}); it will be rebuilt.")
            return table
        blob = digests.numpy().tobytes()
        keys = [blob[offset : offset + 20] for offset in range(0, len(blob), 20)]
        table._table = features  # adopted as loaded: no second copy
        table._keys = keys
        table._rows = {key: row for row, key in enumerate(keys)}
        return table

    def _save(self, fingerprint: str) -> None:
        """
        Writes the keyed rows of the table to the cache folder in one file, atomically (temporary file + rename). A
        failed write is a warning, not an error: the features are in memory, and under several processes the others
        are waiting for this one.
        """
        if self.cache_dir is None:
            return
        temporary = None
        try:
            os.makedirs(self.cache_dir, exist_ok=True)
            keys, features = self._tables[fingerprint].keyed_rows()
            digests = torch.frombuffer(bytearray(b"".join(keys)), dtype=torch.uint8).reshape(len(keys), 20)
            handle, temporary = tempfile.mkstemp(dir=self.cache_dir, suffix=".tmp")
            os.close(handle)
            save_file({"features": features.contiguous(), "keys": digests}, temporary)
            os.replace(temporary, self._path(fingerprint))
        except OSError as error:
            logger.warning(
                f"Could not write the embedding cache in {self.cache_dir} ({error}); training goes on with the "
                "features in memory, and the next run encodes the texts again."
            )
        finally:
            if temporary is not None and os.path.exists(temporary):
                os.remove(temporary)

    def fingerprint(self, model, tokenizer, max_length: int | None = None) -> str:
        """The key of `model`'s backbone with `tokenizer` and `max_length` ([`backbone_hash`]); it names its table."""
        from .modeling_pal import default_max_length

        model.register_tokenizer(tokenizer)
        return backbone_hash(model, max_length or default_max_length(tokenizer, model.config))

    def feature_table(self, fingerprint: str) -> FeatureTable:
        """The table of a backbone fingerprint ([`fingerprint`]), loaded from the cache folder the first time."""
        if fingerprint not in self._tables:
            self._tables[fingerprint] = self._load(fingerprint)
        return self._tables[fingerprint]

    def encode_rows(
        self,
        model,
        tokenizer,
        texts: Sequence[str],
        batch_size: int = 64,
        max_length: int | None = None,
        show_progress: bool = True,
        distributed: bool = False,
        lockstep: bool = False,
        fingerprint: str | None = None,
    ) -> tuple[FeatureTable, list[int]]:
        """
        Makes sure every text has a row in the table of `model`'s backbone and returns that table and the row of each
        text. Only texts that no row holds reach the backbone, each once; with `distributed=True` (call it from every
        process, with the same texts in the same order) they are split across the processes and gathered.
        `lockstep=True` makes every process run the same number of backbone batches (a process with fewer texts repeats
        its last one), which a backbone whose parameters are sharded (FSDP2, ZeRO-3) needs for its collectives.
        `fingerprint` pins the table (a trainer computes it once, so that later changes to the backbone's config, such
        as special token ids, do not start a new table); by default it is [`fingerprint`] of the model now.
        """
        from .modeling_pal import default_max_length

        model.register_tokenizer(tokenizer)
        max_length = max_length or default_max_length(tokenizer, model.config)
        fingerprint = fingerprint or backbone_hash(model, max_length)
        table = self.feature_table(fingerprint)
        keys = [text_key(text) for text in texts]
        missing = table.missing(keys)
        state = distributed_state() if distributed else None
        if state is not None:
            _check_same_keys(missing)
        if missing:
            by_key = dict(zip(keys, texts))
            new_texts = [by_key[key] for key in missing]
            encode = {"batch_size": batch_size, "max_length": max_length}
            if state is None:
                features = model.encode_texts(tokenizer, new_texts, show_progress=show_progress, **encode)
                self.num_encoded += len(new_texts)
                table.add(features, missing)
            else:
                self._encode_sharded(
                    model, tokenizer, table, new_texts, missing, state, show_progress, lockstep, encode
                )
            if state is None or state.is_main_process:
                self._save(fingerprint)
            if state is not None:
                state.wait_for_everyone()  # the cache file is complete before any process goes on
        return table, table.rows(keys)

    def encode(
        self,
        model,
        tokenizer,
        texts: Sequence[str],
        batch_size: int = 64,
        max_length: int | None = None,
        show_progress: bool = True,
        distributed: bool = False,
    ) -> torch.Tensor:
        """Features `(len(texts), hidden_size)` (float32, CPU; a copy); only texts never seen before reach the backbone
        (see [`encode_rows`] for `distributed`)."""
        table, rows = self.encode_rows(model, tokenizer, texts, batch_size, max_length, show_progress, distributed)
        if not rows:
            return torch.empty(0, model.config.hidden_size)
        return table.table[torch.tensor(rows, dtype=torch.long)].float()

    def _encode_sharded(self, model, tokenizer, table, texts, keys, state, show_progress, lockstep, encode) -> None:
        """Each process encodes every `num_processes`-th text by length; the features are gathered into `table`."""
        world, rank = state.num_processes, state.process_index
        order = sorted(range(len(texts)), key=lambda index: len(texts[index]))  # the same on every process
        shards = [order[process::world] for process in range(world)]
        own = [texts[index] for index in shards[rank]]
        if lockstep:  # the same number of texts, hence of batches, on every process
            own += [own[-1] if own else texts[0]] * (len(shards[0]) - len(own))
        error, local = None, None
        try:
            local = model.encode_texts(tokenizer, own, show_progress=show_progress and state.is_main_process, **encode)
            self.num_encoded += len(own)
            local = table.checked(local[: len(shards[rank])])
        except Exception as exception:  # every process must learn of it, or the others wait forever below
            error = exception
        failures = _all_gather_object(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        for process, failure in enumerate(failures):
            if failure is not None:
                raise RuntimeError(f"Encoding the texts failed on process {process}: {failure}")
        hidden_size = local.shape[1] if local.dim() == 2 else model.config.hidden_size
        new_rows = table._extend(len(texts), hidden_size, keys)
        _all_gather_rows(local, new_rows, shards, state)


def distributed_state():
    """
    accelerate's `PartialState` when this process is one of several, else `None`. A process started as one of several
    (`WORLD_SIZE` > 1, as `torchrun` / `accelerate launch` set it) that joined no process group is an error: each
    process would otherwise train alone on all the data, silently.
    """
    from accelerate import PartialState

    state = PartialState()
    if state.num_processes > 1:
        return state
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        raise RuntimeError(
            f"This process was started as one of {world_size} (WORLD_SIZE={world_size}) but is not part of a process "
            "group, so each process would encode and train alone. On a machine without GPUs, pass `--use_cpu true` "
            "to the script (or `PalRewardConfig(use_cpu=True)`), so that the processes join a gloo group."
        )
    return None


def _all_gather_object(value) -> list:
    values = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(values, value)
    return values


def _check_same_keys(keys: Sequence[bytes]) -> None:
    """Raises on every process unless all processes are about to encode the same texts in the same order."""
    digest = hashlib.sha256(b"".join(keys)).hexdigest()
    digests = _all_gather_object((len(keys), digest))
    if len(set(digests)) > 1:
        counts = [count for count, _ in digests]
        raise ValueError(
            f"The processes disagree on the texts to encode (texts not yet in the table, per process: {counts}). "
            "Every process must pass the same dataset, in the same order, and see the same `embedding_cache_dir` "
            "(a folder on storage shared by all machines, or none)."
        )


def _all_gather_rows(local: torch.Tensor, new_rows: torch.Tensor, shards: list[list[int]], state) -> None:
    """
    Gathers every process's encoded shard into `new_rows` (the same on every process): shard `p` holds the rows
    `shards[p]` of `new_rows`. Rows travel as raw bytes in chunks of at most `GATHER_CHUNK_BYTES` per process, on the
    device of the process group's backend (the CPU for gloo, the GPU for NCCL).
    """
    world = len(shards)
    hidden_size = new_rows.shape[1]
    row_bytes = hidden_size * new_rows.element_size()
    chunk = max(1, GATHER_CHUNK_BYTES // row_bytes)
    largest = max(len(shard) for shard in shards)
    for start in range(0, largest, chunk):
        stop = min(start + chunk, largest)
        send = torch.zeros(stop - start, row_bytes, dtype=torch.uint8, device=state.device)
        own = local[start:stop]
        if own.shape[0]:
            send[: own.shape[0]] = own.contiguous().view(torch.uint8).reshape(own.shape[0], row_bytes).to(send.device)
        received = [torch.empty_like(send) for _ in range(world)]
        torch.distributed.all_gather(received, send)
        for process, piece in enumerate(received):
            positions = shards[process][start:stop]
            if positions:
                rows = piece[: len(positions)].cpu().view(new_rows.dtype).reshape(len(positions), hidden_size)
                new_rows[torch.tensor(positions, dtype=torch.long)] = rows


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


__all__ = [
    "EmbeddingCache",
    "FeatureTable",
    "backbone_hash",
    "distributed_state",
    "featurize_preferences",
    "resolve_feature_dtype",
    "text_key",
]
