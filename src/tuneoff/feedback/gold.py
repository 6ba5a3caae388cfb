"""The gold judge: a sentiment classifier trained by tuneoff on the human labels of SST-2 train.

In the default experiment it stands in for people (DESIGN.md, "The default experiment"): simulated
annotators compare responses by its score, and alignment is measured with it. It must stay independent of
any reward model tuneoff trains, so it takes another data route (the human SST-2 labels, not preference
pairs) and another model family: tf-idf word uni+bigrams and character n-grams, logistic regression
(scikit-learn).

Built once (seconds) and cached without pickle: the vocabularies go to JSON, the idf weights and the
coefficients to ``.npy`` files, under ``$TUNEOFF_CACHE/gold/<key>/`` (default ``~/.cache/tuneoff``), where
``<key>`` hashes the training file, the hyperparameters and :data:`FORMAT_VERSION`, so a change rebuilds.
Scoring always runs from those arrays (:meth:`GoldJudge.logit`), in memory and after a reload alike.

SST-2 is lower-cased and Penn-Treebank tokenized; :func:`normalize_like_sst2` brings any text (model
output) into that form before scoring, and the training text goes through it too.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from tuneoff.errors import DataError, TuneoffError

SST2_DIR = Path(__file__).resolve().parent.parent / "assets" / "data" / "sst2"
SPLITS = {"train": "train.tsv.gz", "dev": "dev.tsv.gz", "test": "test.tsv.gz"}
FORMAT_VERSION = 1
"""Bump when normalisation, features or the saved format change: it is part of the cache key."""

# ---------------------------------------------------------------- text normalisation (PTB, like SST-2)

_UNICODE_PUNCTUATION = str.maketrans(
    {
        "\u2018": "'",
        "\u2019": "'",
        "\u201c": '"',
        "\u201d": '"',
        "\u2013": " -- ",
        "\u2014": " -- ",
        "\u2026": " ... ",
        "\u00a0": " ",
    }
)
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
# A period ends these tokens without ending the sentence (SST-2 keeps "mr." and "u.s." whole).
_ABBREVIATIONS = frozenset("mr mrs ms dr jr sr st vs etc inc co ltd bros mt no prof gen rev lt sgt capt col".split())
_CLITIC = r"(?:s|m|d|ll|re|ve|em|n|til|tis|twas)\b|n'"  # 's 're 'em 'n' 'til ...: not quotes

# Ordered (pattern, replacement) rules after the Penn Treebank tokenizer; each keeps SST-2 text unchanged.
_RULES = [
    (re.compile(r'^"'), " `` "),  # opening double quotes ...
    (re.compile(r'(?<=[\s(\[{<])"'), " `` "),
    (re.compile(r"``"), " `` "),
    (re.compile(r"(?<!\S)'(?!" + _CLITIC + r")(?=[^\W\d_])"), " ` "),  # ... and single: 'great' -> ` great '
    (re.compile(r"([:,])([^\d])"), r" \1 \2"),  # not inside numbers: 2,500 and 1:30
    (re.compile(r"([:,])$"), r" \1 "),
    (re.compile(r"\.\.\.+"), " ... "),
    (re.compile(r"[;@#$%?!]"), r" \g<0> "),
    (re.compile(r"(?<!\w)&|&(?!\w)"), " & "),  # but r&b stays whole
    (re.compile(r"(?<!\\)/"), r"\\/"),  # PTB escapes the slash
    (re.compile(r"[()\[\]{}]"), lambda m: f" {_BRACKETS[m.group()]} "),
    (re.compile(r"--"), " -- "),
    (re.compile(r"''"), " '' "),  # closing double quotes
    (re.compile(r'"'), " '' "),
    (re.compile(r"(?<!')([^' ])('s|'m|'d|') "), r"\1 \2 "),  # clitics: it's -> it 's (not 'n')
    (re.compile(r"([^' ])('ll|'re|'ve|n't) "), r"\1 \2 "),  # don't -> do n't
    (re.compile(r"\b(can)(not)\b"), r"\1 \2"),  # cannot -> can not
    (re.compile(r"\b(gon|wan|got)(na|ta)\b"), r"\1 \2"),  # gonna -> gon na
]


def _split_period(token: str) -> str:
    """``good.`` -> ``good .``; abbreviations (``mr.``, ``u.s.``, ``j.``) keep their period."""
    if not token.endswith(".") or token.endswith("..") or token == ".":
        return token
    stem = token[:-1]
    if "." in stem or stem in _ABBREVIATIONS or (len(stem) == 1 and stem.isalpha()):
        return token
    return f"{stem} ."


def normalize_like_sst2(text: str) -> str:
    """Lower-case and tokenize ``text`` the way SST-2 is: Penn Treebank tokens separated by one space.

    Punctuation is split off (``good.`` -> ``good .``), clitics too (``don't`` -> ``do n't``, ``it's`` ->
    ``it 's``), brackets become ``-lrb-``/``-rrb-``, double quotes ````` ``/``''``, and the slash ``\\/``.
    Text that is already in SST-2's form comes back unchanged. Unlike the treebank tokenizer, every
    sentence's final period is split, since model output often holds several sentences.
    """
    text = " " + text.translate(_UNICODE_PUNCTUATION).lower() + " "
    for pattern, replacement in _RULES:
        text = pattern.sub(replacement, text)
    return " ".join(_split_period(token) for token in text.split())


# ---------------------------------------------------------------- data


def read_sst2(split: str) -> tuple[list[str], np.ndarray]:
    """The sentences (as shipped) and 0/1 labels (1 = positive) of one SST-2 split: train, dev or test."""
    if split not in SPLITS:
        raise TuneoffError(f"unknown SST-2 split {split!r}; expected one of {', '.join(SPLITS)}")
    path = SST2_DIR / SPLITS[split]
    if not path.is_file():
        raise TuneoffError(f"the shipped SST-2 file {path} is missing; reinstall tuneoff")
    texts, labels = [], []
    with gzip.open(path, "rt", encoding="utf-8", newline="") as handle:
        for line_number, row in enumerate(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE), start=1):
            if line_number == 1:
                continue  # header: label<TAB>sentence (train) or label<TAB>content (dev, test)
            if len(row) != 2 or row[0] not in ("0", "1"):
                raise DataError(
                    str(path), line_number, "label", f"expected '0' or '1' and one text column, got {row!r}"
                )
            labels.append(int(row[0]))
            texts.append(row[1])
    return texts, np.asarray(labels, dtype=np.int64)


# ---------------------------------------------------------------- model


@dataclass(frozen=True)
class GoldConfig:
    """Hyperparameters of the gold judge; all of them enter the cache key."""

    word_ngram_range: tuple[int, int] = (1, 2)
    """Word n-grams over SST-2 tokens (whitespace-split, punctuation included)."""
    char_ngram_range: tuple[int, int] | None = (2, 5)
    """Character n-grams inside word boundaries (``char_wb``); ``None`` leaves them out."""
    char_min_df: int = 2
    """Drop character n-grams seen in fewer training phrases (halves that vocabulary, same accuracy)."""
    sublinear_tf: bool = True
    """tf -> 1 + log(tf), as in scikit-learn's ``TfidfVectorizer``."""
    C: float = 3.0
    """Inverse L2 strength of the logistic regression (best dev accuracy and log-loss among 1, 3, 5, 10, 30)."""
    max_iter: int = 2000
    """L-BFGS iterations; it converges well before this."""


@dataclass
class FeatureBlock:
    """One tf-idf vectorizer's saved state: its analyzer settings, vocabulary and idf weights."""

    analyzer: str
    """``"word"`` or ``"char_wb"``."""
    ngram_range: tuple[int, int]
    vocabulary: list[str]
    """Terms in column order."""
    idf: np.ndarray  # (V,)
    sublinear_tf: bool

    def __post_init__(self):
        from sklearn.feature_extraction.text import CountVectorizer

        self.ngram_range = tuple(self.ngram_range)
        # Given the vocabulary, a CountVectorizer needs no fitting: it counts exactly these terms.
        self._counter = CountVectorizer(
            analyzer=self.analyzer,
            ngram_range=self.ngram_range,
            token_pattern=r"\S+",
            vocabulary=self.vocabulary,
            lowercase=True,
            dtype=np.float64,
        )

    def tfidf(self, texts: Sequence[str]):
        """L2-normalised tf-idf rows (sparse, (N, V)), computed as ``TfidfVectorizer.transform`` does."""
        from sklearn.preprocessing import normalize

        counts = self._counter.transform(texts)  # (N, V) term counts
        if self.sublinear_tf:
            np.log(counts.data, out=counts.data)
            counts.data += 1.0
        counts = counts.multiply(self.idf[None, :]).tocsr()  # (N, V)
        return normalize(counts, norm="l2", copy=False)


@dataclass
class GoldJudge:
    """Scores text by P(positive sentiment), from saved arrays (no pickle, no fitted estimator needed)."""

    blocks: list[FeatureBlock]
    coef: list[np.ndarray]
    """Logistic-regression weights, one (V,) array per block."""
    intercept: float
    info: dict = field(default_factory=dict)
    """Config, cache key, build seconds, training size and dev/test accuracy of this build."""
    path: Path | None = None
    """The cache folder the judge was saved to or loaded from."""
    from_cache: bool = False
    """True when :func:`load_gold_judge` found it built already."""

    def logit(self, texts: Sequence[str]) -> np.ndarray:
        """log P(positive)/P(negative) of each text, after :func:`normalize_like_sst2`.  # (N,)"""
        if isinstance(texts, str):
            raise TypeError("GoldJudge scores a list of texts, got one string")
        normalized = [normalize_like_sst2(text) for text in texts]
        if not normalized:
            return np.zeros(0, dtype=np.float64)
        logits = np.full(len(normalized), self.intercept, dtype=np.float64)  # (N,)
        for block, weights in zip(self.blocks, self.coef):
            logits += block.tfidf(normalized) @ weights
        return logits

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """P(positive) in [0, 1] of each text.  # (N,)"""
        return np.exp(-np.logaddexp(0.0, -self.logit(texts)))  # σ(z) = 1 / (1 + e^-z), no overflow

    __call__ = score

    def save(self, folder: str | os.PathLike) -> Path:
        """Write the judge to ``folder`` atomically (a temporary sibling renamed into place)."""
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
        try:
            blocks = []
            for index, (block, weights) in enumerate(zip(self.blocks, self.coef)):
                vocabulary = json.dumps(block.vocabulary, ensure_ascii=False)
                (staging / f"vocabulary_{index}.json").write_text(vocabulary, encoding="utf-8")
                np.save(staging / f"idf_{index}.npy", block.idf)
                np.save(staging / f"coef_{index}.npy", weights)
                blocks.append(
                    dict(analyzer=block.analyzer, ngram_range=list(block.ngram_range), sublinear_tf=block.sublinear_tf)
                )
            meta = dict(format_version=FORMAT_VERSION, intercept=self.intercept, blocks=blocks, info=self.info)
            (staging / "judge.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
            try:
                staging.rename(folder)
            except OSError:
                if not (folder / "judge.json").is_file():
                    raise
                shutil.rmtree(staging)  # another process saved the same judge first
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self.path = folder
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "GoldJudge":
        """Read a judge written by :meth:`save` (JSON and ``.npy`` with ``allow_pickle=False`` only)."""
        folder = Path(folder)
        meta = json.loads((folder / "judge.json").read_text(encoding="utf-8"))
        if meta.get("format_version") != FORMAT_VERSION:
            raise TuneoffError(
                f"{folder} holds a gold judge of format {meta.get('format_version')}, expected {FORMAT_VERSION}"
            )
        blocks, coef = [], []
        for index, spec in enumerate(meta["blocks"]):
            vocabulary = json.loads((folder / f"vocabulary_{index}.json").read_text(encoding="utf-8"))
            idf = np.load(folder / f"idf_{index}.npy", allow_pickle=False)
            blocks.append(
                FeatureBlock(spec["analyzer"], tuple(spec["ngram_range"]), vocabulary, idf, spec["sublinear_tf"])
            )
            coef.append(np.load(folder / f"coef_{index}.npy", allow_pickle=False))
        return cls(blocks, coef, float(meta["intercept"]), meta["info"], path=folder)


def make_vectorizers(config: GoldConfig) -> list:
    """The unfitted scikit-learn ``TfidfVectorizer``s of ``config``, one per feature block."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizers = [
        TfidfVectorizer(
            analyzer="word", ngram_range=config.word_ngram_range, token_pattern=r"\S+", sublinear_tf=config.sublinear_tf
        )
    ]
    if config.char_ngram_range is not None:
        vectorizers.append(
            TfidfVectorizer(
                analyzer="char_wb",
                ngram_range=config.char_ngram_range,
                min_df=config.char_min_df,
                sublinear_tf=config.sublinear_tf,
            )
        )
    return vectorizers


def fit_sklearn(config: GoldConfig, texts: Sequence[str], labels: np.ndarray):
    """Fit the vectorizers and the logistic regression on normalised ``texts``; return ``(vectorizers, classifier)``.

    The judge's own scoring (:meth:`GoldJudge.logit`) is checked against this pipeline in the tests.
    """
    from scipy.sparse import hstack
    from sklearn.linear_model import LogisticRegression

    vectorizers = make_vectorizers(config)
    features = hstack([vectorizer.fit_transform(texts) for vectorizer in vectorizers]).tocsr()  # (N, ΣV)
    classifier = LogisticRegression(C=config.C, max_iter=config.max_iter)
    classifier.fit(features, labels)
    return vectorizers, classifier


def judge_from_sklearn(vectorizers: list, classifier, info: dict | None = None) -> GoldJudge:
    """Take the arrays out of a fitted pipeline: vocabularies, idf weights, per-block coefficients."""
    blocks, coef, start = [], [], 0
    weights = classifier.coef_[0]  # (ΣV,)
    for vectorizer in vectorizers:
        vocabulary = sorted(vectorizer.vocabulary_, key=vectorizer.vocabulary_.get)
        blocks.append(
            FeatureBlock(
                vectorizer.analyzer,
                vectorizer.ngram_range,
                vocabulary,
                np.asarray(vectorizer.idf_, dtype=np.float64),
                vectorizer.sublinear_tf,
            )
        )
        coef.append(np.ascontiguousarray(weights[start : start + len(vocabulary)], dtype=np.float64))
        start += len(vocabulary)
    return GoldJudge(blocks, coef, float(classifier.intercept_[0]), dict(info or {}))


def build_gold_judge(config: GoldConfig = GoldConfig()) -> GoldJudge:
    """Train the judge on shipped SST-2 train (normalised) and measure it on dev and test."""
    start = time.perf_counter()
    texts, labels = read_sst2("train")
    normalized = [normalize_like_sst2(text) for text in texts]
    judge = judge_from_sklearn(*fit_sklearn(config, normalized, labels))
    build_seconds = time.perf_counter() - start
    config_as_saved = json.loads(json.dumps(asdict(config)))  # tuples become lists, as a reload reads them
    judge.info = dict(
        config=config_as_saved,
        key=cache_key(config),
        train_examples=len(texts),
        build_seconds=round(build_seconds, 2),
        accuracy=evaluate(judge),
    )
    return judge


# ---------------------------------------------------------------- cache


def cache_key(config: GoldConfig = GoldConfig()) -> str:
    """sha256 of the training file's bytes, the hyperparameters and :data:`FORMAT_VERSION` (hex, 16 chars)."""
    digest = hashlib.sha256()
    digest.update((SST2_DIR / SPLITS["train"]).read_bytes())
    digest.update(json.dumps(dict(config=asdict(config), format_version=FORMAT_VERSION), sort_keys=True).encode())
    return digest.hexdigest()[:16]


def default_cache_dir() -> Path:
    """``$TUNEOFF_CACHE/gold`` where set, else ``~/.cache/tuneoff/gold``."""
    return Path(os.environ.get("TUNEOFF_CACHE") or Path.home() / ".cache" / "tuneoff") / "gold"


def cache_path(cache_dir: str | os.PathLike | None = None, config: GoldConfig = GoldConfig()) -> Path:
    """The folder that holds the judge built with ``config``."""
    return Path(cache_dir or default_cache_dir()) / cache_key(config)


def load_gold_judge(cache_dir: str | os.PathLike | None = None, config: GoldConfig = GoldConfig()) -> GoldJudge:
    """The gold judge from the cache, built (seconds) and saved there first when missing."""
    folder = cache_path(cache_dir, config)
    if (folder / "judge.json").is_file():
        try:
            judge = GoldJudge.load(folder)
        except (OSError, ValueError, KeyError) as error:  # json.JSONDecodeError is a ValueError
            message = f"the cached gold judge in {folder} is damaged ({error}); delete it to rebuild"
            raise TuneoffError(message) from error
        judge.from_cache = True
        return judge
    judge = build_gold_judge(config)
    try:
        judge.save(folder)
    except OSError as error:
        raise TuneoffError(f"cannot write the gold judge to {folder}: {error.strerror or error}") from error
    return judge


def evaluate(judge: GoldJudge | None = None) -> dict[str, float]:
    """Accuracy of ``judge`` (default: the cached one) on SST-2 dev and test: ``{"dev": acc, "test": acc}``."""
    judge = load_gold_judge() if judge is None else judge
    accuracy = {}
    for split in ("dev", "test"):
        texts, labels = read_sst2(split)
        predictions = (judge.logit(texts) > 0).astype(np.int64)  # (N,) the rule of LogisticRegression.predict
        accuracy[split] = float((predictions == labels).mean())
    return accuracy
