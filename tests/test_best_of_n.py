import pytest
import torch
from conftest import make_word_tokenizer, tiny_model, tiny_policy

from pal_rm.best_of_n import best_of_n, sample_and_rerank


@pytest.fixture(scope="module")
def tokenizer():
    return make_word_tokenizer(["hello world yes no the quick brown fox jumps over a lazy dog what is this"])


@pytest.fixture(scope="module")
def reward_model(tokenizer):
    model = tiny_model("gpt2", vocab_size=len(tokenizer), variant="a", num_prototypes=2, similarity="dot").eval()
    model.add_users(["alice", "bob"])
    with torch.no_grad():
        model.user_weights.weight.copy_(torch.tensor([[30.0, -30.0], [-30.0, 30.0]]))
        model.prototypes[1] = -model.prototypes[0]
    return model


def test_best_of_n_picks_each_users_favourite(reward_model, tokenizer):
    prompts = ["hello world", "what is this"]
    candidates = [["the quick fox", "a lazy dog", "yes"], ["no", "the brown dog", "jumps over"]]
    alice = best_of_n(reward_model, tokenizer, prompts, candidates, users="alice")
    bob = best_of_n(reward_model, tokenizer, prompts, candidates, users="bob")
    assert alice.rewards.shape == (2, 3)
    assert torch.allclose(alice.rewards, -bob.rewards, atol=1e-4)
    assert alice.best_index == alice.rewards.argmax(1).tolist()
    assert bob.best_index == alice.rewards.argmin(1).tolist()  # opposite tastes: bob picks what alice ranks last
    assert alice.best == [group[i] for group, i in zip(candidates, alice.best_index)]
    assert alice.best_index != bob.best_index
    per_prompt = best_of_n(reward_model, tokenizer, prompts, candidates, users=["alice", "bob"])
    assert per_prompt.best_index == [alice.best_index[0], bob.best_index[1]]
    mixture = best_of_n(reward_model, tokenizer, prompts, candidates, mixture_weights=[1.0, 0.0])
    assert torch.allclose(mixture.rewards, alice.rewards, atol=1e-3)


def test_bad_input(reward_model, tokenizer):
    with pytest.raises(ValueError, match="n >= 1 candidates"):
        best_of_n(reward_model, tokenizer, ["hello"], [[]])
    with pytest.raises(ValueError, match="n >= 1 candidates, got n=0"):
        sample_and_rerank(None, tokenizer, reward_model, tokenizer, ["hello"], n=0)
    with pytest.raises(ValueError, match="same number of candidates"):
        best_of_n(reward_model, tokenizer, ["a", "b"], [["x"], ["y", "z"]])
    with pytest.raises(ValueError, match="must lie on the simplex"):
        best_of_n(reward_model, tokenizer, ["hello"], [["yes", "no"]], mixture_weights=[0.9, 0.9])
    with pytest.raises(KeyError, match="Unknown user 'carol'"):
        best_of_n(reward_model, tokenizer, ["hello"], [["yes", "no"]], users="carol")


def test_sample_and_rerank_with_a_causal_lm(reward_model, tokenizer):
    policy = tiny_policy(tokenizer).eval()
    output = sample_and_rerank(
        policy,
        tokenizer,
        reward_model,
        tokenizer,
        ["hello world", "what is this"],
        n=4,
        users="alice",
        generation_kwargs={"max_new_tokens": 4, "min_new_tokens": 1},
    )
    assert output.rewards.shape == (2, 4) and len(output.candidates[0]) == 4
    check = best_of_n(reward_model, tokenizer, ["hello world", "what is this"], output.candidates, users="alice")
    assert output.best_index == check.best_index
