import math

import pytest
import torch

from pal_rm.losses import btl_loss, hinge_loss, norm_bound_penalty, preference_loss


def test_btl_loss_matches_formula():
    chosen = torch.tensor([2.0, 0.0, -1.0])
    rejected = torch.tensor([1.0, 0.0, 1.0])
    expected = sum(-math.log(1 / (1 + math.exp(-(c - r)))) for c, r in zip(chosen.tolist(), rejected.tolist())) / 3
    assert btl_loss(chosen, rejected).item() == pytest.approx(expected, rel=1e-6)


def test_btl_loss_margin_shifts_difference():
    chosen, rejected = torch.randn(5), torch.randn(5)
    margin = torch.rand(5)
    assert torch.allclose(btl_loss(chosen, rejected, margin), btl_loss(chosen - margin, rejected))


def test_hinge_loss_is_zero_beyond_margin():
    assert hinge_loss(torch.tensor([3.0]), torch.tensor([1.0])).item() == 0.0
    assert hinge_loss(torch.tensor([1.0]), torch.tensor([1.0])).item() == pytest.approx(1.0)


def test_norm_bound_penalty_only_outside_ball():
    points = torch.tensor([[3.0, 4.0], [0.3, 0.4]])  # norms 5 and 0.5
    assert norm_bound_penalty(points, bound=1.0).item() == pytest.approx((5.0 - 1.0) / 2)


def test_btl_loss_gradient_pushes_chosen_up():
    chosen = torch.zeros(4, requires_grad=True)
    btl_loss(chosen, torch.zeros(4)).backward()
    assert (chosen.grad < 0).all()


def test_unknown_loss_type():
    with pytest.raises(ValueError, match="Unknown `loss_type` 'square'"):
        preference_loss("square", torch.zeros(1), torch.zeros(1))
