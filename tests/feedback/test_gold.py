"""The gold judge: SST-2 normalisation, accuracy, parity with scikit-learn, the pickle-free cache, the CLI."""

from __future__ import annotations

import argparse
import gzip
import re
import shutil

import numpy as np
import pytest

from tuneoff.errors import DataError, TuneoffError
from tuneoff.feedback import gold, gold_cli
from tuneoff.feedback.gold import GoldConfig, normalize_like_sst2

# ---------------------------------------------------------------- normalisation (hand-written expectations)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("I didn't like it. It's \"boring\" (really)!", "i did n't like it . it 's `` boring '' -lrb- really -rrb- !"),
        (
            "The U.S. release, by Mr. Smith, cost $2,500... Wow!",
            "the u.s. release , by mr. smith , cost $ 2,500 ... wow !",
        ),
        (
            "We're gonna love the 'best' writer/director's film; they'll cannot.",
            "we 're gon na love the ` best ' writer\\/director 's film ; they 'll can not .",
        ),
        ("Rock 'n' roll -- it won't stop\u2014ever\u2026", "rock 'n' roll -- it wo n't stop -- ever ..."),
        ("CAN'T WAIT!!", "ca n't wait ! !"),
        ("the actors' work [sic]", "the actors ' work -lsb- sic -rsb-"),
        ("r&b & soul", "r&b & soul"),
        ("It ran 1:30, at 3.5 stars.", "it ran 1:30 , at 3.5 stars ."),
        ("\u2018Great\u2019 film, I\u2019d say", "` great ' film , i 'd say"),
        ("  multiple   spaces\tand\nnewlines ", "multiple spaces and newlines"),
        ("", ""),
    ],
)
def test_normalize_like_sst2(raw, expected):
    assert normalize_like_sst2(raw) == expected


def test_normalize_keeps_sst2_dev_unchanged():
    texts, _ = gold.read_sst2("dev")
    assert [text for text in texts if normalize_like_sst2(text) != text] == []


def test_normalize_is_idempotent():
    raw = "He said: \"It's (sort of) great... isn't it?\" I'd say 9/10."
    once = normalize_like_sst2(raw)
    assert normalize_like_sst2(once) == once


# ---------------------------------------------------------------- the judge, built once for this module


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Build through the public path (load_gold_judge on an empty cache) and keep the sklearn objects."""
    cache = tmp_path_factory.mktemp("gold-cache")
    fitted = {}
    real_fit = gold.fit_sklearn

    def capture(*args, **kwargs):
        fitted["pipeline"] = real_fit(*args, **kwargs)
        return fitted["pipeline"]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gold, "fit_sklearn", capture)
        judge = gold.load_gold_judge(cache)
    return judge, fitted["pipeline"], cache


def test_accuracy_on_dev_and_test(built):
    judge, _, _ = built
    accuracy = gold.evaluate(judge)
    assert accuracy == judge.info["accuracy"]
    assert accuracy["dev"] >= 0.82
    assert accuracy["test"] >= 0.82
    assert not judge.from_cache and judge.info["train_examples"] == 67349


def test_scores_match_sklearn_pipeline(built):
    """Scoring from the saved arrays equals the fitted scikit-learn pipeline (an independent implementation)."""
    from scipy.sparse import hstack

    judge, (vectorizers, classifier), _ = built
    texts, _ = gold.read_sst2("dev")
    texts = texts + ["What a wonderful, moving film!", "Dull (and far too long)."]
    normalized = [normalize_like_sst2(text) for text in texts]
    features = hstack([vectorizer.transform(normalized) for vectorizer in vectorizers]).tocsr()
    np.testing.assert_allclose(judge.logit(texts), classifier.decision_function(features), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(judge.score(texts), classifier.predict_proba(features)[:, 1], rtol=1e-10, atol=1e-12)


def test_cached_reload_gives_identical_scores(built, monkeypatch):
    judge, _, cache = built
    monkeypatch.setattr(gold, "build_gold_judge", lambda config: pytest.fail("the cached judge was rebuilt"))
    reloaded = gold.load_gold_judge(cache)
    assert reloaded.from_cache and reloaded.path == judge.path == gold.cache_path(cache)
    texts = gold.read_sst2("test")[0] + ["", "an utterly charming film", "Worst. Movie. Ever."]
    assert np.array_equal(reloaded.logit(texts), judge.logit(texts))
    assert reloaded.info == judge.info


def test_cache_holds_no_pickle(built):
    _, _, cache = built
    files = sorted(path.name for path in gold.cache_path(cache).iterdir())
    assert {name.rsplit(".", 1)[1] for name in files} == {"json", "npy"}
    for name in files:
        if name.endswith(".npy"):
            np.load(gold.cache_path(cache) / name, allow_pickle=False)


def test_damaged_cache_is_a_user_error(built, tmp_path):
    _, _, cache = built
    copy = gold.cache_path(tmp_path)
    shutil.copytree(gold.cache_path(cache), copy)
    (copy / "coef_0.npy").write_bytes(b"not an array")
    with pytest.raises(TuneoffError, match="damaged"):
        gold.load_gold_judge(tmp_path)


def test_positive_text_scores_higher_than_negative(built):
    judge, _, _ = built
    positive = ["A wonderful, moving film with superb performances.", "I loved every minute of it!"]
    negative = ["A dull, tedious mess; the worst movie of the year.", "I hated it and walked out bored."]
    scores = judge.score(positive + negative)
    assert scores.shape == (4,) and np.all((scores >= 0) & (scores <= 1))
    assert scores[:2].min() > 0.8 > 0.2 > scores[2:].max()
    assert judge.score([]).shape == (0,)
    with pytest.raises(TypeError):
        judge.score("a single string")


def test_cache_key_follows_data_and_hyperparameters(tmp_path, monkeypatch):
    key = gold.cache_key(GoldConfig())
    assert gold.cache_key(GoldConfig()) == key
    assert gold.cache_key(GoldConfig(C=1.0)) != key
    copy = tmp_path / "sst2"
    shutil.copytree(gold.SST2_DIR, copy)
    with gzip.open(copy / "train.tsv.gz", "at", encoding="utf-8") as handle:
        handle.write("1\tone more phrase\n")
    monkeypatch.setattr(gold, "SST2_DIR", copy)
    assert gold.cache_key(GoldConfig()) != key


def test_cache_folder_honours_tuneoff_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEOFF_CACHE", str(tmp_path))
    assert gold.default_cache_dir() == tmp_path / "gold"
    assert gold.cache_path().parent == tmp_path / "gold"


def test_bad_data_file_names_line(tmp_path, monkeypatch):
    (tmp_path / "dev.tsv.gz").write_bytes(gzip.compress(b"label\tcontent\n1\tfine\npositive\toops\n"))
    monkeypatch.setattr(gold, "SST2_DIR", tmp_path)
    with pytest.raises(DataError, match=r"dev\.tsv\.gz:3: field 'label'"):
        gold.read_sst2("dev")


def test_cli_eval_and_score(built, capsys):
    _, _, cache = built
    parser = argparse.ArgumentParser()
    gold_cli.add_parser(parser.add_subparsers(dest="verb"))
    args = parser.parse_args(["gold", "--cache-dir", str(cache), "--eval", "--score", "a gem", "--score", "awful"])
    assert args.func(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert str(gold.cache_path(cache)) in lines[0]
    assert len([line for line in lines if re.fullmatch(r"dev accuracy 0\.\d{3}", line)]) == 1
    assert len([line for line in lines if re.fullmatch(r"test accuracy 0\.\d{3}", line)]) == 1
    first, second = (float(line) for line in lines[-2:])
    assert first > 0.5 > second
