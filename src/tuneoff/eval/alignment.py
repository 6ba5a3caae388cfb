"""Alignment and drift on held-out prompts: gold reward with a 95% CI, proxy reward, win rates, KL to a reference.

Every function here is pure over numbers except those that run models (``exact_kl_per_token``, ``continuations``,
``kl_per_token``, ``evaluate_policy``); they sample with :func:`tuneoff.rollout.sample_responses`.
"""

from __future__ import annotations

import gzip
import math
import random
from dataclasses import dataclass

import torch


def mean_ci(values) -> dict:
    """Mean with a normal-approximation 95% confidence interval (t would widen it by < 2% at n ≥ 60)."""
    values = [float(v) for v in values]
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, n - 1))
    half = 1.96 * sd / math.sqrt(n)
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "n": n}


def t_ci(values) -> dict:
    """Mean with a Student-t 95% interval: for a handful of seeds, where the normal approximation is too narrow."""
    from scipy import stats

    values = [float(v) for v in values]
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "ci_low": float("nan"), "ci_high": float("nan"), "n": n}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "n": n}


def win_rate(a, b) -> float:
    """Share of paired items where a scores above b; ties count half."""
    pairs = list(zip(a, b))
    return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in pairs) / len(pairs)


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct n-grams / all n-grams over a set of texts."""
    grams = [tuple(t.split()[i : i + n]) for t in texts for i in range(max(0, len(t.split()) - n + 1))]
    return len(set(grams)) / max(1, len(grams))


def held_out_prompts(n: int, words: int = 4, seed: int = 0) -> list[str]:
    """Beginnings (first ``words`` words) of SST-2 *dev* reviews: never seen by review-gpt or the demo's SFT data."""
    from tuneoff.data.sources import shipped_data

    with gzip.open(shipped_data("sst2/dev.tsv.gz"), "rt", encoding="utf-8") as f:
        sentences = [line.rstrip("\n").split("\t")[1] for line in f][1:]
    sentences = [s for s in sentences if len(s.split()) > words + 3]
    random.Random(seed).shuffle(sentences)
    return [" ".join(s.split()[:words]) for s in sentences[:n]]


@torch.inference_mode()
def exact_kl_per_token(model, reference, batches, temperature: float = 1.0) -> float:
    """KL(π‖π_ref) per response token: the exact KL of the two next-token distributions (softmax(logits / T)),
    summed over the vocabulary at every sampled response position, averaged over positions.
    ``batches`` as returned by :func:`tuneoff.rollout.sample_responses`."""
    from tuneoff.models.heads import position_ids_from_mask

    total, count = 0.0, 0
    for full_ids, full_mask, P, mask in batches:
        positions = position_ids_from_mask(full_mask)
        logp = torch.log_softmax(
            model(input_ids=full_ids, attention_mask=full_mask, position_ids=positions).logits[:, P - 1 : -1].float()
            / temperature,
            -1,
        )  # (B, R, V)
        ref = torch.log_softmax(
            reference(input_ids=full_ids, attention_mask=full_mask, position_ids=positions)
            .logits[:, P - 1 : -1]
            .float()
            / temperature,
            -1,
        )  # (B, R, V)
        kl = (logp.exp() * (logp - ref)).sum(-1)  # (B, R)
        total += float((kl * mask.to(kl.dtype)).sum())
        count += int(mask.sum())
    return total / max(1, count)


def _prompt_ids(tokenizer, prompts: list[str]) -> list[list[int]]:
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]


@torch.inference_mode()
def continuations(
    model, tokenizer, prompts: list[str], max_new_tokens: int, seed: int, temperature: float = 1.0, batch: int = 64
) -> list[str]:
    """One sampled continuation per prompt, decoded without special tokens."""
    from tuneoff.rollout import sample_responses

    model.eval()
    generator = torch.Generator(next(model.parameters()).device).manual_seed(seed)  # where the sampler draws
    return sample_responses(
        model, tokenizer, _prompt_ids(tokenizer, prompts), max_new_tokens, temperature, generator, batch
    )[1]


@torch.inference_mode()
def kl_per_token(
    model, reference, tokenizer, prompts: list[str], max_new_tokens: int, seed: int, batch: int = 64
) -> float:
    """KL(π‖π_ref) per response token on held-out prompts, on responses sampled from π (temperature 1)."""
    from tuneoff.rollout import sample_responses

    model.eval()
    reference.eval()
    generator = torch.Generator(next(model.parameters()).device).manual_seed(seed)  # where the sampler draws
    _, _, batches = sample_responses(
        model, tokenizer, _prompt_ids(tokenizer, prompts), max_new_tokens, 1.0, generator, batch
    )
    return exact_kl_per_token(model, reference, batches)


@dataclass
class Evaluation:
    gold: list[float]
    proxy: list[float] | None
    kl_per_token: float | None
    continuations: list[str]


def evaluate_policy(
    model_name: str,
    prompts: list[str],
    seed: int,
    max_new_tokens: int = 32,
    reference: str | None = None,
    reward_model: str | None = None,
    device: str = "auto",
) -> Evaluation:
    """Continuations of ``prompts`` by ``model_name``, gold P(positive) of each, proxy reward, KL to ``reference``;
    the models on ``device`` (auto: CUDA when there is one; the gold judge is a CPU model)."""
    from tuneoff.feedback.gold import load_gold_judge
    from tuneoff.feedback.judges import judge_text
    from tuneoff.models.load import load_model, load_tokenizer

    if device == "cuda" and not torch.cuda.is_available():
        from tuneoff.errors import TuneoffError

        raise TuneoffError("device cuda: torch sees no CUDA GPU here; use --device cpu or auto")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(model_name)
    model = load_model(model_name).to(device)
    texts = continuations(model, tokenizer, prompts, max_new_tokens, seed)
    gold = load_gold_judge().score([judge_text(p, t) for p, t in zip(prompts, texts)]).tolist()
    proxy = None
    if reward_model:
        from tuneoff.feedback.judges import load_scorer

        proxy = load_scorer(reward_model, device).score(prompts, texts).tolist()
    reference_model = load_model(reference).to(device) if reference else None
    kl = kl_per_token(model, reference_model, tokenizer, prompts, max_new_tokens, seed) if reference else None
    return Evaluation(gold, proxy, kl, texts)


LENGTH_CONTROL_L2 = 1e-4
"""L2 penalty (λ/2)·φ² on the summed log-likelihood of ``length_controlled_win_rate``: keeps φ finite when length
separates wins from losses, and moves σ(θ) by ~λ (< 1e-4) when it does not."""


def length_controlled_win_rate(a_scores, b_scores, a_lengths, b_lengths) -> float:
    """Win rate of a over b at equal length, by the regression adjustment of AlpacaEval 2's length-controlled win rate
    (Dubois et al. 2024, arXiv:2404.04475), reduced to one length term and no per-instruction terms.

    Per paired item i: y_i = 1 if a scores above b, 0.5 on a tie, 0 otherwise (fractional targets), and
    z_i = (len_a − len_b) / sd(len_a − len_b) (population sd; z = 0 everywhere when it is 0 — dividing by the sd
    rescales φ only, not σ(θ)). Fit P(a wins) = σ(θ + φ·z) by maximum likelihood (Newton's method with
    step halving, a tiny L2 penalty on φ only: ``LENGTH_CONTROL_L2``) and return σ(θ), the win rate predicted at
    z = 0. AlpacaEval 2 passes z through tanh; this linear form is the one we specified. When a always wins
    (or never), θ has no finite maximum and the raw 1.0 (0.0) is returned.
    """
    import numpy as np

    if not len(a_scores) == len(b_scores) == len(a_lengths) == len(b_lengths) > 0:
        raise ValueError("need the same, nonzero number of scores and lengths for a and b")
    y = np.array([1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(a_scores, b_scores)])  # (n,)
    if np.all(y == 1.0) or np.all(y == 0.0):
        return float(y[0])
    delta = np.asarray(a_lengths, dtype=float) - np.asarray(b_lengths, dtype=float)  # (n,)
    sd = float(delta.std())
    z = delta / sd if sd > 0 else np.zeros_like(delta)  # (n,)
    theta, _phi = _fit_logistic(y, z, LENGTH_CONTROL_L2)
    return 1.0 / (1.0 + math.exp(-theta))


def _fit_logistic(y, z, l2: float) -> tuple[float, float]:
    """argmax over (θ, φ) of Σ_i [y_i log σ(η_i) + (1 − y_i) log σ(−η_i)] − (l2/2)·φ², η_i = θ + φ·z_i.
    The objective is concave, so Newton with step halving converges from (0, 0)."""
    import numpy as np

    X = np.stack([np.ones_like(z), z], axis=1)  # (n, 2): intercept, length
    penalty = np.diag([0.0, l2])  # (2, 2): θ is not penalised

    def objective(w):
        eta = X @ w  # (n,)
        return float(-(y * np.logaddexp(0.0, -eta) + (1 - y) * np.logaddexp(0.0, eta)).sum() - 0.5 * l2 * w[1] ** 2)

    w = np.zeros(2)
    value = objective(w)
    for _ in range(200):
        p = 0.5 * (1.0 + np.tanh(0.5 * (X @ w)))  # (n,) σ(η) without overflow
        grad = X.T @ (y - p) - penalty @ w  # (2,)
        curvature = X.T @ (X * (p * (1 - p))[:, None]) + penalty  # (2, 2), minus the Hessian
        step = np.linalg.solve(curvature, grad)
        t = 1.0
        while objective(w + t * step) < value and t > 1e-12:
            t /= 2
        w, value = w + t * step, objective(w + t * step)
        if np.max(np.abs(t * step)) < 1e-12:
            break
    return float(w[0]), float(w[1])


def paired_win_rates(scores: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """``win_rate(scores[a], scores[b])`` for every ordered pair of arms a ≠ b: result[a][b] = P(a beats b)."""
    return {a: {b: win_rate(scores[a], scores[b]) for b in scores if b != a} for a in scores}
