import pytest
import torch
from conftest import tiny_model
from trl.experimental.utils import get_reward

PAD = 0


def query_responses():
    # two prompts of 3 tokens, responses of 3 and 2 tokens, right-padded with PAD
    return torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, PAD]])


@pytest.mark.parametrize("target", [None, "bob", [0.25, 0.25, 0.5]])
def test_get_reward_matches_forward_for_pal_a(target):
    model = tiny_model("gpt2", variant="a").eval()
    model.add_users(["alice", "bob"])
    with torch.no_grad():
        model.user_weights.weight[1] = torch.tensor([2.0, -1.0, 0.5])
    if target == "bob":
        model.set_default_mixture(user_id="bob")
    elif target is not None:
        model.set_default_mixture(mixture_weights=target)
    sequences = query_responses()
    _, final_rewards, lengths = get_reward(model, sequences, PAD, context_length=3)
    assert lengths.tolist() == [5, 4]
    attention_mask = (sequences != PAD).long()
    with torch.no_grad():
        if target == "bob":
            expected = model(input_ids=sequences, attention_mask=attention_mask, user_ids=["bob", "bob"]).logits
        elif target is not None:
            expected = model(input_ids=sequences, attention_mask=attention_mask, mixture_weights=target).logits
        else:
            expected = model(input_ids=sequences, attention_mask=attention_mask).logits
    assert final_rewards.tolist() == pytest.approx(expected.squeeze(-1).tolist(), abs=1e-5)
    model.set_default_mixture()
    assert model.default_mixture is None


def test_get_reward_on_pal_b_points_to_reward_function():
    model = tiny_model("gpt2", variant="b").eval()
    with pytest.raises(ValueError, match="PAL-B model.*PalRewardFunction"):
        get_reward(model, query_responses(), PAD, context_length=3)


def test_score_needs_last_token_pooling():
    model = tiny_model("bert", variant="a").eval()
    with pytest.raises(ValueError, match="only for `pooling='last'`"):
        model.score(torch.randn(1, 4, 32))
