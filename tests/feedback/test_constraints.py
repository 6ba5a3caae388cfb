"""Verifiable-instruction checkers: a hand-made passing and failing response for every kind, then loose checking
and the gold score."""

import pytest

from tuneoff.feedback.constraints import KINDS, Constraint, follows, loose_variants, score, sentences, words

C = Constraint
CASES = [
    (C("length_constraints:number_words", n=5, relation="at least"), "one two three four five", "one two three four"),
    (C("length_constraints:number_words", n=5, relation="less than"), "one two three four", "one two three four five"),
    (C("length_constraints:number_sentences", n=2, relation="at least"), "It rains. We stay in!", "It rains all day."),
    (C("length_constraints:number_sentences", n=3, relation="less than"), "One. Two.", "One. Two. Three."),
    (C("length_constraints:number_paragraphs", n=2), "First part.\n***\nSecond part.", "First.\n\nSecond."),
    (C("keywords:existence", keywords=("river", "stone")), "A stone sank in the River.", "A stone sank in a lake."),
    (C("keywords:forbidden_words", keywords=("bad",)), "A badger walked by.", "That was bad, truly."),
    (C("keywords:frequency", keywords=("sun",), n=2, relation="at least"), "Sun, sun, sun.", "The sun rose."),
    (C("keywords:frequency", keywords=("sun",), n=2, relation="less than"), "The sun rose.", "sun and sun"),
    (C("punctuation:no_comma"), "No commas here at all.", "Well, here is one."),
    (C("change_case:english_lowercase"), "all quiet here.", "All quiet here."),
    (C("change_case:english_capital"), "ALL LOUD HERE!", "ALL LOUD here!"),
    (C("detectable_format:title"), "<<A Day Out>>\nWe went.", "A Day Out\nWe went."),
    (C("detectable_format:number_bullet_lists", n=2), "* apples\n- pears\nDone.", "* apples\n* pears\n* plums"),
    (C("detectable_format:number_highlighted_sections", n=2), "*one* and *two*", "only *one* here"),
    (C("detectable_content:postscript"), "Thanks.\nP.S. See you soon.", "Thanks. See you soon. PS"),
    (C("startend:end_checker", phrase="Any other questions?"), "Here it is. Any other questions?",
     "Any other questions? Here it is."),
    (C("startend:quotation"), '"A quoted reply."', 'A "partly" quoted reply.'),
    (C("detectable_format:json_format"), '```json\n{"a": [1, 2]}\n```', "{'a': 1}"),
    (C("detectable_content:number_placeholders", n=2), "Send it to [name] at [address].", "Send it to [name]."),
]  # fmt: skip


@pytest.mark.parametrize("constraint, passing, failing", CASES, ids=[f"{c.kind}-{i}" for i, (c, _, _) in
                                                                      enumerate(CASES)])  # fmt: skip
def test_every_kind_passes_and_fails_by_hand(constraint, passing, failing):
    assert follows(constraint, passing) and not follows(constraint, failing)
    assert constraint.instruction()  # every kind has the text a person reads


def test_every_kind_is_covered():
    assert {c.kind for c, _, _ in CASES} == set(KINDS)


def test_words_and_sentences_by_hand():
    assert words("It's a dog-friendly place, isn't it?") == ["It", "s", "a", "dog", "friendly", "place", "isn", "t",
                                                             "it"]  # fmt: skip
    assert sentences("Hi there. How are you?! Fine...  ok") == ["Hi there.", "How are you?!", "Fine...", "ok"]
    assert sentences("  ") == []


def test_loose_checking_forgives_a_first_line_a_last_line_and_asterisks():
    title = C("detectable_format:title")
    lowercase = C("change_case:english_lowercase")
    assert not follows(lowercase, "Sure! here it is:\nall lowercase now.")
    assert follows(lowercase, "Sure! here it is:\nall lowercase now.", loose=True)  # the first line dropped
    end = C("startend:end_checker", phrase="The end.")
    assert follows(end, "Story.\nThe end.\n(word count: 3)", loose=True)  # the last line dropped
    assert not follows(end, "Story.\nThe end.\n(word count: 3)")
    assert follows(title, "**<<Title>>**\ntext") and follows(C("keywords:existence", keywords=("x",)), "*x*")
    assert "text" in loose_variants("**<<Title>>**\ntext")[1]
    assert not follows(C("punctuation:no_comma"), "   ")  # an empty response follows nothing


def test_score_is_the_fraction_followed():
    constraints = [C("punctuation:no_comma"), C("change_case:english_lowercase"), C("keywords:existence",
                   keywords=("tea",))]  # fmt: skip
    assert score(constraints, "i like tea") == 1.0
    assert score(constraints, "I like tea") == pytest.approx(2 / 3)
    assert score(constraints, "I like coffee, a lot") == 0.0
    with pytest.raises(ValueError):
        score([], "x")
    with pytest.raises(ValueError):
        C("no:such_kind")
