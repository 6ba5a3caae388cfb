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
