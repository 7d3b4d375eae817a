"""preference_loss against hand-computed values, and its gradient direction."""

from __future__ import annotations

import math

import pytest
import torch

from rlfuse.plugins.loss.dpo import LOSS_TYPES, preference_loss


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def expected(pc, pr, rc, rr, beta, loss_type, eps=0.0, gamma=0.5):
    """The papers' formulas, one pair at a time, in plain Python floats."""
    if loss_type == "simpo":
        z = beta * (pc - pr) - gamma
        return -(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z)
    h = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":
        return -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
    if loss_type == "robust":
        return (-(1 - eps) * log_sigmoid(beta * h) + eps * log_sigmoid(-beta * h)) / (1 - 2 * eps)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return max(0.0, 1 - beta * h)
    raise AssertionError(loss_type)


# (policy_chosen, policy_rejected, ref_chosen, ref_rejected): odd size 5, both signs of h.
PAIRS = [
    (-3.0, -5.0, -4.0, -4.5),
    (-10.0, -2.0, -9.0, -2.5),
    (-1.25, -1.25, -1.0, -1.0),
    (-7.5, -12.0, -7.0, -8.0),
    (-0.5, -30.0, -6.0, -6.0),
]


def tensors(dtype):
    cols = list(zip(*PAIRS, strict=False))
    return [torch.tensor(c, dtype=dtype) for c in cols]


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "ipo", "hinge", "simpo"])
@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hand_computed(loss_type, beta, eps, dtype):
    if eps and loss_type in ("ipo", "hinge"):
        with pytest.raises(ValueError, match="label_smoothing"):
            preference_loss(*tensors(dtype), beta=beta, loss_type=loss_type, label_smoothing=eps)
        return
    pc, pr, rc, rr = tensors(dtype)
    got = preference_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps, simpo_gamma=0.7)
    assert got.shape == (len(PAIRS),) and got.dtype == torch.float32
    # the reference uses the same (possibly bf16-rounded) inputs, in float64
    want = [
        expected(float(a), float(b), float(c), float(d), beta, loss_type, eps, gamma=0.7)
        for a, b, c, d in zip(pc, pr, rc, rr, strict=False)
    ]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32), rtol=1e-5, atol=1e-5)


def test_known_numbers():
    """A few values worked out by hand."""
    one = torch.tensor([0.0])
    # h = 0: DPO = log 2; IPO = (1/(2 beta))^2; hinge = 1
    assert preference_loss(one, one, one, one, beta=0.1).item() == pytest.approx(math.log(2))
    assert preference_loss(one, one, one, one, beta=0.5, loss_type="ipo").item() == pytest.approx(1.0)
    assert preference_loss(one, one, one, one, beta=0.5, loss_type="hinge").item() == pytest.approx(1.0)
    # h = 2, beta = 0.5: hinge reaches 0; IPO (2 - 1)^2 = 1
    two = torch.tensor([2.0])
    assert preference_loss(two, one, one, one, beta=0.5, loss_type="hinge").item() == 0.0
    assert preference_loss(two, one, one, one, beta=0.5, loss_type="ipo").item() == pytest.approx(1.0)
    # robust at h = 0 with eps: [(1-eps) log 2 - eps log 2] / (1 - 2 eps) = log 2
    assert preference_loss(one, one, one, one, beta=1.0, loss_type="robust", label_smoothing=0.2).item() == pytest.approx(math.log(2))
    # simpo: equal averages -> -log sigma(-gamma)
    assert preference_loss(one, one, None, None, beta=2.0, loss_type="simpo", simpo_gamma=1.0).item() == pytest.approx(
        math.log1p(math.e)
    )


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_gradient_pushes_chosen_up_rejected_down(loss_type, eps):
    if eps and loss_type in ("ipo", "hinge"):
        return
    # h < 0 everywhere so the hinge is active; IPO's target 1/(2 beta) is above h too
    pc = torch.tensor([-5.0, -3.0, -8.0], requires_grad=True)
    pr = torch.tensor([-4.0, -2.0, -6.0], requires_grad=True)
    rc = torch.tensor([-4.0, -3.0, -7.0])
    rr = torch.tensor([-4.0, -3.0, -7.0])
    loss = preference_loss(pc, pr, rc, rr, beta=0.5, loss_type=loss_type, label_smoothing=eps).sum()
    loss.backward()
    # gradient descent moves along -grad: chosen log-prob up, rejected down
    assert (pc.grad < 0).all(), pc.grad
    assert (pr.grad > 0).all(), pr.grad
    # reference tensors carry no gradient
    assert not rc.requires_grad


def test_errors():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="loss_type"):
        preference_loss(x, x, x, x, beta=0.1, loss_type="nope")
    with pytest.raises(ValueError, match="beta"):
        preference_loss(x, x, x, x, beta=0.0)
    with pytest.raises(ValueError, match="reference"):
        preference_loss(x, x, None, None, beta=0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss(x, x, x, x, beta=0.1, loss_type="robust", label_smoothing=0.5)
