"""Records, readers and validation for tuneoff's data files.

The formats are the ecosystem's (TRL's), so users bring their files unchanged:

* SFT (:class:`SFTExample`): ``{"prompt", "completion"}`` (strings; or a messages list as prompt and a list
  of assistant (and tool) messages as completion, trained on the completion's assistant turns),
  ``{"messages": [{"role", "content"}, ...]}`` or ``{"text"}``; conversational records may carry ``tools``
  (a list of tool schemas for the chat template). A ``label`` field is refused: that is KTO data.
* Preferences (:class:`PreferencePair`): ``{"prompt", "chosen", "rejected"}`` (strings; or a messages
  list as prompt with chosen/rejected as strings or one-message assistant lists), or the implicit-prompt
  form ``{"chosen", "rejected"}`` where both hold whole conversations; optional ``annotator``.
* Unpaired preferences for KTO (:class:`UnpairedExample`): ``{"prompt", "completion", "label"}`` with a
  boolean ``label`` (true: a desirable completion); prompt and completion are strings, or a messages list
  and a list of assistant messages (or a string).
* Prompts for RL (:class:`Prompt`): ``{"prompt"}`` (a string or a messages list) or ``{"messages"}``.

Messages: roles ``system``, ``developer``, ``user``, ``assistant``, ``tool``. An assistant message may carry
``tool_calls`` (``[{"type": "function", "function": {"name", "arguments"}}]``; its content may then be empty
or absent); ``name`` and ``tool_call_id`` are kept too. These optional keys reach the chat template as given;
a null (or an empty ``tool_calls`` list) means absent, since columnar formats fill missing keys that way.

Files: ``.jsonl``, ``.json`` (a list of objects, or an object with one list field such as
``{"data": [...]}``), both optionally gzipped (``.jsonl.gz``, ``.json.gz``); ``.csv``; ``.parquet``;
or a folder written by ``datasets``' ``save_to_disk``. :func:`read_rows` turns any of them into plain
dicts; :func:`load_sft`, :func:`load_preferences`, :func:`load_unpaired` and :func:`load_prompts` validate
every record before they return, so a training run that starts has data that is whole and writes nothing when it is not.

Every problem raises one :class:`tuneoff.errors.DataError` that names the file, the position, the field
and what was expected versus found. Positions are the line for JSONL and CSV (the header is line 1),
``record N`` for JSON (1-based; ``line N`` for syntax errors) and ``row N`` for Parquet and ``datasets``
folders. Message indices in field names count from 0 (``messages[2].role``). Decisions:

* Extra keys are ignored (real files carry ids and metadata). CSV cells are text, except the ``messages``
  column (JSON) and ``true``/``false`` in a ``label`` column (booleans). Nulls in columnar formats (Parquet,
  ``datasets``) mean "field absent", since those formats fill missing fields of mixed rows with null;
  in JSON a null is a value of the wrong type.
* One file holds one shape: the first record that differs from the first record is an error.
* Empty or whitespace-only ``completion``, ``text``, ``chosen``, ``rejected`` and assistant message
  contents (but for an assistant message that calls tools) are errors; so are empty RL prompts. An empty SFT
  ``prompt`` and an empty preference
  ``prompt`` string are allowed: pretraining-style data and prompt-less comparisons have none.
* Byte offsets of invalid UTF-8 count from 0 at the start of the (decompressed) file.
* Over-long records are not checked here: that needs a tokenizer (``tuneoff.data.tokenize``).
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import gzip
import io
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from tuneoff.errors import DataError, TuneoffError

ROLES = ("system", "developer", "user", "assistant", "tool")
COMPLETION_ROLES = ("assistant", "tool")
"""Roles of a conversational SFT completion: the assistant's turns (trained on) and the tools' answers between them."""
KTO_LABEL = (
    "records with a `label` field are unpaired preference data (KTO), where false marks an undesirable "
    "completion: train them with `tuneoff kto` (check them with --kind kto), or drop the field to "
    "fine-tune on every completion"
)
EMPTY_FILE = "file is empty: expected at least one record"
IDENTICAL = "chosen and rejected are the same text: a preference needs two different responses"
SUPPORTED = ".jsonl, .jsonl.gz, .json, .json.gz, .csv, .parquet, or a folder written by datasets' save_to_disk"
SUFFIXES = {
    ".jsonl": "jsonl",
    ".jsonl.gz": "jsonl",
    ".json": "json",
    ".json.gz": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}
POSITIONS = {"jsonl": "{}", "csv": "{}", "json": "record {}", "parquet": "row {}", "datasets": "row {}"}
"""How each format names the position of a record in error messages and in ``where``."""

ASSISTANT_MARKERS = ("\n\nAssistant:", "<|im_start|>assistant\n", "<|assistant|>\n", "[/INST]")
"""Turn boundaries that end the prompt of an implicit-prompt string pair (HH-RLHF, ChatML, Zephyr, Llama-2)."""


# ---------------------------------------------------------------- records


@dataclass(frozen=True)
class Message:
    """One turn of a conversation."""

    role: str
    """``system``, ``developer``, ``user``, ``assistant`` or ``tool``."""
    content: str
    """The turn's text; may be empty for an assistant turn that only calls tools."""
    tool_calls: tuple[dict, ...] | None = dataclasses.field(default=None, hash=False)
    """An assistant's tool calls as the file gives them, ``{"type": "function", "function": {"name", "arguments"}}``."""
    name: str | None = None
    """The speaker's or the tool's name, when the file gives one."""
    tool_call_id: str | None = None
    """The call a ``tool`` message answers, when the file gives it."""

    def as_dict(self) -> dict:
        """The message as a chat template reads it: role, content and the optional fields that are set."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls is not None:
            out["tool_calls"] = [dict(call) for call in self.tool_calls]
        for key in ("name", "tool_call_id"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


@dataclass(frozen=True)
class SFTExample:
    """One supervised example; exactly one of prompt+completion, ``messages`` or ``text`` is set."""

    prompt: str | tuple[Message, ...] | None = None
    """What the model conditions on (not trained on): text (may be empty), or a conversation that does not end
    with the assistant. Set together with ``completion``, of the same kind."""
    completion: str | tuple[Message, ...] | None = None
    """Text the model learns to write after ``prompt``, never empty; or, after a conversation, the next turns
    (assistant ones, maybe with tool answers between them), whose assistant turns are the targets."""
    messages: tuple[Message, ...] | None = None
    """A conversation with at least one assistant turn; the assistant turns are the targets."""
    text: str | None = None
    """Plain text trained on in full (language-modelling style)."""
    where: str = ""
    """``file:position`` of the record, for later messages."""
    tools: tuple[dict, ...] | None = dataclasses.field(default=None, hash=False)
    """Tool schemas (JSON schema objects) for the chat template of a conversational record, when it has them."""

    def __post_init__(self):
        shapes = (self.completion is not None) + (self.messages is not None) + (self.text is not None)
        if shapes != 1 or (self.prompt is None) != (self.completion is None):
            raise ValueError("SFTExample needs exactly one of prompt+completion, messages or text")
        if self.completion is not None and isinstance(self.prompt, tuple) != isinstance(self.completion, tuple):
            raise ValueError("SFTExample's prompt and completion are both text or both messages")


@dataclass(frozen=True)
class PreferencePair:
    """A prompt with a preferred (``chosen``) and a dispreferred (``rejected``) response."""

    prompt: str | tuple[Message, ...]
    """The shared context: a string (may be empty) or a conversation that does not end with the assistant."""
    chosen: str
    """The preferred response; never empty."""
    rejected: str
    """The dispreferred response; never empty and never equal to ``chosen``."""
    annotator: str | None = None
    """Who judged the pair, when the file says so (integers are turned into strings)."""
    where: str = ""
    """``file:position`` of the record, for later messages."""


@dataclass(frozen=True)
class UnpairedExample:
    """A prompt with one completion judged desirable (``label`` True) or undesirable: KTO's unpaired data."""

    prompt: str | tuple[Message, ...]
    """The context: a string (may be empty) or a conversation that does not end with the assistant."""
    completion: str | tuple[Message, ...]
    """The response: non-empty text, or (after a conversation) a list of assistant messages."""
    label: bool
    """True when the completion is desirable, False when it is not."""
    where: str = ""
    """``file:position`` of the record, for later messages."""
    tools: tuple[dict, ...] | None = dataclasses.field(default=None, hash=False)
    """Tool schemas for the chat template of a conversational record, when it has them."""

    def __post_init__(self):
        if isinstance(self.completion, tuple) and not isinstance(self.prompt, tuple):
            raise ValueError("UnpairedExample's completion can be messages only after a conversational prompt")


@dataclass(frozen=True)
class Prompt:
    """A prompt for RL sampling; exactly one of ``prompt`` or ``messages`` is set."""

    prompt: str | None = None
    """Plain text the policy continues; never empty."""
    messages: tuple[Message, ...] | None = None
    """A conversation whose last turn is not the assistant's: the policy writes the next turn."""
    where: str = ""
    """``file:position`` of the record, for later messages."""

    def __post_init__(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("Prompt needs exactly one of prompt or messages")


# ---------------------------------------------------------------- readers


class _JSONObject(dict):
    """A JSON object that remembers the first key its text held twice (``json`` keeps only the last)."""

    duplicate: str | None = None


def _object_pairs(pairs: list[tuple[str, Any]]) -> _JSONObject:
    value = _JSONObject(pairs)
    if len(value) < len(pairs):
        seen: set[str] = set()
        value.duplicate = next(key for key, _ in pairs if key in seen or seen.add(key))
    return value


def _check_duplicates(value: Any, file: str, where: Any, field: str = "") -> None:
    """Raise at the first object nested in ``value`` whose JSON text repeated a key."""
    if isinstance(value, dict):
        if getattr(value, "duplicate", None) is not None:
            key = value.duplicate
            raise DataError(
                file,
                where,
                f"{field}.{key}" if field else key,
                f"duplicate key '{key}': it appears more than once in one JSON object; keep one",
            )
        for key, item in value.items():
            _check_duplicates(item, file, where, f"{field}.{key}" if field else key)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_duplicates(item, file, where, f"{field}[{index}]")


def _kind(value: Any) -> str:
    names = {
        type(None): "null",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "a list",
        tuple: "a list",
        bytes: "bytes",
    }
    return "an object" if isinstance(value, dict) else names.get(type(value), type(value).__name__)


def _describe(value: Any) -> str:
    """``a number (3)``: the JSON type and a short view of the value, for 'expected X, got Y' messages."""
    if value is None:
        return "null"
    text = json.dumps(value, ensure_ascii=False, default=repr)
    return f"{_kind(value)} ({text if len(text) <= 60 else text[:57] + '...'})"


def _here(file: str, where: Any) -> str:
    """The ``where`` of a record: ``file:position``."""
    return file if where is None else f"{file}:{where}"


def _braces(keys: Iterable[Any]) -> str:
    return "{" + ", ".join(str(key) for key in keys) + "}"


def _format(path: Path) -> str:
    """Which reader handles ``path``: raises DataError for a missing file or an unknown suffix."""
    if not path.exists():
        raise DataError(str(path), None, None, "no such file")
    if path.is_dir():
        return "datasets"
    name = path.name.lower()
    for suffix, fmt in SUFFIXES.items():
        if name.endswith(suffix):
            return fmt
    raise DataError(str(path), None, None, f"unsupported format '{path.suffix}': expected {SUPPORTED}")


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _read_bytes(path: Path, file: str) -> bytes:
    try:
        with _open_binary(path) as stream:
            return stream.read()
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(file, None, None, f"cannot read the file: {error}") from None


def _decode_text(data: bytes, file: str, where_for: Callable[[int], Any], offset: int = 0) -> str:
    """UTF-8 text of ``data`` (a leading BOM dropped); ``where_for(byte)`` names the position of a bad byte."""
    start = len(codecs.BOM_UTF8) if offset == 0 and data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as error:
        bad = start + error.start
        raise DataError(
            file,
            where_for(bad),
            None,
            f"not valid UTF-8 at byte {offset + bad} (0x{data[bad]:02x}): save the file as UTF-8",
        ) from None


def _line_of(data: bytes, byte: int) -> int:
    return data.count(b"\n", 0, byte) + 1


def _parse_json(text: str, file: str, where: Any) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_object_pairs)
    except json.JSONDecodeError as error:
        where = where if where is not None else f"line {error.lineno}"
        raise DataError(file, where, None, f"invalid JSON: {error.msg} (column {error.colno})") from None
    except RecursionError:
        raise DataError(file, where, None, "invalid JSON: nested too deeply") from None


def _as_record(value: Any, file: str, where: Any) -> dict:
    if not isinstance(value, dict):
        raise DataError(file, where, None, f"expected a JSON object {{...}}, got {_describe(value)}")
    _check_duplicates(value, file, where)
    return value


def _read_jsonl(path: Path, file: str) -> Iterator[tuple[int, dict]]:
    offset = 0
    try:
        with _open_binary(path) as stream:
            for number, raw in enumerate(stream, 1):
                text = _decode_text(raw, file, lambda _, number=number: number, offset)
                offset += len(raw)
                if text.strip():
                    yield number, _as_record(_parse_json(text, file, number), file, number)
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(file, None, None, f"cannot read the file: {error}") from None


def _records_of(value: Any, file: str) -> list:
    """The list of records in a whole-file JSON value: the list itself or an object's single list field."""
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        if getattr(value, "duplicate", None) is not None:
            raise DataError(file, None, value.duplicate, f"duplicate key '{value.duplicate}' in the top-level object")
        if len(value) == 1 and isinstance(next(iter(value.values())), list):
            return next(iter(value.values()))
        found = f"an object with keys {_braces(value)}"
    else:
        found = _describe(value)
    raise DataError(
        file,
        None,
        None,
        f'expected a list of records or an object with one list field such as {{"data": [...]}}, got {found}',
    )


def _read_json(path: Path, file: str) -> Iterator[tuple[int, dict]]:
    data = _read_bytes(path, file)
    text = _decode_text(data, file, lambda byte: f"line {_line_of(data, byte)}")
    if not text.strip():
        return
    for number, value in enumerate(_records_of(_parse_json(text, file, None), file), 1):
        yield number, _as_record(value, file, f"record {number}")


def _json_cell(text: str, file: str, where: int, field: str) -> Any:
    """A CSV cell that holds JSON (the ``messages`` column)."""
    try:
        return json.loads(text, object_pairs_hook=_object_pairs)
    except json.JSONDecodeError as error:
        raise DataError(
            file,
            where,
            field,
            f"expected a JSON list of messages, got invalid JSON: {error.msg} (column {error.colno})",
        ) from None


def _read_csv(path: Path, file: str) -> Iterator[tuple[int, dict]]:
    data = _read_bytes(path, file)
    text = _decode_text(data, file, lambda byte: _line_of(data, byte))
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # long completions exceed the 128 KiB default
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [name.strip() for name in next(reader, [])]
        duplicates = sorted({name for name in header if header.count(name) > 1})
        if duplicates:
            raise DataError(file, 1, duplicates[0], f"duplicate column '{duplicates[0]}' in the header; keep one")
        start = reader.line_num + 1
        for cells in reader:
            number, start = start, reader.line_num + 1
            if not cells:
                continue  # a blank line
            if len(cells) != len(header):
                raise DataError(
                    file, number, None, f"expected {len(header)} cells as in the header, found {len(cells)}"
                )
            row = dict(zip(header, cells))
            if "messages" in row:
                row["messages"] = _json_cell(row["messages"], file, number, "messages")
                _check_duplicates(row, file, number)
            if isinstance(row.get("label"), str) and row["label"].strip().lower() in ("true", "false"):
                row["label"] = row["label"].strip().lower() == "true"  # CSV has no booleans: KTO's label
            yield number, row
    except csv.Error as error:
        raise DataError(file, reader.line_num, None, f"invalid CSV: {error}") from None


def _without_nulls(row: dict) -> dict:
    return {key: value for key, value in row.items() if value is not None}


def _read_parquet(path: Path, file: str) -> Iterator[tuple[int, dict]]:
    import pyarrow.parquet as pq  # lazy: pyarrow is heavy and only Parquet needs it here

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        number = 0
        for batch in batches:
            for row in batch.to_pylist():
                number += 1
                yield number, _without_nulls(row)
    except (OSError, ValueError) as error:  # pyarrow.ArrowInvalid is a ValueError
        raise DataError(file, None, None, f"not a readable Parquet file: {error}") from None


def _read_datasets(path: Path, file: str) -> Iterator[tuple[int, dict]]:
    markers = ("dataset_info.json", "state.json", "dataset_dict.json")
    if not any((path / marker).exists() for marker in markers):
        raise DataError(
            file, None, None, f"a folder, but not one written by datasets' save_to_disk (no {' or '.join(markers)})"
        )
    from datasets import DatasetDict, load_from_disk  # lazy: importing datasets takes seconds

    try:
        dataset = load_from_disk(str(path))
    except (OSError, ValueError) as error:
        raise DataError(file, None, None, f"cannot load the datasets folder: {error}") from None
    if isinstance(dataset, DatasetDict):
        if "train" not in dataset:
            raise DataError(
                file,
                None,
                None,
                f"expected a 'train' split, found splits {_braces(dataset)}; pass one split's folder instead",
            )
        dataset = dataset["train"]
    for number, row in enumerate(dataset, 1):
        yield number, _without_nulls(row)


READERS = {
    "jsonl": _read_jsonl,
    "json": _read_json,
    "csv": _read_csv,
    "parquet": _read_parquet,
    "datasets": _read_datasets,
}


def read_rows(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield ``(position, record)`` for every record of a data file, checking only that each is an object.

    ``position`` is the 1-based line (JSONL; CSV with the header as line 1), record (JSON) or row
    (Parquet, ``datasets``); :func:`position_label` turns it into the text used in messages. Blank
    JSONL and CSV lines are skipped. Raises DataError for a missing, unreadable or empty file, an
    unknown suffix, invalid UTF-8 or JSON, a record that is not an object, and duplicate keys.
    """
    path = Path(path)
    count = 0
    for number, row in READERS[_format(path)](path, str(path)):
        count += 1
        yield number, row
    if count == 0:
        raise DataError(str(path), None, None, EMPTY_FILE)


def position_label(path: str | os.PathLike, number: int) -> str:
    """How messages name position ``number`` of ``path``: ``"3"`` (a line), ``"record 3"`` or ``"row 3"``."""
    return POSITIONS[_format(Path(path))].format(number)


# ---------------------------------------------------------------- fields


def text_field(row: dict, field: str, file: str, where: Any, allow_empty: bool = False) -> str:
    """``row[field]`` as a string; raises DataError if it is not one, or is blank and ``allow_empty`` is False."""
    value = row[field]
    if not isinstance(value, str):
        raise DataError(file, where, field, f"expected a string, got {_describe(value)}")
    if not allow_empty and not value.strip():
        raise DataError(file, where, field, f"empty {field}: expected non-empty text, got {value!r}")
    return value


def _optional_text(item: dict, key: str, field: str, file: str, where: Any) -> str | None:
    value = item.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise DataError(file, where, f"{field}.{key}", f"expected a non-empty string, got {_describe(value)}")
    return value


def _tool_calls(item: dict, field: str, file: str, where: Any) -> tuple[dict, ...] | None:
    """A message's ``tool_calls``: None when absent, null or empty; else each call must name its function."""
    value = item.get("tool_calls")
    if value is None or (isinstance(value, (list, tuple)) and not value):
        return None
    if not isinstance(value, (list, tuple)):
        raise DataError(file, where, f"{field}.tool_calls", f"expected a list of tool calls, got {_describe(value)}")
    for index, call in enumerate(value):
        at = f"{field}.tool_calls[{index}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            raise DataError(
                file,
                where,
                at,
                'expected {"type": "function", "function": {"name": ..., "arguments": '
                f"{{...}}}}}}, got {_describe(call)}",
            )
        name = function.get("name")
        if not isinstance(name, str) or not name.strip():
            raise DataError(
                file,
                where,
                f"{at}.function.name",
                f"expected the function's name, a non-empty string, got {_describe(name)}",
            )
        arguments = function.get("arguments")
        if arguments is not None and not isinstance(arguments, (dict, str)):
            raise DataError(
                file,
                where,
                f"{at}.function.arguments",
                f"expected an object (or a JSON string), got {_describe(arguments)}",
            )
    return tuple(value)


def _message(item: Any, field: str, file: str, where: Any) -> Message:
    if not isinstance(item, dict):
        raise DataError(file, where, field, f"expected an object with keys {{role, content}}, got {_describe(item)}")
    calls = _tool_calls(item, field, file, where)
    if "role" not in item or ("content" not in item and calls is None):
        raise DataError(file, where, field, f"expected keys {{role, content}}, found keys {_braces(item)}")
    role, content = item["role"], item.get("content")
    if not isinstance(role, str) or role not in ROLES:
        raise DataError(file, where, f"{field}.role", f"expected one of {', '.join(ROLES)}, got {_describe(role)}")
    if calls is not None and role != "assistant":
        raise DataError(file, where, f"{field}.tool_calls", f"only assistant messages call tools, got role {role!r}")
    if content is None and calls is not None:
        content = ""  # an assistant turn that only calls tools
    if not isinstance(content, str):
        raise DataError(file, where, f"{field}.content", f"expected a string, got {_describe(content)}")
    if role == "assistant" and calls is None and not content.strip():
        raise DataError(
            file,
            where,
            f"{field}.content",
            f"empty assistant message: expected non-empty text or tool_calls, got {content!r}",
        )
    return Message(
        role,
        content,
        calls,
        _optional_text(item, "name", field, file, where),
        _optional_text(item, "tool_call_id", field, file, where),
    )


def messages_field(value: Any, field: str, file: str, where: Any) -> tuple[Message, ...]:
    """A non-empty list of ``{role, content}`` objects as Messages; an assistant's content must be non-empty
    unless it calls tools."""
    if not isinstance(value, (list, tuple)):
        raise DataError(file, where, field, f"expected a list of {{role, content}} objects, got {_describe(value)}")
    if not value:
        raise DataError(file, where, field, "expected at least one message, got an empty list")
    return tuple(_message(item, f"{field}[{index}]", file, where) for index, item in enumerate(value))


def _not_ending_with_assistant(messages: tuple[Message, ...], field: str, file: str, where: Any) -> tuple[Message, ...]:
    if messages[-1].role == "assistant":
        raise DataError(
            file,
            where,
            f"{field}[{len(messages) - 1}].role",
            "a prompt must not end with an assistant message: the model writes the next turn",
        )
    return messages


def _prompt_value(value: Any, field: str, file: str, where: Any, allow_empty: bool) -> str | tuple[Message, ...]:
    """A prompt: a string, or a conversation that does not end with the assistant."""
    if isinstance(value, (list, tuple)):
        return _not_ending_with_assistant(messages_field(value, field, file, where), field, file, where)
    if not isinstance(value, str):
        raise DataError(file, where, field, f"expected a string or a list of messages, got {_describe(value)}")
    return text_field({field: value}, field, file, where, allow_empty=allow_empty)


# ---------------------------------------------------------------- SFT


def _no_label(row: dict, file: str, where: Any) -> None:
    """SFT trains on every completion: a ``label`` (KTO's desirable/undesirable) would be silently ignored."""
    if "label" in row:
        raise DataError(file, where, "label", KTO_LABEL)


def _tools(row: dict, file: str, where: Any) -> tuple[dict, ...] | None:
    """A conversational record's ``tools`` (schemas for the chat template); None when absent or null."""
    value = row.get("tools")
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(tool, dict) for tool in value):
        raise DataError(file, where, "tools", f"expected a list of tool schemas (objects), got {_describe(value)}")
    return tuple(value)


def _completion_messages(
    value: Any, field: str, file: str, where: Any, roles: tuple[str, ...] = COMPLETION_ROLES
) -> tuple[Message, ...]:
    """The turns after a conversational prompt: ``roles`` only, starting with the assistant's."""
    messages = messages_field(value, field, file, where)
    for index, message in enumerate(messages):
        if message.role not in roles:
            expected = " or ".join(map(repr, roles))
            raise DataError(
                file,
                where,
                f"{field}[{index}].role",
                f"expected {expected} in a completion (the model writes it), got {message.role!r}",
            )
    if messages[0].role != "assistant":
        raise DataError(
            file, where, f"{field}[0].role", f"a completion starts with the assistant's turn, got {messages[0].role!r}"
        )
    return messages


def _sft_prompt_completion(row: dict, file: str, where: Any) -> SFTExample:
    _no_label(row, file, where)
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, (list, tuple)):
        messages = _prompt_value(prompt, "prompt", file, where, allow_empty=False)
        if isinstance(completion, str):  # a plain reply after a conversation: the assistant's next turn
            turns = (Message("assistant", text_field(row, "completion", file, where)),)
        elif isinstance(completion, (list, tuple)):
            turns = _completion_messages(completion, "completion", file, where)
        else:
            raise DataError(
                file,
                where,
                "completion",
                f"expected a list of assistant messages or a string, got {_describe(completion)}",
            )
        return SFTExample(prompt=messages, completion=turns, where=_here(file, where), tools=_tools(row, file, where))
    if isinstance(completion, (list, tuple)):
        raise DataError(
            file,
            where,
            "prompt",
            f"expected a list of messages before a conversational completion, got {_describe(prompt)}",
        )
    return SFTExample(
        prompt=text_field(row, "prompt", file, where, allow_empty=True),
        completion=text_field(row, "completion", file, where),
        where=_here(file, where),
    )


def _sft_messages(row: dict, file: str, where: Any) -> SFTExample:
    _no_label(row, file, where)
    messages = messages_field(row["messages"], "messages", file, where)
    if not any(message.role == "assistant" for message in messages):
        roles = ", ".join(message.role for message in messages)
        raise DataError(
            file, where, "messages", f"expected at least one assistant message to learn from, found roles [{roles}]"
        )
    return SFTExample(messages=messages, where=_here(file, where), tools=_tools(row, file, where))


def _sft_text(row: dict, file: str, where: Any) -> SFTExample:
    _no_label(row, file, where)
    return SFTExample(text=text_field(row, "text", file, where), where=_here(file, where))


SFT_SHAPES = {("prompt", "completion"): _sft_prompt_completion, ("messages",): _sft_messages, ("text",): _sft_text}


# ---------------------------------------------------------------- preferences


def split_shared_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split two whole transcripts into ``(prompt, chosen_reply, rejected_reply)``.

    The prompt is the longest common prefix, cut back to the end of the last assistant marker in it
    (:data:`ASSISTANT_MARKERS`, e.g. ``"\\n\\nAssistant:"``), or where there is none, to the last word
    boundary, with the whitespace before the replies' first word given to the replies, as TRL's
    ``extract_prompt`` does: prompt and reply are tokenized apart, and BPE tokenizers join a space to the
    word after it (``" blue"`` is one token, ``"The sky is "`` ends with a lone space token). So
    ``"The sky is blue."`` / ``"The sky is green."`` give ``("The sky is", " blue.", " green.")``.
    ``prompt + reply`` always gives back the transcript. The prompt is ``""`` when nothing is shared.
    """
    shared = os.path.commonprefix([chosen, rejected])
    cut = max((shared.rfind(marker) + len(marker) for marker in ASSISTANT_MARKERS if marker in shared), default=-1)
    if cut < 0:
        ends_on_space = all(len(text) == len(shared) or text[len(shared)].isspace() for text in (chosen, rejected))
        cut = len(shared) if ends_on_space else max((i + 1 for i, ch in enumerate(shared) if ch.isspace()), default=0)
        cut = len(chosen[:cut].rstrip())  # a cut after a non-space is a token boundary; one after a space is not
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _reply(row: dict, field: str, file: str, where: Any) -> str:
    """A response: a string, or TRL's conversational ``[{"role": "assistant", "content": ...}]``."""
    value = row[field]
    if isinstance(value, (list, tuple)):
        messages = messages_field(value, field, file, where)
        if len(messages) != 1 or messages[0].role != "assistant":
            roles = ", ".join(message.role for message in messages)
            raise DataError(
                file,
                where,
                field,
                f"expected a string or one assistant message, got {len(messages)} message(s) with roles [{roles}]",
            )
        return _text_reply(messages[0], f"{field}[0]", file, where)
    if not isinstance(value, str):
        raise DataError(file, where, field, f"expected a string or a list of messages, got {_describe(value)}")
    return text_field(row, field, file, where)


def _text_reply(message: Message, field: str, file: str, where: Any) -> str:
    """A compared reply's text: a reply that calls tools has no text form to compare."""
    if message.tool_calls is not None:
        raise DataError(
            file,
            where,
            f"{field}.tool_calls",
            "a compared reply must be text: tool calls are supported in prompts, SFT and KTO data",
        )
    return message.content


def _annotator(row: dict, file: str, where: Any) -> str | None:
    value = row.get("annotator")
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return None if value is None else str(value)
    if isinstance(value, str) and value.strip():
        return value
    raise DataError(file, where, "annotator", f"expected a non-empty string or an integer, got {_describe(value)}")


def _pair(
    prompt: str | tuple[Message, ...], chosen: str, rejected: str, row: dict, file: str, where: Any
) -> PreferencePair:
    if chosen.strip() == rejected.strip():
        raise DataError(file, where, "rejected", IDENTICAL)
    return PreferencePair(prompt, chosen, rejected, _annotator(row, file, where), _here(file, where))


def _preference_explicit(row: dict, file: str, where: Any) -> PreferencePair:
    prompt = _prompt_value(row["prompt"], "prompt", file, where, allow_empty=True)
    return _pair(prompt, _reply(row, "chosen", file, where), _reply(row, "rejected", file, where), row, file, where)


def _split_conversations(row: dict, file: str, where: Any) -> tuple[tuple[Message, ...], str, str]:
    chosen, rejected = (messages_field(row[field], field, file, where) for field in ("chosen", "rejected"))
    for field, messages in (("chosen", chosen), ("rejected", rejected)):
        if messages[-1].role != "assistant":
            raise DataError(
                file,
                where,
                f"{field}[{len(messages) - 1}].role",
                f"expected the conversation to end with an assistant message, got {messages[-1].role!r}",
            )
    if chosen[:-1] != rejected[:-1]:
        differ = next(
            (i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)) - 1
        )
        raise DataError(
            file,
            where,
            None,
            "chosen and rejected must share every message but the last assistant turn; "
            f"they differ at message {differ}",
        )
    last = len(chosen) - 1
    return (
        chosen[:-1],
        _text_reply(chosen[-1], f"chosen[{last}]", file, where),
        _text_reply(rejected[-1], f"rejected[{last}]", file, where),
    )


def _preference_implicit(row: dict, file: str, where: Any) -> PreferencePair:
    kinds = {
        field: "list" if isinstance(row[field], (list, tuple)) else "string" if isinstance(row[field], str) else None
        for field in ("chosen", "rejected")
    }
    for field, kind in kinds.items():
        if kind is None:
            raise DataError(file, where, field, f"expected a string or a list of messages, got {_describe(row[field])}")
    if kinds["chosen"] != kinds["rejected"]:
        raise DataError(
            file,
            where,
            "rejected",
            f"expected the same type as chosen (a {kinds['chosen']}), got a {kinds['rejected']}",
        )
    if kinds["chosen"] == "list":
        prompt, chosen, rejected = _split_conversations(row, file, where)
    else:
        if row["chosen"].strip() == row["rejected"].strip():
            raise DataError(file, where, "rejected", IDENTICAL)
        prompt, chosen, rejected = split_shared_prompt(row["chosen"], row["rejected"])
        for field, reply in (("chosen", chosen), ("rejected", rejected)):
            if not reply.strip():
                raise DataError(
                    file,
                    where,
                    field,
                    f"empty {field}: expected a non-empty reply after the shared prompt {prompt[-40:]!r}",
                )
    if not prompt or (isinstance(prompt, str) and not prompt.strip()):
        raise DataError(
            file,
            where,
            None,
            "chosen and rejected share no prompt; "
            'for pairs without one write {"prompt": "", "chosen": ..., "rejected": ...}',
        )
    return _pair(prompt, chosen, rejected, row, file, where)


PREFERENCE_SHAPES = {
    ("prompt", "chosen", "rejected"): _preference_explicit,
    ("chosen", "rejected"): _preference_implicit,
}


# ---------------------------------------------------------------- unpaired preferences (KTO)


def _label(row: dict, file: str, where: Any) -> bool:
    value = row["label"]
    if not isinstance(value, bool):
        raise DataError(
            file,
            where,
            "label",
            f"expected a boolean (true: a desirable completion, false: an undesirable one), got {_describe(value)}",
        )
    return value


def _unpaired(row: dict, file: str, where: Any) -> UnpairedExample:
    prompt = _prompt_value(row["prompt"], "prompt", file, where, allow_empty=True)
    value = row["completion"]
    if isinstance(value, (list, tuple)):
        if isinstance(prompt, str):
            raise DataError(
                file,
                where,
                "prompt",
                f"expected a list of messages before a conversational completion, got {_describe(prompt)}",
            )
        completion = _completion_messages(value, "completion", file, where, roles=("assistant",))
    elif isinstance(value, str):
        completion = text_field(row, "completion", file, where)
    else:
        raise DataError(file, where, "completion", f"expected a string or a list of messages, got {_describe(value)}")
    return UnpairedExample(
        prompt,
        completion,
        _label(row, file, where),
        _here(file, where),
        _tools(row, file, where) if isinstance(prompt, tuple) else None,
    )


UNPAIRED_SHAPES = {("prompt", "completion", "label"): _unpaired}


# ---------------------------------------------------------------- prompts


def _prompt_text(row: dict, file: str, where: Any) -> Prompt:
    value = _prompt_value(row["prompt"], "prompt", file, where, allow_empty=False)
    if isinstance(value, str):
        return Prompt(prompt=value, where=_here(file, where))
    return Prompt(messages=value, where=_here(file, where))


def _prompt_messages(row: dict, file: str, where: Any) -> Prompt:
    messages = _not_ending_with_assistant(
        messages_field(row["messages"], "messages", file, where), "messages", file, where
    )
    return Prompt(messages=messages, where=_here(file, where))


PROMPT_SHAPES = {("prompt",): _prompt_text, ("messages",): _prompt_messages}


# ---------------------------------------------------------------- loading


def detect_shape(row: dict, shapes: Iterable[tuple[str, ...]], file: str, where: Any) -> tuple[str, ...]:
    """The one shape (a tuple of keys) whose keys ``row`` has all of; a shape inside a larger one loses.

    Raises DataError naming the keys found and the shapes accepted when none or two shapes match.
    """
    shapes = tuple(shapes)
    complete = [shape for shape in shapes if all(key in row for key in shape)]
    complete = [shape for shape in complete if not any(set(shape) < set(other) for other in complete)]
    if len(complete) == 1:
        return complete[0]
    if not complete:
        accepted = " | ".join(_braces(shape) for shape in shapes)
        raise DataError(file, where, None, f"expected one of {accepted}, found keys {_braces(row)}")
    both = " and ".join(_braces(shape) for shape in complete)
    raise DataError(file, where, None, f"ambiguous record: it has the keys of {both}; keep one")


def _parse(shapes: dict, row: dict, file: str, where: Any):
    return shapes[detect_shape(row, shapes, file, where)](row, file, where)


def parse_sft(row: dict, file: str = "<record>", where: Any = None) -> SFTExample:
    """One SFT record (a dict) as an SFTExample; raises DataError if it is not valid."""
    return _parse(SFT_SHAPES, row, file, where)


def parse_preference(row: dict, file: str = "<record>", where: Any = None) -> PreferencePair:
    """One preference record (a dict) as a PreferencePair; raises DataError if it is not valid."""
    return _parse(PREFERENCE_SHAPES, row, file, where)


def parse_unpaired(row: dict, file: str = "<record>", where: Any = None) -> UnpairedExample:
    """One unpaired preference record (KTO) as an UnpairedExample; raises DataError if it is not valid."""
    return _parse(UNPAIRED_SHAPES, row, file, where)


def parse_prompt(row: dict, file: str = "<record>", where: Any = None) -> Prompt:
    """One prompt record (a dict) as a Prompt; raises DataError if it is not valid."""
    return _parse(PROMPT_SHAPES, row, file, where)


def _load(path: str | os.PathLike, shapes: dict) -> list:
    """Every record of ``path`` parsed by its shape's builder; all in one shape, all valid, or DataError."""
    file, records, first = str(path), [], None
    template = POSITIONS[_format(Path(path))]
    for number, row in read_rows(path):
        where = template.format(number)
        shape = detect_shape(row, shapes, file, where)
        if first is None:
            first = (shape, where)
        elif shape != first[0]:
            raise DataError(
                file,
                where,
                None,
                f"this record has the shape {_braces(shape)} but the first record "
                f"({first[1]}) has {_braces(first[0])}: use one shape per file",
            )
        records.append(shapes[shape](row, file, where))
    return records


def load_sft(path: str | os.PathLike) -> list[SFTExample]:
    """All SFT examples of a file, validated; raises DataError at the first bad record."""
    return _load(path, SFT_SHAPES)


def load_preferences(path: str | os.PathLike) -> list[PreferencePair]:
    """All preference pairs of a file, validated; raises DataError at the first bad record."""
    return _load(path, PREFERENCE_SHAPES)


def load_unpaired(path: str | os.PathLike) -> list[UnpairedExample]:
    """All unpaired preference examples (KTO) of a file, validated; raises DataError at the first bad record."""
    return _load(path, UNPAIRED_SHAPES)


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> Path:
    """One JSON object per line (UTF-8), parent folders made; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def load_prompts(path: str | os.PathLike) -> list[Prompt]:
    """All RL prompts of a file, validated; raises DataError at the first bad record."""
    return _load(path, PROMPT_SHAPES)


LOADERS = {
    "sft": load_sft,
    "preference": load_preferences,
    "kto": load_unpaired,
    "unpaired": load_unpaired,
    "prompt": load_prompts,
}


def validate_file(path: str | os.PathLike, kind: str = "sft") -> int:
    """The number of valid records of ``kind`` (``sft``, ``preference``, ``kto`` or its alias ``unpaired``,
    ``prompt``) in ``path``; DataError if any is bad."""
    if kind not in LOADERS:
        raise TuneoffError(f"unknown data kind {kind!r}: expected one of {', '.join(LOADERS)}")
    return len(LOADERS[kind](path))
