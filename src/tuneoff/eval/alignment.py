"""Alignment and drift on held-out prompts: gold reward with a 95% CI, proxy reward, win rates, KL to a reference.

Every function here is pure over numbers except the two that run models (``continuations``, ``kl_per_token``).
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
def continuations(model, tokenizer, prompts: list[str], max_new_tokens: int, seed: int, temperature: float = 1.0,
                  batch: int = 64) -> list[str]:
    """One sampled continuation per prompt (tuneoff's KV-cached sampler), decoded without special tokens."""
    from tuneoff.rollout import generate, left_pad

    model.eval()
    generator = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(prompts), batch):
        ids, mask = left_pad([tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts[i : i + batch]], tokenizer.pad_token_id)
        r = generate(model, ids, mask, max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id, temperature, generator=generator)
        out += tokenizer.batch_decode(r.response_ids.masked_fill(r.response_mask == 0, tokenizer.pad_token_id), skip_special_tokens=True)
    return out


@torch.inference_mode()
def kl_per_token(model, reference, tokenizer, prompts: list[str], max_new_tokens: int, seed: int, batch: int = 64) -> float:
    """KL(π‖π_ref) per response token on held-out prompts: responses sampled from π, exact KL of the two
    next-token distributions summed over the vocabulary at each response position, averaged over tokens."""
    from tuneoff.rollout import generate, left_pad
    from tuneoff.train.policy import position_ids_from_mask

    model.eval()
    reference.eval()
    generator = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for i in range(0, len(prompts), batch):
        ids, mask = left_pad([tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts[i : i + batch]], tokenizer.pad_token_id)
        r = generate(model, ids, mask, max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id, 1.0, generator=generator)
        full_ids, full_mask = r.full()
        P = ids.shape[1]
        position_ids = position_ids_from_mask(full_mask)
        logp = torch.log_softmax(model(input_ids=full_ids, attention_mask=full_mask, position_ids=position_ids).logits[:, P - 1 : -1].float(), -1)
        ref = torch.log_softmax(reference(input_ids=full_ids, attention_mask=full_mask, position_ids=position_ids).logits[:, P - 1 : -1].float(), -1)
        kl = (logp.exp() * (logp - ref)).sum(-1)  # (B, R)
        total += float((kl * r.response_mask).sum())
        count += int(r.response_mask.sum())
    return total / max(1, count)


@dataclass
class Evaluation:
    gold: list[float]
    proxy: list[float] | None
    kl_per_token: float | None
    continuations: list[str]


def evaluate_policy(model_name: str, prompts: list[str], seed: int, max_new_tokens: int = 32, reference: str | None = None,
                    reward_model: str | None = None) -> Evaluation:
    """Continuations of ``prompts`` by ``model_name``, gold P(positive) of each, proxy reward, KL to ``reference``."""
    from tuneoff.feedback.gold import load_gold_judge
    from tuneoff.models.load import load_model, load_tokenizer

    tokenizer = load_tokenizer(model_name)
    model = load_model(model_name)
    texts = continuations(model, tokenizer, prompts, max_new_tokens, seed)
    gold = load_gold_judge().score([p + " " + t for p, t in zip(prompts, texts)]).tolist()
    proxy = None
    if reward_model:
        from tuneoff.train.policy import load_scorer

        proxy = load_scorer(reward_model).score(prompts, texts).tolist()
    kl = kl_per_token(model, load_model(reference), tokenizer, prompts, max_new_tokens, seed) if reference else None
    return Evaluation(gold, proxy, kl, texts)
