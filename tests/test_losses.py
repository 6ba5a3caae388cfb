import math

import pytest
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
    logits = torch.tensor(
        [[[0.0, 0.0], [math.log(3.0), 0.0], [9.0, -9.0]], [[7.0, -7.0], [0.0, math.log(3.0)], [9.0, -9.0]]]
    )
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


# ---------------------------------------------------------------- KTO


def test_kto_loss_hand_computed():
    from tuneoff.losses import kto_loss

    # r = log π − log π_ref = (-1 − -1.5, -2 − -2.2, -3 − -2.6) = (0.5, 0.2, -0.4); z_0 = 0.2, β = 0.5,
    # λ_D = 2, λ_U = 0.5; examples 0 and 1 desirable, 2 undesirable.
    # 0: σ(0.5·(0.5 − 0.2)) = σ(0.15) = 0.537430 -> 2 · (1 − 0.537430) = 0.925140.
    # 1: σ(0.5·(0.2 − 0.2)) = σ(0) = 0.5 -> 2 · 0.5 = 1.
    # 2: σ(0.5·(0.2 − -0.4)) = σ(0.3) = 0.574443 -> 0.5 · (1 − 0.574443) = 0.212779.
    # Rewards β r = (0.25, 0.1, -0.2); batch loss (0.925140 + 1 + 0.212779) / 3 = 0.712640.
    policy = torch.tensor([-1.0, -2.0, -3.0], requires_grad=True)
    reference = torch.tensor([-1.5, -2.2, -2.6])
    labels = torch.tensor([True, True, False])
    losses, rewards = kto_loss(
        policy, reference, labels, torch.tensor(0.2), beta=0.5, desirable_weight=2.0, undesirable_weight=0.5
    )
    sigmoid = lambda x: 1.0 / (1.0 + math.exp(-x))
    expected = [2.0 * (1.0 - sigmoid(0.15)), 1.0, 0.5 * (1.0 - sigmoid(0.3))]
    assert torch.allclose(losses, torch.tensor(expected), atol=1e-6)
    assert abs(losses.mean().item() - 0.7126397) < 1e-6
    assert torch.allclose(rewards, torch.tensor([0.25, 0.1, -0.2]), atol=1e-6) and not rewards.requires_grad
    # z_0 = 0 and unit weights (APO-zero unpaired): 1 − σ(0.25), 1 − σ(0.1), σ(-0.2).
    apo, _ = kto_loss(policy, reference, labels, 0.0, beta=0.5)
    assert torch.allclose(apo, torch.tensor([1 - sigmoid(0.25), 1 - sigmoid(0.1), sigmoid(-0.2)]), atol=1e-6)
    # d/dπ of λ_D (1 − σ(β m)) is −λ_D β σ(β m)(1 − σ(β m)); for the undesirable one, +λ_U β σ(β m)(1 − σ(β m)).
    losses.sum().backward()
    s0, s2 = sigmoid(0.15), sigmoid(0.3)
    grad = [-2.0 * 0.5 * s0 * (1 - s0), -2.0 * 0.5 * 0.25, 0.5 * 0.5 * s2 * (1 - s2)]
    assert torch.allclose(policy.grad, torch.tensor(grad), atol=1e-6)


def test_kto_kl_clamps_at_zero_and_is_detached():
    from tuneoff.losses import kto_kl, kto_kl_from_sum, kto_kl_sum

    policy = torch.tensor([-1.0, -2.0], requires_grad=True)
    # d = (-1 − -0.5, -2 − -1) = (-0.5, -1): mean -0.75 -> clamped to 0.
    z = kto_kl(policy, torch.tensor([-0.5, -1.0]))
    assert z.item() == 0.0 and z.dim() == 0 and not z.requires_grad
    # d = (-1 − -1.5, -2 − -1.9) = (0.5, -0.1): mean 0.2 (a negative pair is kept; only the mean is clamped).
    z = kto_kl(policy, torch.tensor([-1.5, -1.9]))
    assert abs(z.item() - 0.2) < 1e-6 and not z.requires_grad
    # Two processes: sums and counts add up, so z_0 is the global mean. Equal counts: d = (0.5, -0.1) and
    # (1.0, 0.2) -> (0.4 + 1.2) / 4 = 0.4, the mean (0.2 + 0.6) / 2 of the per-process means, as TRL gathers it.
    a = kto_kl_sum(policy, torch.tensor([-1.5, -1.9]))
    b = kto_kl_sum(torch.tensor([0.0, 0.0]), torch.tensor([-1.0, -0.2]))
    assert torch.allclose(a, torch.tensor([0.4, 2.0]), atol=1e-6) and not a.requires_grad
    assert abs(kto_kl_from_sum(a + b).item() - 0.4) < 1e-6
    # Unequal counts: (0.4 + 1.0) / 3, not (0.2 + 1.0) / 2.
    c = kto_kl_sum(torch.tensor([0.0]), torch.tensor([-1.0]))
    assert abs(kto_kl_from_sum(a + c).item() - 1.4 / 3) < 1e-6
    assert kto_kl_from_sum(torch.tensor([-3.0, 2.0])).item() == 0.0


class _CatRecorder(torch.overrides.TorchFunctionMode):
    """Records what ``torch.cat`` returns (TRL concatenates the weighted per-example losses, chosen first)."""

    def __init__(self):
        super().__init__()
        self.outputs = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.cat:
            self.outputs.append(out)
        return out


def _trl_kto(loss_type, policy, reference, labels, policy_kl, reference_kl, beta, desirable_weight, undesirable_weight):
    """TRL 1.16's ``KTOTrainer._compute_loss`` on given sequence log-probs, with a stand-in trainer and model.

    The stand-in model returns one completion position per row (inputs are 2 tokens wide), whose log-prob is the
    given sequence log-prob; reference log-probs come in precomputed, as ``precompute_ref_log_probs`` passes them.
    Returns (loss, per-example weighted losses chosen first, metrics).
    """
    import collections
    import types

    from trl import KTOTrainer

    batch_size = len(labels)
    batch = {
        "input_ids": torch.zeros(batch_size, 2, dtype=torch.long),
        "attention_mask": torch.ones(batch_size, 2, dtype=torch.long),
        "completion_mask": torch.tensor([[0, 1]] * batch_size),
        "label": labels,
        "ref_logps": reference,
    }
    calculate_kl = loss_type == "kto"
    if calculate_kl:
        batch.update(
            {
                "KL_input_ids": torch.ones(batch_size, 2, dtype=torch.long),
                "KL_attention_mask": torch.ones(batch_size, 2, dtype=torch.long),
                "KL_completion_mask": torch.tensor([[0, 1]] * batch_size),
                "ref_KL_logps": reference_kl,
            }
        )

    def model(*, input_ids, labels, fused_lm_head, **kwargs):
        assert fused_lm_head and input_ids.shape == (batch_size, 2)
        logps = policy_kl if input_ids is batch.get("KL_input_ids") else policy
        zeros = torch.zeros(batch_size, 1)
        return types.SimpleNamespace(log_probs=logps[:, None], entropy=zeros, mean_logits=zeros)

    trainer = types.SimpleNamespace(
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
        loss_type=loss_type,
        calculate_KL=calculate_kl,
        precompute_ref_logps=True,
        aux_loss_enabled=False,
        model=types.SimpleNamespace(training=True),
        accelerator=types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda t: t),  # 1 process
        _metrics={"train": collections.defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    trainer._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, trainer)
    with _CatRecorder() as recorder:
        loss = KTOTrainer._compute_loss(trainer, model, batch, return_outputs=False)
    assert len(recorder.outputs) == 1
    return loss, recorder.outputs[0], trainer._metrics["train"]


@pytest.mark.parametrize("loss_type, kl_shift", [("kto", 0.3), ("kto", -0.3), ("apo_zero_unpaired", 0.0)])
def test_kto_loss_matches_trl(loss_type, kl_shift):
    """Parity with TRL 1.16: losses, their batch mean and its gradient, rewards and the KL reference point."""
    pytest.importorskip("trl")
    from tuneoff.losses import kto_kl, kto_loss

    torch.manual_seed(0)
    beta, desirable_weight, undesirable_weight = 0.1, 1.33, 0.75
    labels = torch.tensor([True, False, True, True, False])
    reference = -20.0 + 5.0 * torch.randn(5)
    policy = (reference + 2.0 * torch.randn(5)).requires_grad_(True)
    reference_kl = -25.0 + 5.0 * torch.randn(5)
    noise = torch.randn(5)
    policy_kl = reference_kl + kl_shift + noise - noise.mean()  # pairs of either sign, with a mean of kl_shift
    trl_policy = policy.detach().clone().requires_grad_(True)
    trl_loss, trl_losses, metrics = _trl_kto(
        loss_type, trl_policy, reference, labels, policy_kl, reference_kl, beta, desirable_weight, undesirable_weight
    )
    trl_loss.backward()

    kl = kto_kl(policy_kl, reference_kl) if loss_type == "kto" else torch.tensor(0.0)
    assert abs(kl.item() - metrics["kl"][-1]) < 1e-6
    if kl_shift < 0:
        assert kl.item() == 0.0  # the clamp is exercised
    elif kl_shift > 0:
        assert kl.item() > 0.0
    losses, rewards = kto_loss(policy, reference, labels, kl, beta, desirable_weight, undesirable_weight)
    assert torch.allclose(torch.cat([losses[labels], losses[~labels]]), trl_losses.detach(), atol=1e-6)
    loss = losses.sum() / len(labels)  # tuneoff's reduction: sum over examples / global example count
    assert abs(loss.item() - trl_loss.item()) < 1e-6
    loss.backward()
    assert torch.allclose(policy.grad, trl_policy.grad, atol=1e-6)
    assert abs(rewards[labels].mean().item() - metrics["rewards/chosen"][-1]) < 1e-6
    assert abs(rewards[~labels].mean().item() - metrics["rewards/rejected"][-1]) < 1e-6
