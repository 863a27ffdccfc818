# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
"""Feature store: with a frozen backbone, every unique text goes through the backbone once in the whole job.

The pooled features of one backbone live in one [`FeatureStore`]: a single 2-D tensor (float32 or half precision), one
row per text, keyed by the SHA-1 digest of the text, that the trainer's collator reads directly. A store belongs to one
backbone fingerprint ([`backbone_fingerprint`]: weights, pooling, max length, tokenizer), so features of two backbones
never mix. Given a folder, the store is also kept on disk as one safetensors file per fingerprint and dtype (features
and the SHA-1 of each text), written atomically by the main process. Under `accelerate launch` / `torchrun`,
[`FeatureStore.encode_rows`] with `distributed=True` splits the texts to encode across the processes and gathers the
features, so that every process ends with the same store.
"""

import hashlib
import json
import os
from collections.abc import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.utils import logging

from .modeling_pal import image_key
from .utils import atomic_write

logger = logging.get_logger(__name__)

FEATURE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Features sent per process and per collective call when gathering encoded texts: bounds the transient memory.
GATHER_CHUNK_BYTES = 64 * 1024 * 1024
# Bytes of a text key (SHA-1).
KEY_BYTES = 20
# `format` in the metadata of a feature file, next to `fingerprint` (which reading checks).
FILE_FORMAT = "pal_rm.FeatureStore"


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
    """The key of a text in a [`FeatureStore`]: its SHA-1 digest (20 bytes)."""
    return hashlib.sha1(text.encode("utf-8")).digest()


def backbone_fingerprint(model, tokenizer, max_length: int | None = None) -> str:
    """
    The fingerprint of `model`'s backbone read with `tokenizer` and truncated at `max_length` (by default the
    smallest of 512 and the tokenizer's and backbone's limits): [`backbone_hash`]. It names a [`FeatureStore`].
    """
    from .modeling_pal import default_max_length

    model.register_tokenizer(tokenizer)
    return backbone_hash(model, max_length or default_max_length(tokenizer, model.config))


def image_backbone_fingerprint(model, processor, max_length: int | None = None) -> str:
    """
    The fingerprint of an image model's backbone (a two-tower image-text backbone such as CLIP) read with `processor`:
    [`backbone_fingerprint`] of its text side (`processor.tokenizer`) combined with the image processor's settings
    (size, crop, normalisation), which change the image features as much as the weights do. It names a
    [`FeatureStore`] of image and caption features.
    """
    image_processor = processor.image_processor.to_dict()
    image_processor.pop("processor_class", None)
    digest = hashlib.sha256(backbone_fingerprint(model, processor.tokenizer, max_length).encode())
    digest.update(json.dumps(image_processor, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


class FeatureStore:
    """
    Pooled backbone features of texts, each held once and computed once: one `(num_rows, hidden_size)` tensor
    ([`table`], in `dtype`, on the CPU) whose rows the processed datasets address by index, and a map from the SHA-1
    digest of each text ([`text_key`]) to its row. The store owns the only copy of the features: the collator reads
    [`table`], and a file read from disk becomes the table as read.

    A store holds the features of one backbone, named by its fingerprint ([`backbone_fingerprint`]: weights, pooling,
    max length, tokenizer): `fingerprint`, or that of the first model [`encode_rows`] encodes with. Encoding with
    another backbone is then an error; each backbone gets a store of its own (the same `cache_dir` is fine). With
    `cache_dir`, the store starts from its file in that folder (a file that is unreadable, or whose fingerprint, dtype
    or shapes are wrong, is a warning and is rebuilt, never trusted) and writes it again, atomically, whenever
    [`encode_rows`] adds rows.

    Looking up never adds: [`rows`] raises for texts without a row, [`missing`] lists them. Rows are added explicitly,
    by [`add`] (features of texts, each text once), [`append`] (rows without a text: pooled-feature columns, never
    written to disk) or [`encode_rows`] / [`encode`] (which put the texts without a row through `model.encode_texts`).
    An image model's store also holds images, keyed by their pixels ([`~pal_rm.modeling_pal.image_key`]), added by
    [`encode_image_rows`] (the captions of its prompts go through [`encode_rows`] as texts).

    Under several processes (`accelerate launch`, `torchrun`), pass `distributed=True` to [`encode_rows`] /
    [`encode`] from every process with the same texts: the texts that the store lacks are split across the processes
    (balanced by length), each process encodes its share, and the features are gathered into the new rows in place, so
    that every process holds the whole table once. The main process alone writes the file; the others wait for it. The
    cache folder must then be one that every process sees (shared storage, like `output_dir`).

    Rows are only ever created by `_grow` (new rows, a view of the table, filled in place) and read through [`table`];
    the keys live in a dict, the features never in Python objects. Two later changes stay inside this class. Sharding:
    encoding already fills new rows in place from an all-gather (`_encode_sharded`), and a store sharded across ranks
    would own a range of rows, since datasets address rows by index. Features larger than memory: in the file,
    `features` is one row-major block after the safetensors header, so `safe_open(path, "pt").get_slice("features")`
    reads rows lazily and a `numpy.memmap` at offset `8 + header_length + data_offsets[0]` maps them whole
    (`torch.from_numpy` makes it the table; bfloat16 as int16, viewed back); a memory-mapped store would hold that map
    as its table and grow by writing rows at the end of a file with capacity reserved ahead, instead of reallocating.

    Args:
        cache_dir (`str`, *optional*):
            Folder of the store's file (`<fingerprint>[.<dtype>].safetensors`). `None`: in memory only.
        dtype (`str` or `torch.dtype`, *optional*, defaults to `torch.float32`):
            Storage precision: `"float32"`, or `"float16"` / `"bfloat16"` for half the memory. Features are computed
            in float32 and cast once; a value that becomes NaN or inf is an error.
        fingerprint (`str`, *optional*):
            The backbone fingerprint of the store ([`backbone_fingerprint`]); its file is read now. `None`: that of the
            first model [`encode_rows`] encodes with (a store that only [`append`]s rows needs none).

    Example:

    ```python
    >>> store = FeatureStore(cache_dir="~/.cache/pal_rm", dtype="float16")
    >>> store.encode_rows(model, tokenizer, ["a text", "another", "a text"])  # each text through the backbone once
    [0, 1, 0]
    >>> store.rows(["another"]), store.missing(["another", "new"]), store.table.shape
    ([1], ['new'], torch.Size([2, 384]))
    >>> store.rows(["new"])
    KeyError: '1 of the 1 texts have no row in the feature store (the first: 'new'). Add them first ...'
    ```
    """

    def __init__(
        self,
        cache_dir: str | None = None,
        dtype: str | torch.dtype = torch.float32,
        fingerprint: str | None = None,
    ):
        self.cache_dir = os.path.expanduser(cache_dir) if cache_dir else None
        self.dtype = resolve_feature_dtype(dtype)
        self.num_encoded = 0
        self._fingerprint: str | None = None
        self._table: torch.Tensor | None = None
        self._rows: dict[bytes, int] = {}  # text key -> row; insertion order is row order
        if fingerprint is not None:
            self._bind(fingerprint)

    def __len__(self) -> int:
        return 0 if self._table is None else self._table.shape[0]

    def __repr__(self) -> str:
        width = 0 if self._table is None else self._table.shape[1]
        return (
            f"{type(self).__name__}(rows={len(self)}, hidden_size={width}, dtype={self.dtype}, "
            f"fingerprint={self._fingerprint!r}, cache_dir={self.cache_dir!r})"
        )

    @property
    def fingerprint(self) -> str | None:
        """The backbone fingerprint of the store (`None` until it encodes, or when it holds pooled-feature rows only)."""
        return self._fingerprint

    @property
    def table(self) -> torch.Tensor:
        """The features, `(len(self), hidden_size)` in `self.dtype` (empty before the first row is added)."""
        return self._table if self._table is not None else torch.empty(0, dtype=self.dtype)

    @property
    def nbytes(self) -> int:
        """Memory held by the features, in bytes."""
        return 0 if self._table is None else self._table.numel() * self._table.element_size()

    @property
    def path(self) -> str | None:
        """The store's file in `cache_dir` (`None` without a folder or a fingerprint)."""
        if self.cache_dir is None or self._fingerprint is None:
            return None
        suffix = "" if self.dtype == torch.float32 else f".{str(self.dtype).removeprefix('torch.')}"
        return os.path.join(self.cache_dir, f"{self._fingerprint}{suffix}.safetensors")

    def missing(self, texts: Sequence[str]) -> list[str]:
        """The texts without a row, each once, in order of first appearance."""
        return [text for text in dict.fromkeys(texts) if text_key(text) not in self._rows]

    def rows(self, texts: Sequence[str]) -> list[int]:
        """The row of each text. A text without a row is a `KeyError` (naming how many lack one); nothing is added."""
        rows = [self._rows.get(text_key(text)) for text in texts]
        if None in rows:
            missing = [text for text, row in zip(texts, rows) if row is None]
            raise KeyError(
                f"{len(missing)} of the {len(texts)} texts have no row in the feature store (the first: "
                f"{missing[0][:80]!r}). Add them first with `add` (features you have) or `encode_rows` (to encode "
                "them with the backbone)."
            )
        return rows

    def add(self, texts: Sequence[str], features: torch.Tensor) -> list[int]:
        """
        Adds the features of texts and returns the row of each text.

        Args:
            texts (`Sequence[str]`):
                The texts, keyed by their SHA-1 digest. A text that already has a row (or comes earlier in `texts`)
                keeps it: its row of `features` is not read.
            features (`torch.Tensor` of shape `(len(texts), hidden_size)`):
                One row per text, cast to `self.dtype`. A value that is (or becomes, by the cast) NaN or inf is an
                error, and leaves the store as it was.
        """
        if features.dim() != 2 or features.shape[0] != len(texts):
            raise ValueError(
                f"`features` must hold one row per text: got shape {tuple(features.shape)} for {len(texts)} texts."
            )
        keys = [text_key(text) for text in texts]
        self._add_keyed(keys, features)
        return [self._rows[key] for key in keys]

    def append(self, features: torch.Tensor) -> list[int]:
        """
        Adds rows without a text (pooled-feature columns: addressed by row only, never written to disk) and returns
        their rows. `features` is `(num_rows, hidden_size)`, cast to `self.dtype` (NaN or inf is an error, and adds
        nothing).
        """
        if features.dim() != 2:
            raise ValueError("Features must be a 2-D tensor (rows, hidden_size).")
        checked = self._checked(features)  # before the table grows: a bad row leaves it as it was
        start = len(self)
        self._grow(checked.shape[0], checked.shape[1]).copy_(checked)
        return list(range(start, start + checked.shape[0]))

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
    ) -> list[int]:
        """
        Adds the features of the texts without a row, computed by `model.encode_texts` (each such text once), writes
        the store's file, and returns the row of every text.

        Args:
            model ([`PalRewardModel`]):
                A model with a backbone. Its fingerprint (or `fingerprint`) must be the store's, or becomes it.
            tokenizer (`PreTrainedTokenizerBase`):
                The tokenizer the model reads texts with.
            texts (`Sequence[str]`):
                The texts, as the backbone reads them.
            batch_size (`int`, *optional*, defaults to `64`):
                Texts per backbone batch.
            max_length (`int`, *optional*):
                Truncation length; by default the smallest of 512 and the tokenizer's and backbone's limits.
            show_progress (`bool`, *optional*, defaults to `True`):
                Whether to show a progress bar.
            distributed (`bool`, *optional*, defaults to `False`):
                Call from every process with the same texts in the same order: the texts to encode are split across
                the processes and gathered.
            lockstep (`bool`, *optional*, defaults to `False`):
                Every process runs the same number of backbone batches (a process with fewer texts repeats its last
                one), which a backbone whose parameters are sharded (FSDP2, ZeRO-3) needs for its collectives.
            fingerprint (`str`, *optional*):
                Pins the backbone fingerprint (a trainer computes it once, so that later changes to the backbone's
                config, such as special token ids, do not make it another backbone); by default
                [`backbone_fingerprint`] of the model now.
        """
        from .modeling_pal import default_max_length

        model.register_tokenizer(tokenizer)
        max_length = max_length or default_max_length(tokenizer, model.config)
        self._bind(fingerprint or backbone_hash(model, max_length))

        def encode(new_texts, show_progress, deduplicate=True):
            return model.encode_texts(
                tokenizer,
                new_texts,
                batch_size=batch_size,
                max_length=max_length,
                show_progress=show_progress,
                deduplicate=deduplicate,
            )

        keys = [text_key(text) for text in texts]
        return self._encode_keyed(keys, texts, encode, len, show_progress, distributed, lockstep)

    def encode_image_rows(
        self,
        model,
        processor,
        images: Sequence,
        batch_size: int = 64,
        show_progress: bool = True,
        distributed: bool = False,
        lockstep: bool = False,
        fingerprint: str | None = None,
        convert_to_rgb: bool = False,
        chunk_size: int = 512,
        name: str = "images",
    ) -> list[int]:
        """
        The image counterpart of [`encode_rows`] for an image model (a two-tower image-text backbone): adds the image
        embeddings of the images without a row (keyed by their pixels, so the same image from two files is encoded
        once), writes the store's file, and returns the row of every image. Images are decoded and checked first
        ([`~pal_rm.modeling_pal.load_image`]: RGB only unless `convert_to_rgb=True`). `fingerprint` defaults to
        [`image_backbone_fingerprint`]; the other arguments are those of [`encode_rows`].

        `images` is any sequence that slices (a list, or a dataset's column as [`ImageColumn`] reads it); they are read,
        decoded and encoded `chunk_size` at a time, so memory holds one chunk of decoded images, never all of them
        (`python examples/benchmarks/pick_a_filter.py --memory_images 4000` measures it). The new features wait aside
        and join the table at the end, in one copy. An image that cannot be used is an error naming its position, as
        `{name}[position]`.
        """
        from tqdm.auto import tqdm

        from .modeling_pal import load_image

        if isinstance(images, (str, bytes, os.PathLike, dict)) or hasattr(images, "getpixel"):
            raise TypeError(f"`{name}` must be a sequence of images, got one {type(images).__name__}.")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"`chunk_size` must be an integer >= 1, got {chunk_size!r}.")
        scorer = model.image_scorer(processor, batch_size=batch_size, convert_to_rgb=convert_to_rgb)
        self._bind(fingerprint or image_backbone_fingerprint(model, processor))
        state = distributed_state() if distributed else None
        chunked = len(images) > chunk_size
        progress = tqdm(
            total=len(images),
            desc="Encoding images",
            unit="image",
            disable=not (show_progress and chunked and (state is None or state.is_main_process)),
        )
        all_keys, new_keys, new_features = [], {}, []  # the keys of the new images, in order (a dict: fast lookups)
        for start in range(0, len(images), chunk_size):
            chunk = [
                load_image(image, f"{name}[{start + offset}]", convert_to_rgb)
                for offset, image in enumerate(images[start : start + chunk_size])
            ]
            keys = [image_key(image) for image in chunk]
            all_keys += keys
            missing = self._missing_keys(keys, state, pending=new_keys)
            if missing:  # set aside: the table grows once, at the end, not once per chunk
                new_features.append(
                    self._encode_missing(
                        missing,
                        dict(zip(keys, chunk)),
                        scorer.encode,
                        lambda image: image.width * image.height,
                        show_progress and not chunked,
                        state,
                        lockstep,
                        rows_for=lambda width: torch.empty(len(missing), width, dtype=self.dtype),
                    )
                )
                new_keys.update(dict.fromkeys(missing))
            progress.update(len(chunk))
        progress.close()
        if new_keys:
            start = len(self)
            rows = self._grow(len(new_keys), new_features[0].shape[-1])
            for features in new_features:
                rows[: len(features)] = features
                rows = rows[len(features) :]
            self._register(list(new_keys), start)
            del new_features
            self._save_everywhere(state)
        return [self._rows[key] for key in all_keys]

    def _save_everywhere(self, state) -> None:
        """Writes the file once (the main process under several) and holds every process until it is complete."""
        if state is None or state.is_main_process:
            self.save()
        if state is not None:
            state.wait_for_everyone()

    def _encode_keyed(self, keys, items, encode, size, show_progress, distributed, lockstep) -> list[int]:
        """
        Adds the features of the `items` whose key has no row (`encode(items, show_progress=, deduplicate=)`, each such
        item once; split across processes with `distributed`, ordered by `size`), writes the file, and returns the
        row of every item.
        """
        state = distributed_state() if distributed else None
        missing = self._missing_keys(keys, state)
        if missing:
            start = len(self)
            self._encode_missing(
                missing,
                dict(zip(keys, items)),
                encode,
                size,
                show_progress,
                state,
                lockstep,
                rows_for=lambda width: self._grow(len(missing), width),  # filled in place
            )
            self._register(missing, start)
            self._save_everywhere(state)  # the file is complete before any process goes on
        return [self._rows[key] for key in keys]

    def _missing_keys(self, keys, state, pending=()) -> list[bytes]:
        """The keys without a row (nor in `pending`), each once, in order; every process must find the same."""
        missing = [key for key in dict.fromkeys(keys) if key not in self._rows and key not in pending]
        if state is not None:
            _check_same_keys(missing)
        return missing

    def _encode_missing(self, missing, by_key, encode, size, show_progress, state, lockstep, rows_for):
        """
        Encodes the items of the `missing` keys (`by_key[key]`), each once, into `rows_for(width)`, a tensor of
        `len(missing)` rows to fill (new rows of the table, or rows set aside), and returns it. Under several processes
        (`state`) each process encodes every `num_processes`-th item by `size` and the features are gathered.
        """
        items = [by_key[key] for key in missing]
        if state is not None:
            return self._encode_sharded(encode, size, items, state, show_progress, lockstep, rows_for)
        features = self._checked(encode(items, show_progress=show_progress))
        self.num_encoded += len(items)
        return rows_for(features.shape[1]).copy_(features)

    def encode(
        self,
        model,
        tokenizer,
        texts: Sequence[str],
        batch_size: int = 64,
        max_length: int | None = None,
        show_progress: bool = True,
        distributed: bool = False,
        fingerprint: str | None = None,
    ) -> torch.Tensor:
        """Features `(len(texts), hidden_size)` of texts (float32, CPU; a copy, the store keeps its own rows); only
        texts without a row reach the backbone. The arguments are those of [`encode_rows`]."""
        rows = self.encode_rows(
            model, tokenizer, texts, batch_size, max_length, show_progress, distributed, fingerprint=fingerprint
        )
        if not rows:
            return torch.empty(0, model.config.hidden_size)
        return self.table[torch.tensor(rows, dtype=torch.long)].float()

    def save(self) -> None:
        """
        Writes the rows of texts to the store's file ([`path`]): features and text digests in one safetensors file
        (with the fingerprint in its metadata), replaced atomically. Without `cache_dir` or a fingerprint it does
        nothing. A failed write is a warning, not an error: the features are in memory, and under several processes
        the others are waiting for this one.
        """
        path = self.path
        if path is None:
            return
        keys, features = self._keyed_rows()
        if not keys:
            return
        digests = torch.frombuffer(bytearray(b"".join(keys)), dtype=torch.uint8).reshape(len(keys), KEY_BYTES)
        metadata = {"format": FILE_FORMAT, "fingerprint": self._fingerprint}
        try:
            with atomic_write(path, mode=None) as temporary:
                save_file({"features": features.contiguous(), "keys": digests}, temporary, metadata=metadata)
        except OSError as error:
            logger.warning(
                f"Could not write the embedding cache in {self.cache_dir} ({error}); training goes on with the "
                "features in memory, and the next run encodes the texts again."
            )

    # ------------------------------------------------------------------ internals
    def _bind(self, fingerprint: str) -> None:
        """Makes `fingerprint` the store's (reading its file) or checks that it is; another one is an error."""
        if fingerprint == self._fingerprint:
            return
        if self._fingerprint is not None:
            raise ValueError(
                f"This feature store holds the features of backbone {self._fingerprint}, and these texts would be "
                f"encoded by backbone {fingerprint} (other weights, pooling, max length or tokenizer): features of two "
                "backbones never mix. Give each backbone a `FeatureStore` of its own (the same `cache_dir` is fine), "
                "or, for the same backbone whose config changed since (a trainer sets its token ids), pass "
                f"`fingerprint={self._fingerprint!r}`."
            )
        self._fingerprint = fingerprint
        self._read()

    def _read(self) -> None:
        """Adds the rows of the store's file, when there is one and it is sound; a file that is not is rebuilt."""
        path = self.path
        if path is None or not os.path.exists(path):
            return
        try:
            with safe_open(path, framework="pt") as file:
                metadata = file.metadata() or {}
                features, digests = file.get_tensor("features"), file.get_tensor("keys")
            if metadata.get("fingerprint", self._fingerprint) != self._fingerprint:
                raise ValueError(f"it holds the features of backbone {metadata['fingerprint']}")
            if features.dim() != 2 or digests.dtype != torch.uint8 or digests.shape != (features.shape[0], KEY_BYTES):
                raise ValueError("its keys and features disagree")
            if features.dtype != self.dtype:
                raise ValueError(f"it holds {features.dtype} features, not {self.dtype}")
            if not torch.isfinite(features).all():
                raise ValueError("it holds NaN or inf values")
            blob = digests.numpy().tobytes()
            keys = [blob[offset : offset + KEY_BYTES] for offset in range(0, len(blob), KEY_BYTES)]
            if len(set(keys)) != len(keys):
                raise ValueError("it holds a text twice")
        except Exception as error:  # a corrupt file is rebuilt, never trusted
            logger.warning(f"Ignoring the unreadable embedding cache {path} ({error}); it will be rebuilt.")
            return
        if self._table is None:
            self._table = features  # adopted as read: no second copy
            self._rows = dict(zip(keys, range(len(keys))))
        else:  # rows appended before the store had a fingerprint come first
            self._add_keyed(keys, features)

    def _add_keyed(self, keys: Sequence[bytes], features: torch.Tensor) -> None:
        """Adds the rows of `features` whose key has no row yet (the first of repeated keys)."""
        positions = {}
        for position, key in enumerate(keys):
            if key not in self._rows and key not in positions:
                positions[key] = position
        if not positions:
            return
        checked = self._checked(features[torch.tensor(list(positions.values()), dtype=torch.long)])
        start = len(self)
        self._grow(len(positions), checked.shape[-1]).copy_(checked)
        self._register(list(positions), start)

    def _register(self, keys: Sequence[bytes], start: int) -> None:
        """Maps `keys` to the rows `start`, `start + 1`, ... (filled already)."""
        self._rows.update(zip(keys, range(start, start + len(keys))))

    def _checked(self, features: torch.Tensor) -> torch.Tensor:
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

    def _grow(self, num_rows: int, hidden_size: int) -> torch.Tensor:
        """Grows the table by `num_rows` rows and returns them (a view of the table, uninitialised) to fill."""
        if num_rows == 0:
            return torch.empty(0, hidden_size, dtype=self.dtype)
        old = self._table
        if old is not None and hidden_size != old.shape[1]:
            source = f" (read from {self.path}; delete that file to rebuild it)" if self.path else ""
            raise ValueError(
                f"Features of width {hidden_size} cannot join a feature table of width {old.shape[1]}{source}: all "
                "features of one trainer must come from the same backbone and pooling."
            )
        start = len(self)
        table = torch.empty(start + num_rows, hidden_size, dtype=self.dtype)
        if old is not None:
            table[:start] = old
        self._table = table  # the old table is released here: one copy at rest, two only while growing
        return table[start:]

    def _keyed_rows(self) -> tuple[list[bytes], torch.Tensor]:
        """The keys of the rows of texts and those rows' features (the table itself when every row has a text)."""
        keys = list(self._rows)
        if len(keys) == len(self):
            return keys, self.table
        return keys, self.table[torch.tensor(list(self._rows.values()), dtype=torch.long)]

    def _encode_sharded(self, encode, size, items, state, show_progress, lockstep, rows_for) -> torch.Tensor:
        """Each process encodes every `num_processes`-th item by size; the features are gathered into
        `rows_for(width)` (the same on every process), which is returned."""
        world, rank = state.num_processes, state.process_index
        order = sorted(range(len(items)), key=lambda index: size(items[index]))  # the same on every process
        shards = [order[process::world] for process in range(world)]
        own = [items[index] for index in shards[rank]]
        if lockstep:  # the same number of items, hence of batches, on every process
            own += [own[-1] if own else items[0]] * (len(shards[0]) - len(own))
        error, local = None, None
        try:
            # In lockstep the padding repeats an item, and every repeat must go through the backbone.
            show = show_progress and state.is_main_process
            local = encode(own, show_progress=show, deduplicate=not lockstep)
            self.num_encoded += len(own)
            local = self._checked(local[: len(shards[rank])])
        except Exception as exception:  # every process must learn of it, or the others wait forever below
            error = exception
        failures = _all_gather_object(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        for process, failure in enumerate(failures):
            if failure is not None:
                raise RuntimeError(f"Encoding the texts failed on process {process}: {failure}")
        rows = rows_for(local.shape[1])
        _all_gather_rows(local, rows, shards, state)
        return rows


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


_FEATURE_COLUMNS = ("prompt_features", "chosen_features", "rejected_features")


def _with_feature_columns(dataset, splits, item_columns, features, rows):
    """`dataset` (a `Dataset`, or a `DatasetDict` of `splits`) with its `item_columns` replaced by the feature columns:
    `rows[split][column]` lists, for each example, its row of `features` (float32). Every other column is kept."""
    from datasets import Dataset, DatasetDict

    output = {}
    for name, split in splits.items():
        columns = split.remove_columns(list(item_columns)).to_dict()
        for column, column_rows in rows[name].items():
            columns[column] = list(features[column_rows]) if column_rows else []  # one float32 array per example
        output[name] = Dataset.from_dict(columns)
    return DatasetDict(output) if isinstance(dataset, DatasetDict) else output["data"]


def featurize_preferences(
    dataset,
    model,
    tokenizer,
    cache: FeatureStore | None = None,
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
    splits), through `cache` (a [`FeatureStore`]; a new one in memory by default).
    """
    from datasets import DatasetDict

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
    cache = cache if cache is not None else FeatureStore()
    features = cache.encode(
        model, tokenizer, texts, batch_size=batch_size, max_length=max_length, show_progress=show_progress
    ).numpy()
    index = {text: i for i, text in enumerate(texts)}
    rows = {
        name: {
            column: [index[texts_of_row[position]] for texts_of_row in formatted[name]]
            for position, column in enumerate(_FEATURE_COLUMNS)
        }
        for name in splits
    }
    return _with_feature_columns(dataset, splits, ("prompt", "chosen", "rejected"), features, rows)


class ImageColumn(Sequence):
    """
    An image column of a `datasets.Dataset`, read lazily: an index or a slice reads those rows from the Arrow table
    as undecoded cells (`{"bytes", "path"}` for a `datasets.Image` column, the stored value otherwise), so that
    [`FeatureStore.encode_image_rows`] decodes one chunk at a time instead of the whole column.
    """

    def __init__(self, dataset, column: str):
        from datasets import Image

        if column not in dataset.column_names:
            raise ValueError(f"The dataset has no {column!r} column (columns: {dataset.column_names}).")
        part = dataset.select_columns([column])
        if isinstance(part.features[column], Image) and part.features[column].decode:
            part = part.cast_column(column, Image(decode=False))  # a change of the schema only: no copy
        self._data, self._column = part, column

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self._data[index][self._column]
        return self._data[int(index)][self._column]


def featurize_image_preferences(
    dataset,
    model,
    processor,
    cache: FeatureStore | None = None,
    batch_size: int = 64,
    show_progress: bool = True,
    convert_to_rgb: bool = False,
):
    """
    The image counterpart of [`featurize_preferences`]: replaces the images and captions of an image preference
    dataset by the frozen two-tower backbone's embeddings (the image tower's for `chosen_image` and `rejected_image`,
    the text tower's for the `prompt` caption), so that PAL heads built with `PalConfig(feature_dim=...)` and no
    backbone train on exactly the features a frozen image `PalRewardTrainer` would compute. This is the form of the
    embeddings the PAL authors release for Pick-a-Pic and Pick-a-Filter.

    `dataset` is a `Dataset` or `DatasetDict` with `prompt` (non-empty captions), `chosen_image` and
    `rejected_image`; `model` a [`PalRewardModel`] on a CLIP or SigLIP backbone and `processor` its processor. The
    result has `prompt_features`, `chosen_features` and `rejected_features` in place of those columns; every other
    column is kept. Each distinct image (by its pixels) and caption is encoded once across all splits, through
    `cache` (a [`FeatureStore`]; a new one in memory by default). Images are checked as the trainer checks them: RGB
    only unless `convert_to_rgb=True`.
    """
    from datasets import DatasetDict

    if model.backbone is None or not model.is_image_model:
        raise ValueError(
            "`featurize_image_preferences` needs a PAL model on a two-tower image-text backbone (CLIP, SigLIP) to "
            "encode the images; for texts use `featurize_preferences`."
        )
    splits = dataset if isinstance(dataset, DatasetDict) else {"data": dataset}
    captions = {}
    for name, split in splits.items():
        missing = [c for c in ("prompt", "chosen_image", "rejected_image") if c not in split.column_names]
        if missing:
            raise ValueError(
                f"The {name} split has no {missing} column(s): it needs prompt (the caption), chosen_image and "
                "rejected_image."
            )
        captions[name] = split["prompt"]
        for row, caption in enumerate(captions[name]):
            if not isinstance(caption, str) or not caption.strip():
                raise ValueError(
                    f"Row {row} of the {name} split has the caption {caption!r}: a non-empty string is needed."
                )
    cache = cache if cache is not None else FeatureStore()
    fingerprint = image_backbone_fingerprint(model, processor)
    image_rows = {
        (name, column): cache.encode_image_rows(
            model,
            processor,
            ImageColumn(split, column),  # read and decoded a chunk at a time
            batch_size=batch_size,
            show_progress=show_progress,
            fingerprint=fingerprint,
            convert_to_rgb=convert_to_rgb,
            name=f"{name} split, {column}",
        )
        for name, split in splits.items()
        for column in ("chosen_image", "rejected_image")
    }
    unique_captions = list(
        dict.fromkeys(caption for split_captions in captions.values() for caption in split_captions)
    )
    caption_rows = dict(
        zip(
            unique_captions,
            cache.encode_rows(
                model,
                processor.tokenizer,
                unique_captions,
                batch_size=batch_size,
                show_progress=show_progress,
                fingerprint=fingerprint,
            ),
        )
    )
    rows = {
        name: {
            "prompt_features": [caption_rows[caption] for caption in captions[name]],
            "chosen_features": image_rows[(name, "chosen_image")],
            "rejected_features": image_rows[(name, "rejected_image")],
        }
        for name in splits
    }
    table = cache.table.float().numpy()
    return _with_feature_columns(dataset, splits, ("prompt", "chosen_image", "rejected_image"), table, rows)


__all__ = [
    "FeatureStore",
    "backbone_fingerprint",
    "backbone_hash",
    "distributed_state",
    "ImageColumn",
    "featurize_image_preferences",
    "featurize_preferences",
    "resolve_feature_dtype",
    "text_key",
]
