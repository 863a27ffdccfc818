# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
"""Model cards and Hub uploads for PAL checkpoints."""

import json
import os
import tempfile

from transformers.utils import logging

from .utils import atomic_write

logger = logging.get_logger(__name__)

USER_ID_SALT_ENV = "PAL_USER_ID_SALT"
"""The environment variable read for the user id salt when none is passed (`pal_rm.hub`, `PalRewardTrainer`)."""

USER_ID_PLACEHOLDER = "<user id>"
"""What the model card's usage snippet shows for a user id: never one of the registered ids."""

CITATION = """@inproceedings{chen2025pal,
  title     = {{PAL}: Sample-Efficient Personalized Reward Modeling for Pluralistic Alignment},
  author    = {Chen, Daiwei and Chen, Yi and Rege, Aniket and Wang, Zhi and Vinayak, Ramya Korlakai},
  booktitle = {The Thirteenth International Conference on Learning Representations (ICLR)},
  year      = {2025}
}"""


def resolve_user_id_salt(salt: str | None = None) -> str | None:
    """The user id salt: `salt` when given, else the `PAL_USER_ID_SALT` environment variable, else `None`."""
    return salt or os.environ.get(USER_ID_SALT_ENV) or None


def missing_salt_message(what: str) -> str:
    """The error raised when user ids must be hashed and no salt was given (`what` names the upload)."""
    return (
        f"{what} hashes the user ids by default and needs a salt: pass `salt=...` (`user_id_salt=...` for "
        f"`PalRewardTrainer`) or set the `{USER_ID_SALT_ENV}` environment variable to a secret string (for example "
        "`python -c 'import secrets; print(secrets.token_hex(32))'`). Keep the salt apart from the checkpoint: it is "
        "never uploaded, and it is what lets you look users up by their raw ids later (`model.set_user_id_salt`). To "
        "upload the raw user ids instead, pass `hash_user_ids=False` explicitly."
    )


def _format_results(eval_results: dict | None) -> str:
    if not eval_results:
        return "No evaluation results were recorded for this checkpoint.\n"
    lines = ["| metric | value |", "|---|---|"]
    for key, value in eval_results.items():
        value = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"| {key} | {value} |")
    return "\n".join(lines) + "\n"


def _is_local_path(name_or_path: str) -> bool:
    """Whether a backbone reference is a folder of this machine rather than a Hub id."""
    return os.path.isabs(name_or_path) or os.path.exists(name_or_path)


def _checkpoint_layout(model, saved: dict | None = None) -> dict:
    """
    How a checkpoint of `model` keeps its backbone: `{"weights": "included" | "reference", "adapter": dict | None,
    "merged": dict | None, "reference": str, "revision": str | None}` (`merged`: the config of an adapter merged into
    the saved backbone), read from a saved `config.json` (`saved`) or, without one, what `save_pretrained` does by
    default (an adapter next to a reference where the model can refer to its backbone).
    """
    config = model.config
    if saved is not None:
        adapter = saved.get("backbone_adapter")
        live_adapter = getattr(config, "backbone_adapter", None)
        return {
            "weights": saved.get("backbone_weights", "included"),
            "adapter": adapter,
            # Saved with `merge_adapter=True`: the model in memory still has the adapter the checkpoint merged in.
            "merged": live_adapter if adapter is None and live_adapter is not None else None,
            "reference": saved.get("backbone_name_or_path") or "",
            "revision": saved.get("backbone_revision"),
        }
    adapter = getattr(config, "backbone_adapter", None)
    by_reference = adapter is not None and model.can_refer_to_backbone()
    return {
        "weights": "reference" if by_reference else "included",
        "adapter": adapter,
        "merged": None,
        "reference": getattr(config, "backbone_name_or_path", None) or "",
        "revision": getattr(config, "backbone_revision", None),
    }


def _adaptation_prior_text(prior: dict | None) -> str:
    """How new users are fitted: the learned prior and how it was chosen (`config.adaptation_prior`)."""
    if prior is None:
        return (
            "New users are fitted under a Gaussian prior with the trained users' mean and spread of mixture logits; "
            "its strength was not chosen on data (the model was trained without a validation split)."
        )
    if prior["method"] == "empirical":
        form = (
            f"the **empirical** population prior (the trained users' mixture logits, blurred by "
            f"{prior['bandwidth']:g} times their spread): a new user gets its posterior-mean mixture"
        )
    else:
        form = (
            f"a **Gaussian** prior on the mixture logits (the trained users' mean and spread, strength "
            f"{prior['strength']:g}): a new user gets its MAP mixture"
        )
    selection = prior.get("selection")
    if not selection:
        return f"New users are fitted under {form}."
    candidates = ", ".join(
        f"{c['method']} {c['value']:g}: {c['accuracy']:.3f}" for c in selection.get("candidates", [])
    )
    return (
        f"New users are fitted under {form}. This was chosen by the {selection['criterion']} "
        f"({selection['users']} users, {selection['comparisons']} comparisons of the `{selection['split']}` split; "
        f"held-out accuracy per candidate: {candidates})."
    )


def _adapter_text(adapter: dict) -> str:
    """`a LORA adapter (rank 16, target modules `q_proj`, `v_proj`)`."""
    targets = adapter.get("target_modules")
    targets = ", ".join(f"`{name}`" for name in targets) if isinstance(targets, list) else f"`{targets}`"
    rank = f"rank {adapter['r']}, " if adapter.get("r") is not None else ""
    return f"a {adapter.get('peft_type', 'PEFT')} adapter ({rank}target modules {targets})"


def _text_usage(config, load_path: str) -> str:
    """The usage section of a text model's card: `score_texts` with the saved tokenizer."""
    salt_line = (
        "model.set_user_id_salt(salt)  # the registry holds salted hashes: the uploader's salt maps raw ids to them\n"
        if config.hashed_user_ids
        else ""
    )
    return f"""```python
from transformers import AutoModel, AutoTokenizer

model = AutoModel.from_pretrained("{load_path}", trust_remote_code=True)  # or `import pal_rm` first
tokenizer = AutoTokenizer.from_pretrained("{load_path}")

prompts = ["Write a note to the team about the offsite."] * 2
responses = ["Dear team, the offsite is on Friday.", "hey all! offsite friday, woohoo!"]
{salt_line}model.score_texts(tokenizer, prompts, responses, users="{USER_ID_PLACEHOLDER}")   # for one registered user
model.score_texts(tokenizer, prompts, responses)                            # population reward (no user)
model.score_texts(tokenizer, prompts, responses, mixture_weights=[1.0] + [0.0] * {config.num_prototypes - 1})  # prototype 0
```

Fit a new user from a few of their comparisons (everything else stays frozen):

```python
from pal_rm.trainers import PalRewardConfig, PalRewardTrainer

trainer = PalRewardTrainer(model, PalRewardConfig("out"), train_dataset=seen_users_data, processing_class=tokenizer)
trainer.adapt_users(new_user_comparisons)   # columns: user_id, prompt, chosen, rejected
model.user_confidence("<new user id>")      # comparisons seen, mixture, posterior spread
```"""


def _image_usage(config, load_path: str) -> str:
    """The usage section of an image model's card: `score_images` with the backbone's processor."""
    salt = "model.set_user_id_salt(salt)  # the registry holds salted hashes\n" if config.hashed_user_ids else ""
    return f"""```python
from PIL import Image
from transformers import AutoModel, AutoProcessor

model = AutoModel.from_pretrained("{load_path}", trust_remote_code=True)  # or `import pal_rm` first
processor = AutoProcessor.from_pretrained("{load_path}")

captions = ["a lighthouse at dusk"] * 2
images = [Image.open("first.png").convert("RGB"), Image.open("second.png").convert("RGB")]
{salt}model.score_images(processor, captions, images, users="{USER_ID_PLACEHOLDER}")   # for one registered user
model.score_images(processor, captions, images)                            # population reward (no user)
```

Fit a new user from a few of their comparisons (everything else stays frozen):

```python
from pal_rm.trainers import PalRewardConfig, PalRewardTrainer

trainer = PalRewardTrainer(model, PalRewardConfig("out"), train_dataset=seen_users_data, processing_class=processor)
trainer.adapt_users(new_user_comparisons)   # columns: user_id, prompt, chosen_image, rejected_image
```"""


def _backbone_weights_text(layout: dict) -> str:
    """One sentence on where the backbone weights of a checkpoint are."""
    reference = layout["reference"]
    where = f"`{reference}`" + (f" (revision `{layout['revision']}`)" if layout["revision"] else "")
    adapter = layout["adapter"]
    if adapter is None and layout["merged"] is not None:
        base = f" into the base backbone {where}" if reference else ""
        merged = _adapter_text(layout["merged"])
        return f"The full backbone weights are in this checkpoint (`model.safetensors`), with {merged} merged{base}."
    if adapter is not None:
        adapter_text = (
            f"{_adapter_text(adapter)} in `backbone_adapter/` (PEFT's format), attached again when the model loads "
            "(this needs `peft`)"
        )
        if layout["weights"] == "reference":
            return (
                f"{adapter_text[0].upper()}{adapter_text[1:]} on the base backbone {where}, whose weights are not in "
                "this checkpoint: they are loaded from there."
            )
        return f"The base backbone weights (in `model.safetensors`) and {adapter_text}."
    if layout["weights"] == "reference":
        return f"Not in this checkpoint: the backbone is loaded from {where} when the model loads."
    return "The full backbone weights are in this checkpoint (`model.safetensors`)."


def _part_description(part, fallback: str) -> str:
    """What the model card says about one of the model's parts: its `description`, or `fallback` and its class."""
    return getattr(part, "description", None) or f"{fallback} (`{type(part).__name__}`)"


def create_model_card(
    model,
    eval_results: dict | None = None,
    dataset_name: str | None = None,
    repo_id: str | None = None,
    license: str = "apache-2.0",
    saved_config: dict | None = None,
) -> str:
    """
    A model card (README.md with YAML metadata) generated from a [`PalRewardModel`]: what PAL is, the backbone, K, the
    variant, the number of users, where the backbone weights are (in the checkpoint, a LoRA adapter on a base backbone
    with `base_model:` metadata, or a reference to the backbone), evaluation results, a usage snippet, the license and
    the citation. `saved_config` is the saved `config.json` the card describes ([`save_model_card`] reads it); without
    it the card describes what `save_pretrained` saves by default. The card names no registered user: its usage
    snippet shows the placeholder `"<user id>"`.
    """
    config = model.config
    backbone = config.backbone_config
    layout = _checkpoint_layout(model, saved_config) if backbone is not None else None
    base_model = (layout["reference"] if layout else "") or (
        getattr(backbone, "_name_or_path", "") if backbone is not None else ""
    )
    base_model_line = f"base_model: {base_model}\n" if base_model and not _is_local_path(base_model) else ""
    adapter_tags = "- peft\n- lora\n" if layout and (layout["adapter"] or layout["merged"]) is not None else ""
    backbone_text = (
        f"`{base_model or backbone.model_type}` ({backbone.model_type}, hidden size {config.hidden_size}, "
        f"`{config.pooling}` pooling)"
        if backbone is not None
        else f"none: the model scores pooled features of width {config.hidden_size}"
    )
    images = config.item_modality == "image"
    if images:
        backbone_text += "; items are images (image tower), prompts are captions (text tower)"
    pipeline_line = "" if images else "pipeline_tag: text-classification\n"
    load_path = repo_id or "path/to/this/checkpoint"
    usage = _image_usage(config, load_path) if images else _text_usage(config, load_path)
    backbone_weights_row = f"| backbone weights | {_backbone_weights_text(layout)} |\n" if layout else ""
    variant_text = _part_description(model.prototype_head, f"variant {config.variant!r}")
    similarity_text = _part_description(
        model.similarity, f"the {config.similarity!r} similarity to the user's ideal point"
    )
    dataset_line = f"datasets:\n- {dataset_name}\n" if dataset_name and "/" in dataset_name else ""
    return f"""---
library_name: transformers
license: {license}
{base_model_line}{dataset_line}tags:
- reward-model
- personalized-reward-model
- pal-rm
- trl
{adapter_tags}{pipeline_line}---

# PAL personalized reward model

This is a **personalized reward model** trained with [pal-rm](https://github.com/pal-rm/pal-rm), an implementation of
PAL (Chen et al., *Sample-Efficient Personalized Reward Modeling for Pluralistic Alignment*, ICLR 2025). Every user
has an ideal point in a learned preference space, a convex combination of K shared prototypes; the reward of a
response for a user is {similarity_text}. Users share what they have in common, each user costs
K numbers, and a new user is fitted from a few comparisons.

| | |
|---|---|
| backbone | {backbone_text} |
{backbone_weights_row}| variant | {variant_text} |
| prototypes (K) | {config.num_prototypes} |
| preference dimension | {config.preference_dim} |
| registered users | {config.num_users}{" (ids stored as salted hashes)" if config.hashed_user_ids else ""} |
| training data | {dataset_name or "not recorded"} |

## Evaluation

{_format_results(eval_results)}
## Usage

{usage}

{_adaptation_prior_text(config.adaptation_prior)}

## License

{license}. The backbone keeps its own license.

## Citation

```bibtex
{CITATION}
```
"""


def save_model_card(model, folder: str, **kwargs) -> str:
    """
    Writes [`create_model_card`]'s card to `folder/README.md` (atomically) and returns its path. The card describes
    the checkpoint saved in `folder` (its `config.json`), where there is one.
    """
    path = os.path.join(folder, "README.md")
    config_file = os.path.join(folder, "config.json")
    if "saved_config" not in kwargs and os.path.isfile(config_file):
        with open(config_file, encoding="utf-8") as file:
            kwargs["saved_config"] = json.load(file)
    card = create_model_card(model, **kwargs)
    with atomic_write(path) as file:  # creates `folder` if needed
        file.write(card)
    return path


def save_upload_folder(
    model,
    tokenizer,
    folder: str,
    eval_results: dict | None = None,
    dataset_name: str | None = None,
    repo_id: str | None = None,
    hash_user_ids: bool = True,
    salt: str | None = None,
    license: str = "apache-2.0",
    include_backbone: bool | None = None,
    merge_adapter: bool = False,
) -> str:
    """
    Writes everything [`push_to_hub`] sends to `folder`: the weights (safetensors), the config with its `auto_map`, the
    two code files, the tokenizer and the model card.

    The backbone is saved as [`PalRewardModel.save_pretrained`] saves it (`include_backbone`): a model with a LoRA
    adapter uploads PAL's weights and the adapter, with a reference to the base backbone (`base_model:` in the card);
    `include_backbone=False` uploads a frozen backbone as a reference too. A reference to a local folder means nothing
    on the Hub: the base backbone weights are then uploaded (and `include_backbone=False` is an error).
    `merge_adapter=True` uploads the backbone with the adapter merged in instead (a plain checkpoint; the card says so).

    By default (`hash_user_ids=True`) the registry is written as salted hashes of the ids, with the salt from `salt`,
    the one set on the model ([`PalRewardModel.set_user_id_salt`]) or the `PAL_USER_ID_SALT` environment variable (a
    `ValueError` without any, unless the registry is already hashed): no file holds a raw id or the salt; score by raw
    id after `model.set_user_id_salt(salt)`. `hash_user_ids=False` writes the raw ids, with a warning. The model passed
    in is left unchanged.
    """
    config = model.config
    saved = (config.user_ids, config.hashed_user_ids, config.user_id_salt_check, getattr(model, "user_id_salt", None))
    if hash_user_ids:
        salt = resolve_user_id_salt(salt or getattr(model, "user_id_salt", None))
        if salt is None and not config.hashed_user_ids:
            raise ValueError(missing_salt_message("Saving a PAL model for the Hub"))
    elif config.num_users and not config.hashed_user_ids:
        logger.warning(
            f"`hash_user_ids=False`: the {config.num_users} raw user ids of the registry are saved in `config.json` as "
            "they are, and are readable by anyone who can read the repository they are uploaded to."
        )
    reference = getattr(config, "backbone_name_or_path", None)
    if reference and _is_local_path(reference) and model.backbone is not None and not merge_adapter:
        if include_backbone is False:
            raise ValueError(
                f"`include_backbone=False` uploads a reference to the backbone instead of its weights, but the "
                f"reference is a local folder ({reference}) that does not exist on the Hub. Build the model on the "
                "backbone's Hub id (`PalRewardModel.from_backbone('org/name', ...)`), or upload the backbone weights "
                "(`include_backbone=None` or `True`)."
            )
        if include_backbone is None and getattr(config, "backbone_adapter", None) is not None:
            logger.info(
                f"The base backbone is a local folder ({reference}), which does not exist on the Hub: the upload holds "
                "its weights next to the adapter."
            )
        include_backbone = True
    try:
        if hash_user_ids and salt is not None:
            model.hash_user_ids(salt)
        model.save_pretrained(folder, include_backbone=include_backbone, merge_adapter=merge_adapter)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        save_model_card(
            model, folder, eval_results=eval_results, dataset_name=dataset_name, repo_id=repo_id, license=license
        )
    finally:
        config.user_ids, config.hashed_user_ids, config.user_id_salt_check = saved[:3]
        model.user_id_salt = saved[3]
    return folder


def push_to_hub(
    model,
    tokenizer,
    repo_id: str,
    eval_results: dict | None = None,
    dataset_name: str | None = None,
    hash_user_ids: bool = True,
    salt: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload PAL reward model",
    license: str = "apache-2.0",
    include_backbone: bool | None = None,
    merge_adapter: bool = False,
):
    """
    Uploads a PAL model to the Hub as one commit: weights, config with `auto_map`, the two code files, the tokenizer
    and a model card generated from the model (see [`save_upload_folder`], also for `include_backbone` and
    `merge_adapter`: a model with a LoRA adapter uploads the adapter and a reference to its base backbone, or with
    `merge_adapter=True` the merged backbone). Returns the commit info.

    User ids are uploaded as salted hashes unless `hash_user_ids=False` is passed explicitly: the salt comes from `salt`,
    the model ([`PalRewardModel.set_user_id_salt`]) or the `PAL_USER_ID_SALT` environment variable and is never
    uploaded. Nothing is created on the Hub when the salt is missing. The model passed in is left unchanged.

    Example:

    ```python
    >>> from pal_rm.hub import push_to_hub
    >>> push_to_hub(model, tokenizer, "my-org/pal-summary", eval_results={"seen_accuracy": 0.9})  # salt: $PAL_USER_ID_SALT
    ```
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as folder:
        save_upload_folder(
            model,
            tokenizer,
            folder,
            eval_results=eval_results,
            dataset_name=dataset_name,
            repo_id=repo_id,
            hash_user_ids=hash_user_ids,
            salt=salt,
            license=license,
            include_backbone=include_backbone,
            merge_adapter=merge_adapter,
        )
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)


__all__ = [
    "CITATION",
    "USER_ID_PLACEHOLDER",
    "USER_ID_SALT_ENV",
    "create_model_card",
    "missing_salt_message",
    "push_to_hub",
    "resolve_user_id_salt",
    "save_model_card",
    "save_upload_folder",
]
