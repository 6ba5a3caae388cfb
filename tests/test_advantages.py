import math

import torch

from tuneoff.advantages import gae, group_advantages, masked_mean, rloo_advantages, whiten


def test_gae_four_steps_hand_computed():
    # γ = 1, λ = 0.5. δ3 = 1 − 0.8 = 0.2; δ2 = 0.8 − 0.6 = 0.2; δ1 = 0.6 − 0.4 = 0.2; δ0 = 0.4 − 0.5 = −0.1
    # A3 = 0.2; A2 = 0.2 + 0.5·0.2 = 0.3; A1 = 0.2 + 0.5·0.3 = 0.35; A0 = −0.1 + 0.5·0.35 = 0.075
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.4, 0.6, 0.8]])
    advantages, returns = gae(rewards, values, torch.ones(1, 4), gamma=1.0, lam=0.5)
    assert torch.allclose(advantages, torch.tensor([[0.075, 0.35, 0.3, 0.2]]))
    assert torch.allclose(returns, torch.tensor([[0.575, 0.75, 0.9, 1.0]]))


def test_gae_discount_and_masked_tail():
    # γ = 0.9, λ = 1: A_t = Σ γ^k r_{t+k} − V_t (Monte-Carlo); row 2 ends after 2 tokens, later entries are ignored.
    rewards = torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 2.0, 9.0, 9.0]])
    values = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=1.0)
    assert torch.allclose(advantages[0], torch.tensor([1 + 0.81 * 2, 0.9 * 2, 2.0, 0.0]))
    # row 2: δ1 = 2 + 0 − 1 = 1, A1 = 1; δ0 = 0 + 0.9·1 − 1 = −0.1, A0 = −0.1 + 0.9·1 = 0.8
    assert torch.allclose(advantages[1], torch.tensor([0.8, 1.0, 0.0, 0.0]))
    assert torch.allclose(returns[1], torch.tensor([1.8, 2.0, 0.0, 0.0]))


def test_whiten_and_masked_mean():
    x = torch.tensor([1.0, 2.0, 3.0, 100.0])
    mask = torch.tensor([1, 1, 1, 0])
    assert masked_mean(x, mask).item() == 2.0
    std = math.sqrt(2 / 3)  # population variance of 1, 2, 3
    assert torch.allclose(whiten(x, mask), torch.tensor([-1 / std, 0.0, 1 / std, 0.0]), atol=1e-5)
    assert torch.allclose(
        whiten(x, mask, shift_mean=False), torch.tensor([-1 / std + 2, 2.0, 1 / std + 2, 0.0]), atol=1e-5
    )


def test_rloo_baseline_hand_computed():
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0])
    assert torch.allclose(rloo_advantages(scores, k=2), torch.tensor([-1.0, 1.0, -3.0, 3.0]))
    # k = 4: the baseline of the first sample is (2 + 3 + 6) / 3
    assert torch.allclose(rloo_advantages(scores, k=4)[0], torch.tensor(1.0 - 11.0 / 3.0))


def test_group_baseline_hand_computed():
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0])  # mean 3, sample std sqrt(14/3)
    std = math.sqrt(14 / 3)
    expected = torch.tensor([-2.0, -1.0, 0.0, 3.0]) / std
    assert torch.allclose(group_advantages(scores, k=4), expected, atol=1e-3)
    assert torch.allclose(group_advantages(scores, k=4, scale=False), torch.tensor([-2.0, -1.0, 0.0, 3.0]))


def test_whiten_over_processes_uses_the_whole_batch():
    """Two halves of a batch, each whitened with sums over both (as two processes would), equal the whole batch
    whitened at once: mean 2.5 and population variance 1.25 of 1, 2, 3, 4 (the masked 100 not counted)."""
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [100.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 1], [0, 0]])
    halves = [(x[:1], mask[:1]), (x[1:], mask[1:])]

    def across(i):  # the sum of a statistic over both halves: what an all-reduce gives process i
        def total(t):
            return t + other_statistic[i].pop(0)

        return total

    # the other half's sums in the order whiten asks for them: mask count, sum of x, sum of squared deviations
    other_statistic = {
        0: [torch.tensor(2.0), torch.tensor(3.0 + 4.0), torch.tensor(0.25 + 2.25)],
        1: [torch.tensor(2.0), torch.tensor(3.0), torch.tensor(2.25 + 0.25)],
    }
    std = math.sqrt(1.25)
    parts = [whiten(h, m, sum_across=across(i)) for i, (h, m) in enumerate(halves)]
    expected = torch.tensor([[-1.5, -0.5], [0.5, 1.5], [0.0, 0.0]]) / std
    assert torch.allclose(torch.cat(parts), expected, atol=1e-6)
    assert torch.allclose(whiten(x, mask), expected, atol=1e-6)
