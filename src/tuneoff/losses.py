"""Losses as pure tensor functions. Shapes: B batch, T time, V vocabulary, N selected tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def shift_targets(labels: torch.Tensor) -> torch.Tensor:
    """Next-token targets aligned with the logits at each position: target[t] = labels[t + 1].

    labels: (B, T) -> (B, T) with the last column IGNORE (nothing follows the last token).
    """
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE)  # (B, T)


class _NLLSum(torch.autograd.Function):
    """Σ_i (logsumexp(z_i) − z_i[y_i]) over rows whose target is not IGNORE, with a fused backward.

    The gradient, softmax(z_i) − onehot(y_i), is written over the logits' own buffer (nothing else reads the
    logits of an LM head: its matmul's backward needs its input and weight), so training never holds a second
    (N, V) tensor: on SmolLM2's 49,152-word vocabulary that is 0.2 MB per token, and a pass less over it each way.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        counted = targets != IGNORE  # (N,)
        safe = targets.clamp(min=0)
        lse = torch.logsumexp(logits, -1)  # (N,)
        picked = logits.gather(-1, safe[:, None]).squeeze(-1)  # (N,)
        ctx.save_for_backward(logits, lse, safe, counted)
        return ((lse - picked) * counted).sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        logits, lse, safe, counted = ctx.saved_tensors
        grad = logits.sub_(lse[:, None]).exp_()  # (N, V) softmax, in place
        grad[torch.arange(len(safe), device=grad.device), safe] -= 1.0
        grad.mul_((grad_output * counted)[:, None].to(grad.dtype))
        return grad, None


def sft_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of next-token negative log-likelihoods over the tokens whose target is not IGNORE.

    logits: (N, V) or (B, T, V); targets: matching (N,) or (B, T), already shifted. Returns a scalar.
    Summing (not averaging) lets the caller divide by the token count of a whole accumulated step.
    Equal to ``F.cross_entropy(..., reduction="sum", ignore_index=IGNORE)`` with its gradient (tested); when the
    logits are an intermediate that needs a gradient (an LM head's output), the backward reuses their memory
    (:class:`_NLLSum`), so they must not be read after the backward.
    """
    logits, targets = logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1)
    if logits.requires_grad and logits.grad_fn is not None:  # an intermediate: its buffer may be reused
        return _NLLSum.apply(logits, targets)
    return F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")


def sft_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over non-ignored targets (the quantity transformers reports as ``loss``)."""
    count = (targets != IGNORE).sum().clamp(min=1)
    return sft_loss_sum(logits, targets) / count


def bradley_terry_loss(
    r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | float | None = None
) -> torch.Tensor:
    """Mean Bradley–Terry loss of a reward model, ``-log σ(r_w − r_l − m)`` (Bradley & Terry 1952; Ouyang 2022).

    r_chosen, r_rejected: (B,) rewards of the preferred (w) and dispreferred (l) responses; margin m: None, a
    float or (B,) (Llama 2's margin: the preferred response must win by at least m). Returns a scalar.
    ``logsigmoid`` keeps it finite for any reward gap (log σ(−1000) = −1000, not log 0).
    """
    delta = r_chosen.float() - r_rejected.float()  # (B,)
    if margin is not None:
        delta = delta - margin
    return -F.logsigmoid(delta).mean()


# ---------------------------------------------------------------- sequence log-probabilities (DPO, PPO)


def selected_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) under ``logits``: (N, V), (N,) -> (N,) float32 (targets must not be IGNORE)."""
    return logits.float().log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)  # (N,)


def sum_by_row(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per-row sums of ``values`` (N,), the entries of the True cells of ``keep`` (B, T) in row-major order -> (B,)."""
    rows = keep.nonzero()[:, 0]  # (N,) the row of each kept cell
    return values.new_zeros(keep.shape[0]).index_add(0, rows, values)  # (B,)


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each sequence's labelled tokens, and how many there are.

    logits: (B, T, V) from a causal LM; labels: (B, T) *unshifted*, as transformers takes them (IGNORE on the
    prompt and padding). Returns (log π(y|x) (B,) float32, token counts (B,) long). The log-softmax runs only
    at the N labelled positions, never over all B·T: callers holding hidden states should likewise apply the
    LM head to the labelled positions alone and call :func:`selected_logprobs` and :func:`sum_by_row`.
    """
    targets = shift_targets(labels)  # (B, T)
    keep = targets != IGNORE  # (B, T)
    per_token = selected_logprobs(logits[keep], targets[keep])  # (N,)
    return sum_by_row(per_token, keep), keep.sum(-1)


# ---------------------------------------------------------------- DPO and IPO (all inputs (B,) sequence log-probs)


def implicit_rewards(policy_logps: torch.Tensor, reference_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO's implicit reward r(x, y) = β (log π(y|x) − log π_ref(y|x)) (Rafailov et al. 2023, Eq. 5): (B,) -> (B,)."""
    return beta * (policy_logps.float() - reference_logps.float())


def _log_ratio_gap(pi_chosen, pi_rejected, ref_chosen, ref_rejected) -> torch.Tensor:
    """h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l)): (B,)."""
    return (pi_chosen.float() - ref_chosen.float()) - (pi_rejected.float() - ref_rejected.float())


def dpo_sigmoid_loss(
    pi_chosen: torch.Tensor,
    pi_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Per-pair DPO loss −log σ(β h) (Rafailov et al. 2023, arXiv:2305.18290, Eq. 7): (B,) x 4 -> (B,).

    label_smoothing ε > 0 gives conservative DPO (cDPO; Mitchell 2023): the label is taken to be flipped with
    probability ε, −(1 − ε) log σ(β h) − ε log σ(−β h). Inputs are summed log-probs of each response.
    """
    logits = beta * _log_ratio_gap(pi_chosen, pi_rejected, ref_chosen, ref_rejected)  # (B,)
    return -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def ipo_loss(
    pi_chosen: torch.Tensor,
    pi_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Per-pair IPO loss (h − 1/(2β))² (Azar et al. 2023, arXiv:2310.12036, Eq. 17, with τ = β): (B,) x 4 -> (B,).

    IPO regresses the log-ratio gap h to a finite target instead of pushing it to infinity, so it does not
    overfit deterministic preferences. Inputs are *per-token mean* log-probs (see :data:`MEAN_LOGPS`).
    label_smoothing has no meaning here and must be 0.
    """
    if label_smoothing:
        raise ValueError("ipo_loss takes no label_smoothing")
    return (_log_ratio_gap(pi_chosen, pi_rejected, ref_chosen, ref_rejected) - 1.0 / (2.0 * beta)) ** 2


DPO_LOSSES = {"sigmoid": dpo_sigmoid_loss, "ipo": ipo_loss}
"""DPO-family losses by ``loss_type``; each maps (π_w, π_l, π_ref_w, π_ref_l, β, ε) to per-pair losses (B,)."""

MEAN_LOGPS = frozenset({"ipo"})
"""Loss types fed the per-token *mean* log-prob of each response instead of the sum. For IPO this follows TRL
(``DPOTrainer`` divides IPO's log-probs by the response length): with sums, the fixed target 1/(2β) asks a
10-token and a 100-token response for the same total gap, so the target's meaning depends on length."""


# ---------------------------------------------------------------- KTO (all inputs (B,) summed sequence log-probs)


def kto_kl_sum(policy_kl_logps: torch.Tensor, reference_kl_logps: torch.Tensor) -> torch.Tensor:
    """One process's share of KTO's reference point: (B',) x 2 -> (2,) detached float32 [Σ_j d_j, B'].

    d_j = log π(y'_j|x_j) − log π_ref(y'_j|x_j) on *mismatched* pairs: each prompt x_j with another example's
    completion y'_j (TRL rotates the completions of a batch by one: x_1 gets y_n, x_2 gets y_1, ...), the policy
    side computed without a gradient. With several processes, all-reduce (SUM) this tensor across them, then
    pass it to :func:`kto_kl_from_sum`: z_0 is then the global mean Σ_p Σ_j d_j / Σ_p B'_p.
    """
    d = (policy_kl_logps.float() - reference_kl_logps.float()).detach()  # (B',)
    return torch.stack([d.sum(), d.new_tensor(float(d.numel()))])  # (2,)


def kto_kl_from_sum(kl_sum: torch.Tensor) -> torch.Tensor:
    """z_0 = max(0, Σ d / n) from a (2,) [Σ d, n] of :func:`kto_kl_sum` (all-reduced if need be): a scalar.

    TRL averages the per-process means instead (``gather(mean).mean()``); the two agree whenever every process
    holds the same number of KL pairs (equal per-device batches), and the global mean is right when they do not.
    Clamped at 0 after the reduction, as the true KL it estimates is never negative.
    """
    return (kl_sum[0] / kl_sum[1].clamp(min=1)).clamp(min=0).detach()


def kto_kl(policy_kl_logps: torch.Tensor, reference_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z_0 on one process: max(0, mean_j d_j), detached. (B',) x 2 -> scalar."""
    return kto_kl_from_sum(kto_kl_sum(policy_kl_logps, reference_kl_logps))


def kto_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    labels: torch.Tensor,
    kl: torch.Tensor | float,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example KTO loss λ_y − v(x, y) (Ethayarajh et al. 2024, arXiv:2402.01306): (B,) x 3 -> (B,), (B,).

    With r_θ = log π(y|x) − log π_ref(y|x) and z_0 = ``kl`` (see :func:`kto_kl`, detached):
    desirable (label True)   λ_D (1 − σ(β (r_θ − z_0))),
    undesirable (label False) λ_U (1 − σ(β (z_0 − r_θ))),
    with λ_D = desirable_weight, λ_U = undesirable_weight. Returns (losses (B,), rewards β r_θ (B,) detached), in
    the batch's order. TRL's batch loss is the plain mean of these weighted losses over all B examples (not a
    weight-normalised mean), so summing them and dividing by the global example count reproduces it.
    With z_0 = 0 this is TRL's ``apo_zero_unpaired`` (D'Oosterlinck et al. 2024, arXiv:2408.06266):
    1 − σ(β r_θ) and 1 − σ(−β r_θ) = σ(β r_θ), which needs no KL pairs.
    """
    log_ratio = policy_logps.float() - reference_logps.float()  # (B,) r_θ
    z = torch.as_tensor(kl, dtype=log_ratio.dtype, device=log_ratio.device).detach()
    desirable = labels.to(device=log_ratio.device, dtype=torch.bool)  # (B,)
    margin = torch.where(desirable, log_ratio - z, z - log_ratio)  # (B,)
    weight = torch.where(desirable, desirable_weight, undesirable_weight).to(log_ratio.dtype)  # (B,)
    losses = weight * (1.0 - torch.sigmoid(beta * margin))  # (B,)
    return losses, (beta * log_ratio).detach()


# --- PPO (Schulman et al. 2017; Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et al. 2022) ---------------


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimate log π − log π_ref (Schulman's k1; unbiased, can be negative). (B, T)."""
    return logp - ref_logp


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimate exp(ρ) − ρ − 1 with ρ = log π_ref − log π (k3; unbiased, never negative). (B, T)."""
    log_ratio = ref_logp - logp
    return log_ratio.exp() - log_ratio - 1


KL_ESTIMATORS = {"k1": kl_k1, "k3": kl_k3}
"""Per-token KL(π‖π_ref) estimators by name (RLConfig.kl_estimator)."""


def ppo_policy_loss(logp, old_logp, advantages, mask, clip: float):
    """Clipped surrogate: mean over tokens of max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε)), ρ = π/π_old.

    All inputs (B, T). Returns (loss, clipfrac, approx_kl) with approx_kl = mean ½(log ρ)².
    """
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    m = mask.to(logp.dtype)
    count = m.sum().clamp(min=1)
    loss = (torch.maximum(pg_loss1, pg_loss2) * m).sum() / count
    clipfrac = ((pg_loss2 > pg_loss1).to(logp.dtype) * m).sum() / count
    approx_kl = (0.5 * log_ratio**2 * m).sum() / count
    return loss, clipfrac.detach(), approx_kl.detach()


def ppo_value_loss(values, old_values, returns, mask, clip: float):
    """Clipped value loss: mean over tokens of ½·max((V − R)², (V_old + clip(V − V_old, ±ε) − R)²). (B, T) inputs."""
    v_clipped = old_values + (values - old_values).clamp(-clip, clip)
    v_loss_unclipped = (values - returns) ** 2
    v_loss_clipped = (v_clipped - returns) ** 2
    m = mask.to(values.dtype)
    count = m.sum().clamp(min=1)
    loss = 0.5 * (torch.maximum(v_loss_unclipped, v_loss_clipped) * m).sum() / count
    clipfrac = ((v_loss_clipped > v_loss_unclipped).to(values.dtype) * m).sum() / count
    return loss, clipfrac.detach()
