import math

import torch

from tuneoff.losses import IGNORE, sft_loss, sft_loss_sum, shift_targets


def test_shift_targets():
    labels = torch.tensor([[IGNORE, 5, 6, IGNORE], [IGNORE, IGNORE, 7, 8]])
    assert shift_targets(labels).tolist() == [[5, 6, IGNORE, IGNORE], [IGNORE, 7, 8, IGNORE]]


def test_sft_loss_hand_computed():
    # Two positions over a 2-token vocabulary. Position 0: logits (0, 0), target 1 -> -log(1/2) = log 2.
    # Position 1: logits (ln 3, 0), target 0 -> p = 3/4 -> -log(3/4). Position 2 is ignored.
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [5.0, -5.0]])
    targets = torch.tensor([1, 0, IGNORE])
    expected_sum = math.log(2.0) - math.log(0.75)
    assert abs(sft_loss_sum(logits, targets).item() - expected_sum) < 1e-6
    assert abs(sft_loss(logits, targets).item() - expected_sum / 2) < 1e-6


def test_sft_loss_gradient_hand_computed_and_equal_to_cross_entropy():
    """The fused backward: d/dz of Σ NLL is softmax(z) − onehot(y) on counted rows, 0 on ignored ones."""
    import torch.nn.functional as F

    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [5.0, -5.0]], requires_grad=True)
    targets = torch.tensor([1, 0, IGNORE])
    (2.0 * sft_loss_sum(logits * 1.0, targets)).backward()  # * 1.0: an intermediate, as an LM head's output
    expected = 2.0 * torch.tensor([[0.5, -0.5], [0.75 - 1.0, 0.25], [0.0, 0.0]])
    assert torch.allclose(logits.grad, expected, atol=1e-6)
    torch.manual_seed(0)
    z = torch.randn(7, 50, requires_grad=True)
    y = torch.randint(0, 50, (7,))
    y[3] = IGNORE
    ours = sft_loss_sum(z * 1.0, y)  # z * 1.0: the fused backward overwrites its input, here a temporary
    ours.backward()
    reference_z = z.detach().clone().requires_grad_(True)
    reference = F.cross_entropy(reference_z, y, ignore_index=IGNORE, reduction="sum")
    reference.backward()
    assert torch.allclose(ours, reference, atol=1e-5) and torch.allclose(z.grad, reference_z.grad, atol=1e-6)


def test_sft_loss_matches_transformers_loss(tiny_tokenizer):
    """Parity: our shifted, masked loss equals transformers' own LM loss with -100 labels."""
    from tuneoff.models.load import load_model

    torch.manual_seed(0)
    model = load_model("tiny")
    input_ids = torch.randint(5, 4000, (3, 12))
    labels = input_ids.clone()
    labels[:, :5] = IGNORE  # a masked prompt
    labels[2, 9:] = IGNORE  # a shorter completion
    reference = model(input_ids=input_ids, labels=labels).loss
    ours = sft_loss(model(input_ids=input_ids).logits, shift_targets(labels))
    assert torch.allclose(ours, reference, atol=1e-6), (ours, reference)


def test_bradley_terry_loss_hand_computed():
    from tuneoff.losses import bradley_terry_loss

    r_chosen, r_rejected = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0])
    # -log σ(2) = log(1 + e^-2) = 0.126928; -log σ(0) = log 2 = 0.693147; mean 0.410038.
    expected = (math.log1p(math.exp(-2.0)) + math.log(2.0)) / 2
    assert abs(bradley_terry_loss(r_chosen, r_rejected).item() - expected) < 1e-6
    # A margin m = 1 shifts both gaps down: -log σ(1) = 0.313262, -log σ(-1) = 1.313262.
    expected_margin = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(1.0))) / 2
    assert abs(bradley_terry_loss(r_chosen, r_rejected, margin=1.0).item() - expected_margin) < 1e-6
    # Per-pair margins (1, -1): both gaps become 1.
    per_pair = bradley_terry_loss(r_chosen, r_rejected, margin=torch.tensor([1.0, -1.0]))
    assert abs(per_pair.item() - math.log1p(math.exp(-1.0))) < 1e-6


def test_bradley_terry_loss_is_finite_and_has_the_textbook_gradient():
    from tuneoff.losses import bradley_terry_loss

    # logsigmoid: a gap of -1000 costs 1000, not inf.
    assert abs(bradley_terry_loss(torch.tensor([-1000.0]), torch.tensor([0.0])).item() - 1000.0) < 1e-3
    r_chosen = torch.tensor([0.5, -1.0], requires_grad=True)
    r_rejected = torch.tensor([0.0, 1.0], requires_grad=True)
    bradley_terry_loss(r_chosen, r_rejected).backward()
    # d/dr_w of -log σ(r_w - r_l) = -(1 - σ(r_w - r_l)) = -σ(r_l - r_w); divided by B = 2 for the mean.
    expected = -torch.sigmoid(torch.tensor([-0.5, 2.0])) / 2
    assert torch.allclose(r_chosen.grad, expected, atol=1e-6)
    assert torch.allclose(r_rejected.grad, -expected, atol=1e-6)


# ---------------------------------------------------------------- sequence log-probs, DPO and IPO


def test_sequence_logprobs_hand_computed():
    from tuneoff.losses import sequence_logprobs

    # Vocabulary of 2. Row 0 labels [-, 1, 0]: position 0 (logits 0, 0) predicts 1 -> log 1/2; position 1
    # (logits ln 3, 0) predicts 0 -> log 3/4. Row 1 labels [-, -, 1]: position 1 (logits 0, ln 3) predicts 1 -> log 3/4.
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [9.0, -9.0]],
                           [[7.0, -7.0], [0.0, math.log(3.0)], [9.0, -9.0]]])
    labels = torch.tensor([[IGNORE, 1, 0], [IGNORE, IGNORE, 1]])
    logps, counts = sequence_logprobs(logits, labels)
    assert torch.allclose(logps, torch.tensor([math.log(0.5 * 0.75), math.log(0.75)]), atol=1e-6)
    assert counts.tolist() == [2, 1]


def test_sequence_logprobs_ignore_padding_and_prompt():
    """Masked positions (prompt, padding, anything after the response) contribute nothing, whatever their logits."""
    from tuneoff.losses import sequence_logprobs

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[IGNORE, IGNORE, 3, 4, IGNORE], [IGNORE, 7, 8, 9, 10]])
    logps, counts = sequence_logprobs(logits, labels)
    padded_logits = torch.cat([logits, 100 * torch.randn(2, 4, 11)], dim=1)  # 4 more columns of padding
    padded_labels = torch.cat([labels, torch.full((2, 4), IGNORE)], dim=1)
    noisy = padded_logits.clone()
    noisy[0, 0] = noisy[0, 3:] = 50.0  # the prompt position and the positions after row 0's last target
    for other_logits in (padded_logits, noisy):
        other, other_counts = sequence_logprobs(other_logits, padded_labels)
        assert torch.equal(other, logps) and torch.equal(other_counts, counts)
    # The selected-positions path equals the full log-softmax over all B·T positions.
    full = logits.log_softmax(-1)[:, :-1].gather(-1, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1)  # (B, T-1)
    assert torch.allclose(logps, (full * (labels[:, 1:] != IGNORE)).sum(-1), atol=1e-5)


def test_sequence_logprobs_match_transformers_loss(tiny_tokenizer):
    """Parity: -log π(y|x) / |y| is transformers' own LM loss of that row with -100 labels."""
    from tuneoff.losses import sequence_logprobs
    from tuneoff.models.load import load_model

    torch.manual_seed(0)
    model = load_model("tiny")
    input_ids = torch.randint(5, 4000, (1, 10))
    labels = input_ids.clone()
    labels[:, :4] = IGNORE
    logps, counts = sequence_logprobs(model(input_ids=input_ids).logits, labels)
    assert abs(-logps.item() / counts.item() - model(input_ids=input_ids, labels=labels).loss.item()) < 1e-5


def test_dpo_sigmoid_loss_hand_computed():
    from tuneoff.losses import dpo_sigmoid_loss, implicit_rewards

    # Pair 0: h = (-1 - -2) - (-3 - -2) = 2, β h = 1 -> -log σ(1) = log(1 + e^-1) = 0.313262.
    # Pair 1: π = π_ref, h = 0 -> log 2.
    pi_chosen, pi_rejected = torch.tensor([-1.0, -4.0]), torch.tensor([-3.0, -6.0])
    ref_chosen, ref_rejected = torch.tensor([-2.0, -4.0]), torch.tensor([-2.0, -6.0])
    losses = dpo_sigmoid_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta=0.5)
    assert torch.allclose(losses, torch.tensor([math.log1p(math.exp(-1.0)), math.log(2.0)]), atol=1e-6)
    # Conservative DPO, ε = 0.1: 0.9 · log(1 + e^-1) + 0.1 · log(1 + e^1) = 0.413262; at h = 0 still log 2.
    smoothed = dpo_sigmoid_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta=0.5, label_smoothing=0.1)
    expected = 0.9 * math.log1p(math.exp(-1.0)) + 0.1 * math.log1p(math.exp(1.0))
    assert torch.allclose(smoothed, torch.tensor([expected, math.log(2.0)]), atol=1e-6)
    # Implicit rewards β (π - π_ref): 0.5 and -0.5 for pair 0, so the margin is β h = 1.
    assert implicit_rewards(pi_chosen, ref_chosen, 0.5).tolist() == [0.5, 0.0]
    assert implicit_rewards(pi_rejected, ref_rejected, 0.5).tolist() == [-0.5, 0.0]


def test_dpo_sigmoid_loss_gradient():
    from tuneoff.losses import dpo_sigmoid_loss

    pi_chosen, pi_rejected = torch.tensor([-1.0], requires_grad=True), torch.tensor([-3.0], requires_grad=True)
    dpo_sigmoid_loss(pi_chosen, pi_rejected, torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.5).sum().backward()
    # d/dπ_w of -log σ(β h) = -β σ(-β h) = -0.5 σ(-1) = -0.134471; the rejected side gets the opposite.
    expected = -0.5 / (1.0 + math.exp(1.0))
    assert abs(pi_chosen.grad.item() - expected) < 1e-6 and abs(pi_rejected.grad.item() + expected) < 1e-6


def test_ipo_loss_hand_computed():
    from tuneoff.losses import ipo_loss

    pi_chosen, pi_rejected = torch.tensor([-1.0, -4.0]), torch.tensor([-3.0, -6.0])
    ref_chosen, ref_rejected = torch.tensor([-2.0, -4.0]), torch.tensor([-2.0, -6.0])
    # h = (2, 0). β = 0.5: target 1/(2β) = 1 -> (2 - 1)² = 1 and (0 - 1)² = 1.
    assert ipo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta=0.5).tolist() == [1.0, 1.0]
    # β = 0.25: target 2 -> 0 (the gap sits exactly at its target: IPO stops pushing) and 4.
    assert ipo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta=0.25).tolist() == [0.0, 4.0]
    # β = 0.1 at h = 0: (0 - 5)² = 25.
    assert ipo_loss(pi_chosen[1:], pi_rejected[1:], ref_chosen[1:], ref_rejected[1:], beta=0.1).item() == 25.0


def test_dpo_loss_table():
    from tuneoff.losses import DPO_LOSSES, MEAN_LOGPS, dpo_sigmoid_loss, ipo_loss

    assert DPO_LOSSES == {"sigmoid": dpo_sigmoid_loss, "ipo": ipo_loss}
    assert MEAN_LOGPS == {"ipo"}
