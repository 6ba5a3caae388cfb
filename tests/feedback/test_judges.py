"""The judges' one interface and the one text a text judge reads."""

import pytest
import torch

from tuneoff.data.formats import Message
from tuneoff.errors import TuneoffError
from tuneoff.feedback.judges import GoldScorer, judge_text, load_scorer


def test_judge_text_continues_a_plain_prompt_as_decoded():
    assert judge_text("the film is", " a delight") == "the film is a delight"
    assert judge_text("the movie", "s are long") == "the movies are long"  # a continuation may end the prompt's word


def test_judge_text_reads_a_conversation_then_the_response():
    messages = (Message("system", "be kind"), Message("user", "how was it?"))
    assert judge_text(messages, "lovely") == "be kind how was it? lovely"
    assert judge_text([{"role": "user", "content": "how was it?"}], "lovely") == "how was it? lovely"


def test_gold_scorer_is_the_gold_logit_of_the_judge_text():
    from tuneoff.feedback.gold import load_gold_judge

    prompts, responses = ["the film is", "the plot"], [" a delight", " is a mess"]
    scores = load_scorer("gold").score(prompts, responses)
    assert isinstance(scores, torch.Tensor) and scores.dtype == torch.float32 and scores.shape == (2,)
    expected = load_gold_judge().logit([judge_text(p, r) for p, r in zip(prompts, responses)])
    assert torch.allclose(scores, torch.tensor(expected, dtype=torch.float32))
    assert scores[0] > 0 > scores[1]
    assert isinstance(load_scorer("gold"), GoldScorer)


def test_load_scorer_needs_a_reward():
    with pytest.raises(TuneoffError, match="no reward given"):
        load_scorer("")
    with pytest.raises(TuneoffError, match="not a reward model folder"):
        load_scorer("no/such/folder")
