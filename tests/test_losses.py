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
