"""The baselines PAL is benchmarked against, and featurize_preferences."""

import pytest
import torch
from conftest import tiny_model
from datasets import Dataset, DatasetDict

from pal_rm import PalConfig, PalRewardModel
from pal_rm.baselines import IndependentRewardHeads, fix_user_mixtures, one_reward_model
from pal_rm.cache import FeatureStore, featurize_preferences


def opposite_tastes(num_pairs=80, seed=0):
    """u0 prefers a large first coordinate, u1 a small one."""
    generator = torch.Generator().manual_seed(seed)
    chosen, rejected = torch.randn(num_pairs, 3, generator=generator), torch.randn(num_pairs, 3, generator=generator)
    users = ["u0", "u1"] * (num_pairs // 2)
    for i, user in enumerate(users):
        if (chosen[i, 0] < rejected[i, 0]) == (user == "u0"):
            chosen[i], rejected[i] = rejected[i].clone(), chosen[i].clone()
    return Dataset.from_dict(
        {"user_id": users, "chosen_features": chosen.tolist(), "rejected_features": rejected.tolist()}
    )


def test_independent_heads_learn_opposite_users():
    heads = IndependentRewardHeads(l2=1e-3).fit(opposite_tastes(seed=0))
    assert heads.user_ids == ["u0", "u1"]
    assert heads.weights[0, 0] > 0 > heads.weights[1, 0]
    assert heads.accuracy(opposite_tastes(seed=1)) > 0.9
    correct, users = heads.correct(opposite_tastes(num_pairs=4, seed=2))
    assert correct.shape == (4,) and users == ["u0", "u1", "u0", "u1"]


def test_independent_heads_share_nothing():
    """A user's head depends on that user's comparisons only."""
    both = IndependentRewardHeads().fit(opposite_tastes(seed=0))
    alone = IndependentRewardHeads().fit(opposite_tastes(seed=0).filter(lambda row: row["user_id"] == "u0"))
    torch.testing.assert_close(both.weights[0], alone.weights[0], atol=1e-5, rtol=1e-5)


def test_independent_heads_bad_input():
    with pytest.raises(ValueError, match="Call `fit` first"):
        IndependentRewardHeads().accuracy(opposite_tastes())
    heads = IndependentRewardHeads(steps=1).fit(opposite_tastes())
    with pytest.raises(ValueError, match="No head for users"):
        heads.accuracy(opposite_tastes().map(lambda row: {"user_id": "stranger"}))
    with pytest.raises(ValueError, match="featurize"):
        heads.fit(Dataset.from_dict({"user_id": ["a"], "chosen": ["x"], "rejected": ["y"]}))


def test_one_reward_model_is_the_same_for_every_user():
    model = one_reward_model(feature_dim=3, preference_dim=4)
    assert model.config.variant == "a" and model.config.num_prototypes == 1 and model.config.similarity == "dot"
    model.add_users(["a", "b"])
    features = torch.randn(5, 3)
    torch.testing.assert_close(
        model(item_features=features, user_ids=["a"] * 5).logits,
        model(item_features=features, user_ids=["b"] * 5).logits,
    )


def test_fix_user_mixtures_sets_and_freezes():
    model = PalRewardModel(PalConfig(feature_dim=3, num_prototypes=3, preference_dim=4))
    model.add_users(["a"])
    fix_user_mixtures(model, ["a", "b"], [[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    weights = model.user_mixture_weights()
    torch.testing.assert_close(weights[0], torch.tensor([1.0, 0.0, 0.0]), atol=1e-3, rtol=0)
    torch.testing.assert_close(weights[1], torch.tensor([0.2, 0.3, 0.5]), atol=1e-5, rtol=0)
    assert not model.user_weights.weight.requires_grad and model.config.user_ids == ["a", "b"]
    with pytest.raises(ValueError, match="simplex"):
        fix_user_mixtures(model, ["a"], [[0.5, 0.6, 0.0]])
    with pytest.raises(ValueError, match="shape"):
        fix_user_mixtures(model, ["a"], [[0.5, 0.5]])


def test_featurize_preferences_matches_the_backbone(word_tokenizer):
    model = tiny_model("bert", vocab_size=len(word_tokenizer), variant="b").eval()
    data = Dataset.from_dict(
        {
            "user_id": ["u0", "u1"],
            "prompt": ["what is this", "hello world"],
            "chosen": [" a quick fox", " yes"],
            "rejected": [" a lazy dog", " no"],
            "group": [0, 1],
        }
    )
    cache = FeatureStore()
    features = featurize_preferences(DatasetDict({"train": data, "test": data}), model, word_tokenizer, cache=cache)
    assert set(features) == {"train", "test"}
    row = features["train"][0]
    assert row["user_id"] == "u0" and row["group"] == 0 and "chosen" not in row
    eos = word_tokenizer.eos_token
    expected = model.encode_texts(
        word_tokenizer, ["what is this", "what is this a quick fox" + eos, "what is this a lazy dog" + eos]
    )
    torch.testing.assert_close(
        torch.tensor([row["prompt_features"], row["chosen_features"], row["rejected_features"]]),
        expected,
        atol=1e-5,
        rtol=1e-5,
    )
    assert cache.num_encoded == 6  # every unique text once, across splits
    with pytest.raises(ValueError, match="no \\['rejected'\\]"):
        featurize_preferences(data.remove_columns("rejected"), model, word_tokenizer)


def low_rank_users(num_users=12, pairs=40, seed=0):
    """Users whose true rewards are signed combinations of two directions (first and second coordinate)."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.eye(6)[:2]
    rows = {"user_id": [], "chosen_features": [], "rejected_features": []}
    for user in range(num_users):
        weights = torch.randn(2, generator=generator)  # any sign: not on the simplex
        for _ in range(pairs):
            a, b = torch.randn(6, generator=generator), torch.randn(6, generator=generator)
            better = (weights @ directions @ (a - b)) > 0
            chosen, rejected = (a, b) if better else (b, a)
            rows["user_id"].append(f"u{user}")
            rows["chosen_features"].append(chosen.tolist())
            rows["rejected_features"].append(rejected.tolist())
    return Dataset.from_dict(rows)


def test_low_rank_basis_learns_signed_users_and_new_users():
    from pal_rm.baselines import LowRankRewardBasis

    seen = low_rank_users(seed=0)
    lore = LowRankRewardBasis(rank=2, l2=1e-3, steps=400).fit(seen)
    assert lore.basis.shape == (2, 6) and lore.weights.shape == (12, 2)
    assert lore.accuracy(low_rank_users(seed=0)) > 0.9
    # per-item rewards (best-of-n) agree with the pair margins
    chosen = torch.tensor(seen["chosen_features"], dtype=torch.float32)
    rejected = torch.tensor(seen["rejected_features"], dtype=torch.float32)
    margins = lore.rewards(chosen, seen["user_id"]) - lore.rewards(rejected, seen["user_id"])
    torch.testing.assert_close(margins, lore.reward_differences(seen)[0])
    # the basis spans the two true directions: new users fitted on it from 10 comparisons each
    new = low_rank_users(num_users=4, pairs=30, seed=1)
    new = new.map(lambda row: {"user_id": "new_" + row["user_id"]})
    few = new.filter(lambda row, i: i % 30 < 10, with_indices=True)
    rest = new.filter(lambda row, i: i % 30 >= 10, with_indices=True)
    before = lore.basis.clone()
    lore.fit_new_users(few)
    assert torch.equal(lore.basis, before) and len(lore.user_ids) == 16
    assert lore.accuracy(rest) > 0.8
    with pytest.raises(ValueError, match="fitted already"):
        lore.fit_new_users(few)
    with pytest.raises(ValueError, match="No weights for users"):
        lore.accuracy(low_rank_users(num_users=1, seed=2).map(lambda row: {"user_id": "stranger"}))
    with pytest.raises(ValueError, match="Call `fit` on the seen users first"):
        LowRankRewardBasis().fit_new_users(few)
    # LoRe's released code: weights on the simplex; signed users need four basis rewards then (about +-e1, +-e2)
    simplex = LowRankRewardBasis(rank=4, l2=1e-3, steps=400, simplex_weights=True).fit(seen)
    torch.testing.assert_close(simplex.weights.sum(-1), torch.ones(12))
    assert (simplex.weights >= 0).all() and simplex.accuracy(seen) > 0.9
    with pytest.raises(ValueError, match="`simplex_weights` must be True or False"):
        LowRankRewardBasis(simplex_weights="yes")
    with pytest.raises(ValueError, match="`rank` must be an integer >= 1"):
        LowRankRewardBasis(rank=0)
    with pytest.raises(ValueError, match="no 'chosen_features' column"):
        LowRankRewardBasis().fit(Dataset.from_dict({"user_id": ["u"], "chosen": ["a"], "rejected": ["b"]}))
