import math

import numpy as np
import pytest

from tuneoff.eval.diversity import (
    diversity_report,
    ead,
    embedding_diversity,
    embedding_diversity_from_vectors,
    self_bleu,
)


def test_ead_hand_computed():
    # [[1, 2, 1]], V = 2:
    #   n=1: distinct {1, 2} = 2, C = 3, expected 2·(1 − (1/2)^3) = 1.75 -> 2 / 1.75 = 8/7
    #   n=2: distinct {(1,2), (2,1)} = 2, C = 2, expected 2·(1 − (1/2)^2) = 1.5 -> 4/3
    #   n=3: distinct 1, C = 1, expected 2·(1 − 1/2) = 1 -> 1
    #   n=4, 5: C = 0, left out -> mean (8/7 + 4/3 + 1) / 3 = 73/63
    assert ead([[1, 2, 1]], vocab_size=2) == pytest.approx(73 / 63, rel=1e-12)


def test_ead_ngrams_do_not_cross_lists():
    # [[1, 2], [1, 2]], V = 3, n_max = 2:
    #   n=1: distinct 2, C = 4, expected 3·(1 − (2/3)^4) = 65/27 -> 54/65
    #   n=2: only (1,2) twice — no (2,1) across the boundary: distinct 1, C = 2, expected 3·(1 − 4/9) = 5/3 -> 3/5
    #   mean (54/65 + 3/5) / 2 = 93/130
    assert ead([[1, 2], [1, 2]], vocab_size=3, n_max=2) == pytest.approx(93 / 130, rel=1e-12)


def test_ead_string_tokens_large_vocab_and_empty():
    # strings work like ints: [["a", "b"]], V = 10, n = 1 only: 2 / (10·(1 − 0.9^2)) = 2 / 1.9
    assert ead([["a", "b"]], vocab_size=10, n_max=1) == pytest.approx(2 / 1.9, rel=1e-12)
    # V = 50257, C = 3 all distinct: expected = V·(1 − (1 − 1/V)^3) ≈ 3 − 3/V, so EAD_1 ≈ 1 + 1/V
    assert ead([[5, 6, 7]], vocab_size=50257, n_max=1) == pytest.approx(1 + 1 / 50257, rel=1e-8)
    assert ead([[], [1]], vocab_size=4, n_max=5) == pytest.approx(1.0)  # only n=1: 1 / (4·(1 − 3/4)) = 1
    assert ead([], vocab_size=4) == 0.0


def test_self_bleu_hand_computed():
    # "a b c d" vs "a b c e" (and back): precisions 3/4, 2/3, 1/2, and 0/1 for 4-grams, which exp smoothing
    # replaces by 1/(2·1); brevity penalty 1 -> (3/4 · 2/3 · 1/2 · 1/2)^(1/4) = (1/8)^(1/4)
    assert self_bleu(["a b c d", "a b c e"]) == pytest.approx((1 / 8) ** 0.25, rel=1e-9)
    # "a b" vs "a b c d": effective order 2, precisions 1, 1; brevity penalty exp(1 − 4/2) = e^-1
    # "a b c d" vs "a b": precisions 2/4, 1/3, then 0/2 -> 1/(2·2) and 0/1 -> 1/(4·1); BP 1 -> (1/96)^(1/4)
    assert self_bleu(["a b", "a b c d"]) == pytest.approx((math.exp(-1) + 96**-0.25) / 2, rel=1e-9)
    # each of the two copies matches a reference exactly (1, 1); the third shares nothing (0) -> 2/3
    assert self_bleu(["a b c d", "a b c d", "x y z w"]) == pytest.approx(2 / 3, rel=1e-9)
    # tokenize='none': "c." is one token, not "c" + "."
    assert self_bleu(["a b c.", "a b c ."]) < 1.0
    with pytest.raises(ValueError):
        self_bleu(["only one"])


def test_embedding_diversity_from_vectors_hand_computed():
    # cosines: (e1, e2) = 0, (e1, e1+e2) = 1/√2, (e2, e1+e2) = 1/√2 -> mean √2/3
    assert embedding_diversity_from_vectors(np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])) == pytest.approx(
        1 - math.sqrt(2) / 3
    )
    assert embedding_diversity_from_vectors(np.array([[2.0, 0.0], [0.0, 3.0]])) == pytest.approx(1.0)  # scale-free
    assert embedding_diversity_from_vectors(np.array([[1.0, 2.0]] * 3)) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError):
        embedding_diversity_from_vectors(np.array([[1.0, 0.0]]))


class LookupEmbedder:
    """Stands in for the SentenceTransformer: fixed vectors by text; records each call."""

    def __init__(self, table):
        self.table, self.calls = table, []

    def encode(self, texts, convert_to_numpy=True):
        self.calls.append(list(texts))
        return np.array([self.table[t] for t in texts], dtype=float)


def test_diversity_report_per_and_across_input():
    table = {"a b": [1, 0], "a c": [0, 1], "x y": [0, 1]}
    embedder = LookupEmbedder(table)
    groups = [["a b", "a c"], ["x y", "x y"]]
    group_tokens = [[[1, 2], [1, 3]], [[4, 5], [4, 5]]]
    report = diversity_report(groups, group_tokens, ["a b", "x y"], [[1, 2], [4, 5]], vocab_size=10, embedder=embedder)
    assert len(embedder.calls) == 1 and embedder.calls[0] == ["a b", "a c", "x y", "x y", "a b", "x y"]
    # embeddings: group 1 orthogonal (1), group 2 identical (0) -> per-input 0.5; singles orthogonal -> 1
    assert report["per_input"]["embedding"] == pytest.approx(0.5)
    assert report["across_input"]["embedding"] == pytest.approx(1.0)
    # self-BLEU: group 1 "a b" vs "a c": precisions 1/2, then 0/1 -> 1/2 -> (1/4)^(1/2) = 1/2; group 2 identical: 1
    assert report["per_input"]["self_bleu"] == pytest.approx((0.5 + 1.0) / 2)
    assert report["across_input"]["self_bleu"] == 0.0
    for key in ("per_input", "across_input"):
        assert set(report[key]) == {"ead", "self_bleu", "embedding"}
    assert report["per_input"]["ead"] == pytest.approx((ead(group_tokens[0], 10) + ead(group_tokens[1], 10)) / 2)
    assert report["across_input"]["ead"] == pytest.approx(ead([[1, 2], [4, 5]], 10))


@pytest.fixture(scope="module")
def minilm():
    from tuneoff.eval.diversity import load_embedder

    return load_embedder("cpu")


def test_embedding_diversity_with_minilm(minilm):
    from tuneoff.eval.diversity import load_embedder

    assert load_embedder("cpu") is minilm  # cached: loads once per process
    same = embedding_diversity(["the film was wonderful"] * 3, embedder=minilm)
    different = embedding_diversity(
        ["the film was wonderful", "stock prices fell sharply today", "a recipe for bread"], embedder=minilm
    )
    assert abs(same) < 1e-5 and different > 0.5
