# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
"""PRISM personalized preferences: participants rating LLM responses in their own multi-turn conversations.

Source: `HannahRoseKirk/prism-alignment` (Kirk et al. 2024, "The PRISM Alignment Project"; human-written texts
CC-BY-4.0, model responses CC-BY-NC-4.0), config `"conversations"` (one split, `train`; 8,011 rows). Each row is one
conversation: `conversation_id` (`"c0"`, ...), `user_id` (`"user0"`, ...), `conversation_type` (`"unguided"`,
`"values guided"`, `"controversy guided"`), `opening_prompt`, `conversation_turns`, `conversation_history`,
`performance_attributes`, `choice_attributes`, `open_feedback`, `generated_datetime`, `timing_duration_s`,
`timing_duration_mins`, `included_in_balanced_subset`. `conversation_history` lists the messages: a participant's
message is `{"turn", "role": "user", "content"}`, a model response `{"turn", "role": "model", "content",
"model_provider", "model_name", "score", "if_chosen", "within_turn_id"}`, where `score` is the participant's rating
(1 to 100) and `if_chosen` marks the highest-rated response of the turn (ties broken at random), the one the
conversation continued with. Turn 0 has up to four responses from different models, later turns two (A and B) from
the chosen model. Verified in the dataset card and the release code of the PRISM repository (HannahKirk/prism-alignment,
`src/data_processing/process_conversations.py` and `prepare_conversations.py`). The `utterances` config holds the
same ratings in long format and `survey` the participants' profiles; neither is needed here. The data is read from
the Hub, from a `save_to_disk` folder, from a `conversations.jsonl` / `.json` / `.parquet` file (or a folder holding
one, also as `conversations-*.parquet` or `conversations/*.parquet`).

Comparisons (the rules as implemented):

1. Each turn of a conversation gives one comparison per rated response other than the chosen one (`if_chosen`):
   chosen vs that response. So turn 0 gives up to three comparisons and later turns one.
2. Ties: a response scored equal to the chosen one is dropped and counted (`drop_ties=True`, the default);
   `drop_ties=False` keeps it with the `if_chosen` response as the winner, which is what LoRe's PRISM code does.
   A response scored higher than the chosen one (an inconsistent row) and a response identical in text to the
   chosen one are dropped and counted.
3. A turn without exactly one participant message or exactly one chosen response (or with empty texts) gives no
   comparison, and neither do the later turns of its conversation (what the participant saw next is unknown); such
   turns are counted.
4. Prompt: the conversation up to the turn as TRL's conversational format: the participant's messages (role
   `"user"`) and, for the earlier turns, the chosen response (role `"assistant"`), ending with the turn's message;
   `chosen` and `rejected` are one assistant message each. pal-rm renders conversations with the tokenizer's chat
   template (or `role: content` lines without one).

Users and splits (the split unit is the conversation, so one conversation's comparisons never span two splits and
an evaluation prompt is never a training prompt of the same user):

5. Eligible users: participants with at least `min_conversations` (6) conversations that give a comparison.
6. Seen users: a seeded `seen_fraction` (0.8, rounded down) of the eligible users (ids sorted, then a seeded
   permutation); the others are the unseen users.
7. A seen user's conversations are shuffled (seeded) and split into `test` (`test_fraction`, 0.5), `validation`
   (`validation_fraction`, 0.1) and `train` (the rest), each fraction of the user's conversation count rounded half
   up (at least one conversation for a non-zero fraction).
8. An unseen user's conversations are shuffled (seeded): `test_fraction` of them (rounded half up, at least one) give
   `unseen_test`, the others the few-shot `unseen_train`, whose comparisons are shuffled (seeded) and, with
   `unseen_shots`, cut to that many.
9. Evaluation comparisons (`validation`, `test`, `unseen_test`) whose prompt (the whole conversation so far) is also
   the prompt of a training comparison (`train`, `unseen_train`) of any user are dropped and counted: different
   participants may open with the same message.

What follows LoRe's PRISM code (facebookresearch/LoRe, `PRISM/prepare.py`, commit 6f93990): chosen vs each rejected
response per turn, earlier turns' chosen responses in the prompt, users with more than five conversations, a seeded
80/20 draw of seen and unseen users (LoRe draws it before the conversation threshold, so its share of seen users is
0.8 only on average), and half of each user's conversations for testing (seen and unseen users alike; LoRe's
`int(0.5 n)` training conversations are our `n - round_half_up(0.5 n)`). Our choices: dropped ties (rule 2), the
rules for broken turns (3), no prompt shared by evaluation and training (9), and a validation split (LoRe has none;
`validation_fraction=0` gives LoRe's training conversations).

Expected sizes on the full data: not computed here (no network). The source has 1,396 participants with
conversations, 8,011 conversations, 27,172 turns and 68,371 rated responses (dataset card and codebook), so at most
68,371 - 27,172 = 41,199 comparisons before ties and the user threshold.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Sequence
from typing import Any

import datasets
import numpy as np
from datasets import Dataset, DatasetDict, Features, Value
from transformers.utils import logging

from ._common import (
    build_dataset_dict,
    check_fractions,
    check_int,
    check_seed,
    check_share,
    data_files,
    draw_seen_users,
    drop_training_prompts,
    looks_like_local_path,
    read_data_files,
    split_sizes,
    split_user_units,
)

logger = logging.get_logger(__name__)

PRISM_SOURCE = "HannahRoseKirk/prism-alignment"
PRISM_CONFIG = "conversations"
_COLUMNS = ("conversation_id", "user_id", "conversation_type", "conversation_history")
_REQUIRED_COLUMNS = ("conversation_id", "user_id", "conversation_history")
_MESSAGES = [{"role": Value("string"), "content": Value("string")}]

# randomness streams
_USER_STREAM, _SEEN_STREAM, _UNSEEN_STREAM, _SHOTS_STREAM = 0, 1, 2, 3


# ---------------------------------------------------------------------------------------------------------------
# reading


def _check_columns(columns: Sequence[str], where: str) -> None:
    absent = [name for name in _REQUIRED_COLUMNS if name not in columns]
    if absent:
        raise ValueError(
            f"{where} has no {absent} column(s): is it the `{PRISM_CONFIG}` config of {PRISM_SOURCE}? Found "
            f"{list(columns)}."
        )


def _rows_from_dataset(dataset: Any, where: str) -> list[dict]:
    if isinstance(dataset, DatasetDict):
        if len(dataset) != 1:
            raise ValueError(
                f"{where} has the splits {list(dataset)}; the `{PRISM_CONFIG}` config of {PRISM_SOURCE} has one "
                "(`train`)."
            )
        dataset = next(iter(dataset.values()))
    if not isinstance(dataset, Dataset):
        raise ValueError(f"{where} is a {type(dataset).__name__}, not a Dataset or DatasetDict.")
    _check_columns(dataset.column_names, where)
    return dataset.select_columns([name for name in _COLUMNS if name in dataset.column_names]).to_list()


def _rows_from_files(files: Sequence[str], where: str) -> list[dict]:
    rows = read_data_files(files)
    if not rows:
        raise ValueError(f"{where} holds no conversations.")
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"Conversation row {index} of {where} is a {type(row).__name__}, expected a dict.")
        _check_columns(list(row), f"Conversation row {index} of {where}")
    return rows


def _read_source(source: str | os.PathLike) -> list[dict]:
    source = os.fspath(source)
    if os.path.isfile(source):
        if not source.endswith((".jsonl", ".json", ".parquet")):
            raise ValueError(f"`source` {source!r} is not a .jsonl, .json or .parquet file.")
        return _rows_from_files([source], repr(source))
    if os.path.isdir(source):
        if any(os.path.isfile(os.path.join(source, name)) for name in ("dataset_dict.json", "dataset_info.json")):
            return _rows_from_dataset(datasets.load_from_disk(source), repr(source))
        files = data_files(source, PRISM_CONFIG)
        if not files:
            raise ValueError(
                f"{source!r} has no `{PRISM_CONFIG}` data. Expected a folder written by `save_to_disk`, or "
                f"`{PRISM_CONFIG}.jsonl` (as in the Hub repository), `{PRISM_CONFIG}.parquet`, "
                f"`{PRISM_CONFIG}-*.parquet` or `{PRISM_CONFIG}/*.parquet`."
            )
        return _rows_from_files(files, repr(source))
    if looks_like_local_path(source):
        raise ValueError(
            f"`source` {source!r} does not exist: pass a Hub dataset id (default {PRISM_SOURCE!r}), a folder or a "
            f"`{PRISM_CONFIG}` data file."
        )
    logger.info(f"Loading {source!r} (config {PRISM_CONFIG!r}) with datasets.load_dataset.")
    return _rows_from_dataset(datasets.load_dataset(source, PRISM_CONFIG), repr(source))


# ---------------------------------------------------------------------------------------------------------------
# comparisons


def _checked(row: Any, index: int) -> tuple[str, str, list[dict]]:
    where = f"Conversation row {index}"
    if not isinstance(row, dict):
        raise ValueError(f"{where} is a {type(row).__name__}, expected a dict.")
    conversation_id, user_id, history = row.get("conversation_id"), row.get("user_id"), row.get("conversation_history")
    if not isinstance(conversation_id, str) or not conversation_id:
        raise ValueError(f"{where} has no `conversation_id` (a non-empty string), got {conversation_id!r}.")
    where = f"Conversation {conversation_id!r} (row {index})"
    if not isinstance(user_id, str) or not user_id:
        raise ValueError(f"{where} has no `user_id` (a non-empty string), got {user_id!r}.")
    if not isinstance(history, list) or not all(isinstance(message, dict) for message in history):
        raise ValueError(f"{where}: `conversation_history` must be a list of message dicts, got {type(history)}.")
    for position, message in enumerate(history):
        at = f"{where}, `conversation_history[{position}]`"
        turn, role = message.get("turn"), message.get("role")
        if isinstance(turn, bool) or not isinstance(turn, (int, np.integer)) or turn < 0:
            raise ValueError(f"{at}: `turn` must be an integer >= 0, got {turn!r}.")
        if role not in ("user", "model"):
            raise ValueError(f"{at}: `role` must be 'user' or 'model', got {role!r}.")
        if message.get("content") is not None and not isinstance(message["content"], str):
            raise ValueError(f"{at}: `content` must be a string, got {message['content']!r}.")
        if role == "model":
            score = message.get("score")
            if isinstance(score, bool) or not isinstance(score, (int, float, np.number)) or not math.isfinite(score):
                raise ValueError(f"{at}: a model response needs a finite `score`, got {score!r}.")
            if not isinstance(message.get("if_chosen"), (bool, np.bool_)):
                raise ValueError(
                    f"{at}: a model response needs a boolean `if_chosen`, got {message.get('if_chosen')!r}."
                )
    return conversation_id, user_id, history


def _text(message: dict) -> str:
    return (message.get("content") or "").strip()


def _comparisons(row: dict, index: int, drop_ties: bool, counts: Counter) -> tuple[str, list[dict]]:
    """The comparisons of one conversation (rules 1-4 of the module docstring) and its user."""
    conversation_id, user_id, history = _checked(row, index)
    turns: dict[int, list[dict]] = {}
    for message in history:
        turns.setdefault(int(message["turn"]), []).append(message)
    comparisons, context = [], []
    for turn in sorted(turns):
        messages = turns[turn]
        asked = [message for message in messages if message["role"] == "user"]
        responses = sorted(
            (message for message in messages if message["role"] == "model"),
            key=lambda message: (message.get("within_turn_id") is None, message.get("within_turn_id") or 0),
        )
        chosen = [message for message in responses if message["if_chosen"]]
        if len(asked) != 1 or len(chosen) != 1 or not _text(asked[0]) or not _text(chosen[0]):
            counts["turns without one user message and one chosen response (and the turns after them)"] += len(
                [t for t in turns if t >= turn]
            )
            break
        chosen = chosen[0]
        prompt = [*context, {"role": "user", "content": _text(asked[0])}]
        for response in responses:
            if response is chosen:
                continue
            if not _text(response):
                counts["empty response"] += 1
                continue
            if _text(response) == _text(chosen):
                counts["response identical to the chosen one"] += 1
                continue
            if response["score"] > chosen["score"]:
                counts["response scored above the chosen one"] += 1
                continue
            if response["score"] == chosen["score"]:
                counts["ties"] += 1
                if drop_ties:
                    continue
            comparisons.append(
                {
                    "user_id": user_id,
                    "prompt": prompt,
                    "chosen": [{"role": "assistant", "content": _text(chosen)}],
                    "rejected": [{"role": "assistant", "content": _text(response)}],
                    "group": -1,
                    "conversation_id": conversation_id,
                    "turn": turn,
                    "conversation_type": row.get("conversation_type") or "",
                    "chosen_score": float(chosen["score"]),
                    "rejected_score": float(response["score"]),
                }
            )
        context = [*prompt, {"role": "assistant", "content": _text(chosen)}]
    return user_id, comparisons


def _prompt_key(row: dict) -> tuple:
    return tuple((message["role"], message["content"]) for message in row["prompt"])


def _features() -> Features:
    return Features(
        {
            "user_id": Value("string"),
            "prompt": _MESSAGES,
            "chosen": _MESSAGES,
            "rejected": _MESSAGES,
            "group": Value("int64"),
            "conversation_id": Value("string"),
            "turn": Value("int64"),
            "conversation_type": Value("string"),
            "chosen_score": Value("float64"),
            "rejected_score": Value("float64"),
        }
    )


def load_prism_preferences(
    source: str | os.PathLike = PRISM_SOURCE,
    seen_fraction: float = 0.8,
    min_conversations: int = 6,
    test_fraction: float = 0.5,
    validation_fraction: float = 0.1,
    unseen_shots: int | None = None,
    drop_ties: bool = True,
    seed: int = 0,
) -> DatasetDict:
    """Build the PRISM personalized preference dataset (rules in the module docstring).

    Args:
        source (`str` or `os.PathLike`, defaults to `"HannahRoseKirk/prism-alignment"`): a Hub dataset id (loaded
            with `datasets.load_dataset(source, "conversations")`), a folder written by `save_to_disk`, a
            `conversations.jsonl` / `.json` / `.parquet` file, or a folder holding one.
        seen_fraction (`float`, defaults to 0.8): share of the eligible participants drawn (seeded) as seen users,
            rounded down.
        min_conversations (`int`, defaults to 6): fewest conversations with a comparison of an eligible participant.
        test_fraction (`float`, defaults to 0.5): share of each user's conversations held out for `test` (seen users)
            or `unseen_test` (unseen users).
        validation_fraction (`float`, defaults to 0.1): share of each seen user's conversations in `validation`.
        unseen_shots (`int`, *optional*): most few-shot comparisons per unseen user; by default all comparisons of
            their few-shot conversations.
        drop_ties (`bool`, defaults to `True`): drop responses scored equal to the chosen one (`True`) or keep them
            with the chosen response as the winner (`False`, as LoRe).
        seed (`int`, defaults to 0): the output is a deterministic function of the arguments and the source.

    Returns:
        `datasets.DatasetDict` with splits `train`, `validation`, `test`, `unseen_train`, `unseen_test` and columns
        `user_id` (the participant), `prompt` (a list of messages), `chosen` and `rejected` (one assistant message
        each), `group` (-1: no groups), `conversation_id`, `turn`, `conversation_type`, `chosen_score` and
        `rejected_score` (the participant's ratings, 1 to 100).

    Example:

    ```python
    >>> from pal_rm.data import load_prism_preferences
    >>> dataset = load_prism_preferences()  # doctest: +SKIP
    ```
    """
    check_share("seen_fraction", seen_fraction)
    min_conversations = check_int("min_conversations", min_conversations, minimum=1)
    check_fractions(validation_fraction, test_fraction)
    if test_fraction == 0:
        raise ValueError("`test_fraction` must be > 0: seen and unseen users need held-out conversations.")
    # every user can be split, unseen users too (they have no validation conversation)
    split_sizes(min_conversations, validation_fraction, test_fraction, "min_conversations")
    if unseen_shots is not None:
        unseen_shots = check_int("unseen_shots", unseen_shots, minimum=1)
    seed = check_seed(seed)

    source_rows = _read_source(source)
    counts = Counter()
    conversations: dict[str, list[list[dict]]] = {}
    for index, row in enumerate(source_rows):
        user_id, comparisons = _comparisons(row, index, drop_ties, counts)
        if comparisons:
            conversations.setdefault(user_id, []).append(comparisons)
        else:
            counts["conversations without a comparison"] += 1
    if counts["response scored above the chosen one"]:
        logger.warning(
            f"{counts['response scored above the chosen one']} responses are scored above the response marked "
            "`if_chosen` of their turn: dropped."
        )
    logger.info(
        f"PRISM: {len(source_rows)} conversations, {sum(map(len, conversations.values()))} with comparisons; ties "
        f"{'dropped' if drop_ties else 'kept (the chosen response wins)'}; counts: {dict(counts) or 'none'}."
    )

    eligible = sorted(
        user for user, user_conversations in conversations.items() if len(user_conversations) >= min_conversations
    )
    seen = draw_seen_users(
        eligible,
        seen_fraction,
        seed,
        _USER_STREAM,
        eligibility=f">= {min_conversations} conversations with a comparison",
        threshold="`min_conversations`",
        noun="participant",
    )
    rows = split_user_units(
        conversations,
        eligible,
        seen,
        validation_fraction,
        test_fraction,
        unseen_shots,
        seed,
        streams=(_SEEN_STREAM, _UNSEEN_STREAM, _SHOTS_STREAM),
        threshold="min_conversations",
    )
    # rule 9: an evaluation prompt is never a training prompt (two participants may open with the same message)
    drop_training_prompts(rows, _prompt_key)

    logger.info(
        f"PRISM preferences: {len(eligible)} eligible participants ({len(seen)} seen, {len(eligible) - len(seen)} "
        "unseen); sizes " + ", ".join(f"{split} {len(split_rows)}" for split, split_rows in rows.items()) + "."
    )
    return build_dataset_dict(rows, _features())
