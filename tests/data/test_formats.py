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
    UnpairedExample,
    load_preferences,
    load_prompts,
    load_sft,
    load_unpaired,
    parse_unpaired,
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
    chat = load_sft(
        jsonl(
            tmp_path,
            [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}],
            "m.jsonl",
        )
    )
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
    assert [(e.prompt, e.where[len(str(path)) + 1 :]) for e in load_sft(path)] == [
        ("q1", "2"),
        ("multi\nline", "3"),
        ("q3", "5"),
    ]
    messages = json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]).replace(
        '"', '""'
    )
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


@pytest.mark.parametrize(
    "name, content",
    [
        ("a.jsonl", ""),
        ("b.jsonl", "\n  \n\n"),
        ("c.json", "[]"),
        ("d.json", '{"data": []}'),
        ("e.csv", "prompt,completion\n"),
        ("f.json", ""),
    ],
)
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
    assert error.where == 2 and "invalid JSON: Expecting property name enclosed in double quotes (column 14)" in str(
        error
    )


def test_invalid_json_file_names_its_line(tmp_path):
    error = error_of(load_sft, write(tmp_path, "d.json", '[\n{"text": "a"},\n{"text" "b"}\n]'))
    assert error.where == "line 3" and "invalid JSON: Expecting ':' delimiter" in str(error)


@pytest.mark.parametrize(
    "line, found", [("[1, 2]", "a list ([1, 2])"), ("3", "a number (3)"), ('"text"', 'a string ("text")')]
)
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
    assert str(error).endswith(
        "expected one of {prompt, completion} | {messages} | {text}, found keys {prompt, answer}"
    )
    error = error_of(load_preferences, jsonl(tmp_path, [{"prompt": "q", "good": "a", "bad": "b"}]))
    assert "expected one of {prompt, chosen, rejected} | {chosen, rejected}, found keys {prompt, good, bad}" in str(
        error
    )


def test_two_shapes_in_one_record_is_ambiguous(tmp_path):
    error = error_of(load_sft, jsonl(tmp_path, [{"text": "t", "prompt": "q", "completion": "a"}]))
    assert "ambiguous record" in str(error)


def test_mixed_shapes_fail_at_first_differing_record(tmp_path):
    path = jsonl(
        tmp_path, [{"prompt": "q", "completion": "a"}, {"prompt": "q", "completion": "b"}, {"text": "t"}, {"text": "u"}]
    )
    error = error_of(load_sft, path)
    assert error.where == "3" and "shape {text} but the first record (1) has {prompt, completion}" in str(error)


@pytest.mark.parametrize(
    "row, field, problem",
    [
        ({"prompt": "q", "completion": 4}, "completion", "expected a string, got a number (4)"),
        (
            {"prompt": ["q"], "completion": "a"},
            "prompt[0]",
            'expected an object with keys {role, content}, got a string ("q")',
        ),
        (
            {"prompt": "q", "completion": [{"role": "assistant", "content": "a"}]},
            "prompt",
            'expected a list of messages before a conversational completion, got a string ("q")',
        ),
        ({"messages": "hi"}, "messages", 'expected a list of {role, content} objects, got a string ("hi")'),
        ({"messages": []}, "messages", "expected at least one message, got an empty list"),
        ({"messages": ["hi"]}, "messages[0]", 'expected an object with keys {role, content}, got a string ("hi")'),
        (
            {"messages": [{"role": "user", "text": "hi"}]},
            "messages[0]",
            "expected keys {role, content}, found keys {role, text}",
        ),
        (
            {"messages": [{"role": "bot", "content": "hi"}]},
            "messages[0].role",
            'expected one of system, developer, user, assistant, tool, got a string ("bot")',
        ),
        (
            {"messages": [{"role": "assistant", "content": ["x"]}]},
            "messages[0].content",
            'expected a string, got a list (["x"])',
        ),
        ({"messages": [{"role": "user", "content": None}]}, "messages[0].content", "expected a string, got null"),
        (
            {"messages": [{"role": "user", "content": "hi"}]},
            "messages",
            "expected at least one assistant message to learn from, found roles [user]",
        ),
    ],
)
def test_mistyped_sft_fields(tmp_path, row, field, problem):
    error = error_of(load_sft, jsonl(tmp_path, [row]))
    assert (error.where, error.field, error.problem) == ("1", field, problem)


@pytest.mark.parametrize(
    "row, field",
    [
        ({"prompt": "q", "completion": "  \n"}, "completion"),
        ({"text": ""}, "text"),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
            "messages[1].content",
        ),
    ],
)
def test_empty_targets(tmp_path, row, field):
    error = error_of(load_sft, jsonl(tmp_path, [row]))
    assert error.field == field and error.problem.startswith(
        f"empty {'assistant message' if 'messages' in field else field}: expected non-empty text"
    )


def test_error_message_reads_as_one_line(tmp_path):
    path = jsonl(
        tmp_path, [{"prompt": "q", "completion": "a"}] * 2 + [{"prompt": "q", "completion": ""}], "train.jsonl"
    )
    assert (
        str(error_of(load_sft, path))
        == f"{path}:3: field 'completion': empty completion: expected non-empty text, got ''"
    )


# ---------------------------------------------------------------- conversational SFT, tools and roles

USER = {"role": "user", "content": "Weather in Paris?"}
CALL = {
    "role": "assistant",
    "content": "",
    "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
}
TOOL = {"role": "tool", "name": "get_weather", "tool_call_id": "c1", "content": "18 C, sunny"}
ANSWER = {"role": "assistant", "content": "It is sunny, 18 C."}


def test_sft_conversational_prompt_completion(tmp_path):
    system = {"role": "system", "content": "be brief"}
    rows = [{"prompt": [system, USER], "completion": [ANSWER]}, {"prompt": [USER], "completion": "Sunny."}]
    first, second = load_sft(jsonl(tmp_path, rows))
    assert first.prompt == (Message("system", "be brief"), Message("user", "Weather in Paris?"))
    assert first.completion == (Message("assistant", "It is sunny, 18 C."),) and first.messages is None
    assert second.completion == (Message("assistant", "Sunny."),)  # a string reply is the assistant's next turn


def test_tool_calls_tool_and_developer_roles_are_kept_for_the_template(tmp_path):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    developer = {"role": "developer", "content": "Use the tools."}
    example = load_sft(jsonl(tmp_path, [{"messages": [developer, USER, CALL, TOOL, ANSWER], "tools": tools}]))[0]
    assert [m.role for m in example.messages] == ["developer", "user", "assistant", "tool", "assistant"]
    call, tool = example.messages[2], example.messages[3]
    assert call.content == "" and call.tool_calls[0]["function"]["name"] == "get_weather"
    assert call.as_dict() == CALL and tool.as_dict() == TOOL and example.tools == tuple(tools)
    assert example.messages[1].as_dict() == USER  # no optional keys when the file has none
    # A tool-calling turn may omit content (or give null); a null tool_calls or name means absent.
    row = {
        "prompt": [USER],
        "completion": [
            {"role": "assistant", "tool_calls": CALL["tool_calls"]},
            TOOL,
            {**ANSWER, "tool_calls": None, "name": None},
        ],
    }
    example = load_sft(jsonl(tmp_path, [row], "pc.jsonl"))[0]
    assert example.completion[0].content == "" and example.completion[2] == Message("assistant", ANSWER["content"])


@pytest.mark.parametrize(
    "message, field, problem",
    [
        (
            {"role": "user", "content": "x", "tool_calls": CALL["tool_calls"]},
            "messages[0].tool_calls",
            "only assistant messages call tools, got role 'user'",
        ),
        (
            {"role": "assistant", "content": "", "tool_calls": "get_weather()"},
            "messages[0].tool_calls",
            'expected a list of tool calls, got a string ("get_weather()")',
        ),
        (
            {"role": "assistant", "content": "", "tool_calls": [{"name": "f"}]},
            "messages[0].tool_calls[0]",
            'expected {"type": "function", "function": {"name": ..., "arguments": {...}}}, got an object',
        ),
        (
            {"role": "assistant", "tool_calls": [{"function": {"name": ""}}]},
            "messages[0].tool_calls[0].function.name",
            'expected the function\'s name, a non-empty string, got a string ("")',
        ),
        (
            {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": 3}}]},
            "messages[0].tool_calls[0].function.arguments",
            "expected an object (or a JSON string), got a number (3)",
        ),
        ({"role": "assistant", "content": ""}, "messages[0].content", "empty assistant message"),
        ({"role": "assistant"}, "messages[0]", "expected keys {role, content}, found keys {role}"),
        (
            {"role": "tool", "content": "x", "tool_call_id": 7},
            "messages[0].tool_call_id",
            "expected a non-empty string",
        ),
    ],
)
def test_bad_tool_messages(tmp_path, message, field, problem):
    error = error_of(load_sft, jsonl(tmp_path, [{"messages": [message, ANSWER]}]))
    assert (error.where, error.field) == ("1", field) and error.problem.startswith(problem)


@pytest.mark.parametrize(
    "row, field, problem",
    [
        (
            {"prompt": [USER], "completion": [USER]},
            "completion[0].role",
            "expected 'assistant' or 'tool' in a completion (the model writes it), got 'user'",
        ),
        (
            {"prompt": [USER], "completion": [TOOL, ANSWER]},
            "completion[0].role",
            "a completion starts with the assistant's turn, got 'tool'",
        ),
        (
            {"prompt": [USER, ANSWER], "completion": [ANSWER]},
            "prompt[1].role",
            "a prompt must not end with an assistant",
        ),
        ({"prompt": [USER], "completion": 3}, "completion", "expected a list of assistant messages or a string"),
        ({"messages": [USER, ANSWER], "tools": {"name": "f"}}, "tools", "expected a list of tool schemas (objects)"),
    ],
)
def test_bad_conversational_sft(tmp_path, row, field, problem):
    error = error_of(load_sft, jsonl(tmp_path, [row]))
    assert error.field == field and error.problem.startswith(problem)


@pytest.mark.parametrize(
    "row",
    [
        {"prompt": "q", "completion": "a bad answer", "label": False},
        {"prompt": "q", "completion": "a good answer", "label": True},
        {"messages": [USER, ANSWER], "label": False},
        {"text": "some text", "label": "false"},
    ],
)
def test_sft_refuses_records_with_a_label(tmp_path, row):
    """A label false marks an undesirable completion: SFT would learn it, so KTO data is refused, not ignored."""
    path = jsonl(tmp_path, [row], "kto.jsonl")
    error = error_of(load_sft, path)
    assert (error.where, error.field) == ("1", "label")
    assert "unpaired preference data (KTO)" in error.problem and "tuneoff kto" in error.problem
    assert str(error).startswith(f"{path}:1: field 'label': records with a `label` field")
    with pytest.raises(DataError, match="field 'label'"):
        validate_file(path, "sft")


def test_preference_reply_that_calls_tools_is_refused(tmp_path):
    row = {"prompt": [USER], "chosen": [CALL], "rejected": [ANSWER]}
    error = error_of(load_preferences, jsonl(tmp_path, [row]))
    assert error.field == "chosen[0].tool_calls" and "a compared reply must be text" in error.problem
    row = {"chosen": [USER, ANSWER], "rejected": [USER, CALL]}
    assert error_of(load_preferences, jsonl(tmp_path, [row])).field == "rejected[1].tool_calls"


# ---------------------------------------------------------------- unpaired preferences (KTO)


def test_unpaired_standard_and_conversational(tmp_path):
    rows = [
        {"prompt": "The sky is", "completion": " blue.", "label": True},
        {"prompt": "", "completion": "green", "label": False, "id": 3},
    ]
    path = jsonl(tmp_path, rows)
    assert load_unpaired(path) == [
        UnpairedExample("The sky is", " blue.", True, f"{path}:1"),
        UnpairedExample("", "green", False, f"{path}:2"),
    ]
    conversational = [
        {"prompt": [USER], "completion": [ANSWER], "label": False},
        {"prompt": [USER], "completion": "Rainy.", "label": True},
    ]
    first, second = load_unpaired(jsonl(tmp_path, conversational, "c.jsonl"))
    assert first.prompt == (Message("user", USER["content"]),)
    assert first.completion == (Message("assistant", ANSWER["content"]),)
    assert first.label is False and (second.completion, second.label) == ("Rainy.", True)
    assert parse_unpaired({"prompt": "p", "completion": "c", "label": True}).where == "<record>"


@pytest.mark.parametrize(
    "row, field, problem",
    [
        (
            {"prompt": "q", "completion": "a", "label": 1},
            "label",
            "expected a boolean (true: a desirable completion, false: an undesirable one), got a number (1)",
        ),
        ({"prompt": "q", "completion": "a", "label": "true"}, "label", 'got a string ("true")'),
        ({"prompt": "q", "completion": "a", "label": None}, "label", "got null"),
        ({"prompt": "q", "completion": " ", "label": True}, "completion", "empty completion"),
        (
            {"prompt": "q", "completion": [ANSWER], "label": True},
            "prompt",
            "expected a list of messages before a conversational completion",
        ),
        (
            {"prompt": [USER], "completion": [CALL, TOOL, ANSWER], "label": True},
            "completion[1].role",
            "expected 'assistant' in a completion",
        ),
        ({"prompt": 4, "completion": "a", "label": True}, "prompt", "expected a string or a list of messages"),
        (
            {"prompt": "q", "completion": "a"},
            None,
            "expected one of {prompt, completion, label}, found keys {prompt, completion}",
        ),
    ],
)
def test_bad_unpaired(tmp_path, row, field, problem):
    error = error_of(load_unpaired, jsonl(tmp_path, [row]))
    assert (error.where, error.field) == ("1", field) and problem in error.problem


def test_unpaired_label_in_columnar_and_csv_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["p", "q"], "completion": ["a", "b"], "label": [True, False]}), path)
    assert [e.label for e in load_unpaired(path)] == [True, False]
    csv_path = write(tmp_path, "d.csv", "prompt,completion,label\np,a,true\nq,b,False\n")
    assert [e.label for e in load_unpaired(csv_path)] == [True, False]
    error = error_of(load_unpaired, write(tmp_path, "e.csv", "prompt,completion,label\np,a,1\n"))
    assert (error.where, error.field) == ("2", "label")


def test_validate_file_kto_kind(tmp_path):
    path = jsonl(tmp_path, [{"prompt": "q", "completion": "a", "label": True}] * 2)
    assert validate_file(path, "kto") == validate_file(path, "unpaired") == 2
    assert validate_file(path, "prompt") == 2


# ---------------------------------------------------------------- preferences


def test_explicit_preference_strings_and_annotator(tmp_path):
    rows = [
        {"prompt": "q", "chosen": "a", "rejected": "b", "annotator": 3},
        {"prompt": "", "chosen": "a", "rejected": "b", "annotator": "ann"},
    ]
    pairs = load_preferences(jsonl(tmp_path, rows))
    assert [(p.prompt, p.chosen, p.rejected, p.annotator) for p in pairs] == [
        ("q", "a", "b", "3"),
        ("", "a", "b", "ann"),
    ]


def test_explicit_preference_conversational(tmp_path):
    row = {
        "prompt": [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "hello"}],
        "rejected": "go away",
    }
    pair = load_preferences(jsonl(tmp_path, [row]))[0]
    assert pair.prompt == (Message("system", "be kind"), Message("user", "hi")) and (pair.chosen, pair.rejected) == (
        "hello",
        "go away",
    )


def test_implicit_prompt_strings_split_at_assistant_marker(tmp_path):
    chosen = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant: Sure, here is one"
    rejected = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant: Sure not"
    pair = load_preferences(jsonl(tmp_path, [{"chosen": chosen, "rejected": rejected}]))[0]
    assert pair.prompt == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant:"
    assert (pair.chosen, pair.rejected) == (" Sure, here is one", " Sure not")


def test_split_shared_prompt_word_boundaries():
    assert split_shared_prompt("Q: hi A: yes", "Q: hi A: yeah") == ("Q: hi A:", " yes", " yeah")
    assert split_shared_prompt("The sky is blue.", "The sky is green.") == ("The sky is", " blue.", " green.")
    assert split_shared_prompt("Answer:\n\nYes", "Answer:\n\nNo") == ("Answer:", "\n\nYes", "\n\nNo")
    assert split_shared_prompt("Q?\nYes", "Q? No") == ("Q?", "\nYes", " No")
    assert split_shared_prompt(
        "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\nA b",
        "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\nA c",
    )[0].endswith("assistant\n")
    assert split_shared_prompt("yes", "no") == ("", "yes", "no")


def test_implicit_prompt_reply_keeps_its_leading_space_token(tmp_path, tiny_tokenizer):
    """As TRL's extract_prompt: the reply gets the space, so it tokenizes as at generation time ('Ġblue')."""
    from tuneoff.data.pairs import encode

    pair = load_preferences(jsonl(tmp_path, [{"chosen": "The sky is blue.", "rejected": "The sky is green."}]))[0]
    assert (pair.prompt, pair.chosen, pair.rejected) == ("The sky is", " blue.", " green.")
    prompt, chosen = encode(tiny_tokenizer, pair.prompt, pair.chosen)
    _, rejected = encode(tiny_tokenizer, pair.prompt, pair.rejected)
    tokens = tiny_tokenizer.convert_ids_to_tokens
    assert tokens(prompt)[-1] == "Ġis" and tokens(chosen)[:2] == ["Ġblue", "."] and tokens(rejected)[0] == "Ġgreen"
    # The prompt and reply ids are those of the whole transcript, split at a token boundary.
    assert prompt + chosen[:-1] == tiny_tokenizer("The sky is blue.", add_special_tokens=False)["input_ids"]


def test_implicit_prompt_messages(tmp_path):
    user = {"role": "user", "content": "hi"}
    row = {
        "chosen": [user, {"role": "assistant", "content": "hello"}],
        "rejected": [user, {"role": "assistant", "content": "no"}],
    }
    pair = load_preferences(jsonl(tmp_path, [row]))[0]
    assert (pair.prompt, pair.chosen, pair.rejected) == ((Message("user", "hi"),), "hello", "no")


@pytest.mark.parametrize(
    "row, field, problem",
    [
        ({"prompt": "q", "chosen": "same", "rejected": "same "}, "rejected", "chosen and rejected are the same text"),
        ({"chosen": "Q: x A: same", "rejected": "Q: x A: same"}, "rejected", "chosen and rejected are the same text"),
        ({"prompt": "q", "chosen": "", "rejected": "b"}, "chosen", "empty chosen"),
        ({"prompt": "q", "chosen": "a", "rejected": " "}, "rejected", "empty rejected"),
        (
            {"prompt": "q", "chosen": 1, "rejected": "b"},
            "chosen",
            "expected a string or a list of messages, got a number (1)",
        ),
        (
            {"prompt": 5, "chosen": "a", "rejected": "b"},
            "prompt",
            "expected a string or a list of messages, got a number (5)",
        ),
        (
            {"prompt": "q", "chosen": "a", "rejected": "b", "annotator": True},
            "annotator",
            "expected a non-empty string or an integer",
        ),
        (
            {"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
            "chosen",
            "expected a string or one assistant message",
        ),
        (
            {
                "prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                "chosen": "a",
                "rejected": "b",
            },
            "prompt[1].role",
            "a prompt must not end with an assistant message",
        ),
        (
            {"chosen": "Q: x A: yes", "rejected": [{"role": "assistant", "content": "no"}]},
            "rejected",
            "expected the same type as chosen (a string), got a list",
        ),
        (
            {"chosen": "Q: x A: ", "rejected": "Q: x A: no"},
            "chosen",
            "empty chosen: expected a non-empty reply after the shared prompt",
        ),
        ({"chosen": "yes", "rejected": "no"}, None, "chosen and rejected share no prompt"),
        (
            {
                "chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
                "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}],
            },
            None,
            "they differ at message 0",
        ),
        (
            {"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "user", "content": "b"}]},
            "chosen[0].role",
            "expected the conversation to end with an assistant message",
        ),
    ],
)
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


@pytest.mark.parametrize(
    "row, field, problem",
    [
        ({"prompt": " "}, "prompt", "empty prompt"),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            "messages[1].role",
            "a prompt must not end with an assistant message",
        ),
        ({"question": "hi"}, None, "expected one of {prompt} | {messages}, found keys {question}"),
    ],
)
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
    kto = jsonl(tmp_path, [{"prompt": "q", "completion": "a", "label": False}], "kto.jsonl")
    assert cli.main(["validate", str(kto), "--kind", "kto"]) == 0
    assert capsys.readouterr().out == f"{kto}: 1 valid kto record\n"
    assert cli.main(["validate", str(kto)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {kto}:1: field 'label': records with a `label` field")
    bad = jsonl(tmp_path, [{"prompt": "q", "completion": ""}], "bad.jsonl")
    assert cli.main(["validate", str(bad), "--kind", "sft"]) == 2
    assert (
        capsys.readouterr().err
        == f"error: {bad}:1: field 'completion': empty completion: expected non-empty text, got ''\n"
    )


def test_write_jsonl_round_trips_through_the_reader(tmp_path):
    from tuneoff.data.formats import load_prompts, write_jsonl

    path = write_jsonl(tmp_path / "sub" / "p.jsonl", [{"prompt": "a é"}, {"prompt": "b"}])
    assert path.read_text(encoding="utf-8").count("\n") == 2
    assert [p.prompt for p in load_prompts(path)] == ["a é", "b"]
