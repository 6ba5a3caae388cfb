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


# ---------------------------------------------------------------- any Hugging Face reward model


def hf_reward_model(folder, kind: str = "gpt2"):
    """A randomly initialised sequence classifier with one label on the tiny tokenizer (GPT-2 or Llama shaped),
    saved as TRL's RewardTrainer saves one: config with pad_token_id, tokenizer beside it."""
    from transformers import GPT2Config, GPT2ForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

    from tuneoff.models.load import load_tokenizer

    tokenizer = load_tokenizer("tiny")
    torch.manual_seed(7)
    if kind == "gpt2":
        config = GPT2Config(vocab_size=len(tokenizer), n_layer=2, n_embd=32, n_head=2, num_labels=1)
        model = GPT2ForSequenceClassification(config)
    else:
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=64, num_labels=1)  # fmt: skip
        model = LlamaForSequenceClassification(config)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model.eval(), tokenizer


def trl_style_ids(tokenizer, prompt, response) -> list[int]:
    """What TRL's RewardTrainer tokenizes: prompt + response + EOS; a conversation through the chat template."""
    if isinstance(prompt, str):
        return tokenizer(prompt + response + tokenizer.eos_token)["input_ids"]
    messages = [*prompt, {"role": "assistant", "content": response}]
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_a_hugging_face_reward_model_scores_as_transformers_does_through_every_entry_point(tmp_path, kind):
    """The same rewards from load_scorer (RL loops, tuneoff eval), load_reward_model (an experiment's judge and
    proxy), the experiment judge's scores, and the model's own forward on TRL's formatting, one row at a time."""
    from tuneoff.compare.evaluate import judge_scores
    from tuneoff.feedback.judges import SequenceClassifierScorer, load_reward_model

    folder = tmp_path / "rm"
    model, tokenizer = hf_reward_model(folder, kind)
    prompts = ["the movie is", "a film", [{"role": "user", "content": "how was it?"}]]
    responses = [" great fun", " that never ends , and it is dull", "lovely"]
    with torch.no_grad():
        expected = torch.stack(
            [model(torch.tensor([trl_style_ids(tokenizer, p, r)])).logits[0, 0] for p, r in zip(prompts, responses)]
        )
    scorer = load_scorer(str(folder))
    assert isinstance(scorer, SequenceClassifierScorer)
    torch.testing.assert_close(scorer.score(prompts, responses), expected, atol=1e-5, rtol=0)  # batched, padded
    torch.testing.assert_close(load_reward_model(folder).score(prompts, responses, batch_size=1), expected)
    torch.testing.assert_close(torch.tensor(judge_scores(str(folder), prompts, responses)), expected, atol=1e-5,
                               rtol=0)  # fmt: skip


def test_what_is_not_a_reward_model_is_refused_clearly(tmp_path):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from tuneoff.feedback.judges import reward_model_kind

    GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=8, n_head=2, num_labels=3)).save_pretrained(tmp_path)
    with pytest.raises(TuneoffError, match="3 labels is not a reward model"):
        reward_model_kind(tmp_path)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(TuneoffError, match="merge it into its base"):
        reward_model_kind(tmp_path / "adapter")
