"""Records, readers and validation of tuneoff.data.formats: each bad input has one defined DataError."""

from __future__ import annotations

import gzip
import json

import pytest

from tuneoff.data.formats import (
    Message,
    PreferencePair,
    Prompt,
    SFTExample,
    load_preferences,
    load_prompts,
    load_sft,
    read_rows,
    split_shared_prompt,
    validate_file,
)
from tuneoff.errors import DataError, TuneoffError


def write(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def jsonl(tmp_path, rows, name="data.jsonl"):
    return write(tmp_path, name, "".join(json.dumps(row) + "\n" for row in rows))


def error_of(call, *args) -> DataError:
    with pytest.raises(DataError) as caught:
        call(*args)
    return caught.value


# ---------------------------------------------------------------- good files, every format


def test_sft_three_shapes(tmp_path):
    pc = load_sft(jsonl(tmp_path, [{"prompt": "2+2=", "completion": " 4", "id": 7}], "pc.jsonl"))
    assert pc == [SFTExample(prompt="2+2=", completion=" 4", where=f"{tmp_path / 'pc.jsonl'}:1")]
    chat = load_sft(jsonl(tmp_path, [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}], "m.jsonl"))
    assert chat[0].messages == (Message("user", "hi"), Message("assistant", "hello"))
    assert load_sft(jsonl(tmp_path, [{"text": "a review"}], "t.jsonl"))[0].text == "a review"


def test_sft_empty_prompt_is_allowed(tmp_path):
    assert load_sft(jsonl(tmp_path, [{"prompt": "", "completion": "text"}]))[0].prompt == ""


def test_jsonl_blank_lines_skipped_and_numbered_by_line(tmp_path):
    path = write(tmp_path, "d.jsonl", '\n{"text": "a"}\n   \n{"text": "b"}\n')
    assert [number for number, _ in read_rows(path)] == [2, 4]
    assert [example.where.rsplit(":", 1)[1] for example in load_sft(path)] == ["2", "4"]


def test_json_list_and_wrapped_list(tmp_path):
    listed = write(tmp_path, "a.json", json.dumps([{"text": "a"}, {"text": "b"}]))
    assert [e.where for e in load_sft(listed)] == [f"{listed}:record 1", f"{listed}:record 2"]
    wrapped = write(tmp_path, "b.json", json.dumps({"data": [{"prompt": "p"}]}))
    assert load_prompts(wrapped) == [Prompt(prompt="p", where=f"{wrapped}:record 1")]


def test_gzip_variants(tmp_path):
    a = write(tmp_path, "a.jsonl.gz", gzip.compress(b'{"text": "x"}\n'))
    b = write(tmp_path, "b.json.gz", gzip.compress(b'[{"text": "y"}]'))
    assert [e.text for e in load_sft(a) + load_sft(b)] == ["x", "y"]


def test_csv_lines_count_the_header_and_messages_cell_is_json(tmp_path):
    path = write(tmp_path, "d.csv", 'prompt,completion\nq1,a1\n"multi\nline",a2\nq3,a3\n')
    assert [(e.prompt, e.where[len(str(path)) + 1:]) for e in load_sft(path)] == [("q1", "2"), ("multi\nline", "3"), ("q3", "5")]
    messages = json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]).replace('"', '""')
    chat = write(tmp_path, "c.csv", f'messages,id\n"{messages}",1\n')
    assert load_sft(chat)[0].messages[1] == Message("assistant", "yo")


def test_parquet_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["p1", "p2"], "chosen": ["good", "fine"], "rejected": ["bad", "poor"]}), path)
    pairs = load_preferences(path)
    assert pairs[1] == PreferencePair("p2", "fine", "poor", None, f"{path}:row 2")


def test_datasets_folder_and_dict_without_train(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = [{"messages": [{"role": "user", "content": "hi"}]}, {"messages": [{"role": "user", "content": "yo"}]}]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "single"))
    assert [p.messages[0].content for p in load_prompts(tmp_path / "single")] == ["hi", "yo"]
    DatasetDict({"train": Dataset.from_list(rows[:1])}).save_to_disk(str(tmp_path / "split"))
    assert validate_file(tmp_path / "split", "prompt") == 1
    DatasetDict({"test": Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "nosplit"))
    assert "expected a 'train' split, found splits {test}" in str(error_of(load_prompts, tmp_path / "nosplit"))
    (tmp_path / "plain").mkdir()
    assert "not one written by datasets" in str(error_of(load_prompts, tmp_path / "plain"))


def test_columnar_nulls_mean_absent(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["a", "b"], "meta": [None, "x"]}), path)
    assert validate_file(path) == 2


def test_extra_keys_ignored(tmp_path):
    path = jsonl(tmp_path, [{"text": "t", "id": 1, "meta": {"source": "web"}}])
    assert validate_file(path, "sft") == 1


# ---------------------------------------------------------------- files that cannot be read


def test_missing_file(tmp_path):
    error = error_of(load_sft, tmp_path / "nope.jsonl")
    assert str(error) == f"{tmp_path / 'nope.jsonl'}: no such file"


def test_unknown_suffix_lists_formats(tmp_path):
    error = error_of(load_sft, write(tmp_path, "d.txt", "hello"))
    assert "unsupported format '.txt'" in str(error) and ".jsonl" in str(error) and ".parquet" in str(error)


@pytest.mark.parametrize("name, content", [("a.jsonl", ""), ("b.jsonl", "\n  \n\n"), ("c.json", "[]"), ("d.json", '{"data": []}'),
                                           ("e.csv", "prompt,completion\n"), ("f.json", "")])
def test_empty_file(tmp_path, name, content):
    error = error_of(load_sft, write(tmp_path, name, content))
    assert str(error).endswith("file is empty: expected at least one record")


def test_non_utf8_names_line_and_byte(tmp_path):
    path = write(tmp_path, "d.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    error = error_of(load_sft, path)
    assert len(b'{"text": "ok"}\n{"text": "caf') == 28  # 0-based offset of the bad byte
    assert error.where == 2 and "not valid UTF-8 at byte 28 (0xe9)" in str(error)
    csv_path = write(tmp_path, "d.csv", b"text\nfine\nbad \xff\n")
    assert error_of(load_sft, csv_path).where == 3


def test_invalid_json_line(tmp_path):
    error = error_of(load_sft, write(tmp_path, "d.jsonl", '{"text": "a"}\n{"text": "b",}\n'))
    assert error.where == 2 and "invalid JSON: Expecting property name enclosed in double quotes (column 14)" in str(error)


def test_invalid_json_file_names_its_line(tmp_path):
    error = error_of(load_sft, write(tmp_path, "d.json", '[\n{"text": "a"},\n{"text" "b"}\n]'))
    assert error.where == "line 3" and "invalid JSON: Expecting ':' delimiter" in str(error)


@pytest.mark.parametrize("line, found", [("[1, 2]", "a list ([1, 2])"), ("3", "a number (3)"), ('"text"', 'a string ("text")')])
def test_line_that_is_not_an_object(tmp_path, line, found):
    error = error_of(load_sft, write(tmp_path, "d.jsonl", line + "\n"))
    assert str(error) == f"{tmp_path / 'd.jsonl'}:1: expected a JSON object {{...}}, got {found}"


def test_json_file_that_is_not_a_list(tmp_path):
    error = error_of(load_sft, write(tmp_path, "d.json", '{"a": [], "b": []}'))
    assert "expected a list of records or an object with one list field" in str(error) and "{a, b}" in str(error)


def test_duplicate_keys(tmp_path):
    error = error_of(load_sft, write(tmp_path, "d.jsonl", '{"text": "a"}\n{"text": "a", "text": "b"}\n'))
    assert error.where == 2 and error.field == "text" and "duplicate key 'text'" in str(error)
    nested = '[{"messages": [{"role": "user", "role": "assistant", "content": "x"}]}]'
    error = error_of(load_sft, write(tmp_path, "d.json", nested))
    assert error.where == "record 1" and error.field == "messages[0].role"


def test_csv_row_with_wrong_cell_count(tmp_path):
    error = error_of(load_sft, write(tmp_path, "d.csv", "prompt,completion\nq,a\nq,a,extra\n"))
    assert error.where == 3 and "expected 2 cells as in the header, found 3" in str(error)


def test_csv_messages_cell_with_bad_json(tmp_path):
    error = error_of(load_sft, write(tmp_path, "d.csv", "messages\n[oops\n"))
    assert error.where == 2 and error.field == "messages" and "expected a JSON list of messages" in str(error)


def test_bad_gzip(tmp_path):
    assert "cannot read the file" in str(error_of(load_sft, write(tmp_path, "d.jsonl.gz", b"not gzip")))


# ---------------------------------------------------------------- records that are not valid


def test_no_recognised_shape_names_keys_and_shapes(tmp_path):
    error = error_of(load_sft, jsonl(tmp_path, [{"prompt": "q", "answer": "a"}]))
    assert str(error).endswith("expected one of {prompt, completion} | {messages} | {text}, found keys {prompt, answer}")
    error = error_of(load_preferences, jsonl(tmp_path, [{"prompt": "q", "good": "a", "bad": "b"}]))
    assert "expected one of {prompt, chosen, rejected} | {chosen, rejected}, found keys {prompt, good, bad}" in str(error)


def test_two_shapes_in_one_record_is_ambiguous(tmp_path):
    error = error_of(load_sft, jsonl(tmp_path, [{"text": "t", "prompt": "q", "completion": "a"}]))
    assert "ambiguous record" in str(error)


def test_mixed_shapes_fail_at_first_differing_record(tmp_path):
    path = jsonl(tmp_path, [{"prompt": "q", "completion": "a"}, {"prompt": "q", "completion": "b"}, {"text": "t"}, {"text": "u"}])
    error = error_of(load_sft, path)
    assert error.where == "3" and "shape {text} but the first record (1) has {prompt, completion}" in str(error)


@pytest.mark.parametrize("row, field, problem", [
    ({"prompt": "q", "completion": 4}, "completion", "expected a string, got a number (4)"),
    ({"prompt": ["q"], "completion": "a"}, "prompt", "expected a string, got a list ([\"q\"]); for conversations use {messages}"),
    ({"messages": "hi"}, "messages", 'expected a list of {role, content} objects, got a string ("hi")'),
    ({"messages": []}, "messages", "expected at least one message, got an empty list"),
    ({"messages": ["hi"]}, "messages[0]", 'expected an object with keys {role, content}, got a string ("hi")'),
    ({"messages": [{"role": "user", "text": "hi"}]}, "messages[0]", "expected keys {role, content}, found keys {role, text}"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "messages[0].role", 'expected one of system, user, assistant, got a string ("bot")'),
    ({"messages": [{"role": "assistant", "content": ["x"]}]}, "messages[0].content", 'expected a string, got a list (["x"])'),
    ({"messages": [{"role": "user", "content": None}]}, "messages[0].content", "expected a string, got null"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages", "expected at least one assistant message to learn from, found roles [user]"),
])
def test_mistyped_sft_fields(tmp_path, row, field, problem):
    error = error_of(load_sft, jsonl(tmp_path, [row]))
    assert (error.where, error.field, error.problem) == ("1", field, problem)


@pytest.mark.parametrize("row, field", [
    ({"prompt": "q", "completion": "  \n"}, "completion"),
    ({"text": ""}, "text"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}, "messages[1].content"),
])
def test_empty_targets(tmp_path, row, field):
    error = error_of(load_sft, jsonl(tmp_path, [row]))
    assert error.field == field and error.problem.startswith(f"empty {'assistant message' if 'messages' in field else field}: expected non-empty text")


def test_error_message_reads_as_one_line(tmp_path):
    path = jsonl(tmp_path, [{"prompt": "q", "completion": "a"}] * 2 + [{"prompt": "q", "completion": ""}], "train.jsonl")
    assert str(error_of(load_sft, path)) == f"{path}:3: field 'completion': empty completion: expected non-empty text, got ''"


# ---------------------------------------------------------------- preferences


def test_explicit_preference_strings_and_annotator(tmp_path):
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b", "annotator": 3}, {"prompt": "", "chosen": "a", "rejected": "b", "annotator": "ann"}]
    pairs = load_preferences(jsonl(tmp_path, rows))
    assert [(p.prompt, p.chosen, p.rejected, p.annotator) for p in pairs] == [("q", "a", "b", "3"), ("", "a", "b", "ann")]


def test_explicit_preference_conversational(tmp_path):
    row = {"prompt": [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"}],
           "chosen": [{"role": "assistant", "content": "hello"}], "rejected": "go away"}
    pair = load_preferences(jsonl(tmp_path, [row]))[0]
    assert pair.prompt == (Message("system", "be kind"), Message("user", "hi")) and (pair.chosen, pair.rejected) == ("hello", "go away")


def test_implicit_prompt_strings_split_at_assistant_marker(tmp_path):
    chosen = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant: Sure, here is one"
    rejected = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant: Sure not"
    pair = load_preferences(jsonl(tmp_path, [{"chosen": chosen, "rejected": rejected}]))[0]
    assert pair.prompt == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant:"
    assert (pair.chosen, pair.rejected) == (" Sure, here is one", " Sure not")


def test_split_shared_prompt_word_boundaries():
    assert split_shared_prompt("Q: hi A: yes", "Q: hi A: yeah") == ("Q: hi A: ", "yes", "yeah")
    assert split_shared_prompt("Q?\nYes", "Q? No") == ("Q?", "\nYes", " No")
    assert split_shared_prompt("<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\nA b", "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\nA c")[0].endswith("assistant\n")
    assert split_shared_prompt("yes", "no") == ("", "yes", "no")


def test_implicit_prompt_messages(tmp_path):
    user = {"role": "user", "content": "hi"}
    row = {"chosen": [user, {"role": "assistant", "content": "hello"}], "rejected": [user, {"role": "assistant", "content": "no"}]}
    pair = load_preferences(jsonl(tmp_path, [row]))[0]
    assert (pair.prompt, pair.chosen, pair.rejected) == ((Message("user", "hi"),), "hello", "no")


@pytest.mark.parametrize("row, field, problem", [
    ({"prompt": "q", "chosen": "same", "rejected": "same "}, "rejected", "chosen and rejected are the same text"),
    ({"chosen": "Q: x A: same", "rejected": "Q: x A: same"}, "rejected", "chosen and rejected are the same text"),
    ({"prompt": "q", "chosen": "", "rejected": "b"}, "chosen", "empty chosen"),
    ({"prompt": "q", "chosen": "a", "rejected": " "}, "rejected", "empty rejected"),
    ({"prompt": "q", "chosen": 1, "rejected": "b"}, "chosen", "expected a string or a list of messages, got a number (1)"),
    ({"prompt": 5, "chosen": "a", "rejected": "b"}, "prompt", "expected a string or a list of messages, got a number (5)"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "annotator": True}, "annotator", "expected a non-empty string or an integer"),
    ({"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "chosen", "expected a string or one assistant message"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "chosen": "a", "rejected": "b"},
     "prompt[1].role", "a prompt must not end with an assistant message"),
    ({"chosen": "Q: x A: yes", "rejected": [{"role": "assistant", "content": "no"}]}, "rejected", "expected the same type as chosen (a string), got a list"),
    ({"chosen": "Q: x A: ", "rejected": "Q: x A: no"}, "chosen", "empty chosen: expected a non-empty reply after the shared prompt"),
    ({"chosen": "yes", "rejected": "no"}, None, "chosen and rejected share no prompt"),
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
      "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}]}, None, "they differ at message 0"),
    ({"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "user", "content": "b"}]},
     "chosen[0].role", "expected the conversation to end with an assistant message"),
])
def test_bad_preferences(tmp_path, row, field, problem):
    error = error_of(load_preferences, jsonl(tmp_path, [row]))
    assert error.field == field and problem in error.problem


def test_mixed_explicit_and_implicit_preferences(tmp_path):
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"chosen": "q a", "rejected": "q b"}]
    assert "use one shape per file" in str(error_of(load_preferences, jsonl(tmp_path, rows)))


# ---------------------------------------------------------------- prompts and validate_file


def test_prompts(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": "hi"}]}, {"prompt": "The movie was"}]
    prompts = load_prompts(jsonl(tmp_path, rows))
    assert prompts[0].messages == (Message("user", "hi"),) and prompts[1].prompt == "The movie was"


@pytest.mark.parametrize("row, field, problem", [
    ({"prompt": " "}, "prompt", "empty prompt"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "messages[1].role",
     "a prompt must not end with an assistant message"),
    ({"question": "hi"}, None, "expected one of {prompt} | {messages}, found keys {question}"),
])
def test_bad_prompts(tmp_path, row, field, problem):
    error = error_of(load_prompts, jsonl(tmp_path, [row]))
    assert error.field == field and problem in error.problem


def test_validate_file_counts_and_rejects_unknown_kind(tmp_path):
    path = jsonl(tmp_path, [{"prompt": "q", "chosen": "a", "rejected": "b"}] * 3)
    assert validate_file(path, "preference") == 3
    assert validate_file(path, "prompt") == 3  # a preference file also holds prompts
    with pytest.raises(TuneoffError, match="unknown data kind"):
        validate_file(path, "rm")


def test_records_reject_impossible_shapes():
    with pytest.raises(ValueError):
        SFTExample(text="a", completion="b", prompt="")
    with pytest.raises(ValueError):
        Prompt()


# ---------------------------------------------------------------- the validate verb


def test_validate_verb_prints_count_and_exits_2_on_bad_data(tmp_path, capsys, monkeypatch):
    from tuneoff import cli, verbs
    from tuneoff.data.cli import add_parser

    monkeypatch.setattr(verbs, "REGISTRY", [add_parser])
    good = jsonl(tmp_path, [{"text": "a"}, {"text": "b"}], "train.jsonl")
    assert cli.main(["validate", str(good)]) == 0
    assert capsys.readouterr().out == f"{good}: 2 valid sft records\n"
    pairs = jsonl(tmp_path, [{"prompt": "q", "chosen": "a", "rejected": "b"}], "pairs.jsonl")
    assert cli.main(["validate", str(pairs), "--kind", "preference"]) == 0
    assert capsys.readouterr().out == f"{pairs}: 1 valid preference record\n"
    bad = jsonl(tmp_path, [{"prompt": "q", "completion": ""}], "bad.jsonl")
    assert cli.main(["validate", str(bad), "--kind", "sft"]) == 2
    assert capsys.readouterr().err == f"error: {bad}:1: field 'completion': empty completion: expected non-empty text, got ''\n"


def test_write_jsonl_round_trips_through_the_reader(tmp_path):
    from tuneoff.data.formats import load_prompts, write_jsonl

    path = write_jsonl(tmp_path / "sub" / "p.jsonl", [{"prompt": "a é"}, {"prompt": "b"}])
    assert path.read_text(encoding="utf-8").count("\n") == 2
    assert [p.prompt for p in load_prompts(path)] == ["a é", "b"]
