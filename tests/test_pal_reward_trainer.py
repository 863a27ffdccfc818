import pytest
import torch
from conftest import tiny_model
from datasets import Dataset, concatenate_datasets

from pal_rm.trainers import DataCollatorForPersonalizedPreference, FeatureStore, PalRewardConfig, PalRewardTrainer


def make_args(tmp_path, **kwargs):
    defaults = {
        "output_dir": str(tmp_path / "out"),
        "num_train_epochs": 1,
        "per_device_train_batch_size": 16,
        "logging_steps": 1000,
        "disable_tqdm": True,
        "seed": 0,
        "use_cpu": True,
    }
    return PalRewardConfig(**{**defaults, **kwargs})


def rows(n=4, users=("alice", "bob")):
    return Dataset.from_dict(
        {
            "user_id": [users[i % len(users)] for i in range(n)],
            "prompt": ["what is this"] * n,
            "chosen": ["the quick fox"] * n,
            "rejected": ["a lazy dog"] * n,
        }
    )


# ---------------------------------------------------------------- collator
def test_collator_token_mode_literal_tensors():
    collator = DataCollatorForPersonalizedPreference(pad_token_id=0)
    output = collator(
        [
            {"chosen_ids": [1, 2, 3], "rejected_ids": [4, 5], "prompt_ids": [1], "user_index": 0, "margin": 0.5},
            {"chosen_ids": [6, 7], "rejected_ids": [8], "prompt_ids": [6, 9], "user_index": 1, "margin": 0.0},
        ]
    )
    assert output["input_ids"].tolist() == [[1, 2, 3], [6, 7, 0], [4, 5, 0], [8, 0, 0]]
    assert output["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0], [1, 1, 0], [1, 0, 0]]
    assert output["user_ids"].tolist() == [0, 1, 0, 1]
    assert output["prompt_input_ids"].tolist() == [[1, 0], [6, 9]]
    assert output["prompt_attention_mask"].tolist() == [[1, 0], [1, 1]]
    assert output["margin"].tolist() == [0.5, 0.0]


def test_collator_feature_mode_literal_tensors():
    store = FeatureStore()
    store.append(torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]))
    collator = DataCollatorForPersonalizedPreference(features=store)
    output = collator(
        [
            {"chosen_index": 1, "rejected_index": 2, "prompt_index": 0, "user_index": 3},
            {"chosen_index": 3, "rejected_index": 0, "prompt_index": 0, "user_index": -1},
        ]
    )
    assert output["item_features"].tolist() == [[1.0, 1.0], [3.0, 3.0], [2.0, 2.0], [0.0, 0.0]]
    assert output["prompt_features"].tolist() == [[0.0, 0.0], [0.0, 0.0]]
    assert output["user_ids"].tolist() == [3, -1, 3, -1]


# ---------------------------------------------------------------- training
@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_training_learns_users_and_updates_every_parameter(kind, tmp_path, demo_dataset, demo_tokenizer):
    # Mean pooling: the last token of a random 1-layer decoder is always EOS and carries little of the text.
    model = tiny_model(
        kind, vocab_size=len(demo_tokenizer), variant="b", num_prototypes=4, preference_dim=16, pooling="mean"
    )
    args = make_args(tmp_path, num_train_epochs=25, per_device_train_batch_size=32, learning_rate=3e-3)
    trainer = PalRewardTrainer(model, args, train_dataset=demo_dataset["train"], processing_class=demo_tokenizer)
    assert model.config.user_ids == sorted(set(demo_dataset["train"]["user_id"]))
    trainable = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    assert not any(name.startswith("backbone.") for name in trainable)  # frozen by default
    assert {"users.logits.weight", "item_head.layers.0.weight"} <= set(trainable)
    before = trainer.evaluate(demo_dataset["validation"])["eval_accuracy"]
    trainer.train()
    for name, parameter in model.named_parameters():
        if name in trainable:
            assert not torch.equal(trainable[name], parameter.detach()), f"{name} did not change"
    metrics = trainer.evaluate(demo_dataset["validation"])
    assert metrics["eval_accuracy"] > 0.8, metrics
    assert metrics["eval_accuracy"] > before + 0.2
    assert metrics["eval_user_accuracy_mean"] > 0.75
    assert set(trainer.per_user_accuracy["eval"]) == set(demo_dataset["validation"]["user_id"])
    # the population mixture is the mean of the seen users' mixtures after training
    assert torch.allclose(model.population_mixture, model.user_mixture_weights().mean(0), atol=1e-6)


def test_frozen_backbone_encodes_every_unique_text_once(tmp_path, small_demo_dataset, demo_tokenizer):
    model = tiny_model("bert", vocab_size=len(demo_tokenizer), variant="b")
    encoded_rows = []
    model.backbone.register_forward_hook(lambda module, args, kwargs_output: None)
    model.backbone.register_forward_pre_hook(
        lambda module, args, kwargs: encoded_rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    train = small_demo_dataset["train"]
    args = make_args(tmp_path, num_train_epochs=3)
    trainer = PalRewardTrainer(model, args, train_dataset=train, eval_dataset=train, processing_class=demo_tokenizer)
    unique = set(train["prompt"])
    for prompt, chosen, rejected in zip(train["prompt"], train["chosen"], train["rejected"]):
        unique |= {prompt + chosen + "[EOS]", prompt + rejected + "[EOS]"}
    assert sum(encoded_rows) == len(unique) == trainer.embedding_cache.num_encoded
    calls = len(encoded_rows)
    trainer.train()
    trainer.evaluate()
    assert len(encoded_rows) == calls  # three epochs and an evaluation without a backbone call


def test_parameter_groups_get_their_learning_rates(tmp_path, word_tokenizer):
    model = tiny_model("gpt2", vocab_size=len(word_tokenizer), variant="a", similarity="cosine")
    args = make_args(
        tmp_path,
        train_backbone=True,
        backbone_learning_rate=1e-5,
        head_learning_rate=1e-4,
        prototype_learning_rate=5e-3,
        user_learning_rate=6e-3,
        logit_scale_learning_rate=0.1,
    )
    trainer = PalRewardTrainer(model, args, train_dataset=rows(), processing_class=word_tokenizer)
    rates = {group["name"]: group["lr"] for group in trainer.parameter_groups()}
    assert rates == {
        "backbone": 1e-5,
        "heads": 1e-4,
        "prototypes": 5e-3,
        "user_weights": 6e-3,
        "logit_scale": 0.1,
    }
    optimizer = trainer.create_optimizer()
    assert sorted({group["lr"] for group in optimizer.param_groups}) == [1e-5, 1e-4, 5e-3, 6e-3, 0.1]


def test_training_the_backbone_on_tokens(tmp_path, word_tokenizer):
    model = tiny_model("gpt2", vocab_size=len(word_tokenizer), variant="b")
    args = make_args(tmp_path, train_backbone=True, backbone_learning_rate=1e-2, max_steps=2)
    trainer = PalRewardTrainer(model, args, train_dataset=rows(8), processing_class=word_tokenizer)
    assert "chosen_ids" in trainer.train_dataset.column_names
    before = model.backbone.h[0].mlp.c_fc.weight.detach().clone()
    trainer.train()
    assert not torch.equal(before, model.backbone.h[0].mlp.c_fc.weight)


def test_features_dataset_without_backbone(tmp_path):
    from pal_rm import PalConfig, PalRewardModel

    torch.manual_seed(0)
    model = PalRewardModel(PalConfig(feature_dim=4, num_prototypes=2, preference_dim=4))
    generator = torch.Generator().manual_seed(0)
    chosen = torch.randn(64, 4, generator=generator)
    rejected = torch.randn(64, 4, generator=generator)
    users = ["u0", "u1"] * 32
    # u0 prefers a large first coordinate, u1 a small one
    for i, user in enumerate(users):
        if (chosen[i, 0] < rejected[i, 0]) == (user == "u0"):
            chosen[i], rejected[i] = rejected[i].clone(), chosen[i].clone()
    data = Dataset.from_dict(
        {"user_id": users, "chosen_features": chosen.tolist(), "rejected_features": rejected.tolist()}
    )
    trainer = PalRewardTrainer(
        model,
        make_args(
            tmp_path, num_train_epochs=40, learning_rate=1e-2, prototype_learning_rate=5e-2, user_learning_rate=5e-2
        ),
        train_dataset=data,
    )
    trainer.train()
    assert trainer.evaluate(data)["eval_accuracy"] > 0.85


# ---------------------------------------------------------------- new users
def test_adapt_users_fits_new_users_and_leaves_known_users_bit_identical(tmp_path, demo_dataset, demo_tokenizer):
    model = tiny_model("bert", vocab_size=len(demo_tokenizer), variant="b", num_prototypes=4, preference_dim=16)
    args = make_args(tmp_path, num_train_epochs=20, per_device_train_batch_size=32, learning_rate=3e-3)
    trainer = PalRewardTrainer(model, args, train_dataset=demo_dataset["train"], processing_class=demo_tokenizer)
    trainer.train()
    model.eval()
    test = demo_dataset["test"]
    seen_users = test["user_id"]
    before_rewards = model.score_texts(demo_tokenizer, test["prompt"], test["chosen"], users=seen_users)
    before_table = model.user_weights.weight.detach().clone()
    # Adaptation writes the new users' rows and their posteriors (`users.posterior_*`); nothing else may change.
    changed = (
        "users.logits.weight",
        "users.posterior_rows",
        "users.posterior_covariance",
        "users.posterior_comparisons",
    )
    before_state = {k: v.clone() for k, v in model.state_dict().items() if k not in changed}
    with pytest.raises(ValueError, match="users the model does not know.*adapt_users"):
        trainer.evaluate(demo_dataset["unseen_test"])
    result = trainer.adapt_users(demo_dataset["unseen_train"])
    new_users = list(dict.fromkeys(demo_dataset["unseen_train"]["user_id"]))
    assert result["users"] == new_users
    assert model.config.user_ids[-len(new_users) :] == new_users
    assert torch.equal(model.user_weights.weight[: before_table.shape[0]], before_table)
    for key, value in model.state_dict().items():
        if key not in changed:
            assert torch.equal(value, before_state[key]), key
    assert model.users.posterior_rows.tolist() == result["rows"]
    after_rewards = model.score_texts(demo_tokenizer, test["prompt"], test["chosen"], users=seen_users)
    assert torch.equal(before_rewards, after_rewards)
    unseen = trainer.evaluate(demo_dataset["unseen_test"], metric_key_prefix="unseen")
    assert unseen["unseen_accuracy"] > 0.75, unseen
    assert trainer.adapt_users(demo_dataset["unseen_train"])["users"] == []  # nothing new the second time


def _two_taste_features(num_users, pairs, seed, prefix):
    """Feature comparisons where even users prefer a large first coordinate and odd users a small one."""
    generator = torch.Generator().manual_seed(seed)
    chosen, rejected = (
        torch.randn(num_users * pairs, 4, generator=generator),
        torch.randn(num_users * pairs, 4, generator=generator),
    )
    users = [f"{prefix}{i % num_users}" for i in range(num_users * pairs)]
    for i in range(len(users)):
        if (chosen[i, 0] < rejected[i, 0]) == (int(users[i][len(prefix) :]) % 2 == 0):
            chosen[i], rejected[i] = rejected[i].clone(), chosen[i].clone()
    return Dataset.from_dict(
        {"user_id": users, "chosen_features": chosen.tolist(), "rejected_features": rejected.tolist()}
    )


@pytest.mark.parametrize("similarity", ["neg_sq_l2", "dot", "neg_l2", "cosine"])
def test_adapt_users_every_similarity_and_known_users_in_the_data(tmp_path, similarity):
    """Fits new users for every similarity (the linear fast path of neg_sq_l2/dot and the general one); rows of
    already-known users in the adaptation data are ignored and those users are left untouched."""
    from pal_rm import PalConfig, PalRewardModel

    torch.manual_seed(0)
    model = PalRewardModel(PalConfig(feature_dim=4, num_prototypes=2, preference_dim=4, similarity=similarity))
    train = _two_taste_features(4, 40, seed=0, prefix="seen")
    args = make_args(
        tmp_path,
        num_train_epochs=30,
        per_device_train_batch_size=32,
        learning_rate=2e-2,
        prototype_learning_rate=5e-2,
        user_learning_rate=5e-2,
    )
    trainer = PalRewardTrainer(model, args, train_dataset=train)
    trainer.train()
    known = model.user_weights.weight.detach().clone()
    new = _two_taste_features(4, 20, seed=1, prefix="new")
    mixed = concatenate_datasets([new, train.select(range(8))])
    result = trainer.adapt_users(mixed)
    assert result["users"] == [f"new{i}" for i in range(4)]
    assert torch.equal(model.user_weights.weight[: known.shape[0]], known)
    test = _two_taste_features(4, 50, seed=2, prefix="new")
    assert trainer.evaluate(test)["eval_accuracy"] > 0.8


def test_linear_reward_difference_identity():
    """For neg_sq_l2 and dot, s(c, sum_k w_k p_k) - s(r, sum_k w_k p_k) = sum_k w_k (s(c, p_k) - s(r, p_k))."""
    from pal_rm import PalConfig, PalRewardModel

    generator = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randn(16, 5, generator=generator), torch.randn(16, 5, generator=generator)
    points = torch.randn(16, 3, 5, generator=generator)
    weights = torch.softmax(torch.randn(16, 3, generator=generator), -1)
    for similarity in ("neg_sq_l2", "dot"):
        model = PalRewardModel(PalConfig(feature_dim=5, num_prototypes=3, preference_dim=5, similarity=similarity))
        ideal = torch.einsum("bk,bkd->bd", weights, points)
        direct = model.similarity(chosen, ideal) - model.similarity(rejected, ideal)
        per_prototype = model.similarity(chosen.unsqueeze(1), points) - model.similarity(rejected.unsqueeze(1), points)
        torch.testing.assert_close(direct, (weights * per_prototype).sum(-1), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- bad input
def test_missing_user_column(tmp_path, word_tokenizer):
    data = rows().remove_columns("user_id")
    with pytest.raises(ValueError, match="no user column 'user_id'.*user_column"):
        PalRewardTrainer(
            tiny_model(vocab_size=len(word_tokenizer)),
            make_args(tmp_path),
            train_dataset=data,
            processing_class=word_tokenizer,
        )


@pytest.mark.parametrize("bad_user", ["", None, "   "])
def test_missing_or_empty_user_id(tmp_path, word_tokenizer, bad_user):
    data = rows().to_list()
    data[2]["user_id"] = bad_user
    with pytest.raises(ValueError, match="Row 2 of the train dataset has a missing or empty user id"):
        PalRewardTrainer(
            tiny_model(vocab_size=len(word_tokenizer)),
            make_args(tmp_path),
            train_dataset=Dataset.from_list(data),
            processing_class=word_tokenizer,
        )


def test_empty_or_non_string_text(tmp_path, word_tokenizer):
    data = rows().to_list()
    data[1]["rejected"] = ""
    with pytest.raises(ValueError, match="Empty response \\(row 1\\)"):
        PalRewardTrainer(
            tiny_model(vocab_size=len(word_tokenizer)),
            make_args(tmp_path),
            train_dataset=Dataset.from_list(data),
            processing_class=word_tokenizer,
        )
    data = rows().to_dict()
    data["chosen"] = [1, 2, 3, 4]
    with pytest.raises(ValueError, match="must be strings or lists of messages \\(row 0\\)"):
        PalRewardTrainer(
            tiny_model(vocab_size=len(word_tokenizer)),
            make_args(tmp_path),
            train_dataset=Dataset.from_dict(data),
            processing_class=word_tokenizer,
        )


def test_row_without_rejected(tmp_path, word_tokenizer):
    with pytest.raises(ValueError, match="no 'rejected' column"):
        PalRewardTrainer(
            tiny_model(vocab_size=len(word_tokenizer)),
            make_args(tmp_path),
            train_dataset=rows().remove_columns("rejected"),
            processing_class=word_tokenizer,
        )


def test_unknown_users_at_evaluation(tmp_path, word_tokenizer):
    trainer = PalRewardTrainer(
        tiny_model(vocab_size=len(word_tokenizer)),
        make_args(tmp_path),
        train_dataset=rows(),
        processing_class=word_tokenizer,
    )
    with pytest.raises(ValueError, match="1 users the model does not know.*unknown_users='population'"):
        trainer.evaluate(rows(users=("carol",)))
    trainer = PalRewardTrainer(
        tiny_model(vocab_size=len(word_tokenizer)),
        make_args(tmp_path, unknown_users="population"),
        train_dataset=rows(),
        processing_class=word_tokenizer,
    )
    trainer.evaluate(rows(users=("carol",)))
    assert set(trainer.per_user_accuracy["eval"]) == {"<population>"}


def test_pal_b_needs_a_prompt(tmp_path, word_tokenizer):
    data = rows().to_list()
    data[3]["prompt"] = ""
    with pytest.raises(ValueError, match="Row 3 of the train dataset has no prompt"):
        PalRewardTrainer(
            tiny_model(vocab_size=len(word_tokenizer), variant="b"),
            make_args(tmp_path),
            train_dataset=Dataset.from_list(data),
            processing_class=word_tokenizer,
        )


def test_implicit_prompt_is_extracted_for_pal_b(tmp_path, word_tokenizer):
    data = Dataset.from_dict(
        {
            "user_id": ["a", "b"],
            "chosen": ["what is this the fox", "hello yes"],
            "rejected": ["what is this a dog", "hello no"],
        }
    )
    trainer = PalRewardTrainer(
        tiny_model(vocab_size=len(word_tokenizer), variant="b"),
        make_args(tmp_path),
        train_dataset=data,
        processing_class=word_tokenizer,
    )
    assert all(index >= 0 for index in trainer.train_dataset["prompt_index"])


def test_wrong_model_and_args_types(tmp_path):
    with pytest.raises(TypeError, match="must be a `PalRewardModel`"):
        PalRewardTrainer(torch.nn.Linear(2, 2), make_args(tmp_path), train_dataset=rows())


def test_conversational_data_and_norm_bound(tmp_path, word_tokenizer):
    data = Dataset.from_dict(
        {
            "user_id": ["a", "b", "a", "b"],
            "prompt": [[{"role": "user", "content": "what is this"}]] * 4,
            "chosen": [[{"role": "assistant", "content": "the quick fox"}]] * 4,
            "rejected": [[{"role": "assistant", "content": "a lazy dog"}]] * 4,
        }
    )
    model = tiny_model(vocab_size=len(word_tokenizer), variant="b")
    args = make_args(tmp_path, norm_bound=0.01, norm_bound_coefficient=10.0, max_steps=3)
    trainer = PalRewardTrainer(model, args, train_dataset=data, processing_class=word_tokenizer)
    assert len(trainer.feature_store) == 3  # one prompt and two conversations, each encoded once
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    with torch.no_grad():
        bounded = trainer.compute_loss(model, dict(inputs))
        trainer.args.norm_bound = None
        unbounded = trainer.compute_loss(model, dict(inputs))
    assert bounded > unbounded  # the ideal points lie outside the tiny ball, so the penalty is added
    trainer.args.norm_bound = 0.01
    trainer.train()


def test_evaluation_accuracy_is_exact_with_an_uneven_last_batch(tmp_path):
    """Batches of 8 pairs over 13 pairs with different accuracies: the mean of batch means would be wrong; the
    trainer's accuracy, margin and per-user figures equal those computed from the model's own rewards."""
    from pal_rm import PalConfig, PalRewardModel
    from pal_rm.metrics import per_user_accuracy, personalized_preference_metrics

    torch.manual_seed(0)
    model = PalRewardModel(PalConfig(feature_dim=4, num_prototypes=2, preference_dim=4))
    generator = torch.Generator().manual_seed(0)
    data = Dataset.from_dict(
        {
            "user_id": [f"u{i % 3}" for i in range(13)],
            "chosen_features": torch.randn(13, 4, generator=generator).tolist(),
            "rejected_features": torch.randn(13, 4, generator=generator).tolist(),
        }
    )
    trainer = PalRewardTrainer(model, make_args(tmp_path, per_device_eval_batch_size=8), train_dataset=data)
    model.eval()
    users = data["user_id"]

    def reward_differences(dataset):
        with torch.no_grad():
            chosen = model(item_features=torch.tensor(dataset["chosen_features"]), user_ids=users).logits
            rejected = model(item_features=torch.tensor(dataset["rejected_features"]), user_ids=users).logits
        return (chosen - rejected).squeeze(-1)

    # Orient the pairs so the first batch of 8 is all right and the last batch of 5 all wrong.
    wrong_way = (reward_differences(data) > 0) != (torch.arange(13) < 8)
    chosen, rejected = torch.tensor(data["chosen_features"]), torch.tensor(data["rejected_features"])
    data = data.remove_columns(["chosen_features", "rejected_features"])
    data = data.add_column("chosen_features", torch.where(wrong_way[:, None], rejected, chosen).tolist())
    data = data.add_column("rejected_features", torch.where(wrong_way[:, None], chosen, rejected).tolist())
    differences = reward_differences(data)
    metrics = trainer.evaluate(data)
    expected = personalized_preference_metrics(differences.numpy(), users)
    assert expected["accuracy"] == pytest.approx(8 / 13)  # the mean of the two batch means would say 0.5
    assert metrics["eval_accuracy"] == pytest.approx(expected["accuracy"], abs=1e-12)
    assert metrics["eval_margin"] == pytest.approx(differences.mean().item(), abs=1e-5)
    assert metrics["eval_user_accuracy_mean"] == pytest.approx(expected["user_accuracy_mean"], abs=1e-12)
    assert metrics["eval_log_loss"] == pytest.approx(expected["log_loss"], abs=1e-5)
    assert metrics["eval_calibration_error"] == pytest.approx(expected["calibration_error"], abs=1e-5)
    assert trainer.per_user_accuracy["eval"] == pytest.approx(per_user_accuracy(differences.numpy(), users))
