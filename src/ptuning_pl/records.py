"""Read and validate prompt/response data files in the ADGEN layout.

A data file is either JSON lines (one object per line) or one JSON array of objects, in UTF-8 with an
optional byte order mark. Each object contains a prompt, a response and optionally a chat history under
configurable keys, for example ``{"content": "类型#上衣*颜色#白色", "summary": "..."}``.

Every problem is reported as a `DataFileError` that names the file, the 1-based line and the fix.
`read_records` stops at the first problem in a file, and `validate_files` checks several files and
returns one error per bad file. This module imports no torch, so it can check data before a model loads.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DataFileError",
    "DataFileSpec",
    "Record",
    "read_records",
    "validate_files",
]

StrPath = str | os.PathLike[str]

_UTF8_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
_JSON_WHITESPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()
# Maximum number of record keys that an error message lists before it abbreviates.
_MAX_KEYS_SHOWN = 12
# Marks a key that is absent from a record, as distinct from a key whose value is null.
_MISSING = object()


@dataclass(frozen=True, slots=True)
class Record:
    """One prompt/response example read from a data file."""

    index: int
    """0-based position of the record among the records of its file."""
    line: int
    """1-based line number where the record starts in its file."""
    prompt: str
    response: str | None
    """None only in files read with ``require_response=False`` whose record has no response."""
    history: tuple[tuple[str, str], ...]
    """Earlier (query, response) turns of a conversation, oldest first. Empty for single-turn data."""
    messages: tuple[tuple[str, str], ...] = ()
    """(role, content) turns of a `messages`-format record; empty for prompt/response records. For such a
    record, `prompt` is the last user message and `response` the last assistant message (or None)."""


class DataFileError(ValueError):
    """Invalid or unreadable data file.

    ``str(error)`` is the full message: the file, the 1-based line when one applies, the problem and
    the fix. ``line`` is None for problems of the whole file (not found, empty), and ``field`` is the
    record key at fault, or None when the problem is not tied to one key.
    """

    def __init__(self, path: StrPath, line: int | None, field: str | None, detail: str):
        self.path = Path(path)
        self.line = line
        self.field = field
        self.detail = detail
        location = f"data file {self.path}" if line is None else f"data file {self.path}, line {line}"
        super().__init__(f"{location}: {detail}")

    def __reduce__(self) -> tuple[Any, ...]:
        # The default pickling passes only the formatted message back to __init__. DataLoader workers
        # and multiprocessing pickle exceptions, so rebuild from all four fields.
        return (type(self), (self.path, self.line, self.field, self.detail))


@dataclass(frozen=True)
class DataFileSpec:
    """Arguments of one `read_records` call, for checking several files with `validate_files`."""

    path: StrPath
    split_name: str = "train"
    prompt_column: str = "content"
    response_column: str = "summary"
    history_column: str | None = None
    require_response: bool = True
    messages_column: str | None = None


def validate_files(specs: Iterable[DataFileSpec]) -> list[DataFileError]:
    """Read every file in ``specs`` and return the first problem of each bad file, in order.

    An empty list means that every file is valid. Errors other than `DataFileError` propagate.
    """
    errors = []
    for spec in specs:
        try:
            read_records(
                spec.path,
                prompt_column=spec.prompt_column,
                response_column=spec.response_column,
                history_column=spec.history_column,
                require_response=spec.require_response,
                split_name=spec.split_name,
                messages_column=spec.messages_column,
            )
        except DataFileError as error:
            errors.append(error)
    return errors


def read_records(
    path: StrPath,
    *,
    prompt_column: str = "content",
    response_column: str = "summary",
    history_column: str | None = None,
    require_response: bool = True,
    split_name: str = "train",
    messages_column: str | None = None,
) -> list[Record]:
    """Read and validate all records of a JSON lines or JSON array file.

    The format follows from the first non-whitespace character: ``[`` starts a JSON array, anything
    else is read as JSON lines, where blank lines are skipped. With ``require_response=False``, as for
    a test split, a missing or null response gives ``Record.response = None``. A missing, null or
    empty history means no history. ``split_name`` only appears in messages.

    Raises:
        DataFileError: on the first problem found. The message names the file, line, field and fix.
    """
    text = _read_text(Path(path), split_name)
    columns = _Columns(prompt_column, response_column, history_column, require_response, split_name, messages_column)

    start = _JSON_WHITESPACE.match(text).end()
    if start == len(text):
        raise DataFileError(
            path,
            None,
            None,
            "the file is empty or contains only whitespace. Write one JSON object per line "
            f"(JSON lines), such as {columns.example()}, or a JSON array of such objects.",
        )

    if text[start] == "[":
        records = _read_json_array(path, text, start, columns)
    else:
        records = _read_json_lines(path, text, columns)

    if not records:
        raise DataFileError(
            path,
            None,
            None,
            f"the JSON array contains no records. Add at least one object such as {columns.example()}.",
        )
    return records


# --- Reading bytes -----------------------------------------------------------------------------------


def _read_text(path: Path, split_name: str) -> str:
    """Read the file and decode it as UTF-8, dropping a leading byte order mark."""
    if path.is_dir():
        raise DataFileError(
            path,
            None,
            None,
            f"the path of the {split_name} data file is a directory. Point it at a .json or .jsonl file "
            "inside it.",
        )
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataFileError(
            path,
            None,
            None,
            f"the {split_name} data file was not found{_resolved(path)}. Check the path in the data "
            f"config. A relative path is resolved against the working directory {Path.cwd()}.",
        ) from None
    except OSError as error:
        raise DataFileError(
            path, None, None, f"the {split_name} data file could not be read: {error.strerror}."
        ) from error

    bom_length = len(_UTF8_BOM) if data.startswith(_UTF8_BOM) else 0
    try:
        return data[bom_length:].decode("utf-8")
    except UnicodeDecodeError as error:
        raise _encoding_error(path, data, bom_length + error.start) from None


def _resolved(path: Path) -> str:
    return "" if path.is_absolute() else f" (resolved to {path.absolute()})"


def _encoding_error(path: Path, data: bytes, offset: int) -> DataFileError:
    line = data.count(b"\n", 0, offset) + 1
    line_start = data.rfind(b"\n", 0, offset) + 1
    bad_bytes = " ".join(f"0x{byte:02x}" for byte in data[offset : offset + 4])

    if data.startswith(_UTF16_BOMS):
        source_encoding, guess = "UTF-16", " It starts with a UTF-16 byte order mark."
    elif _decodes_as(data, "gbk"):
        source_encoding, guess = "GBK", " It decodes as GBK, so it is probably GBK-encoded."
    else:
        source_encoding, guess = "<source encoding>", ""

    return DataFileError(
        path,
        line,
        None,
        f"the file is not valid UTF-8: invalid byte at byte offset {offset} (byte column "
        f"{offset - line_start + 1} of the line), starting {bad_bytes}.{guess} Re-encode it as UTF-8, "
        "for example with "
        f"`iconv -f {source_encoding} -t UTF-8 {path.name} > {path.stem}.utf8{path.suffix}`.",
    )


def _decodes_as(data: bytes, encoding: str) -> bool:
    try:
        data.decode(encoding)
    except UnicodeDecodeError:
        return False
    return True


# --- Parsing the two layouts -------------------------------------------------------------------------


def _read_json_lines(path: StrPath, text: str, columns: _Columns) -> list[Record]:
    records: list[Record] = []
    # Split on "\n" only: str.splitlines would also split on U+2028 and other separators, which JSON
    # allows raw inside strings, and so would shift the line numbers. A "\r" left by CRLF endings is
    # JSON whitespace.
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line or line.isspace():
            continue
        try:
            value = _DECODER.decode(line)
        except json.JSONDecodeError as error:
            raise _json_lines_syntax_error(path, text, line_number, error, first_record=not records) from None
        records.append(columns.make_record(path, value, len(records), line_number))
    return records


def _json_lines_syntax_error(
    path: StrPath,
    text: str,
    line_number: int,
    error: json.JSONDecodeError,
    first_record: bool,
) -> DataFileError:
    detail = f"column {error.colno}: invalid JSON ({error.msg})."
    whole_file = _parse_whole_file(text) if first_record else None
    if isinstance(whole_file, dict):
        detail += (
            " The file is one JSON object spread over several lines, not a list of records. Write the "
            "records as JSON lines (one object per line) or as a JSON array of objects."
        )
        list_keys = [key for key, item in whole_file.items() if isinstance(item, list)]
        if list_keys:
            detail += f' The records may be the list under key "{list_keys[0]}".'
    else:
        detail += (
            " In JSON lines each line must hold exactly one complete JSON object. To spread a record over "
            "several lines, put all records in one JSON array: [ {...}, {...} ]."
        )
    return DataFileError(path, line_number, None, detail)


def _parse_whole_file(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _read_json_array(path: StrPath, text: str, start: int, columns: _Columns) -> list[Record]:
    records: list[Record] = []
    # The line number is advanced by counting newlines since the last position, so the whole scan is
    # linear in the file size.
    line_number = text.count("\n", 0, start) + 1
    counted_up_to = start
    position = _skip_whitespace(text, start + 1)

    if position < len(text) and text[position] == "]":
        position = _skip_whitespace(text, position + 1)
        _check_end_of_array(path, text, position)
        return records

    while True:
        if position >= len(text):
            raise _array_not_closed(path, text)
        try:
            value, end = _DECODER.raw_decode(text, position)
        except json.JSONDecodeError as error:
            raise _array_syntax_error(path, text, error, after_comma=bool(records)) from None

        line_number += text.count("\n", counted_up_to, position)
        counted_up_to = position
        if not isinstance(value, dict):
            raise DataFileError(
                path,
                line_number,
                None,
                f"item {len(records)} of the top-level array is {_json_type(value)}, not an object. The "
                f"array must contain only record objects such as {columns.example()}.",
            )
        records.append(columns.make_record(path, value, len(records), line_number))

        position = _skip_whitespace(text, end)
        if position >= len(text):
            raise _array_not_closed(path, text)
        if text[position] == "]":
            position = _skip_whitespace(text, position + 1)
            _check_end_of_array(path, text, position)
            return records
        if text[position] != ",":
            raise _syntax_error_at(
                path,
                text,
                position,
                "expected ',' or ']' after the record. Separate the objects in the array with commas.",
            )
        position = _skip_whitespace(text, position + 1)


def _skip_whitespace(text: str, position: int) -> int:
    return _JSON_WHITESPACE.match(text, position).end()


def _check_end_of_array(path: StrPath, text: str, position: int) -> None:
    if position < len(text):
        raise _syntax_error_at(
            path,
            text,
            position,
            "extra data after the closing ] of the top-level array. The file must contain exactly one JSON "
            "array, or be JSON lines with one object per line.",
        )


def _array_not_closed(path: StrPath, text: str) -> DataFileError:
    return _syntax_error_at(
        path,
        text,
        len(text),
        "the top-level JSON array is not closed. Add the missing ] at the end, or check whether the file "
        "was cut short.",
    )


def _array_syntax_error(
    path: StrPath, text: str, error: json.JSONDecodeError, after_comma: bool
) -> DataFileError:
    if after_comma and text.startswith("]", error.pos):
        return _syntax_error_at(
            path, text, error.pos, "a trailing comma before ] is not valid JSON. Remove the last comma."
        )
    return DataFileError(
        path,
        error.lineno,
        None,
        f"column {error.colno}: invalid JSON ({error.msg}). Fix the JSON syntax there.",
    )


def _syntax_error_at(path: StrPath, text: str, position: int, detail: str) -> DataFileError:
    line_number = text.count("\n", 0, position) + 1
    column = position - (text.rfind("\n", 0, position) + 1) + 1
    return DataFileError(path, line_number, None, f"column {column}: {detail}")


# --- Checking one record -----------------------------------------------------------------------------


MESSAGE_ROLES = ("system", "user", "assistant", "observation")


@dataclass(frozen=True)
class _Columns:
    """Record keys to read and how strictly to check them."""

    prompt: str
    response: str
    history: str | None
    require_response: bool
    split_name: str
    messages: str | None = None

    def example(self) -> str:
        if self.messages is not None:
            return f'{{"{self.messages}": [{{"role": "user", "content": "..."}}, {{"role": "assistant", "content": "..."}}]}}'
        return f'{{"{self.prompt}": "...", "{self.response}": "..."}}'

    def make_record(self, path: StrPath, value: Any, index: int, line: int) -> Record:
        if not isinstance(value, dict):
            raise DataFileError(
                path,
                line,
                None,
                f"the record is {_json_type(value)}, not a JSON object. Each record must be an object such "
                f"as {self.example()}.",
            )
        if self.messages is not None:
            return self._messages_record(path, value, index, line)

        prompt = value.get(self.prompt, _MISSING)
        if prompt is _MISSING:
            raise DataFileError(
                path,
                line,
                self.prompt,
                f'field "{self.prompt}" is missing. The record has {_describe_keys(value)}. Set '
                "data.prompt_column to the key that holds the prompt.",
            )
        if not isinstance(prompt, str):
            raise _not_a_string(path, line, self.prompt, prompt, "data.prompt_column")

        response = value.get(self.response, _MISSING)
        if isinstance(response, str):
            pass
        elif response is _MISSING or response is None:
            if self.require_response:
                raise self._response_required(path, line, value, response)
            response = None
        else:
            raise _not_a_string(path, line, self.response, response, "data.response_column")

        history: tuple[tuple[str, str], ...] = ()
        if self.history is not None:
            history = _check_history(path, line, self.history, value.get(self.history))

        return Record(index=index, line=line, prompt=prompt, response=response, history=history)

    def _messages_record(self, path: StrPath, value: dict[str, Any], index: int, line: int) -> Record:
        column = self.messages
        messages = value.get(column, _MISSING)
        if messages is _MISSING:
            raise DataFileError(
                path,
                line,
                column,
                f'field "{column}" is missing. The record has {_describe_keys(value)}. Set data.messages_column '
                "to the key that holds the conversation, or to null for prompt/response records.",
            )
        if not isinstance(messages, list) or not messages:
            raise DataFileError(
                path,
                line,
                column,
                f'field "{column}" is {_json_type(messages)}{" with no items" if messages == [] else ""}, but it '
                f"must be a non-empty list of {{\"role\": ..., \"content\": ...}} objects.",
            )
        turns = []
        for position, message in enumerate(messages):
            if not isinstance(message, dict):
                raise DataFileError(
                    path, line, column, f'"{column}"[{position}] is {_json_type(message)}, not an object with '
                    '"role" and "content".'
                )
            role, content = message.get("role"), message.get("content")
            if role not in MESSAGE_ROLES:
                raise DataFileError(
                    path, line, column, f'"{column}"[{position}].role is {json.dumps(role, ensure_ascii=False)}; '
                    f"expected one of {', '.join(MESSAGE_ROLES)}."
                )
            if not isinstance(content, str):
                raise DataFileError(
                    path, line, column, f'"{column}"[{position}].content is {_json_type(content)}, but it must be '
                    "a string."
                )
            turns.append((role, content))

        assistant = [content for role, content in turns if role == "assistant"]
        users = [content for role, content in turns if role == "user"]
        if self.require_response and not assistant:
            raise DataFileError(
                path,
                line,
                column,
                f'"{column}" has no assistant message, but the {self.split_name} split needs one to learn from. '
                "Add the assistant's answer, or move the record to the test file.",
            )
        if not users:
            raise DataFileError(path, line, column, f'"{column}" has no user message; add the user\'s turn.')
        return Record(
            index=index,
            line=line,
            prompt=users[-1],
            response=assistant[-1] if assistant else None,
            history=(),
            messages=tuple(turns),
        )

    def _response_required(
        self, path: StrPath, line: int, record: dict[str, Any], response: Any
    ) -> DataFileError:
        if response is None:
            detail = (
                f'field "{self.response}" is null, but the {self.split_name} split requires a response '
                "string in every record. Fill in the response, or move the record to the test file."
            )
        else:
            detail = (
                f'field "{self.response}" is missing, but the {self.split_name} split requires a response. '
                "Every training and validation record needs a response, so set data.response_column to "
                f"the key your file uses. The record has {_describe_keys(record)}."
            )
        return DataFileError(path, line, self.response, detail)


def _check_history(path: StrPath, line: int, column: str, value: Any) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    shape = "a list of [query, response] pairs of strings, or null or [] for no history"
    if not isinstance(value, list):
        raise DataFileError(
            path,
            line,
            column,
            f'field "{column}" is {_json_type(value)}, but it must be {shape}. Fix the record, or set '
            "data.history_column to null if the file has no history.",
        )

    turns = []
    for item_index, item in enumerate(value):
        if not isinstance(item, list) or len(item) != 2:
            if isinstance(item, list):
                found = "an array of 1 item" if len(item) == 1 else f"an array of {len(item)} items"
            else:
                found = _json_type(item)
            raise DataFileError(
                path,
                line,
                column,
                f'"{column}"[{item_index}] is {found}, but each history item must be a [query, response] '
                f'pair of strings. Field "{column}" must be {shape}.',
            )
        for part_index, part in enumerate(item):
            if not isinstance(part, str):
                role = "query" if part_index == 0 else "response"
                raise DataFileError(
                    path,
                    line,
                    column,
                    f'"{column}"[{item_index}][{part_index}] (the {role}) is {_json_type(part)}, but it must '
                    "be a string.",
                )
        turns.append((item[0], item[1]))
    return tuple(turns)


def _not_a_string(path: StrPath, line: int, column: str, value: Any, config_key: str) -> DataFileError:
    return DataFileError(
        path,
        line,
        column,
        f'field "{column}" is {_json_type(value)}, but it must be a string. Fix the record, or set '
        f"{config_key} if the text is under another key.",
    )


def _json_type(value: Any) -> str:
    """Name the JSON type of a decoded value, with an article, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _describe_keys(record: dict[str, Any]) -> str:
    if not record:
        return "no keys"
    keys = [f'"{key}"' for key in list(record)[:_MAX_KEYS_SHOWN]]
    more = f" and {len(record) - _MAX_KEYS_SHOWN} more" if len(record) > _MAX_KEYS_SHOWN else ""
    return "keys " + ", ".join(keys) + more
