import torch

from tuneoff.data.formats import Message, SFTExample
from tuneoff.data.tokenize import (IGNORE, Tokenized, TokenizeReport, fit_length, pack, packed_batch, pad_batch,
                                   tokenize_dataset, tokenize_sft)
from tuneoff.errors import DataError


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
    messages = (Message("user", "rate it"), Message("assistant", "great"), Message("user", "why"), Message("assistant", "fun"))
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
