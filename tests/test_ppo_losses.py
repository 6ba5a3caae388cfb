import math

import torch

from tuneoff.losses import kl_k1, kl_k3, ppo_policy_loss, ppo_value_loss


def test_kl_estimators():
    logp, ref = torch.tensor([-1.0, -0.5]), torch.tensor([-2.0, -0.5])
    assert torch.allclose(kl_k1(logp, ref), torch.tensor([1.0, 0.0]))
    # k3 with ρ = ref − logp = −1: e^{−1} + 1 − 1
    assert torch.allclose(kl_k3(logp, ref), torch.tensor([math.exp(-1.0), 0.0]))


def test_clipped_policy_loss_hand_computed():
    # ratios 1.5 and 0.5, advantages 1, ε = 0.2: −Aρ = (−1.5, −0.5); −A·clip(ρ) = (−1.2, −0.8); max = (−1.2, −0.5)
    old = torch.zeros(1, 2)
    logp = torch.log(torch.tensor([[1.5, 0.5]]))
    loss, clipfrac, approx_kl = ppo_policy_loss(logp, old, torch.ones(1, 2), torch.ones(1, 2), clip=0.2)
    assert abs(loss.item() - (-0.85)) < 1e-6
    assert abs(clipfrac.item() - 0.5) < 1e-6
    assert abs(approx_kl.item() - 0.25 * (math.log(1.5) ** 2 + math.log(0.5) ** 2)) < 1e-6
    # a negative advantage with ratio 0.5: −Aρ = 0.5, −A·clip = 0.8 -> the pessimistic 0.8
    loss, _, _ = ppo_policy_loss(
        torch.log(torch.tensor([[0.5]])), torch.zeros(1, 1), -torch.ones(1, 1), torch.ones(1, 1), 0.2
    )
    assert abs(loss.item() - 0.8) < 1e-6


def test_clipped_value_loss_hand_computed():
    # V = (1, 0), V_old = (0.5, 0.5), R = (2, 0), ε = 0.2: clipped V = (0.7, 0.3)
    # unclipped (1, 0), clipped (1.69, 0.09) -> ½·mean(max) = ½·(1.69 + 0.09)/2 = 0.445
    loss, clipfrac = ppo_value_loss(
        torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5]]), torch.tensor([[2.0, 0.0]]), torch.ones(1, 2), clip=0.2
    )
    assert abs(loss.item() - 0.445) < 1e-6 and clipfrac.item() == 1.0


def test_masked_entries_contribute_nothing():
    logp = torch.tensor([[-1.0, -1.0, 50.0]])
    old = torch.tensor([[-1.2, -0.8, -30.0]])
    adv = torch.tensor([[1.0, -1.0, 1e6]])
    mask = torch.tensor([[1, 1, 0]])
    full = ppo_policy_loss(logp, old, adv, mask, 0.2)
    trimmed = ppo_policy_loss(logp[:, :2], old[:, :2], adv[:, :2], mask[:, :2], 0.2)
    assert all(torch.allclose(a, b) for a, b in zip(full, trimmed))
    v = ppo_value_loss(
        torch.tensor([[1.0, 2.0, 1e5]]), torch.tensor([[1.0, 2.0, -1e5]]), torch.tensor([[0.0, 0.0, 3.0]]), mask, 0.2
    )
    assert abs(v[0].item() - 0.5 * (1.0 + 4.0) / 2) < 1e-5
