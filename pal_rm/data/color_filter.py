# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
"""Image preferences with warm and cool colour filters, on procedurally drawn images (offline, no download).

A small, self-contained version of the PAL paper's Pick-a-Filter protocol (Chen et al., ICLR 2025): there, Pick-a-Pic
images get a warm or a cool colour filter and two groups of users prefer one filter or the other. Here the images are
drawn in code, so the data exists anywhere and a two-tower image-text backbone (CLIP, SigLIP) sees real pixels through
its real image processor. It checks the image pipeline end to end; it is not a benchmark of image understanding.

The rules, as implemented:

1. A prompt is a caption drawn from a small grammar: `"{count} {colour} {shape}s on a {background} background"`
   (1-4 shapes; circles, squares or triangles; 6 named colours; gradient, striped, checkered or speckled
   backgrounds). The two images of a comparison are two renderings of the same caption (as two generations for one
   Pick-a-Pic prompt): the same content, drawn with other positions, sizes and shades ([`draw_caption`]).
2. One rendering gets the warm filter, the other the cool filter ([`apply_color_filter`]: a blend towards amber or
   towards blue with a matching shift of the red and blue channels; `filter_strength` in (0, 1]); which one is warm
   is a fair coin.
3. Users (the shared simulation of `pal_rm.data`): group 0 prefers warm images, group 1 cool ones; a mixture user
   has Dirichlet weights `(w_warm, w_cool)`. User `u`'s reward of image `x` is
   `r_u(x) = (w_warm - w_cool) * filter(x) + shared_weight * coverage(x)`, with `filter(x) = +1` for the warm and
   `-1` for the cool rendering, and `coverage(x)` the share of the canvas the shapes cover, standardised (a
   preference for bigger shapes that every user shares, so that one reward for everyone has something to learn).
4. Labels are Bradley-Terry draws: `P(x1 preferred) = sigmoid(label_scale * (r_u(x1) - r_u(x2)))` from the user's
   own generator.
5. Splits: each seen user's `pairs_per_user` comparisons go to `train` / `validation` / `test`
   (`validation_fraction`, `test_fraction`); each unseen user has `unseen_shots` comparisons in `unseen_train` and
   `unseen_test_pairs` in `unseen_test`. Every comparison draws new renderings, so no image is in two splits.

Columns: `user_id`, `prompt` (the caption), `chosen_image` and `rejected_image` (`datasets.Image()`, RGB PNG,
`image_size` pixels square), `group` (0 warm, 1 cool, -1 mixture), `mixture_weights` (`[w_warm, w_cool]`),
`chosen_is_warm` (whether the chosen image is the warm one) and `true_margin` (`r_u(chosen) - r_u(rejected)`).
"""

from __future__ import annotations

import math

import numpy as np
from datasets import DatasetDict, Features, Image, Value
from PIL import Image as PILImage
from PIL import ImageDraw

from ._common import (
    MIXTURE_WEIGHTS_FEATURE,
    SEEN_SPLIT_NAMES,
    SimulatedUser,
    build_dataset_dict,
    check_fractions,
    check_int,
    check_positive_float,
    check_seed,
    empty_rows,
    simulate_users,
    split_sizes,
)

COLOR_FILTER_GROUPS = {0: "prefers the warm filter", 1: "prefers the cool filter"}
FILTERS = ("warm", "cool")
SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (200, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 70, 200),
    "yellow": (230, 200, 40),
    "purple": (130, 50, 170),
    "white": (235, 235, 235),
}
BACKGROUNDS = ("gradient", "striped", "checkered", "speckled")
COUNT_WORDS = ("one", "two", "three", "four")
# The tints the filters blend towards, and how they shift the red and blue channels.
_TINTS = {
    "warm": (np.array([255.0, 170.0, 70.0]), (1.15, 0.85)),
    "cool": (np.array([70.0, 140.0, 255.0]), (0.85, 1.15)),
}

# randomness streams
_USER_STREAM, _UNSEEN_STREAM = 0, 1


def apply_color_filter(image: PILImage.Image, kind: str, strength: float = 0.5) -> PILImage.Image:
    """
    A warm or cool colour filter, as the Pick-a-Filter data applies to Pick-a-Pic images: the image is blended
    towards an amber (`"warm"`) or blue (`"cool"`) tint by `0.35 * strength`, and its red and blue channels are scaled
    by `1 +/- 0.15 * strength` in the direction of the tint. Returns a new RGB image.
    """
    if kind not in FILTERS:
        raise ValueError(f"`kind` must be one of {FILTERS}, got {kind!r}.")
    if not 0 < strength <= 1:
        raise ValueError(f"`strength` must be in (0, 1], got {strength!r}.")
    tint, (red, blue) = _TINTS[kind]
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    pixels = pixels * (1 - 0.35 * strength) + tint * 0.35 * strength
    pixels[..., 0] *= 1 + (red - 1) * strength
    pixels[..., 2] *= 1 + (blue - 1) * strength
    return PILImage.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))


def random_caption(rng: np.random.Generator) -> tuple[int, str, str, str]:
    """`(count, colour, shape, background)` of a caption, uniformly over the grammar of the module docstring."""
    return (
        int(rng.integers(1, len(COUNT_WORDS) + 1)),
        str(rng.choice(list(COLORS))),
        str(rng.choice(SHAPES)),
        str(rng.choice(BACKGROUNDS)),
    )


def caption_text(count: int, color: str, shape: str, background: str) -> str:
    plural = "s" if count > 1 else ""
    return f"{COUNT_WORDS[count - 1]} {color} {shape}{plural} on a {background} background"


def _background(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    first, second = rng.integers(30, 226, size=(2, 3)).astype(np.float64)
    y, x = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    if kind == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        t = (np.cos(angle) * x + np.sin(angle) * y + 1) / 2
        t = (t - t.min()) / max(t.max() - t.min(), 1e-9)
    elif kind == "striped":
        period = rng.uniform(0.1, 0.3)
        t = (np.floor((x if rng.random() < 0.5 else y) / period) % 2).astype(np.float64)
    elif kind == "checkered":
        period = rng.uniform(0.12, 0.3)
        t = ((np.floor(x / period) + np.floor(y / period)) % 2).astype(np.float64)
    else:  # speckled
        t = rng.random((size, size))
    return first * (1 - t[..., None]) + second * t[..., None]


def draw_caption(
    rng: np.random.Generator, count: int, color: str, shape: str, background: str, size: int = 64
) -> tuple[PILImage.Image, float]:
    """
    One rendering of a caption: `count` shapes of `color` (each shade jittered) at random positions and sizes on the
    background. Returns the RGB image and the share of the canvas the shapes cover.
    """
    canvas = PILImage.fromarray(np.clip(_background(rng, background, size), 0, 255).astype(np.uint8))
    mask = PILImage.new("L", (size, size), 0)
    draw, draw_mask = ImageDraw.Draw(canvas), ImageDraw.Draw(mask)
    base = np.array(COLORS[color], dtype=np.float64)
    for _ in range(count):
        radius = rng.uniform(0.08, 0.28) * size
        cx, cy = rng.uniform(radius, size - radius, size=2)
        fill = tuple(int(v) for v in np.clip(base + rng.normal(0, 12, size=3), 0, 255))
        box = [cx - radius, cy - radius, cx + radius, cy + radius]
        triangle = [(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)]
        for target, color_value in ((draw, fill), (draw_mask, 255)):
            if shape == "circle":
                target.ellipse(box, fill=color_value)
            elif shape == "square":
                target.rectangle(box, fill=color_value)
            else:
                target.polygon(triangle, fill=color_value)
    coverage = float((np.asarray(mask) > 0).mean())
    return canvas, coverage


def _features() -> Features:
    return Features(
        {
            "user_id": Value("string"),
            "prompt": Value("string"),
            "chosen_image": Image(),
            "rejected_image": Image(),
            "group": Value("int64"),
            "mixture_weights": MIXTURE_WEIGHTS_FEATURE,
            "chosen_is_warm": Value("bool"),
            "true_margin": Value("float64"),
        }
    )


# Mean and spread of `coverage` over renderings at 64 pixels (measured on 20,000 draws), to standardise it.
_COVERAGE_MEAN, _COVERAGE_STD = 0.239, 0.128


def _user_rows(user: SimulatedUser, num_pairs: int, settings: dict) -> list[dict]:
    rng = user.rng
    direction = float(user.weights[0] - user.weights[1])
    rows = []
    for _ in range(num_pairs):
        caption = random_caption(rng)
        images, rewards, warm = [], [], []
        first_is_warm = bool(rng.random() < 0.5)
        for position in range(2):
            image, coverage = draw_caption(rng, *caption, size=settings["image_size"])
            is_warm = first_is_warm == (position == 0)
            kind = "warm" if is_warm else "cool"
            images.append(apply_color_filter(image, kind, settings["filter_strength"]))
            standardised = (coverage - _COVERAGE_MEAN) / _COVERAGE_STD
            rewards.append(direction * (1.0 if is_warm else -1.0) + settings["shared_weight"] * standardised)
            warm.append(is_warm)
        margin = rewards[0] - rewards[1]
        first_chosen = bool(rng.random() < 1 / (1 + math.exp(-settings["label_scale"] * margin)))
        chosen, rejected = (0, 1) if first_chosen else (1, 0)
        rows.append(
            {
                "user_id": user.user_id,
                "prompt": caption_text(*caption),
                "chosen_image": images[chosen],
                "rejected_image": images[rejected],
                "group": user.group,
                "mixture_weights": user.weights.tolist(),
                "chosen_is_warm": warm[chosen],
                "true_margin": rewards[chosen] - rewards[rejected],
            }
        )
    return rows


def load_color_filter_preferences(
    users_per_group: int = 10,
    num_mixture_users: int = 10,
    pairs_per_user: int = 40,
    num_unseen_users: int = 20,
    unseen_shots: int = 20,
    unseen_test_pairs: int = 20,
    dirichlet_alpha: float = 1.0,
    filter_strength: float = 0.5,
    shared_weight: float = 0.5,
    label_scale: float = 3.0,
    image_size: int = 64,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> DatasetDict:
    """Simulate image preferences for warm and cool colour filters on procedurally drawn images (module docstring).

    Args:
        users_per_group (`int`, defaults to 10): seen users in each of the two groups (warm, cool).
        num_mixture_users (`int`, defaults to 10): seen users with Dirichlet mixture weights over the two groups.
        pairs_per_user (`int`, defaults to 40): comparisons per seen user (28 / 4 / 8 with the default fractions).
        num_unseen_users (`int`, defaults to 20): new users, with the seen users' share of mixture users.
        unseen_shots (`int`, defaults to 20), unseen_test_pairs (`int`, defaults to 20): comparisons per unseen
            user in `unseen_train` and `unseen_test`.
        dirichlet_alpha (`float`, defaults to 1.0): Dirichlet concentration of the mixture users' weights.
        filter_strength (`float`, defaults to 0.5): strength of both filters, in (0, 1].
        shared_weight (`float`, defaults to 0.5): weight of the preference for bigger shapes that every user shares.
        label_scale (`float`, defaults to 3.0): inverse temperature of the Bradley-Terry labels.
        image_size (`int`, defaults to 64): side of the square images, in pixels.
        validation_fraction (`float`, defaults to 0.1), test_fraction (`float`, defaults to 0.2): shares of each
            seen user's comparisons in `validation` and `test`.
        seed (`int`, defaults to 0): the output is a deterministic function of the arguments.

    Returns:
        `datasets.DatasetDict` with the splits `train`, `validation`, `test`, `unseen_train`, `unseen_test`. The
        defaults give 30 seen users (840 / 120 / 240 comparisons) and 20 unseen users (400 / 400).

    Example:

    ```python
    >>> from pal_rm.data import load_color_filter_preferences
    >>> dataset = load_color_filter_preferences(users_per_group=2, num_mixture_users=0, num_unseen_users=2)
    >>> dataset["train"][0]["prompt"], dataset["train"][0]["chosen_image"].size  # doctest: +SKIP
    ('three red circles on a striped background', (64, 64))
    ```
    """
    users_per_group = check_int("users_per_group", users_per_group)
    num_mixture_users = check_int("num_mixture_users", num_mixture_users)
    if users_per_group + num_mixture_users == 0:
        raise ValueError("There must be seen users: `users_per_group` and `num_mixture_users` are both 0.")
    pairs_per_user = check_int("pairs_per_user", pairs_per_user, minimum=1)
    num_unseen_users = check_int("num_unseen_users", num_unseen_users)
    unseen_shots = check_int("unseen_shots", unseen_shots)
    unseen_test_pairs = check_int("unseen_test_pairs", unseen_test_pairs)
    image_size = check_int("image_size", image_size, minimum=16)
    settings = {
        "filter_strength": check_positive_float("filter_strength", filter_strength),
        "shared_weight": float(shared_weight),
        "label_scale": check_positive_float("label_scale", label_scale),
        "image_size": image_size,
    }
    if settings["filter_strength"] > 1:
        raise ValueError(f"`filter_strength` must be in (0, 1], got {filter_strength!r}.")
    if not math.isfinite(settings["shared_weight"]) or settings["shared_weight"] < 0:
        raise ValueError(f"`shared_weight` must be a finite number >= 0, got {shared_weight!r}.")
    dirichlet_alpha = check_positive_float("dirichlet_alpha", dirichlet_alpha)
    seed = check_seed(seed)
    check_fractions(validation_fraction, test_fraction)
    sizes = split_sizes(pairs_per_user, validation_fraction, test_fraction, "pairs_per_user")

    seen_users, unseen_users = simulate_users(
        num_groups=len(FILTERS),
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
        for split, count in zip(SEEN_SPLIT_NAMES, sizes):
            rows[split] += _user_rows(user, count, settings)
    for user in unseen_users:
        rows["unseen_train"] += _user_rows(user, unseen_shots, settings)
        rows["unseen_test"] += _user_rows(user, unseen_test_pairs, settings)
    return build_dataset_dict(rows, _features())


__all__ = [
    "COLOR_FILTER_GROUPS",
    "apply_color_filter",
    "caption_text",
    "draw_caption",
    "load_color_filter_preferences",
    "random_caption",
]
