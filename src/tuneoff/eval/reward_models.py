"""How good is a reward model on a preference file: `tuneoff rm-eval` (any reward model, any preference records).

For N pairs (x, y_w, y_l) the scorer gives r_w = r(x, y_w) and r_l = r(x, y_l). Reported:
- accuracy: the share of pairs with r_w > r_l, an exact tie counting one half, with a 95% Wilson score interval
  (Wilson 1927) over N pairs (the ties' halves counted as successes);
- ECE of σ(r_w − r_l) read as P(y_w ≻ y_l) (tuneoff.train.rm_metrics.pairwise_ece);
- the length-bias probe: Pearson correlation of reward with response length in words over the 2N responses, and
  the accuracy on pairs whose preferred response is the shorter / the longer one;
- per subset (the records' ``subset`` field, as RewardBench's files carry it): pairs and accuracy with its interval.
Lengths are counted in words, not tokens, so that every reward model is measured on the same scale.
"""

from __future__ import annotations

import math

import torch


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion p̂ = successes / n:
    (p̂ + z²/2n ± z·sqrt(p̂(1 − p̂)/n + z²/4n²)) / (1 + z²/n). (nan, nan) for n = 0."""
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    scale = 1 + z * z / n
    return (centre - half) / scale, (centre + half) / scale


def accuracy_with_ci(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> dict:
    """{accuracy, ci_low, ci_high, pairs} of (N,) rewards; ties count one half."""
    wins = float((r_chosen > r_rejected).sum()) + 0.5 * float((r_chosen == r_rejected).sum())
    n = int(r_chosen.numel())
    low, high = wilson_interval(wins, n)
    return {"accuracy": wins / n if n else float("nan"), "ci_low": low, "ci_high": high, "pairs": n}


def evaluate_rewards(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    words_chosen: torch.Tensor,
    words_rejected: torch.Tensor,
    subsets: list[str | None],
) -> dict:
    """Every metric of the module docstring from the (N,) rewards, the (N,) response lengths in words and each
    pair's subset (None where a record has none)."""
    from tuneoff.train.rm_metrics import length_bias, pairwise_ece

    result = {
        **accuracy_with_ci(r_chosen, r_rejected),
        "ece": pairwise_ece(r_chosen, r_rejected),
        **length_bias(r_chosen, r_rejected, words_chosen.double(), words_rejected.double()),
    }
    names = sorted({s for s in subsets if s is not None})
    if names:
        result["subsets"] = {}
        for name in names:
            where = torch.tensor([s == name for s in subsets])
            result["subsets"][name] = accuracy_with_ci(r_chosen[where], r_rejected[where])
    return result


def score_pairs(scorer, pairs: list, batch_size: int = 32, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected), each (N,), scoring ``batch_size`` pairs at a time with a progress bar."""
    from tqdm import tqdm

    chosen, rejected = [], []
    with tqdm(total=len(pairs), unit="pair", desc="scoring", disable=not progress) as bar:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            prompts = [p.prompt for p in chunk]
            chosen.append(scorer.score(prompts, [p.chosen for p in chunk]))
            rejected.append(scorer.score(prompts, [p.rejected for p in chunk]))
            bar.update(len(chunk))
    return torch.cat(chosen).float(), torch.cat(rejected).float()


def read_subsets(path: str, count: int) -> list[str | None]:
    """The ``subset`` field of every record of ``path`` (one per pair, in file order), None where absent."""
    from tuneoff.data.formats import read_rows

    subsets = [None if row.get("subset") is None else str(row["subset"]) for _, row in read_rows(path)]
    if len(subsets) != count:  # load_preferences reads one pair per record
        raise ValueError(f"{path}: {len(subsets)} records but {count} pairs")
    return subsets
