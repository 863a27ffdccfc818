import pickle

import pytest
import torch
from conftest import make_word_tokenizer, tiny_model, tiny_policy
from datasets import Dataset

from pal_rm import PalRewardFunction

WORDS = "hello world yes no the quick brown fox jumps over a lazy dog what is this say something nice please"
PROMPT_USER = {"say something nice": "alice", "what is this": "bob", "hello world": "alice", "please say yes": "bob"}


@pytest.fixture(scope="module")
def tokenizer():
    return make_word_tokenizer([WORDS])


def opposed_reward_model(tokenizer, variant="a"):
    """alice's ideal point is prototype 0, bob's prototype 1 = -prototype 0: with `dot`, bob's reward is -alice's."""
    model = tiny_model("gpt2", vocab_size=len(tokenizer), variant=variant, num_prototypes=2, similarity="dot").eval()
    model.add_users(["alice", "bob"])
    with torch.no_grad():
        model.user_weights.weight.copy_(torch.tensor([[30.0, -30.0], [-30.0, 30.0]]))
        if variant == "a":
            model.prototypes[1] = -model.prototypes[0]
    return model


class RecordingReward(PalRewardFunction):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def __call__(self, prompts, completions, **columns):
        rewards = super().__call__(prompts, completions, **columns)
        self.calls.append((list(prompts), list(columns["user_id"]), list(completions), rewards))
        return rewards


def test_rewards_per_row_user_and_opposed_users(tokenizer):
    reward = PalRewardFunction(opposed_reward_model(tokenizer), tokenizer)
    prompts = ["hello world", "hello world", "what is this", "what is this"]
    completions = ["the quick fox", "a lazy dog", "the quick fox", "a lazy dog"]
    alice = reward(prompts, completions, user_id=["alice"] * 4)
    bob = reward(prompts, completions, user_id=["bob"] * 4)
    mixed = reward(prompts, completions, user_id=["alice", "bob", "alice", "bob"])
    assert all(isinstance(value, float) for value in alice)
    assert alice == pytest.approx([-value for value in bob], abs=1e-4)
    assert mixed == pytest.approx([alice[0], bob[1], alice[2], bob[3]], abs=1e-5)
    assert alice != pytest.approx(bob, abs=1e-3)


def test_mixture_and_population(tokenizer):
    model = opposed_reward_model(tokenizer)
    prompts, completions = ["hello world"] * 2, ["the quick fox", "a lazy dog"]
    half = PalRewardFunction(model, tokenizer, mixture=[0.5, 0.5])(prompts, completions)
    assert half == pytest.approx([0.0, 0.0], abs=1e-4)  # the two prototypes cancel
    population = PalRewardFunction(model, tokenizer, user_column=None)(prompts, completions, user_id=["alice"] * 2)
    expected = model.score_texts(tokenizer, prompts, completions).tolist()
    assert population == pytest.approx(expected, abs=1e-6)


def test_conversational_prompts(tokenizer):
    reward = PalRewardFunction(opposed_reward_model(tokenizer, variant="b"), tokenizer)
    prompts = [[{"role": "user", "content": "hello world"}]] * 2
    completions = [[{"role": "assistant", "content": "the quick fox"}], [{"role": "assistant", "content": "a dog"}]]
    values = reward(prompts, completions, user_id=["alice", "bob"])
    assert len(values) == 2 and all(isinstance(v, float) for v in values)


def test_picklable(tokenizer):
    reward = PalRewardFunction(opposed_reward_model(tokenizer), tokenizer)
    clone = pickle.loads(pickle.dumps(reward))
    args = (["hello world"], ["the quick fox"])
    assert clone(*args, user_id=["bob"]) == pytest.approx(reward(*args, user_id=["bob"]))
    assert not isinstance(reward, torch.nn.Module) and reward.__name__ == "pal_reward"


def test_bad_input(tokenizer):
    model = opposed_reward_model(tokenizer)
    reward = PalRewardFunction(model, tokenizer)
    with pytest.raises(ValueError, match="no 'user_id' column.*mixture="):
        reward(["hello world"], ["the quick fox"])
    with pytest.raises(KeyError, match="Unknown user 'carol'"):
        reward(["hello world"], ["the quick fox"], user_id=["carol"])
    assert PalRewardFunction(model, tokenizer, unknown_users="population")(
        ["hello world"], ["the quick fox"], user_id=["carol"]
    ) == pytest.approx(model.score_texts(tokenizer, ["hello world"], ["the quick fox"]).tolist())
    with pytest.raises(ValueError, match="must lie on the simplex"):
        PalRewardFunction(model, tokenizer, mixture=[0.7, 0.7])
    with pytest.raises(ValueError, match="does not match the backbone"):
        PalRewardFunction(tiny_model("gpt2", vocab_size=4), tokenizer)


# ---------------------------------------------------------------- real TRL online trainers
def prompt_dataset():
    prompts = list(PROMPT_USER)
    return Dataset.from_dict({"prompt": prompts, "user_id": [PROMPT_USER[p] for p in prompts]})


def common_args(tmp_path):
    return {
        "output_dir": str(tmp_path),
        "per_device_train_batch_size": 4,
        "num_generations": 2,
        "max_completion_length": 4,
        "max_steps": 2,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "report_to": "none",
        "use_cpu": True,
        "bf16": False,
        "save_strategy": "no",
        "disable_tqdm": True,
    }


def check_calls(reward: RecordingReward, tokenizer):
    assert len(reward.calls) >= 2  # one call per step
    for prompts, users, completions, rewards in reward.calls:
        assert users == [PROMPT_USER[prompt] for prompt in prompts]  # the right user for every completion
        model = reward.model
        alice = model.score_texts(tokenizer, prompts, completions, users="alice", allow_empty_responses=True).tolist()
        bob = model.score_texts(tokenizer, prompts, completions, users="bob", allow_empty_responses=True).tolist()
        assert alice == pytest.approx([-value for value in bob], abs=1e-4)  # opposite preferences
        assert rewards == pytest.approx([a if u == "alice" else b for a, b, u in zip(alice, bob, users)], abs=1e-4)


def test_grpo_trainer_with_pal_reward(tmp_path, tokenizer):
    from trl import GRPOConfig, GRPOTrainer

    reward = RecordingReward(opposed_reward_model(tokenizer), tokenizer)
    trainer = GRPOTrainer(
        model=tiny_policy(tokenizer),
        reward_funcs=[reward],
        args=GRPOConfig(**common_args(tmp_path)),
        train_dataset=prompt_dataset(),
        processing_class=tokenizer,
    )
    trainer.train()
    check_calls(reward, tokenizer)


def test_rloo_trainer_with_pal_reward(tmp_path, tokenizer):
    from trl import RLOOConfig, RLOOTrainer

    reward = RecordingReward(opposed_reward_model(tokenizer), tokenizer)
    trainer = RLOOTrainer(
        model=tiny_policy(tokenizer),
        reward_funcs=[reward],
        args=RLOOConfig(**common_args(tmp_path), beta=0.0),  # no reference model: the policy is built in code
        train_dataset=prompt_dataset(),
        processing_class=tokenizer,
    )
    trainer.train()
    check_calls(reward, tokenizer)


@pytest.mark.parametrize("trainer_name", ["grpo", "rloo"])
def test_pal_a_model_as_reward_model_gives_population_reward(tmp_path, tokenizer, trainer_name):
    """A PAL-A model passed to TRL as a reward model scores each completion with the population reward, and gives
    exactly the reward `PalRewardFunction` (so `score_texts`) gives the same completion: TRL tokenizes `prompt +
    completion` without special tokens or EOS, and the model brings those ids to the form it was trained on."""
    import trl

    model = opposed_reward_model(tokenizer)
    with torch.no_grad():
        model.population_mixture.copy_(torch.tensor([0.9, 0.1]))
    direct, through_function = [], []

    def record(module, args, kwargs, output):
        if kwargs.get("input_ids") is not None:  # TRL's own call on token ids (the reward function passes features)
            direct.append(output)

    model.register_forward_hook(record, with_kwargs=True)

    class Recording(PalRewardFunction):
        def __call__(self, prompts, completions, **columns):
            rewards = super().__call__(prompts, completions, **columns)
            through_function.append(torch.tensor(rewards))
            return rewards

    config_class, trainer_class = {
        "grpo": (trl.GRPOConfig, trl.GRPOTrainer),
        "rloo": (trl.RLOOConfig, trl.RLOOTrainer),
    }[trainer_name]
    extra = {"beta": 0.0} if trainer_name == "rloo" else {}
    trainer = trainer_class(
        model=tiny_policy(tokenizer),
        reward_funcs=[model, Recording(model, tokenizer, user_column=None, name="population")],
        reward_processing_classes=[tokenizer, None],
        args=config_class(**common_args(tmp_path), **extra),
        train_dataset=prompt_dataset(),
        processing_class=tokenizer,
    )
    trainer.train()
    assert len(direct) >= 2 and len(direct) == len(through_function)  # TRL called the model itself, once per step
    for output, expected in zip(direct, through_function):
        assert torch.allclose(output.mixture_weights, torch.tensor([0.9, 0.1]).expand_as(output.mixture_weights))
        torch.testing.assert_close(output.logits.squeeze(-1), expected, rtol=1e-5, atol=1e-5)
    assert any(key.startswith("rewards/") for key in trainer.state.log_history[0])


def test_pal_b_model_as_reward_model_points_to_reward_function(tmp_path, tokenizer):
    from trl import GRPOConfig, GRPOTrainer

    trainer = GRPOTrainer(
        model=tiny_policy(tokenizer),
        reward_funcs=[opposed_reward_model(tokenizer, variant="b")],
        reward_processing_classes=[tokenizer],
        args=GRPOConfig(**common_args(tmp_path)),
        train_dataset=prompt_dataset(),
        processing_class=tokenizer,
    )
    with pytest.raises(ValueError, match="PAL-B model.*PalRewardFunction"):
        trainer.train()


def test_prompt_column_and_name(tokenizer):
    """`prompt_column` scores against a dataset column; conversational completions are scored on their text."""
    model = opposed_reward_model(tokenizer, variant="b")
    plain = PalRewardFunction(model, tokenizer)(
        ["hello world"] * 2, ["the quick fox", "a lazy dog"], user_id=["alice"] * 2
    )
    chat_prompts = [[{"role": "user", "content": "please say yes"}]] * 2
    chat_completions = [
        [{"role": "assistant", "content": "the quick fox"}],
        [{"role": "assistant", "content": "a lazy dog"}],
    ]
    reward = PalRewardFunction(model, tokenizer, prompt_column="request", name="pal_alice")
    assert reward.__name__ == "pal_alice"
    rewards = reward(chat_prompts, chat_completions, user_id=["alice"] * 2, request=["hello world"] * 2)
    assert rewards == pytest.approx(plain, abs=1e-5)
    with pytest.raises(ValueError, match="no 'request' column"):
        reward(chat_prompts, chat_completions, user_id=["alice"] * 2)
