"""Few-shot adaptation: the MAP objective, the learned population prior, per-user confidence, and the choice of the
comparisons to ask a new user."""

import math
from collections import defaultdict

import pytest
import torch
from datasets import Dataset

from pal_rm import PalConfig, PalRewardModel
from pal_rm.adaptation import (
    NotEnoughValidationData,
    embed_pairs,
    fit_adaptation_prior,
    fit_map_logits,
    fit_users,
    select_by_mutual_information,
    select_comparisons,
    user_particles,
)
from pal_rm.data import load_synthetic_preferences
from pal_rm.hub import create_model_card
from pal_rm.losses import gaussian_prior_penalty, map_adaptation_objective, pair_losses
from pal_rm.modeling_pal import PalAdaptationPrior
from pal_rm.trainers import PalRewardConfig, PalRewardTrainer


def make_args(tmp_path, **kwargs):
    defaults = {
        "output_dir": str(tmp_path / "out"),
        "num_train_epochs": 40,
        "per_device_train_batch_size": 128,
        "learning_rate": 3e-3,
        "user_learning_rate": 3e-2,
        "prototype_learning_rate": 3e-2,
        "logging_steps": 1000,
        "disable_tqdm": True,
        "seed": 0,
        "use_cpu": True,
        "report_to": "none",
    }
    return PalRewardConfig(**{**defaults, **kwargs})


# ---------------------------------------------------------------- the objective
def test_map_objective_matches_a_hand_computation():
    """Two users, three comparisons: the sum (not the mean) of the pairs' losses plus a fixed-weight prior."""
    differences = torch.tensor([0.5, -1.0, 2.0])
    users = torch.tensor([0, 0, 1])
    logits = torch.tensor([[0.2, -0.2], [1.0, 0.0]])
    mean, std, strength = torch.tensor([0.0, 0.1]), torch.tensor([1.0, 2.0]), 3.0
    objective = map_adaptation_objective(pair_losses("sigmoid", differences), users, logits, mean, std, strength)

    def nll(d):
        return math.log1p(math.exp(-d))

    user0 = nll(0.5) + nll(-1.0) + strength * 0.5 * ((0.2 - 0.0) ** 2 / 1.0 + (-0.2 - 0.1) ** 2 / 4.0)
    user1 = nll(2.0) + strength * 0.5 * ((1.0 - 0.0) ** 2 / 1.0 + (0.0 - 0.1) ** 2 / 4.0)
    assert objective.item() == pytest.approx(user0 + user1, rel=1e-6)
    # hinge: max(0, 1 - d)
    hinge = map_adaptation_objective(pair_losses("hinge", differences), users, logits, mean, std, 0.0)
    assert hinge.item() == pytest.approx(0.5 + 2.0 + 0.0)
    assert gaussian_prior_penalty(logits, mean, std).shape == (2,)


def toy_model(num_prototypes=2, dim=2):
    """PAL-A on 2-d features with the identity item map and prototypes at the unit vectors: rewards are known."""
    model = PalRewardModel(PalConfig(feature_dim=dim, num_prototypes=num_prototypes, preference_dim=dim))
    with torch.no_grad():
        model.item_head.layers[-1].weight.copy_(torch.eye(dim))
        model.item_head.layers[-1].bias.zero_()
        model.prototypes.copy_(torch.eye(num_prototypes, dim) * 2.0)
    return model.eval()


def test_map_fit_reaches_the_minimum_of_the_objective():
    model = toy_model()
    generator = torch.Generator().manual_seed(0)
    chosen = torch.randn(6, 2, generator=generator)
    rejected = torch.randn(6, 2, generator=generator)
    users = torch.tensor([0, 0, 0, 1, 1, 1])
    prior = PalAdaptationPrior(mean=torch.zeros(2), std=torch.ones(2), strength=1.0, learned=True)
    pairs = embed_pairs(model, chosen, rejected)
    fit = fit_map_logits(model, pairs, users, 2, prior, steps=600, learning_rate=0.05)
    # brute force over a grid of logits for each user
    grid = torch.stack(torch.meshgrid(torch.linspace(-4, 4, 161), torch.linspace(-4, 4, 161), indexing="ij"), -1)
    grid = grid.reshape(-1, 2)
    for user in (0, 1):
        index = (users == user).nonzero().flatten()
        weights = torch.softmax(grid, -1)
        differences = pairs.prototype_differences[index] @ weights.T  # (pairs, grid)
        values = -torch.nn.functional.logsigmoid(differences).sum(0) + 0.5 * grid.pow(2).sum(-1)
        best = values.min()
        fitted = map_adaptation_objective(
            pair_losses("sigmoid", pairs.select(index).differences(model, torch.softmax(fit.logits[user], -1)[None])),
            torch.zeros(len(index), dtype=torch.long),
            fit.logits[user : user + 1],
            prior.mean,
            prior.std,
            1.0,
        )
        assert fitted.item() <= best.item() + 1e-3
    assert fit.covariance.shape == (2, 2, 2)
    assert torch.all(torch.linalg.eigvalsh(fit.covariance) > 0)
    assert fit.num_comparisons.tolist() == [3, 3]


# ---------------------------------------------------------------- the learned prior on synthetic data
@pytest.fixture(scope="module")
def synthetic_trainer(tmp_path_factory):
    data = load_synthetic_preferences(
        feature_dim=8, num_groups=2, users_per_group=20, pairs_per_user=50, num_unseen_users=20, unseen_shots=30
    )
    torch.manual_seed(0)
    model = PalRewardModel(PalConfig(feature_dim=8, num_prototypes=2, preference_dim=8))
    args = make_args(tmp_path_factory.mktemp("synthetic"))
    trainer = PalRewardTrainer(model, args, train_dataset=data["train"], eval_dataset=data["validation"])
    trainer.train()
    return trainer, data


def first_shots(split, shots):
    seen, keep, names = defaultdict(int), [], []
    for row, user in enumerate(split["user_id"]):
        seen[user] += 1
        for n in shots:
            if seen[user] <= n:
                keep.append(row)
                names.append(f"{user}@{n}")
    return split.select(keep).remove_columns("user_id").add_column("user_id", names)


def test_prior_is_learned_on_validation_and_stored(synthetic_trainer, tmp_path):
    trainer, _ = synthetic_trainer
    prior = trainer.model.config.adaptation_prior
    assert prior is not None and prior["method"] in ("empirical", "gaussian")
    selection = prior["selection"]
    assert selection["split"] == "validation" and selection["users"] == 40
    assert len(selection["candidates"]) == 9
    best = max(selection["candidates"], key=lambda c: (c["accuracy"], -c["log_loss"]))
    assert prior["method"] == best["method"]
    card = create_model_card(trainer.model)
    assert f"**{prior['method']}**" in card.lower() and "held-out accuracy per candidate" in card
    trainer.model.save_pretrained(tmp_path / "model")
    reloaded = PalRewardModel.from_pretrained(tmp_path / "model")
    assert reloaded.config.adaptation_prior == prior


def test_adaptation_recovers_true_mixtures_better_as_shots_grow(synthetic_trainer):
    trainer, data = synthetic_trainer
    model = trainer.model
    before = model.num_users
    shots = (2, 8, 30)
    result = trainer.adapt_users(first_shots(data["unseen_train"], shots))
    try:
        # Where each true group sits in PAL's space: the mean ideal point of its seen users.
        groups = dict(zip(data["train"]["user_id"], data["train"]["group"]))
        seen_ids = list(model.config.user_ids[:before])
        ideal = model.user_mixture_weights() @ model.prototypes
        centroids = {
            g: ideal[[i for i, u in enumerate(seen_ids) if groups[u] == g]].mean(0) for g in set(groups.values())
        }
        unseen_groups = dict(zip(data["unseen_train"]["user_id"], data["unseen_train"]["group"]))
        errors, spreads = defaultdict(list), defaultdict(list)
        confidence = model.user_confidence(result["users"])
        for i, user in enumerate(result["users"]):
            name, n = user.rsplit("@", 1)
            row = model.user_rows([user])[0]
            errors[int(n)].append((ideal[row] - centroids[unseen_groups[name]]).norm().item())
            spreads[int(n)].append(confidence.mixture_std[i].sum().item())
            assert confidence.num_comparisons[i] == int(n)
        error = [sum(errors[n]) / len(errors[n]) for n in shots]
        spread = [sum(spreads[n]) / len(spreads[n]) for n in shots]
        assert error[0] > error[1] > error[2], error
        assert spread[0] > spread[1] > spread[2], spread  # confidence grows with shots
        # seen users have no posterior: NaN spread and -1 comparisons
        trained = model.user_confidence([seen_ids[0]])
        assert trained.num_comparisons.tolist() == [-1] and trained.mixture_std.isnan().all()
    finally:
        model.truncate_users(before)
    assert model.config.num_user_posteriors == 0


def test_validation_without_two_comparisons_per_user_cannot_choose_the_prior(synthetic_trainer):
    trainer, data = synthetic_trainer
    model = trainer.model
    one_each = data["validation"].select(sorted({u: i for i, u in enumerate(data["validation"]["user_id"])}.values()))
    pairs = embed_pairs(
        model, torch.tensor(one_each["chosen_features"]), torch.tensor(one_each["rejected_features"]), None
    )
    users = model.user_rows(one_each["user_id"])
    with pytest.raises(NotEnoughValidationData, match="2 or more validation comparisons"):
        fit_adaptation_prior(model, pairs, users, model.trained_user_rows())


# ---------------------------------------------------------------- confidence in rewards
def test_score_texts_returns_reward_spread_for_adapted_users(tmp_path, demo_dataset, demo_tokenizer):
    from conftest import tiny_model

    model = tiny_model("bert", vocab_size=len(demo_tokenizer), variant="b", num_prototypes=3, preference_dim=8)
    args = make_args(tmp_path, num_train_epochs=2, per_device_train_batch_size=32)
    trainer = PalRewardTrainer(
        model,
        args,
        train_dataset=demo_dataset["train"],
        eval_dataset=demo_dataset["validation"],
        processing_class=demo_tokenizer,
    )
    trainer.train()
    assert model.config.adaptation_prior is not None
    trainer.adapt_users(demo_dataset["unseen_train"])
    test = demo_dataset["unseen_test"].select(range(6))
    seen_user = demo_dataset["train"]["user_id"][0]
    users = list(test["user_id"][:5]) + [seen_user]
    rewards, spread = model.score_texts(
        demo_tokenizer, test["prompt"], test["chosen"], users=users, return_uncertainty=True
    )
    assert torch.equal(rewards, model.score_texts(demo_tokenizer, test["prompt"], test["chosen"], users=users))
    assert torch.isfinite(spread[:5]).all() and (spread[:5] > 0).all()
    assert spread[5].isnan()  # a trained user has no posterior
    _, prototype_rewards, spread_again = model.score_texts(
        demo_tokenizer,
        test["prompt"],
        test["chosen"],
        users=users,
        return_prototype_rewards=True,
        return_uncertainty=True,
    )
    assert prototype_rewards.shape == (6, 3)
    torch.testing.assert_close(spread_again, spread, equal_nan=True)


# ---------------------------------------------------------------- choosing comparisons
def test_active_selection_picks_the_informative_comparisons():
    """
    Prototypes at (2, 0) and (0, 2). A pair of items symmetric about the diagonal has the same reward difference for
    every mixture except through the prototypes' axis: only pairs that separate the two prototypes tell which one a
    user follows. Items on the diagonal are equidistant from both prototypes for any mixture: uninformative.
    """
    model = toy_model()
    informative_a = torch.tensor([[2.0, 0.0], [1.5, 0.0], [2.5, 0.2]])
    informative_b = torch.tensor([[0.0, 2.0], [0.0, 1.5], [0.2, 2.5]])
    diagonal = torch.linspace(-1, 1, 12).unsqueeze(-1).repeat(1, 2)
    features_a = torch.cat([diagonal[:6], informative_a])
    features_b = torch.cat([diagonal[6:] * 0.9, informative_b])
    particles = torch.tensor([[3.0, -3.0], [-3.0, 3.0]])  # the user follows one prototype, we do not know which
    log_weights = torch.log(torch.tensor([0.5, 0.5]))
    pairs = embed_pairs(model, features_a, features_b)
    chosen = select_by_mutual_information(model, pairs, particles, log_weights, n=3)
    assert sorted(chosen) == [6, 7, 8]
    # once the user is known, nothing is left to learn from any pair: the information is ~0 everywhere
    certain = torch.log(torch.tensor([1.0 - 1e-9, 1e-9]))
    first = select_by_mutual_information(model, pairs, particles, certain, n=1)
    assert len(first) == 1
    # the public API, features in, a new user (prior particles from the trained users)
    model.add_users(["a", "b"])
    with torch.no_grad():
        model.user_weights.weight.copy_(particles)
    mean, std = model.population_prior_statistics()
    model.config.adaptation_prior = {
        "method": "empirical",
        "mean": mean.tolist(),
        "std": std.tolist(),
        "strength": 1.0,
        "bandwidth": 0.0,
    }
    ask = select_comparisons(model, {"features_a": features_a, "features_b": features_b}, user=None, n=2)
    assert set(ask) <= {6, 7, 8}
    # one answer preferring the item at prototype a's place: the posterior follows prototype a
    particles_after, log_weights_after = user_particles(
        model, answered={"chosen_features": informative_a[:1], "rejected_features": informative_b[:1]}
    )
    posterior_mixture = log_weights_after.exp() @ torch.softmax(particles_after, -1)
    assert posterior_mixture[0] > 0.8, posterior_mixture


def test_selection_and_fit_bad_inputs():
    model = toy_model()
    model.add_users(["a", "b"])
    with pytest.raises(ValueError, match="`n` must be >= 1"):
        select_comparisons(model, {"features_a": torch.randn(3, 2), "features_b": torch.randn(3, 2)}, n=0)
    with pytest.raises(ValueError, match="`candidate_pairs` is empty"):
        select_comparisons(model, [], n=1)
    with pytest.raises(ValueError, match="needs the model's `tokenizer`"):
        select_comparisons(model, [{"prompt": "p", "response_a": "a", "response_b": "b"}], n=1)
    pairs = embed_pairs(model, torch.randn(4, 2), torch.randn(4, 2))
    # a user with zero comparisons
    with pytest.raises(ValueError, match=r"Users \[2\] have no comparison"):
        fit_users(model, pairs, torch.tensor([0, 0, 1, 1]), 3)
    # non-finite features
    with pytest.raises(ValueError, match="not finite"):
        embed_pairs(model, torch.tensor([[math.nan, 0.0]]), torch.zeros(1, 2))
    # a misspelt prior method or an empty candidate list is an error, never a quiet fallback
    mean, std = model.population_prior_statistics()
    typo = PalAdaptationPrior(mean=mean, std=std, method="gausian")
    with pytest.raises(ValueError, match="Unknown prior method 'gausian'"):
        fit_users(model, pairs, torch.tensor([0, 0, 1, 1]), 2, typo)
    with pytest.raises(ValueError, match="non-empty lists of settings"):
        fit_adaptation_prior(model, pairs, torch.tensor([0, 0, 1, 1]), [0, 1], candidates={"empirical": ()})
    with pytest.raises(ValueError, match="non-empty lists of settings"):
        fit_adaptation_prior(model, pairs, torch.tensor([0, 0, 1, 1]), [0, 1], candidates={"kernel": (0.1,)})


def test_adapt_users_with_one_prototype_registers_new_users_with_the_one_mixture(tmp_path):
    torch.manual_seed(0)
    model = PalRewardModel(PalConfig(feature_dim=4, num_prototypes=1, preference_dim=4))
    generator = torch.Generator().manual_seed(0)
    rows = {
        "user_id": ["u0", "u1"] * 4,
        "chosen_features": torch.randn(8, 4, generator=generator).tolist(),
        "rejected_features": torch.randn(8, 4, generator=generator).tolist(),
    }
    trainer = PalRewardTrainer(model, make_args(tmp_path, num_train_epochs=1), train_dataset=Dataset.from_dict(rows))
    trainer.train()
    result = trainer.adapt_users(Dataset.from_dict({**rows, "user_id": ["new"] * 8}))
    assert result["users"] == ["new"] and model.is_registered(["new"]) == [True]
    torch.testing.assert_close(model.user_mixture_weights()[-1], torch.ones(1))


def test_contradictory_comparisons_stay_at_the_prior():
    """The same pair answered both ways carries no information about the direction: the user stays at the prior
    mean, with about the prior's spread."""
    model = toy_model()
    model.add_users(["a", "b", "c", "d"])
    with torch.no_grad():
        model.user_weights.weight.copy_(torch.tensor([[1.0, -1.0], [-1.0, 1.0], [0.8, -0.8], [-0.8, 0.8]]))
    x, y = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    pairs = embed_pairs(model, torch.cat([x, y]), torch.cat([y, x]))
    users = torch.tensor([0, 0])
    for method in ("gaussian", "empirical"):
        mean, std = model.population_prior_statistics()
        prior = PalAdaptationPrior(mean=mean, std=std, strength=1.0, learned=True, method=method)
        fit = fit_users(model, pairs, users, 1, prior)
        torch.testing.assert_close(torch.softmax(fit.logits[0], -1), torch.tensor([0.5, 0.5]), atol=0.02, rtol=0)
        assert fit.accuracy == pytest.approx(0.5)


def test_all_comparisons_on_one_prompt_adapt_pal_b(tmp_path):
    """PAL-B reads the ideal point off the prompt: a user seen on one prompt only is fitted like any other (its
    mixture is what that prompt tells about it); the posterior spread says how little that is."""
    torch.manual_seed(0)
    dim = 4
    model = PalRewardModel(PalConfig(feature_dim=dim, num_prototypes=2, preference_dim=dim, variant="b"))
    generator = torch.Generator().manual_seed(1)
    rows = 32
    train = Dataset.from_dict(
        {
            "user_id": [f"u{i % 4}" for i in range(rows)],
            "chosen_features": torch.randn(rows, dim, generator=generator).tolist(),
            "rejected_features": torch.randn(rows, dim, generator=generator).tolist(),
            "prompt_features": torch.randn(rows, dim, generator=generator).tolist(),
        }
    )
    trainer = PalRewardTrainer(model, make_args(tmp_path, num_train_epochs=2), train_dataset=train, eval_dataset=train)
    trainer.train()
    prompt = torch.randn(dim, generator=generator).tolist()
    new = Dataset.from_dict(
        {
            "user_id": ["new"] * 3,
            "chosen_features": torch.randn(3, dim, generator=generator).tolist(),
            "rejected_features": torch.randn(3, dim, generator=generator).tolist(),
            "prompt_features": [prompt] * 3,
        }
    )
    trainer.adapt_users(new)
    confidence = model.user_confidence("new")
    assert confidence.num_comparisons.tolist() == [3]
    assert torch.isfinite(confidence.mixture_std).all()


# ---------------------------------------------------------------- checkpoints
def test_posteriors_round_trip_and_older_checkpoints_still_load(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    model = toy_model()
    model.add_users(["a", "b", "c"])
    model.set_user_posteriors([2], torch.eye(2).unsqueeze(0) * 0.5, [7])
    model.save_pretrained(tmp_path / "with")
    reloaded = PalRewardModel.from_pretrained(tmp_path / "with")
    confidence = reloaded.user_confidence(["c", "a"])
    assert confidence.num_comparisons.tolist() == [7, -1]
    torch.testing.assert_close(confidence.logit_covariance[0], torch.eye(2) * 0.5)
    # a checkpoint saved before posteriors existed: no buffers, no config fields
    plain = toy_model()
    plain.add_users(["a"])
    plain.save_pretrained(tmp_path / "old")
    weights = load_file(str(tmp_path / "old" / "model.safetensors"))
    save_file(
        {k: v for k, v in weights.items() if not k.startswith("users.posterior_")},
        str(tmp_path / "old" / "model.safetensors"),
        metadata={"format": "pt"},
    )
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    for key in ("num_user_posteriors", "adaptation_prior"):
        config.pop(key)
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    old = PalRewardModel.from_pretrained(tmp_path / "old")
    assert old.config.num_user_posteriors == 0 and old.config.adaptation_prior is None
    torch.testing.assert_close(old.user_weights.weight, plain.user_weights.weight)
    # truncating the registry drops the posteriors of the removed users
    reloaded.truncate_users(2)
    assert reloaded.config.num_user_posteriors == 0
