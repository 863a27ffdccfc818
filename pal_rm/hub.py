# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
"""Model cards and Hub uploads for PAL checkpoints."""

import os
import tempfile

from transformers.utils import logging

logger = logging.get_logger(__name__)

CITATION = """@inproceedings{chen2025pal,
  title     = {{PAL}: Sample-Efficient Personalized Reward Modeling for Pluralistic Alignment},
  author    = {Chen, Daiwei and Chen, Yi and Rege, Aniket and Wang, Zhi and Vinayak, Ramya Korlakai},
  booktitle = {The Thirteenth International Conference on Learning Representations (ICLR)},
  year      = {2025}
}"""

_SIMILARITY_TEXT = {
    "neg_sq_l2": "minus the squared Euclidean distance to the user's ideal point",
    "neg_l2": "minus the Euclidean distance to the user's ideal point",
    "cosine": "a scaled cosine similarity with the user's ideal point",
    "dot": "the inner product with the user's ideal point",
}


def _format_results(eval_results: dict | None) -> str:
    if not eval_results:
        return "No evaluation results were recorded for this checkpoint.\n"
    lines = ["| metric | value |", "|---|---|"]
    for key, value in eval_results.items():
        value = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"| {key} | {value} |")
    return "\n".join(lines) + "\n"


def create_model_card(
    model,
    eval_results: dict | None = None,
    dataset_name: str | None = None,
    repo_id: str | None = None,
    license: str = "apache-2.0",
) -> str:
    """
    A model card (README.md with YAML metadata) generated from a [`PalRewardModel`]: what PAL is, the backbone, K, the
    variant, the number of users, evaluation results, a usage snippet, the license and the citation.
    """
    config = model.config
    backbone = config.backbone_config
    base_model = getattr(backbone, "_name_or_path", "") if backbone is not None else ""
    base_model_line = f"base_model: {base_model}\n" if base_model and not os.path.isabs(base_model) else ""
    backbone_text = (
        f"`{base_model or backbone.model_type}` ({backbone.model_type}, hidden size {config.hidden_size}, "
        f"`{config.pooling}` pooling)"
        if backbone is not None
        else f"none: the model scores pooled features of width {config.hidden_size}"
    )
    load_path = repo_id or "path/to/this/checkpoint"
    example_user = config.user_ids[0] if config.user_ids and not config.hashed_user_ids else "alice"
    variant_text = (
        "PAL-A: the K prototypes are points of the preference space; the reward depends on the response."
        if config.variant == "a"
        else "PAL-B: the K prototypes are maps of the prompt, so each user's ideal point depends on the prompt."
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
pipeline_tag: text-classification
---

# PAL personalized reward model

This is a **personalized reward model** trained with [pal-rm](https://github.com/pal-rm/pal-rm), an implementation of
PAL (Chen et al., *Sample-Efficient Personalized Reward Modeling for Pluralistic Alignment*, ICLR 2025). Every user
has an ideal point in a learned preference space, a convex combination of K shared prototypes; the reward of a
response for a user is {_SIMILARITY_TEXT[config.similarity]}. Users share what they have in common, each user costs
K numbers, and a new user is fitted from a few comparisons.

| | |
|---|---|
| backbone | {backbone_text} |
| variant | {variant_text} |
| prototypes (K) | {config.num_prototypes} |
| preference dimension | {config.preference_dim} |
| registered users | {config.num_users}{" (ids stored as salted hashes)" if config.hashed_user_ids else ""} |
| training data | {dataset_name or "not recorded"} |

## Evaluation

{_format_results(eval_results)}
## Usage

```python
from transformers import AutoModel, AutoTokenizer

model = AutoModel.from_pretrained("{load_path}", trust_remote_code=True)  # or `import pal_rm` first
tokenizer = AutoTokenizer.from_pretrained("{load_path}")

prompts = ["Write a note to the team about the offsite."] * 2
responses = ["Dear team, the offsite is on Friday.", "hey all! offsite friday, woohoo!"]
model.score_texts(tokenizer, prompts, responses, users="{example_user}")   # for one registered user
model.score_texts(tokenizer, prompts, responses)                            # population reward (no user)
model.score_texts(tokenizer, prompts, responses, mixture_weights=[1.0] + [0.0] * {config.num_prototypes - 1})  # prototype 0
```

Fit a new user from a few of their comparisons (everything else stays frozen):

```python
from pal_rm.trainers import PalRewardConfig, PalRewardTrainer

trainer = PalRewardTrainer(model, PalRewardConfig("out"), train_dataset=seen_users_data, processing_class=tokenizer)
trainer.adapt_users(new_user_comparisons)   # columns: user_id, prompt, chosen, rejected
```

## License

{license}. The backbone keeps its own license.

## Citation

```bibtex
{CITATION}
```
"""


def save_model_card(model, folder: str, **kwargs) -> str:
    """Writes [`create_model_card`]'s card to `folder/README.md` (atomically) and returns its path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "README.md")
    staging = path + ".tmp"
    with open(staging, "w", encoding="utf-8") as file:
        file.write(create_model_card(model, **kwargs))
    os.replace(staging, path)
    return path


def save_upload_folder(
    model,
    tokenizer,
    folder: str,
    eval_results: dict | None = None,
    dataset_name: str | None = None,
    repo_id: str | None = None,
    hash_user_ids: bool = False,
    salt: str | None = None,
    license: str = "apache-2.0",
) -> str:
    """
    Writes everything [`push_to_hub`] sends to `folder`: the weights (safetensors), the config with its `auto_map`, the
    two code files, the tokenizer and the model card. With `hash_user_ids=True`, the registry is written as salted
    hashes of the ids (`salt` required): the raw ids appear in no file; score by raw id after
    `model.set_user_id_salt(salt)`. The model passed in is left unchanged.
    """
    from .modeling_pal import hash_user_id

    config = model.config
    raw_ids, raw_flag = list(config.user_ids), config.hashed_user_ids
    if hash_user_ids:
        if not salt:
            raise ValueError("`hash_user_ids=True` needs a `salt` (a secret string kept apart from the checkpoint).")
        if not raw_flag:
            config.user_ids = [hash_user_id(user, salt) for user in raw_ids]
            config.hashed_user_ids = True
    try:
        model.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        save_model_card(
            model, folder, eval_results=eval_results, dataset_name=dataset_name, repo_id=repo_id, license=license
        )
    finally:
        config.user_ids, config.hashed_user_ids = raw_ids, raw_flag
    return folder


def push_to_hub(
    model,
    tokenizer,
    repo_id: str,
    eval_results: dict | None = None,
    dataset_name: str | None = None,
    hash_user_ids: bool = False,
    salt: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload PAL reward model",
    license: str = "apache-2.0",
):
    """
    Uploads a PAL model to the Hub as one commit: weights, config with `auto_map`, the two code files, the tokenizer
    and a model card generated from the model (see [`save_upload_folder`]). Returns the commit info.

    Example:

    ```python
    >>> from pal_rm.hub import push_to_hub
    >>> push_to_hub(model, tokenizer, "my-org/pal-summary", eval_results={"seen_accuracy": 0.9}, hash_user_ids=True,
    ...             salt=os.environ["PAL_USER_SALT"])
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
        )
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)


__all__ = ["CITATION", "create_model_card", "push_to_hub", "save_model_card", "save_upload_folder"]
