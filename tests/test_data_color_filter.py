# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
import numpy as np
import pytest
from PIL import Image

from pal_rm.data import SPLIT_NAMES, apply_color_filter, load_color_filter_preferences
from pal_rm.data.color_filter import caption_text, draw_caption

SMALL = {
    "users_per_group": 3,
    "num_mixture_users": 2,
    "pairs_per_user": 10,
    "num_unseen_users": 4,
    "unseen_shots": 5,
    "unseen_test_pairs": 6,
}


@pytest.fixture(scope="module")
def data():
    return load_color_filter_preferences(seed=0, **SMALL)


def test_splits_columns_sizes_and_users(data):
    assert tuple(data) == SPLIT_NAMES
    # 8 seen users x (7 / 1 / 2); 4 unseen users x (5 / 6)
    sizes = {split: data[split].num_rows for split in SPLIT_NAMES}
    assert sizes == {"train": 56, "validation": 8, "test": 16, "unseen_train": 20, "unseen_test": 24}
    row = data["train"][0]
    assert isinstance(row["chosen_image"], Image.Image) and row["chosen_image"].mode == "RGB"
    assert row["chosen_image"].size == (64, 64)
    assert row["prompt"] == caption_text(*_parse(row["prompt"]))
    seen = set(data["train"]["user_id"])
    assert seen == set(data["test"]["user_id"]) == {f"user_{i:03d}" for i in range(8)}
    assert set(data["unseen_test"]["user_id"]) == {f"unseen_user_{i:03d}" for i in range(4)}
    assert set(data["train"]["group"]) == {0, 1, -1}


def _parse(prompt):
    words = prompt.split()
    count = ("one", "two", "three", "four").index(words[0]) + 1
    return count, words[1], words[2].rstrip("s"), words[5]


def test_no_image_is_in_two_splits(data):
    def keys(split):
        return {
            data[split][i][column].tobytes()
            for i in range(len(data[split]))
            for column in ("chosen_image", "rejected_image")
        }

    all_keys = [keys(split) for split in SPLIT_NAMES]
    for i in range(len(all_keys)):
        for j in range(i + 1, len(all_keys)):
            assert not all_keys[i] & all_keys[j]


def test_groups_prefer_their_filter(data):
    """Pure users pick their filter most of the time (Bradley-Terry labels, so not always); the chosen image's
    warmth matches `chosen_is_warm`."""
    rows = data["train"].select_columns(["group", "chosen_is_warm", "true_margin"]).to_pandas()
    warm_share = rows.groupby("group")["chosen_is_warm"].mean()
    assert warm_share[0] > 0.75 and warm_share[1] < 0.25
    row = data["train"][0]
    chosen, rejected = (np.asarray(row[c], dtype=float) for c in ("chosen_image", "rejected_image"))

    def warmth(pixels):
        return (pixels[..., 0] - pixels[..., 2]).mean()

    assert (warmth(chosen) > warmth(rejected)) == row["chosen_is_warm"]


def test_deterministic_and_streams_independent(data):
    again = load_color_filter_preferences(seed=0, **SMALL)
    assert again["train"]["prompt"] == data["train"]["prompt"]
    assert again["train"][3]["chosen_image"].tobytes() == data["train"][3]["chosen_image"].tobytes()
    # the number of unseen users does not change the seen users' data
    fewer = load_color_filter_preferences(seed=0, **{**SMALL, "num_unseen_users": 1})
    assert fewer["train"]["true_margin"] == data["train"]["true_margin"]
    assert load_color_filter_preferences(seed=1, **SMALL)["train"]["prompt"] != data["train"]["prompt"]


def test_filters_and_drawing():
    rng = np.random.default_rng(0)
    image, coverage = draw_caption(rng, 2, "red", "circle", "gradient", size=64)
    assert image.size == (64, 64) and 0 < coverage < 1
    pixels = np.asarray(image, dtype=float)
    warm = np.asarray(apply_color_filter(image, "warm"), dtype=float)
    cool = np.asarray(apply_color_filter(image, "cool"), dtype=float)
    assert (warm[..., 0] - warm[..., 2]).mean() > (pixels[..., 0] - pixels[..., 2]).mean()
    assert (cool[..., 2] - cool[..., 0]).mean() > (pixels[..., 2] - pixels[..., 0]).mean()
    with pytest.raises(ValueError, match="`kind` must be one of"):
        apply_color_filter(image, "sepia")
    with pytest.raises(ValueError, match="`strength` must be in"):
        apply_color_filter(image, "warm", strength=2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"users_per_group": 0, "num_mixture_users": 0}, "There must be seen users"),
        ({"pairs_per_user": 0}, "`pairs_per_user` must be an integer >= 1"),
        ({"filter_strength": 1.5}, r"`filter_strength` must be in \(0, 1\]"),
        ({"shared_weight": -1}, "`shared_weight` must be a finite number >= 0"),
        ({"image_size": 8}, "`image_size` must be an integer >= 16"),
        ({"seed": -1}, "`seed` must be a non-negative integer"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_color_filter_preferences(**{**SMALL, **kwargs})
