# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
"""A built-in, offline, templated text preference dataset for demos and tests (no download).

Every response is a short workplace note rendered from templates, and has four binary, measurable properties:

- `formal`: formal vocabulary ("Dear colleague, I would like to inform you ...") or casual ("hey, just a heads up ...");
- `bulleted`: body as a lead-in line ("Key points:", "the gist:") and `- ` bullet lines, or as prose;
- `long`: five sentences (opener, three points, closer; 24 to 45 words) or two (opener, one point; at most 23);
- `enthusiastic`: exclamation marks and upbeat words ("delighted", "awesome") or plain.

Users belong to groups that value these properties differently (`DEMO_GROUP_PREFERENCES`): group 0 prefers
formal notes, group 1 casual ones, group 2 bulleted lists and group 3 concise notes. A user's utility for a response
is the weighted sum of its property scores (+1 if the property holds, -1 otherwise); the chosen response is the one
with the higher utility. Groups disagree (0 and 1 choose opposite sides of every formal/casual pair), so one reward
for everyone cannot fit them all.

- Pure-group users see only pairs that differ in their group's key property; the key weight (1.0) outweighs the sum
  of the secondary weights, so their label always follows the key property and ties cannot happen.
- Mixture users (`group == -1`) have Dirichlet weights over the groups and the mixed utility. Their pairs are drawn
  among property pairs whose utility gap is at least 10% of the largest gap possible for that user, so no label rests
  on a near-tie.

Responses come from a fixed pool: every (topic, property combination) is rendered `variants_per_style` times (3 by
default, with random wording, content points and details), so the same notes recur across comparisons and users, as
in real preference data where several annotators label the same responses; this also keeps the number of distinct
texts to encode small (about 2,200 prompts and notes with the defaults, all under 46 words).

Leakage: the topics are split (seeded) into disjoint train / validation / test pools first. `train` and
`unseen_train` use only train topics, `validation` only validation topics, `test` and `unseen_test` only test topics,
so no prompt, and no response, of an evaluation split occurs in a training split.
"""

from __future__ import annotations

import itertools

import numpy as np
from datasets import DatasetDict, Features, Value
from transformers.utils import logging

from ._common import (
    MIXTURE_WEIGHTS_FEATURE,
    SEEN_SPLIT_NAMES,
    TEXT_FEATURES,
    SimulatedUser,
    build_dataset_dict,
    check_fractions,
    check_int,
    check_positive_float,
    check_seed,
    empty_rows,
    rng_for,
    simulate_users,
    split_sizes,
)

logger = logging.get_logger(__name__)

DEMO_PROPERTIES = ("formal", "bulleted", "long", "enthusiastic")
"""The measurable response properties, in the order of the weight vectors below."""

DEMO_GROUP_PREFERENCES = {
    0: {
        "name": "formal",
        "description": "prefers formal notes; also mildly prefers thorough, sober notes",
        "key_property": "formal",
        "weights": {"formal": 1.0, "bulleted": 0.1, "long": 0.2, "enthusiastic": -0.3},
    },
    1: {
        "name": "casual",
        "description": "prefers casual notes; also mildly prefers short, upbeat prose",
        "key_property": "formal",
        "weights": {"formal": -1.0, "bulleted": -0.1, "long": -0.2, "enthusiastic": 0.4},
    },
    2: {
        "name": "bulleted",
        "description": "prefers bulleted lists; also mildly prefers thorough, sober notes",
        "key_property": "bulleted",
        "weights": {"formal": 0.0, "bulleted": 1.0, "long": 0.3, "enthusiastic": -0.2},
    },
    3: {
        "name": "concise",
        "description": "prefers short notes; also mildly prefers prose and formal wording",
        "key_property": "long",
        "weights": {"formal": 0.2, "bulleted": -0.3, "long": -1.0, "enthusiastic": 0.0},
    },
}
"""What each demo group prefers: a name, a description, the key property (every pair a pure member sees differs in
it) and the utility weight of each property (a response scores +1 on a property it has and -1 otherwise)."""

_TOPICS = (
    "quarterly budget review", "team offsite", "client presentation", "server migration", "office move",
    "product launch", "security training", "hiring plan", "design review", "sprint planning", "customer survey",
    "holiday schedule", "marketing campaign", "database upgrade", "onboarding session", "annual report",
    "vendor contract", "code freeze", "sales kickoff", "board meeting", "website redesign", "expense policy",
    "performance reviews", "parking changes", "fire drill", "printer replacement", "team lunch",
    "training workshop", "project deadline", "network maintenance", "research proposal", "user interviews",
    "mobile app release", "data audit", "conference trip", "internship program", "style guide update",
    "support rotation", "inventory count", "charity drive", "benefits enrollment", "quarterly goals",
    "wellness program", "release notes", "cloud cost review", "accessibility audit", "partner workshop",
    "hackathon",
)  # fmt: skip

_PROMPT_TEMPLATES = (
    "Write a short note to a colleague about the {topic}.",
    "Draft a message to your team about the {topic}.",
    "Let a coworker know about the {topic}.",
    "Send a quick update to a teammate about the {topic}.",
    "Compose a note to the team regarding the {topic}.",
    "Tell your colleagues about the {topic}.",
)

_FACTS = {
    "day": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday"),
    "time": ("9 am", "10:30 am", "noon", "2 pm", "3:30 pm", "4 pm"),
    "place": ("room 4B", "the main conference room", "the third-floor lounge", "the video call", "the east wing"),
    "person": ("Priya", "Marcus", "Elena", "Tom", "Aisha", "Kenji", "Sofia", "Daniel"),
    "doc": ("agenda", "slide deck", "draft plan", "summary sheet", "budget file", "checklist"),
}

# (formal, casual) wording of the same content point
_POINTS = (
    ("it is scheduled for {day} at {time}", "it's on {day} at {time}"),
    ("it will take place in {place}", "it's happening in {place}"),
    ("{person} will lead the discussion", "{person} is running the whole thing"),
    ("please review the {doc} beforehand", "take a look at the {doc} first"),
    ("kindly confirm your availability by {day}", "let me know by {day} if you can come"),
    ("attendance is expected from everyone", "everyone should try to come"),
    ("questions may be directed to {person}", "ping {person} with any questions"),
    ("the {doc} will be circulated afterwards", "i'll send the {doc} around after"),
)

# _OPENERS[formal][enthusiastic]
_OPENERS = {
    True: {
        False: (
            "Dear colleague, I am writing about the {topic}.",
            "Good morning, please note an update on the {topic}.",
            "Dear team, here is an update concerning the {topic}.",
            "Hello, I would like to inform you about the {topic}.",
        ),
        True: (
            "Dear team, I am delighted to announce the {topic}!",
            "Good morning! Wonderful news about the {topic}!",
            "Dear colleague, I am thrilled about the {topic}!",
        ),
    },
    False: {
        False: (
            "hey, just a quick heads up about the {topic}.",
            "hi there, quick note on the {topic} for you.",
            "yo, so here's the latest on the {topic}.",
            "fyi, a couple of things about the {topic}.",
        ),
        True: (
            "hey!! awesome news about the {topic} coming up!",
            "omg, super exciting update on the {topic}!",
            "hi! great stuff happening with the {topic}!",
            "woohoo, some really good news on the {topic}!",
        ),
    },
}
_CLOSERS = {
    True: {
        False: ("Thank you for your attention.", "Kind regards.", "Sincerely, the coordination team."),
        True: ("Thank you, and I look forward to it!", "With great enthusiasm and kind regards!"),
    },
    False: {
        False: ("thanks.", "cheers, talk soon.", "see ya."),
        True: ("can't wait, it's gonna be awesome!", "so pumped, see ya there!"),
    },
}

# the lead-in line of a bulleted note: _LIST_HEADERS[formal]
_LIST_HEADERS = {True: ("Key points:", "Details:"), False: ("quick rundown:", "the gist:")}

_ALL_PROPERTY_VECTORS = np.array(list(itertools.product((1.0, -1.0), repeat=len(DEMO_PROPERTIES))))
_MIN_RELATIVE_MARGIN = 0.1
_SHORT_POINTS, _LONG_POINTS = 1, 3

# randomness streams
_TOPIC_STREAM, _USER_STREAM, _UNSEEN_STREAM, _RESPONSE_STREAM = 0, 1, 2, 3


def demo_utility_weights(mixture_weights) -> np.ndarray:
    """A demo user's utility weight of each property of `DEMO_PROPERTIES` from their true `mixture_weights` (the
    column of that name): `mixture_weights @ group weights`. A response's utility is the dot product of these with its
    property scores (+1 if the property holds, -1 otherwise)."""
    weights = np.asarray(mixture_weights, dtype=np.float64)
    if weights.ndim != 1 or not 1 <= len(weights) <= len(DEMO_GROUP_PREFERENCES):
        raise ValueError(f"`mixture_weights` must be a vector over at most {len(DEMO_GROUP_PREFERENCES)} groups.")
    return weights @ _weight_matrix(len(weights))


def demo_response_pool(seed: int = 0, variants_per_style: int = 3) -> dict[str, dict[str, np.ndarray]]:
    """Every note `load_demo_preferences(seed=seed, variants_per_style=variants_per_style)` draws its responses from:
    `{topic: {text: property scores}}`, the scores in the order of `DEMO_PROPERTIES` (+1 if the property holds, -1
    otherwise). For candidate sets beyond the comparisons (best-of-n checks): a user's true utility of a note is
    `demo_utility_weights(mixture_weights) @ scores`."""
    check_seed(seed)
    check_int("variants_per_style", variants_per_style, minimum=1)
    pool = _response_pool(seed, variants_per_style)
    return {
        topic: {
            text: vector.astype(np.float64)
            for vector, variants in zip(_ALL_PROPERTY_VECTORS, styles)
            for text in variants
        }
        for topic, styles in pool.items()
    }


def _weight_matrix(num_groups: int) -> np.ndarray:
    return np.array(
        [[DEMO_GROUP_PREFERENCES[g]["weights"][name] for name in DEMO_PROPERTIES] for g in range(num_groups)]
    )


def _render_response(rng: np.random.Generator, properties: np.ndarray, topic: str) -> str:
    formal, bulleted, long, enthusiastic = (bool(value > 0) for value in properties)
    facts = {name: values[rng.integers(len(values))] for name, values in _FACTS.items()}
    opener = _OPENERS[formal][enthusiastic][rng.integers(len(_OPENERS[formal][enthusiastic]))]
    num_points = _LONG_POINTS if long else _SHORT_POINTS
    point_ids = rng.choice(len(_POINTS), size=num_points, replace=False)
    end = "!" if enthusiastic else "."
    points = []
    for point_id in point_ids:
        text = _POINTS[point_id][0 if formal else 1].format(topic=topic, **facts)
        if formal:
            text = text[0].upper() + text[1:]
        points.append(text + end)
    lines = [opener.format(topic=topic)]
    if bulleted:
        lines.append(_LIST_HEADERS[formal][rng.integers(len(_LIST_HEADERS[formal]))])
        lines.extend("- " + point for point in points)
    else:
        lines[0] = " ".join([lines[0], *points])
    if long:
        closer = _CLOSERS[formal][enthusiastic][rng.integers(len(_CLOSERS[formal][enthusiastic]))]
        if bulleted:
            lines.append(closer)
        else:
            lines[0] += " " + closer
    return "\n".join(lines)


def _response_pool(seed: int, variants_per_style: int) -> dict[str, list[list[str]]]:
    """`pool[topic][style][variant]`: the notes of every topic and property combination (style), rendered once."""
    rng = rng_for(seed, _RESPONSE_STREAM)
    pool = {}
    for topic in _TOPICS:
        pool[topic] = []
        for properties in _ALL_PROPERTY_VECTORS:
            variants: list[str] = []
            for _ in range(100 * variants_per_style):  # distinct renderings; the template space is far larger
                text = _render_response(rng, properties, topic)
                if text not in variants:
                    variants.append(text)
                if len(variants) == variants_per_style:
                    break
            pool[topic].append(variants)
    return pool


def _eligible_pairs(weights: np.ndarray, key_property: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Ordered pairs of property vectors a user may be asked about, as index arrays into the 16 vectors."""
    utility = _ALL_PROPERTY_VECTORS @ weights
    first, second = np.meshgrid(np.arange(len(utility)), np.arange(len(utility)), indexing="ij")
    first, second = first.ravel(), second.ravel()
    if key_property is not None:
        keep = _ALL_PROPERTY_VECTORS[first, key_property] != _ALL_PROPERTY_VECTORS[second, key_property]
    else:
        gap = np.abs(utility[first] - utility[second])
        keep = gap >= _MIN_RELATIVE_MARGIN * gap.max()
    keep &= first != second
    return first[keep], second[keep]


def _user_rows(
    user: SimulatedUser,
    weight_matrix: np.ndarray,
    topics: tuple[str, ...],
    num_pairs: int,
    pool: dict[str, list[list[str]]],
) -> list[dict]:
    """`num_pairs` comparisons of `user` on `topics`, drawn from the user's generator."""
    rng = user.rng
    utility_weights = user.weights @ weight_matrix
    group = user.group
    key_property = DEMO_PROPERTIES.index(DEMO_GROUP_PREFERENCES[group]["key_property"]) if group >= 0 else None
    first, second = _eligible_pairs(utility_weights, key_property)
    rows = []
    for pair_id in rng.integers(len(first), size=num_pairs):
        properties = (_ALL_PROPERTY_VECTORS[first[pair_id]], _ALL_PROPERTY_VECTORS[second[pair_id]])
        utilities = [float(p @ utility_weights) for p in properties]
        winner = 0 if utilities[0] > utilities[1] else 1
        topic = topics[rng.integers(len(topics))]
        prompt = _PROMPT_TEMPLATES[rng.integers(len(_PROMPT_TEMPLATES))].format(topic=topic)
        texts = []
        for style in (first[pair_id], second[pair_id]):
            variants = pool[topic][style]
            texts.append(variants[rng.integers(len(variants))])
        row = {
            "user_id": user.user_id,
            "prompt": prompt,
            "chosen": texts[winner],
            "rejected": texts[1 - winner],
            "group": group,
            "mixture_weights": user.weights.tolist(),
            "topic": topic,
            "utility_margin": utilities[winner] - utilities[1 - winner],
        }
        for side, index in (("chosen", winner), ("rejected", 1 - winner)):
            for name, value in zip(DEMO_PROPERTIES, properties[index]):
                row[f"{side}_{name}"] = bool(value > 0)
        rows.append(row)
    return rows


def _features() -> Features:
    features = dict(TEXT_FEATURES)
    features["mixture_weights"] = MIXTURE_WEIGHTS_FEATURE
    features["topic"] = Value("string")
    features["utility_margin"] = Value("float64")
    for side in ("chosen", "rejected"):
        for name in DEMO_PROPERTIES:
            features[f"{side}_{name}"] = Value("bool")
    return Features(features)


def load_demo_preferences(
    num_groups: int = 4,
    users_per_group: int = 6,
    num_mixture_users: int = 4,
    pairs_per_user: int = 60,
    num_unseen_users: int = 8,
    unseen_shots: int = 20,
    unseen_test_pairs: int = 40,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.2,
    dirichlet_alpha: float = 1.0,
    variants_per_style: int = 3,
    seed: int = 0,
) -> DatasetDict:
    """Build the offline demo preference dataset (see the module docstring for the construction).

    Args:
        num_groups (`int`, defaults to 4): groups in use, the first `num_groups` of `DEMO_GROUP_PREFERENCES` (1 to 4).
        users_per_group (`int`, defaults to 6): pure-group seen users per group.
        num_mixture_users (`int`, defaults to 4): seen users with Dirichlet weights over the groups (`group == -1`).
        pairs_per_user (`int`, defaults to 60): comparisons per seen user, split into `train` / `validation` /
            `test` by `validation_fraction` and `test_fraction` (42 / 6 / 12 with the defaults).
        num_unseen_users (`int`, defaults to 8): new users. They keep the seen users' share of mixture users
            (rounded half up: 1 of 8 with the defaults); the pure ones are assigned to groups in turn (0, 1, 2, ...).
        unseen_shots (`int`, defaults to 20): comparisons per unseen user in `unseen_train` (train topics).
        unseen_test_pairs (`int`, defaults to 40): comparisons per unseen user in `unseen_test` (test topics).
        validation_fraction (`float`, defaults to 0.1), test_fraction (`float`, defaults to 0.2): shares of each seen
            user's comparisons, and of the topics, given to the validation and test splits.
        dirichlet_alpha (`float`, defaults to 1.0): concentration of the mixture users' Dirichlet weights.
        variants_per_style (`int`, defaults to 3): renderings of each (topic, property combination) in the response
            pool: 48 topics x 16 combinations x 3 = 2,304 distinct notes, reused across comparisons and users.
        seed (`int`, defaults to 0): the output is a deterministic function of the arguments.

    Returns:
        `datasets.DatasetDict` with splits `train`, `validation`, `test`, `unseen_train`, `unseen_test` and columns
        `user_id` (`user_000`, `user_001`, ... for seen users, `unseen_user_000`, ... for unseen users), `prompt`,
        `chosen`, `rejected`, `group` (-1 for mixture users), `mixture_weights` (the true weights over the groups),
        `topic`, `utility_margin` (the user's utility gap, > 0) and the property flags `chosen_formal`,
        `chosen_bulleted`, `chosen_long`, `chosen_enthusiastic`, `rejected_formal`, ... .
        The defaults give 28 seen users (1,176 / 168 / 336 comparisons) and 8 unseen users (160 / 320).

    Example:

    ```python
    >>> from pal_rm.data import load_demo_preferences
    >>> dataset = load_demo_preferences(seed=0)
    >>> dataset["train"].num_rows
    1176
    ```
    """
    num_groups = check_int("num_groups", num_groups, minimum=1)
    if num_groups > len(DEMO_GROUP_PREFERENCES):
        raise ValueError(
            f"`num_groups` must be at most {len(DEMO_GROUP_PREFERENCES)} (the groups defined in "
            f"DEMO_GROUP_PREFERENCES), got {num_groups}."
        )
    users_per_group = check_int("users_per_group", users_per_group)
    num_mixture_users = check_int("num_mixture_users", num_mixture_users)
    pairs_per_user = check_int("pairs_per_user", pairs_per_user, minimum=1)
    num_unseen_users = check_int("num_unseen_users", num_unseen_users)
    unseen_shots = check_int("unseen_shots", unseen_shots)
    unseen_test_pairs = check_int("unseen_test_pairs", unseen_test_pairs)
    dirichlet_alpha = check_positive_float("dirichlet_alpha", dirichlet_alpha)
    variants_per_style = check_int("variants_per_style", variants_per_style, minimum=1)
    seed = check_seed(seed)
    check_fractions(validation_fraction, test_fraction)
    num_seen_users = num_groups * users_per_group + num_mixture_users
    if num_seen_users == 0:
        raise ValueError("There are no seen users: set `users_per_group` or `num_mixture_users` to at least 1.")
    sizes = split_sizes(pairs_per_user, validation_fraction, test_fraction, "pairs_per_user")

    # disjoint topic pools: train / validation / test
    topic_order = rng_for(seed, _TOPIC_STREAM).permutation(len(_TOPICS))
    num_train_topics, num_validation_topics, _ = split_sizes(
        len(_TOPICS), validation_fraction, test_fraction, "topics"
    )
    boundaries = (num_train_topics, num_train_topics + num_validation_topics)
    pools = [tuple(_TOPICS[i] for i in part) for part in np.split(topic_order, boundaries)]
    if unseen_test_pairs > 0 and num_unseen_users > 0 and not pools[2]:
        raise ValueError(
            "`unseen_test` draws from the test topics, and `test_fraction=0` leaves none: set `test_fraction` > 0 or "
            "`unseen_test_pairs=0`."
        )
    weight_matrix = _weight_matrix(num_groups)
    pool = _response_pool(seed, variants_per_style)

    seen_users, unseen_users = simulate_users(
        num_groups=num_groups,
        users_per_group=users_per_group,
        num_mixture_users=num_mixture_users,
        num_unseen_users=num_unseen_users,
        dirichlet_alpha=dirichlet_alpha,
        seed=seed,
        seen_stream=_USER_STREAM,
        unseen_stream=_UNSEEN_STREAM,
    )
    rows = empty_rows()
    for user in seen_users:
        for split, topics, count in zip(SEEN_SPLIT_NAMES, pools, sizes):
            rows[split] += _user_rows(user, weight_matrix, topics, count, pool)
    for user in unseen_users:
        rows["unseen_train"] += _user_rows(user, weight_matrix, pools[0], unseen_shots, pool)
        rows["unseen_test"] += _user_rows(user, weight_matrix, pools[2], unseen_test_pairs, pool)

    logger.info(
        f"Demo preferences: {num_seen_users} seen users, {num_unseen_users} unseen users, topics split "
        f"{len(pools[0])} / {len(pools[1])} / {len(pools[2])}."
    )
    return build_dataset_dict(rows, _features())
