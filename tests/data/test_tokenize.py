import json

import pytest
import torch

from tuneoff.data.formats import Message, SFTExample, UnpairedExample, load_sft, load_unpaired, parse_sft
from tuneoff.data.tokenize import (
    IGNORE,
    Tokenized,
    TokenizeReport,
    UnpairedIds,
    encode_unpaired,
    fit_length,
    pack,
    packed_batch,
    pad_batch,
    tokenize_dataset,
    tokenize_sft,
    tokenize_unpaired,
)
from tuneoff.errors import DataError, TuneoffError


def test_prompt_completion_masks_prompt(tiny_tokenizer):
    tok = tiny_tokenizer
    example = SFTExample(prompt="the film is", completion=" a charming delight .", where="x.jsonl:1")
    out = tokenize_sft(example, tok)
    prompt_ids = tok("the film is", add_special_tokens=False)["input_ids"]
    completion_ids = tok(" a charming delight .", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert out.input_ids == prompt_ids + completion_ids
    assert out.labels == [IGNORE] * len(prompt_ids) + completion_ids
    full = tokenize_sft(example, tok, completion_only_loss=False)
    assert full.labels == [IGNORE] + (prompt_ids + completion_ids)[1:]


def test_text_trains_on_everything_but_first_token(tiny_tokenizer):
    out = tokenize_sft(SFTExample(text="a fine movie ."), tiny_tokenizer)
    assert out.input_ids[-1] == tiny_tokenizer.eos_token_id
    assert out.labels == [IGNORE] + out.input_ids[1:]


def test_messages_label_only_assistant_turns(tiny_tokenizer):
    tok = tiny_tokenizer
    messages = (
        Message("user", "rate it"),
        Message("assistant", "great"),
        Message("user", "why"),
        Message("assistant", "fun"),
    )
    out = tokenize_sft(SFTExample(messages=messages), tok)
    trained = tok.decode([i for i, l in zip(out.input_ids, out.labels) if l != IGNORE])
    # ChatML: each assistant turn's text and its end-of-turn marker and newline, nothing of the user turns.
    assert trained == "great<|im_end|>\nfun<|im_end|>\n"


def test_overlong_policies(tiny_tokenizer):
    long = Tokenized(list(range(10)), [IGNORE] * 4 + list(range(4, 10)))
    report = TokenizeReport()
    cut = fit_length(long, 6, "truncate", "f.jsonl:3", report)
    assert cut.input_ids == [0, 1, 2, 3, 4, 5] and cut.labels == [IGNORE] * 4 + [4, 5]
    assert report.truncated == 1
    # A truncation that leaves no trainable token drops the record.
    assert fit_length(long, 4, "truncate", "f.jsonl:3", report) is None
    assert fit_length(long, 6, "drop", "f.jsonl:4", report) is None
    assert len(report.dropped) == 2 and report.dropped[1].startswith("f.jsonl:4")
    try:
        fit_length(long, 6, "error", "f.jsonl:5", report)
    except DataError as error:
        assert str(error).startswith("f.jsonl:5:") and "max_length 6" in str(error)
    else:
        raise AssertionError("expected DataError")


def test_tokenize_dataset_reports(tiny_tokenizer):
    long_text = " ".join(["word"] * 50)
    n_long = len(tiny_tokenizer(long_text, add_special_tokens=False)["input_ids"]) + 1  # + EOS
    examples = [SFTExample(text="short ."), SFTExample(text=long_text, where="f:2")]
    out, report = tokenize_dataset(examples, tiny_tokenizer, max_length=8, overlong="drop")
    assert len(out) == 1 and report.kept == 1 and report.dropped == [f"f:2 ({n_long} tokens)"]


def test_pad_batch_hand_computed():
    batch = pad_batch([Tokenized([1, 2, 3], [IGNORE, 2, 3]), Tokenized([4], [IGNORE])], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 2, 3], [IGNORE, IGNORE, IGNORE]]
    assert batch["num_tokens"].item() == 4


def test_pack_first_fit_decreasing():
    lengths = [5, 3, 4, 2, 6]
    examples = [Tokenized([n] * n, [n] * n) for n in lengths]
    bins = pack(examples, max_length=8)
    # Sorted 6,5,4,3,2: 6 -> bin0 (room 2); 5 -> bin1 (room 3); 4 -> bin2 (room 4); 3 -> bin1 (room 0); 2 -> bin0.
    assert [[len(e.input_ids) for e in b] for b in bins] == [[6, 2], [5, 3], [4]]


def test_packed_batch_positions_and_labels():
    rows = [[Tokenized([7, 8, 9], [IGNORE, 8, 9]), Tokenized([5, 6], [IGNORE, 6])], [Tokenized([4, 3], [IGNORE, 3])]]
    batch = packed_batch(rows, pad_id=1)
    assert batch["input_ids"].tolist() == [[7, 8, 9, 5, 6], [4, 3, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    assert batch["labels"].tolist() == [[IGNORE, 8, 9, IGNORE, 6], [IGNORE, 3, IGNORE, IGNORE, IGNORE]]
    assert "attention_mask" not in batch and batch["num_tokens"].item() == 7


def test_packing_does_not_leak_attention_across_examples():
    """Per-token losses of a packed row equal those of each example run alone."""
    from tuneoff.losses import shift_targets
    from tuneoff.models.load import load_model

    torch.manual_seed(0)
    model = load_model("tiny").eval()
    a = Tokenized(list(range(10, 17)), [IGNORE] + list(range(11, 17)))
    b = Tokenized(list(range(30, 35)), [IGNORE] + list(range(31, 35)))

    def token_losses(batch):
        logits = model(**{k: v for k, v in batch.items() if k not in ("labels", "num_tokens")}, use_cache=False).logits
        targets = shift_targets(batch["labels"])
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none")
        return losses[targets != IGNORE]

    with torch.no_grad():
        packed = token_losses(packed_batch([[a, b]], pad_id=1))
        alone = torch.cat([token_losses(pad_batch([a], 1)), token_losses(pad_batch([b], 1))])
    assert packed.shape == alone.shape == (10,)
    assert torch.allclose(packed, alone, atol=1e-5)


# ---------------------------------------------------------------- conversations with tools, other roles


TOOL_TEMPLATE = (  # a ChatML template that renders tools, tool calls and the tool and developer roles
    "{%- if tools %}<|im_start|>system\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role not in ['system', 'developer', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('unknown role ' + m.role) }}{% endif %}"
    "<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{%- for c in m.tool_calls or [] %}<tool_call>{{ {'name': c.function.name, 'arguments': c.function.arguments}"
    " | tojson }}</tool_call>{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
USER = {"role": "user", "content": "Weather in Paris?"}
CALL = {
    "role": "assistant",
    "content": "",
    "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
}
TOOL = {"role": "tool", "name": "get_weather", "tool_call_id": "c1", "content": "18 C, sunny"}
ANSWER = {"role": "assistant", "content": "It is sunny, 18 C."}
SCHEMA = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def with_template(template):
    from tuneoff.models.load import load_tokenizer

    tokenizer = load_tokenizer("tiny")
    tokenizer.chat_template = template
    return tokenizer


def trained_text(tokenizer, tokenized) -> str:
    return tokenizer.decode([i for i, label in zip(tokenized.input_ids, tokenized.labels) if label != IGNORE])


def jsonl(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_conversational_prompt_completion_trains_on_the_completion_only(tiny_tokenizer):
    tok = tiny_tokenizer
    row = {
        "prompt": [
            {"role": "user", "content": "rate it"},
            {"role": "assistant", "content": "great"},
            {"role": "user", "content": "why"},
        ],
        "completion": [{"role": "assistant", "content": "fun"}],
    }
    out = tokenize_sft(parse_sft(row), tok)
    assert trained_text(tok, out) == "fun<|im_end|>\n"  # the prompt's assistant turn is context, not a target
    rendered = tok.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
    assert out.input_ids == tok(rendered, add_special_tokens=False)["input_ids"]
    everything = tokenize_sft(parse_sft(row), tok, completion_only_loss=False)
    assert everything.labels == [IGNORE] + everything.input_ids[1:]


def test_tool_calls_reach_the_template_and_only_assistant_turns_are_trained(tmp_path):
    tok = with_template(TOOL_TEMPLATE)
    developer = {"role": "developer", "content": "Use the tools."}
    messages = jsonl(tmp_path, [{"messages": [developer, USER, CALL, TOOL, ANSWER], "tools": [SCHEMA]}])
    pcs = jsonl(tmp_path, [{"prompt": [USER], "completion": [CALL, TOOL, ANSWER], "tools": [SCHEMA]}], "pc.jsonl")
    (tokenized, pc), report = tokenize_dataset(load_sft(messages) + load_sft(pcs), tok, max_length=512)
    assert report.kept == 2
    text = tok.decode(tokenized.input_ids)
    assert text.startswith('<|im_start|>system\n{"type": "function", "function": {"name": "get_weather"')
    assert "<|im_start|>developer\nUse the tools.<|im_end|>" in text and "<|im_start|>tool\n18 C, sunny" in text
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call><|im_end|>\n'
    # The call and the final answer are learnt; the user's question and the tool's output are not.
    assert trained_text(tok, tokenized) == call + "It is sunny, 18 C.<|im_end|>\n"
    assert trained_text(tok, pc) == call + "It is sunny, 18 C.<|im_end|>\n"


def test_template_without_tool_support_is_a_clear_error(tmp_path, tiny_tokenizer):
    # The tiny model's ChatML template prints only role and content: the tool call would vanish.
    path = jsonl(tmp_path, [{"messages": [USER, CALL, TOOL, ANSWER]}])
    with pytest.raises(DataError) as caught:
        tokenize_dataset(load_sft(path), tiny_tokenizer, max_length=512)
    assert str(caught.value).startswith(f"{path}:1: the chat template leaves out the tool_calls of message 1")
    # The tool and developer roles themselves it renders (ChatML prints any role).
    path = jsonl(tmp_path, [{"messages": [{"role": "developer", "content": "be brief"}, USER, ANSWER]}], "d.jsonl")
    assert (
        trained_text(tiny_tokenizer, tokenize_dataset(load_sft(path), tiny_tokenizer, 512)[0][0])
        == "It is sunny, 18 C.<|im_end|>\n"
    )


def test_template_that_rejects_or_drops_a_role_is_a_clear_error(tmp_path):
    strict = with_template(
        "{% for m in messages %}{% if m.role not in ['system', 'user', 'assistant'] %}"
        "{{ raise_exception('Conversation roles must be system, user or assistant') }}{% endif %}"
        "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    )
    path = jsonl(tmp_path, [{"messages": [{"role": "developer", "content": "be brief"}, USER, ANSWER]}])
    with pytest.raises(DataError) as caught:
        tokenize_dataset(load_sft(path), strict, max_length=512)
    assert str(caught.value) == (
        f"{path}:1: the chat template cannot render this conversation (roles [developer, "
        "user, assistant]): TemplateError: Conversation roles must be system, user or assistant"
    )
    silent = with_template(
        "{% for m in messages %}{% if m.role != 'tool' %}<|im_start|>{{ m.role }}\n{{ m.content }}"
        "<|im_end|>\n{% endif %}{% endfor %}"
    )
    path = jsonl(tmp_path, [{"prompt": [USER, {"role": "tool", "content": "18 C"}], "completion": [ANSWER]}], "t.jsonl")
    with pytest.raises(DataError, match=r"t\.jsonl:1: the chat template leaves out message 1 \(role 'tool'\)"):
        tokenize_dataset(load_sft(path), silent, max_length=512)


# ---------------------------------------------------------------- unpaired examples (KTO)


def test_unpaired_encoding_matches_dpo(tiny_tokenizer):
    from tuneoff.data.pairs import encode

    tok = tiny_tokenizer
    user = (Message("user", "hi"),)
    for prompt, completion in (("The sky is", " blue."), ("", "blue"), (user, "hello there")):
        assert encode_unpaired(tok, UnpairedExample(prompt, completion, True)) == encode(tok, prompt, completion)
    # A conversational completion is the same as its text as one assistant turn.
    as_messages = encode_unpaired(tok, UnpairedExample(user, (Message("assistant", "hello there"),), False))
    assert as_messages == encode(tok, user, "hello there")
    prompt, completion = as_messages
    assert tok.decode(completion) == "hello there<|im_end|>\n"
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n")


def test_tokenize_unpaired_labels_and_overlong_policies(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    rows = [
        {"prompt": "the film is", "completion": " a charming delight .", "label": True},
        {"prompt": "the film is " + "very " * 30, "completion": " dull .", "label": False},
    ]
    examples = load_unpaired(jsonl(tmp_path, rows))
    n_prompt = len(tok(rows[1]["prompt"], add_special_tokens=False)["input_ids"])
    n_long = n_prompt + len(tok(" dull .", add_special_tokens=False)["input_ids"]) + 1
    report = TokenizeReport()
    short, cut = tokenize_unpaired(
        examples, tok, max_length=20, max_prompt_length=16, overlong="truncate", report=report
    )
    assert isinstance(short, UnpairedIds) and short.label is True and cut.label is False
    assert (short.prompt, short.completion) == encode_unpaired(tok, examples[0])
    full_prompt, full_completion = encode_unpaired(tok, examples[1])
    # truncate keeps the prompt's end (what the completion follows), then cuts the completion to max_length
    assert cut.prompt == full_prompt[-16:] and cut.completion == full_completion[:4]
    assert (report.kept, report.truncated, report.dropped) == (2, 1, [])
    prompt_ids, completion_ids, label = short  # a plain (prompt_ids, completion_ids, label) triple
    assert label is True and completion_ids[-1] == tok.eos_token_id
    report = TokenizeReport()
    kept = tokenize_unpaired(examples, tok, max_length=20, max_prompt_length=16, overlong="drop", report=report)
    assert kept == [short] and report.dropped == [f"{examples[1].where} ({n_long} tokens)"]
    with pytest.raises(DataError) as caught:
        tokenize_unpaired(examples, tok, max_length=100, max_prompt_length=16, overlong="error")
    assert str(caught.value).startswith(f"{examples[1].where}: record is {n_long} tokens, {n_prompt} of them the")
    assert "over max_prompt_length 16" in str(caught.value)
    with pytest.raises(TuneoffError, match="no example left"):
        tokenize_unpaired(examples[1:], tok, max_length=20, max_prompt_length=16, overlong="drop")
    with pytest.raises(TuneoffError, match="unknown overlong policy"):
        tokenize_unpaired(examples, tok, max_length=20, max_prompt_length=16, overlong="cut")


def test_tokenize_unpaired_conversations_with_tools(tmp_path, tiny_tokenizer):
    rows = [
        {"prompt": [USER], "completion": [CALL], "label": True, "tools": [SCHEMA]},
        {"prompt": [USER], "completion": "It is raining.", "label": False},
    ]
    examples = load_unpaired(jsonl(tmp_path, rows))
    tok = with_template(TOOL_TEMPLATE)
    good, bad = tokenize_unpaired(examples, tok, max_length=512, max_prompt_length=256)
    assert tok.decode(good.completion).startswith('<tool_call>{"name": "get_weather"') and good.label is True
    assert tok.decode(good.prompt).startswith('<|im_start|>system\n{"type": "function"')  # the tools' schemas
    assert tok.decode(bad.completion) == "It is raining.<|im_end|>\n" and bad.label is False
    with pytest.raises(DataError, match=r"data\.jsonl:1: the chat template leaves out the tool_calls of message 1"):
        tokenize_unpaired(examples, tiny_tokenizer, max_length=512, max_prompt_length=256)
