"""Pick-a-Filter built from Pick-a-Pic v1 (`pal_rm.data.pick_a_filter`), on the offline fixture in Pick-a-Pic v1's
schema (`tests/fixtures/pickapic_v1`), and the image feature path around it."""

import io
import json
import os
from collections import defaultdict

import numpy as np
import pytest
import torch
from conftest import tiny_clip
from datasets import Dataset
from datasets import Image as DatasetImage
from PIL import Image
from transformers import AutoModel, CLIPModel, CLIPProcessor

from pal_rm import PalRewardModel
from pal_rm.cache import FeatureStore, featurize_image_preferences, image_backbone_fingerprint
from pal_rm.data import PICK_A_FILTER_GROUPS, apply_color_filter, load_pick_a_filter_preferences
from pal_rm.utils import MINILM, resolve_model_path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(REPO, "tests", "fixtures", "pickapic_v1")
WINNING = {0: "cool", 1: "warm"}
EVALUATION = ("validation", "test", "unseen_test")


@pytest.fixture(scope="module")
def source() -> Dataset:
    return Dataset.from_parquet(os.path.join(FIXTURE, "data", "train-00000-of-00001.parquet"))


@pytest.fixture(scope="module")
def dataset():
    return load_pick_a_filter_preferences(FIXTURE, mix_ratio=0.4, seed=0)


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_rows_follow_the_card_rules(dataset, source):
    rows = [row for split in dataset.values() for row in split]
    assert rows and set(dataset) == {"train", "validation", "test", "unseen_train", "unseen_test"}
    # rule 1: the tie (row 3), the unlabelled row (8), the identical images (13) and the empty caption (20) are gone
    used = {row["source_row"] for row in rows}
    assert not used & {3, 8, 13, 20}
    # rule 2: one group per user, both groups present
    groups = defaultdict(set)
    for row in rows:
        groups[row["user_id"]].add(row["group"])
    assert all(len(g) == 1 for g in groups.values()) and {g.pop() for g in groups.values()} == set(
        PICK_A_FILTER_GROUPS
    )
    # rule 3: the winning filter on the chosen image, or the losing filter on the rejected one, or nothing
    for row in rows:
        expected = {"none": "", "chosen": WINNING[row["group"]], "rejected": WINNING[1 - row["group"]]}
        assert row["filter"] == expected[row["filtered"]]
    assert {row["filtered"] for row in rows} == {"none", "chosen", "rejected"}


def test_images_are_the_users_choice_with_the_filter_applied(dataset, source):
    for row in dataset["train"]:
        original = source[row["source_row"]]
        winner = 0 if original["label_0"] > original["label_1"] else 1
        assert original["user_id"] == int(row["user_id"]) and original["caption"].strip() == row["prompt"]
        for role, index in (("chosen", winner), ("rejected", 1 - winner)):
            data = original[f"jpg_{index}"]
            if row["filtered"] == role:
                expected = pixels(apply_color_filter(Image.open(io.BytesIO(data)), row["filter"], 0.5))
                np.testing.assert_array_equal(pixels(row[f"{role}_image"]), expected)  # stored lossless (PNG)
            else:  # Pick-a-Pic's own JPEG bytes, untouched
                assert row[f"{role}_image"].format == "JPEG"
                np.testing.assert_array_equal(pixels(row[f"{role}_image"]), pixels(Image.open(io.BytesIO(data))))


def test_mixture_ratio_sets_the_share_of_filtered_comparisons():
    def filtered(beta):
        data = load_pick_a_filter_preferences(FIXTURE, mix_ratio=beta, seed=0)
        return {row["source_row"]: row["filtered"] for split in data.values() for row in split}

    none, some, more, every = filtered(0.0), filtered(0.4), filtered(0.8), filtered(1.0)
    assert set(none.values()) == {"none"} and "none" not in set(every.values())
    assert none.keys() == some.keys() == every.keys()  # beta changes the images, never the split
    assert {r for r, f in some.items() if f != "none"} <= {r for r, f in more.items() if f != "none"}  # nested
    share = sum(f != "none" for f in some.values()) / len(some)
    assert 0.2 < share < 0.6  # 40 % of all kept comparisons; the eligible users' share varies around it
    halves = [f for f in every.values()]
    assert abs(halves.count("chosen") - halves.count("rejected")) <= 0.2 * len(halves)


def test_splits_keep_users_prompts_and_captions_apart(dataset):
    seen = set(dataset["train"]["user_id"])
    unseen = set(dataset["unseen_train"]["user_id"]) | set(dataset["unseen_test"]["user_id"])
    assert seen and unseen and not seen & unseen
    assert set(dataset["validation"]["user_id"]) <= seen and set(dataset["test"]["user_id"]) <= seen
    # one user's prompt never spans two splits, and no evaluation caption is a training caption (rule 8)
    where = defaultdict(set)
    for split, rows in dataset.items():
        for row in rows.select_columns(["user_id", "prompt"]):
            where[(row["user_id"], row["prompt"])].add(split)
    assert all(len(splits) == 1 for splits in where.values())
    training = set(dataset["train"]["prompt"]) | set(dataset["unseen_train"]["prompt"])
    for split in EVALUATION:
        assert not set(dataset[split]["prompt"]) & training
    # the users with fewer than 5 prompts (2000, 2001, 2002) are not eligible
    assert not {"2000", "2001", "2002"} & (seen | unseen)


def test_deterministic_in_the_seed_and_unseen_shots_cut(dataset):
    again = load_pick_a_filter_preferences(FIXTURE, mix_ratio=0.4, seed=0)
    other = load_pick_a_filter_preferences(FIXTURE, mix_ratio=0.4, seed=1)
    for split in dataset:
        assert again[split]["source_row"] == dataset[split]["source_row"]
        assert again[split]["filtered"] == dataset[split]["filtered"]
    assert any(other[split]["source_row"] != dataset[split]["source_row"] for split in dataset)
    parallel = load_pick_a_filter_preferences(FIXTURE, mix_ratio=0.4, seed=0, num_proc=2)  # the same rows
    for split in dataset:
        assert parallel[split]["source_row"] == dataset[split]["source_row"]
    row, reference = parallel["train"][-1], dataset["train"][-1]
    np.testing.assert_array_equal(pixels(row["rejected_image"]), pixels(reference["rejected_image"]))
    cut = load_pick_a_filter_preferences(FIXTURE, mix_ratio=0.4, seed=0, unseen_shots=2)
    counts = defaultdict(int)
    for user in cut["unseen_train"]["user_id"]:
        counts[user] += 1
    assert counts and max(counts.values()) <= 2
    assert cut["train"]["source_row"] == dataset["train"]["source_row"]


def test_reads_a_dataset_a_parquet_file_and_another_split(source, tmp_path):
    from_dataset = load_pick_a_filter_preferences(source, mix_ratio=0.4, seed=0)
    from_file = load_pick_a_filter_preferences(
        os.path.join(FIXTURE, "data", "train-00000-of-00001.parquet"), mix_ratio=0.4, seed=0
    )
    assert from_dataset["train"]["source_row"] == from_file["train"]["source_row"]
    source.save_to_disk(str(tmp_path / "saved"))
    from_disk = load_pick_a_filter_preferences(str(tmp_path / "saved"), mix_ratio=0.4, seed=0)
    assert from_disk["test"]["source_row"] == from_file["test"]["source_row"]
    decoded = source.cast_column("jpg_0", DatasetImage()).cast_column("jpg_1", DatasetImage())  # PIL images
    from_images = load_pick_a_filter_preferences(decoded, mix_ratio=0.4, seed=0)
    row, reference = from_images["test"][0], from_file["test"][0]
    np.testing.assert_array_equal(pixels(row["chosen_image"]), pixels(reference["chosen_image"]))
    validation = load_pick_a_filter_preferences(FIXTURE, source_split="validation", seed=0)
    assert {int(user) for user in validation["train"]["user_id"]} <= set(range(3000, 3006))


def test_bad_input_is_a_clear_error(source, tmp_path):
    with pytest.raises(ValueError, match=r"no \['jpg_0', 'jpg_1'\] column.*_no_images"):
        load_pick_a_filter_preferences(source.remove_columns(["jpg_0", "jpg_1"]))
    with pytest.raises(ValueError, match="does not exist"):
        load_pick_a_filter_preferences(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no parquet data for the split 'test'"):
        load_pick_a_filter_preferences(FIXTURE, source_split="test")
    for beta in (1.5, -0.1, "0.4", True):
        with pytest.raises(ValueError, match="`mix_ratio`"):
            load_pick_a_filter_preferences(FIXTURE, mix_ratio=beta)
    with pytest.raises(ValueError, match="`filter_strength`"):
        load_pick_a_filter_preferences(FIXTURE, filter_strength=2.0)
    with pytest.raises(ValueError, match="min_prompts"):
        load_pick_a_filter_preferences(FIXTURE, min_prompts=2)  # too few prompts to split a user three ways
    with pytest.raises(ValueError, match="leaves no seen user"):
        load_pick_a_filter_preferences(FIXTURE, min_prompts=50)
    for bad in (None, 2.0, float("nan")):
        labels = source.to_dict()
        labels["label_0"][5] = bad
        with pytest.raises(ValueError, match=rf"Row 5 of the source has the labels \({bad}.*numbers in \[0, 1\]"):
            load_pick_a_filter_preferences(Dataset.from_dict(labels, features=source.features))
    broken = source.to_dict()
    broken["jpg_0"][0] = broken["jpg_1"][0] = b"not an image"  # with beta = 1 one of them is filtered, so decoded
    with pytest.raises(ValueError, match=r"Row 0 of the source: `jpg_[01]` is not a readable image"):
        load_pick_a_filter_preferences(Dataset.from_dict(broken, features=source.features), mix_ratio=1.0)


# ------------------------------------------------------------------------- the image feature path and train_pal
@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> str:
    """A tiny CLIP with random weights and its processor (MiniLM's tokenizer), saved as a pretrained backbone."""
    folder = str(tmp_path_factory.mktemp("clip"))
    config, processor = tiny_clip()
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_featurize_image_preferences_gives_the_trainers_features(dataset, clip_folder):
    processor = CLIPProcessor.from_pretrained(clip_folder)
    model = PalRewardModel.from_backbone(clip_folder, variant="b", num_prototypes=2, preference_dim=8).eval()
    store = FeatureStore()
    features = featurize_image_preferences(dataset, model, processor, cache=store, show_progress=False)
    for split in dataset:
        assert features[split].num_rows == dataset[split].num_rows
        assert {"prompt_features", "chosen_features", "rejected_features", "group", "filtered"} <= set(
            features[split].column_names
        )
        assert not {"prompt", "chosen_image", "rejected_image"} & set(features[split].column_names)
    row = dataset["test"][0]
    reference = FeatureStore()  # the store a frozen image trainer fills: same backbone fingerprint, same rows
    rows = reference.encode_image_rows(model, processor, [row["chosen_image"]], show_progress=False)
    assert reference.fingerprint == store.fingerprint == image_backbone_fingerprint(model, processor)
    np.testing.assert_allclose(features["test"][0]["chosen_features"], reference.table[rows[0]].numpy(), rtol=1e-6)
    assert len(features["test"][0]["prompt_features"]) == len(features["test"][0]["chosen_features"]) == 16
    images = 2 * sum(split.num_rows for split in dataset.values())
    captions = len({caption for split in dataset.values() for caption in split["prompt"]})
    assert store.num_encoded <= images + captions  # every distinct image and caption encoded once
    with pytest.raises(ValueError, match="two-tower image-text backbone"):
        featurize_image_preferences(dataset, PalRewardModel.from_backbone(resolve_model_path(MINILM)), processor)


def run_train_pal(arguments):
    from pal_rm.trainers import train_pal

    parsed = train_pal.make_parser().parse_args_and_config(arguments)
    train_pal.main(*parsed)
    with open(os.path.join(parsed[2].output_dir, "results.json")) as file:
        return json.load(file)


def test_train_pal_trains_on_pick_a_filter_images(tmp_path, clip_folder):
    """`--dataset_name pick_a_filter` with a CLIP backbone: image rows, frozen cached features, seen and unseen users;
    the saved model scores images with the saved processor."""
    output_dir = tmp_path / "out"
    arguments = ["--config", os.path.join(REPO, "hub_configs", "pal-pick-a-filter.yaml")]
    arguments += ["--dataset_path", FIXTURE, "--model_name_or_path", clip_folder, "--output_dir", str(output_dir)]
    arguments += ["--num_train_epochs", "2", "--preference_dim", "8", "--disable_tqdm", "true", "--adapt_steps", "20"]
    arguments += ["--embedding_cache_dir", str(tmp_path / "cache"), "--hub_model_id", "local/pal-pick-a-filter"]
    results = run_train_pal(arguments)["results"]
    pal = next(value for name, value in results.items() if name.startswith("PAL-B"))
    assert 0 <= pal["seen_accuracy"] <= 1 and 0 <= pal["unseen_accuracy"] <= 1
    assert "Bradley-Terry (one reward for everyone)" in results
    model = AutoModel.from_pretrained(output_dir)
    processor = CLIPProcessor.from_pretrained(output_dir)
    data = load_pick_a_filter_preferences(FIXTURE, mix_ratio=0.4, seed=0)
    row = data["unseen_test"][0]
    rewards = model.score_images(
        processor, [row["prompt"]] * 2, [row["chosen_image"], row["rejected_image"]], row["user_id"]
    )
    assert torch.isfinite(rewards).all()

    # any dataset of image rows, here a `save_to_disk` folder, trains the same way
    data.save_to_disk(str(tmp_path / "images"))
    own = ["--dataset_name", str(tmp_path / "images"), "--model_name_or_path", clip_folder, "--num_prototypes", "2"]
    own += ["--output_dir", str(tmp_path / "own"), "--num_train_epochs", "2", "--preference_dim", "8"]
    own += ["--disable_tqdm", "true", "--adapt_steps", "20", "--compare_baseline", "false", "--report_to", "none"]
    own_results = run_train_pal(own)["results"]
    assert 0 <= own_results["PAL-B (K=2)"]["unseen_accuracy"] <= 1

    from pal_rm.trainers import train_pal

    for extra, problem in (
        (["--model_name_or_path", MINILM], "two-tower image-text backbone"),
        (["--use_peft", "true", "--train_backbone", "true"], r"\['--use_peft', '--train_backbone'\] cannot apply"),
    ):
        parsed = train_pal.make_parser().parse_args_and_config(arguments + extra)
        with pytest.raises(ValueError, match=problem):
            train_pal.main(*parsed)
