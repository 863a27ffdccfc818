import glob
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(REPO, "hub_configs", "*.yaml")))


def parser():
    from pal_rm.trainers.train_pal import make_parser  # trainers/ is installed as pal_rm.trainers

    return make_parser()


def test_every_published_checkpoint_has_a_recipe():
    names = {os.path.basename(path) for path in RECIPES}
    assert {
        "pal-demo.yaml",
        "pal-persona.yaml",
        "pal-summary.yaml",
        "pal-summary-lore.yaml",
        "pal-prism.yaml",
        "pal-personalllm.yaml",
        "pal-pick-a-filter.yaml",
    } <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=os.path.basename)
def test_recipe_parses_with_the_real_parser(recipe):
    script_args, model_args, training_args = parser().parse_args_and_config(["--config", recipe])
    name = os.path.basename(recipe).removesuffix(".yaml")
    assert training_args.hub_model_id.endswith("/" + name)  # names the Hub repo it publishes to
    assert (
        script_args.dataset_name
        in {"demo", "persona", "summary", "summary_lore", "prism", "personalllm", "pick_a_filter"}
        or name == "pal-own-data"
    )
    assert model_args.variant in {"a", "b"} and model_args.num_prototypes >= 1
    assert not training_args.train_backbone
    if script_args.dataset_name in {"persona", "summary", "summary_lore", "prism", "personalllm", "pick_a_filter"}:
        assert script_args.dataset_path  # persona needs its folder, the Hub loaders their source


@pytest.mark.parametrize(
    ("recipe", "fixture"),
    [
        ("pal-summary.yaml", "summarize_from_feedback"),
        ("pal-summary-lore.yaml", "summarize_from_feedback_lore"),
        ("pal-prism.yaml", "prism_alignment"),
        ("pal-personalllm.yaml", "personalllm"),
        ("pal-pick-a-filter.yaml", "pickapic_v1"),
    ],
)
def test_hub_loader_recipes_load_their_data(recipe, fixture):
    """The recipe's loader and `dataset_kwargs`, on the offline fixture in the real schema instead of the Hub."""
    from pal_rm.trainers.train_pal import load_preference_dataset

    path = os.path.join(REPO, "hub_configs", recipe)
    script_args, _, _ = parser().parse_args_and_config(["--config", path])
    script_args.dataset_path = os.path.join(REPO, "tests", "fixtures", fixture)
    if fixture == "personalllm":  # the fixture has 24 training prompts: fewer comparisons per user than the recipe
        script_args.dataset_kwargs.update(
            num_users=4, num_unseen_users=2, pairs_per_user=10, validation_pairs_per_user=2, test_pairs_per_user=4
        )
        script_args.dataset_kwargs.update(unseen_shots=3, unseen_test_pairs=4)
    dataset = load_preference_dataset(script_args)
    assert dataset["train"].num_rows > 0 and dataset["test"].num_rows > 0
