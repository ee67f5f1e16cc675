"""Tests for reading and validating prompt/response data files (ptuning_pl.records)."""

from __future__ import annotations

import importlib.util
import json
import pickle
import time
from pathlib import Path

import pytest

from ptuning_pl.records import DataFileError, DataFileSpec, Record, read_records, validate_files
from ptuning_pl.sample_data import sample_data_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
# The real ADGEN development split is present beside the repository on development machines only.
from conftest import ADGEN_DEV  # noqa: E402


def write_file(directory: Path, name: str, content: str | bytes) -> Path:
    path = directory / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", newline="")
    return path


def read_error(path: Path, **kwargs) -> DataFileError:
    with pytest.raises(DataFileError) as caught:
        read_records(path, **kwargs)
    return caught.value


def assert_error(
    error: DataFileError, path: Path, line: int | None, field: str | None, *phrases: str
) -> None:
    message = str(error)
    assert error.path == path
    assert error.line == line
    assert error.field == field
    assert str(path) in message
    if line is None:
        assert ", line " not in message
    else:
        assert f"{path}, line {line}:" in message
    for phrase in phrases:
        assert phrase in message


# --- Happy paths -------------------------------------------------------------------------------------


def test_json_lines_with_blank_lines(tmp_path):
    text = (
        "\n"
        '{"content": "类型#上衣", "summary": "一"}\n'
        "\n"
        "   \n"
        '{"content": "类型#裤", "summary": "二"}\n'
        '{"content": "类型#裙", "summary": "三"}'  # no final newline
    )
    path = write_file(tmp_path, "train.json", text)

    records = read_records(path)

    assert [record.index for record in records] == [0, 1, 2]
    assert [record.line for record in records] == [2, 5, 6]
    assert [record.prompt for record in records] == ["类型#上衣", "类型#裤", "类型#裙"]
    assert [record.response for record in records] == ["一", "二", "三"]
    assert all(record.history == () for record in records)


def test_json_lines_with_crlf_endings(tmp_path):
    text = '{"content": "a", "summary": "b"}\r\n\r\n{"content": "c", "summary": "d"}\r\n'
    path = write_file(tmp_path, "train.json", text)

    records = read_records(path)

    assert [record.line for record in records] == [1, 3]
    assert records[1].response == "d"


def test_json_array_pretty_printed_line_numbers(tmp_path):
    rows = [{"content": f"类型#{i}", "summary": f"描述{i}"} for i in range(3)]
    path = write_file(tmp_path, "dev.json", json.dumps(rows, ensure_ascii=False, indent=2))
    # indent=2 puts "[" on line 1 and each object over 4 lines: "{", two keys, "}".

    records = read_records(path)

    assert [record.index for record in records] == [0, 1, 2]
    assert [record.line for record in records] == [2, 6, 10]
    assert [record.prompt for record in records] == ["类型#0", "类型#1", "类型#2"]


def test_json_array_on_one_line(tmp_path):
    path = write_file(
        tmp_path, "dev.json", '  [{"content": "a", "summary": "b"}, {"content": "c", "summary": "d"}]\n'
    )

    records = read_records(path)

    assert [record.line for record in records] == [1, 1]
    assert [record.prompt for record in records] == ["a", "c"]


def test_utf8_bom_json_lines(tmp_path):
    text = '{"content": "类型#上衣", "summary": "白色"}\n{"content": "类型#裤", "summary": "黑色"}\n'
    path = write_file(tmp_path, "train.json", b"\xef\xbb\xbf" + text.encode("utf-8"))

    records = read_records(path)

    assert [record.prompt for record in records] == ["类型#上衣", "类型#裤"]
    assert [record.line for record in records] == [1, 2]


def test_utf8_bom_json_array(tmp_path):
    text = '[\n  {"content": "a", "summary": "b"}\n]\n'
    path = write_file(tmp_path, "train.json", b"\xef\xbb\xbf" + text.encode("utf-8"))

    records = read_records(path)

    assert [record.line for record in records] == [2]


def test_line_separator_inside_string_keeps_line_numbers(tmp_path):
    # JSON allows U+2028 unescaped inside strings, and str.splitlines() would treat it as a line break.
    text = '{"content": "a\u2028b", "summary": "c"}\n{"content": "d", "summary": "e"}\n'
    path = write_file(tmp_path, "train.json", text)

    records = read_records(path)

    assert records[0].prompt == "a\u2028b"
    assert [record.line for record in records] == [1, 2]


def test_custom_columns_and_extra_keys(tmp_path):
    path = write_file(tmp_path, "train.json", '{"q": "hello", "a": "world", "id": 7}\n')

    records = read_records(path, prompt_column="q", response_column="a")

    assert records == [Record(index=0, line=1, prompt="hello", response="world", history=())]


def test_history_missing_null_empty_and_valid(tmp_path):
    text = (
        '{"prompt": "p0", "response": "r0"}\n'
        '{"prompt": "p1", "response": "r1", "history": null}\n'
        '{"prompt": "p2", "response": "r2", "history": []}\n'
        '{"prompt": "p3", "response": "r3", "history": [["q1", "a1"], ["q2", "a2"]]}\n'
    )
    path = write_file(tmp_path, "train.json", text)

    records = read_records(path, prompt_column="prompt", response_column="response", history_column="history")

    assert records[0].history == ()
    assert records[1].history == ()
    assert records[2].history == ()
    assert records[3].history == (("q1", "a1"), ("q2", "a2"))


def test_history_ignored_without_history_column(tmp_path):
    path = write_file(tmp_path, "train.json", '{"content": "a", "summary": "b", "history": "not a list"}\n')

    records = read_records(path)

    assert records[0].history == ()


def test_test_file_without_response(tmp_path):
    text = '{"content": "a"}\n{"content": "b", "summary": null}\n{"content": "c", "summary": "given"}\n'
    path = write_file(tmp_path, "test.json", text)

    records = read_records(path, require_response=False, split_name="test")

    assert [record.response for record in records] == [None, None, "given"]


def test_record_is_frozen(tmp_path):
    path = write_file(tmp_path, "train.json", '{"content": "a", "summary": "b"}\n')
    record = read_records(path)[0]

    with pytest.raises(AttributeError):
        record.prompt = "changed"


# --- Whole-file problems -----------------------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "absent.json"

    error = read_error(path, split_name="validation")

    assert_error(error, path, None, None, "validation data file was not found", "Check the path")


def test_relative_missing_file_shows_resolved_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    error = read_error(Path("data/absent.json"))

    assert_error(
        error, Path("data/absent.json"), None, None, f"resolved to {tmp_path / 'data' / 'absent.json'}"
    )


def test_directory_given_as_file(tmp_path):
    error = read_error(tmp_path)

    assert_error(error, tmp_path, None, None, "is a directory", "Point it at a .json or .jsonl file")


def test_gbk_file_is_not_utf8(tmp_path):
    first_lines = '{"content": "a", "summary": "b"}\n{"content": "c", "summary": "d"}\n'
    gbk_line = '{"content": "类型#上衣", "summary": "白色"}\n'.encode("gbk")
    path = write_file(tmp_path, "train.json", first_lines.encode("utf-8") + gbk_line)
    offset = len(first_lines.encode("utf-8")) + len('{"content": "')

    error = read_error(path)

    assert_error(
        error,
        path,
        3,
        None,
        "not valid UTF-8",
        f"byte offset {offset}",
        "byte column 14",
        "probably GBK-encoded",
        "iconv -f GBK -t UTF-8 train.json > train.utf8.json",
    )


def test_bom_counts_in_bad_byte_offset(tmp_path):
    path = write_file(tmp_path, "train.json", b"\xef\xbb\xbf" + b'{"content": "\xff"}\n')

    error = read_error(path)

    assert_error(error, path, 1, None, "byte offset 16", "0xff", "iconv -f <source encoding> -t UTF-8")


def test_utf16_file_is_not_utf8(tmp_path):
    path = write_file(tmp_path, "train.json", '{"content": "a", "summary": "b"}\n'.encode("utf-16"))

    error = read_error(path)

    assert_error(error, path, 1, None, "UTF-16 byte order mark", "iconv -f UTF-16 -t UTF-8")


@pytest.mark.parametrize(
    "content",
    [b"", b"  \n\n\t\r\n", b"\xef\xbb\xbf", b"\xef\xbb\xbf\n \n"],
    ids=["empty", "whitespace", "bom-only", "bom-and-whitespace"],
)
def test_empty_file(tmp_path, content):
    path = write_file(tmp_path, "train.json", content)

    error = read_error(path)

    assert_error(error, path, None, None, "the file is empty", 'such as {"content": "...", "summary": "..."}')


def test_empty_json_array(tmp_path):
    path = write_file(tmp_path, "train.json", "[\n]\n")

    error = read_error(path)

    assert_error(error, path, None, None, "contains no records", "Add at least one object")


# --- JSON syntax -------------------------------------------------------------------------------------


def test_invalid_json_line_reports_column(tmp_path):
    text = '{"content": "a", "summary": "b"}\n\n{"content": "c" "summary": "d"}\n'
    path = write_file(tmp_path, "train.json", text)

    error = read_error(path)

    assert_error(
        error, path, 3, None, "column 17: invalid JSON (Expecting ',' delimiter)", "exactly one complete"
    )


def test_two_objects_on_one_line(tmp_path):
    path = write_file(
        tmp_path, "train.json", '{"content": "a", "summary": "b"} {"content": "c", "summary": "d"}\n'
    )

    error = read_error(path)

    assert_error(error, path, 1, None, "column 34: invalid JSON (Extra data)", "one complete JSON object")


def test_non_json_file(tmp_path):
    path = write_file(tmp_path, "train.csv", "content,summary\na,b\n")

    error = read_error(path)

    assert_error(error, path, 1, None, "column 1: invalid JSON (Expecting value)", "JSON array")


def test_first_error_wins(tmp_path):
    text = '{"content": "a", "summary": "b"}\n{"content": 1, "summary": "b"}\n{broken\n'
    path = write_file(tmp_path, "train.json", text)

    error = read_error(path)

    assert_error(error, path, 2, "content", "is a number")


def test_single_pretty_printed_object_names_records_key(tmp_path):
    data = {"version": 1, "data": [{"content": "a", "summary": "b"}]}
    path = write_file(tmp_path, "train.json", json.dumps(data, indent=2))

    error = read_error(path)

    assert_error(
        error, path, 1, None, "one JSON object spread over several lines", 'the list under key "data"'
    )


def test_concatenated_pretty_printed_objects(tmp_path):
    text = '{\n  "content": "a",\n  "summary": "b"\n}\n{\n  "content": "c",\n  "summary": "d"\n}\n'
    path = write_file(tmp_path, "train.json", text)

    error = read_error(path)

    assert_error(error, path, 1, None, "invalid JSON", "put all records in one JSON array")


def test_array_syntax_error_inside_pretty_object(tmp_path):
    lines = ["[", "  {", '    "content": "a",', '    "summary": "b"', "  },", "  {", '    "content": "c",']
    lines += ['    "summary": ', "  }", "]", ""]
    text = "\n".join(lines)
    path = write_file(tmp_path, "train.json", text)

    error = read_error(path)

    assert_error(error, path, 9, None, "column 3: invalid JSON (Expecting value)", "Fix the JSON syntax")


def test_array_trailing_comma(tmp_path):
    text = '[\n  {"content": "a", "summary": "b"},\n  {"content": "c", "summary": "d"},\n]\n'
    path = write_file(tmp_path, "train.json", text)

    error = read_error(path)

    assert_error(error, path, 4, None, "column 1: a trailing comma", "Remove the last comma")


def test_array_missing_comma(tmp_path):
    text = '[\n  {"content": "a", "summary": "b"}\n  {"content": "c", "summary": "d"}\n]\n'
    path = write_file(tmp_path, "train.json", text)

    error = read_error(path)

    assert_error(error, path, 3, None, "column 3: expected ',' or ']'", "Separate the objects")


def test_array_not_closed(tmp_path):
    text = '[\n  {"content": "a", "summary": "b"},\n  {"content": "c", "summary": "d"}\n'
    path = write_file(tmp_path, "train.json", text)

    error = read_error(path)

    assert_error(error, path, 4, None, "array is not closed", "Add the missing ]")


def test_array_extra_data_after_close(tmp_path):
    text = '[\n  {"content": "a", "summary": "b"}\n]\n{"content": "c", "summary": "d"}\n'
    path = write_file(tmp_path, "train.json", text)

    error = read_error(path)

    assert_error(error, path, 4, None, "column 1: extra data after the closing ]", "exactly one JSON array")


# --- Record shape and types --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line_text", "found"),
    [('["a", "b"]', "an array"), ("42", "a number"), ('"text"', "a string"), ("null", "null")],
    ids=["array", "number", "string", "null"],
)
def test_json_lines_record_not_object(tmp_path, line_text, found):
    path = write_file(tmp_path, "train.json", '{"content": "a", "summary": "b"}\n\n' + line_text + "\n")

    error = read_error(path)

    assert_error(
        error, path, 3, None, f"the record is {found}, not a JSON object", "Each record must be an object"
    )


def test_array_item_not_object(tmp_path):
    text = '[\n  {"content": "a", "summary": "b"},\n\n  "just text"\n]\n'
    path = write_file(tmp_path, "train.json", text)

    error = read_error(path)

    assert_error(error, path, 4, None, "item 1 of the top-level array is a string, not an object")


def test_array_of_arrays(tmp_path):
    path = write_file(tmp_path, "train.json", '[["a", "b"], ["c", "d"]]\n')

    error = read_error(path)

    assert_error(error, path, 1, None, "item 0 of the top-level array is an array, not an object")


def test_missing_prompt_lists_keys(tmp_path):
    text = '{"content": "a", "summary": "b"}\n{"text": "a", "label": "b"}\n'
    path = write_file(tmp_path, "train.json", text)

    error = read_error(path)

    assert_error(
        error,
        path,
        2,
        "content",
        'field "content" is missing',
        'The record has keys "text", "label"',
        "Set data.prompt_column",
    )


def test_missing_prompt_in_empty_object(tmp_path):
    path = write_file(tmp_path, "train.json", "{}\n")

    error = read_error(path)

    assert_error(error, path, 1, "content", "The record has no keys")


def test_missing_prompt_pretty_array_line(tmp_path):
    rows = [
        {"content": "a", "summary": "b"},
        {"content": "c", "summary": "d"},
        {"prompt": "e", "summary": "f"},
    ]
    path = write_file(tmp_path, "train.json", json.dumps(rows, indent=2))

    error = read_error(path)

    assert_error(error, path, 10, "content", 'field "content" is missing', 'keys "prompt", "summary"')


@pytest.mark.parametrize("split_name", ["train", "validation"])
def test_missing_response_when_required(tmp_path, split_name):
    text = '{"content": "a", "summary": "b"}\n\n\n{"content": "c", "target": "d"}\n'
    path = write_file(tmp_path, f"{split_name}.json", text)

    error = read_error(path, split_name=split_name)

    assert_error(
        error,
        path,
        4,
        "summary",
        f'field "summary" is missing, but the {split_name} split requires a response',
        "set data.response_column to the key your file uses",
        'keys "content", "target"',
    )


def test_null_response_when_required(tmp_path):
    path = write_file(tmp_path, "train.json", '{"content": "a", "summary": null}\n')

    error = read_error(path)

    assert_error(error, path, 1, "summary", 'field "summary" is null', "Fill in the response")


@pytest.mark.parametrize(
    ("value", "found"),
    [
        ("1", "a number"),
        ("2.5", "a number"),
        ("true", "a boolean"),
        ("null", "null"),
        ('["a"]', "an array"),
        ('{"a": 1}', "an object"),
    ],
    ids=["int", "float", "boolean", "null", "array", "object"],
)
def test_prompt_not_a_string(tmp_path, value, found):
    path = write_file(
        tmp_path,
        "train.json",
        f'{{"content": "a", "summary": "b"}}\n{{"content": {value}, "summary": "b"}}\n',
    )

    error = read_error(path)

    assert_error(
        error,
        path,
        2,
        "content",
        f'field "content" is {found}, but it must be a string',
        "data.prompt_column",
    )


@pytest.mark.parametrize("require_response", [True, False])
def test_response_not_a_string(tmp_path, require_response):
    path = write_file(tmp_path, "test.json", '{"content": "a", "summary": 3}\n')

    error = read_error(path, require_response=require_response)

    assert_error(
        error,
        path,
        1,
        "summary",
        'field "summary" is a number, but it must be a string',
        "data.response_column",
    )


@pytest.mark.parametrize(
    ("history", "phrases"),
    [
        ('"q1 a1"', ['field "history" is a string', "a list of [query, response] pairs"]),
        ('{"q1": "a1"}', ['field "history" is an object', "data.history_column to null"]),
        ('[["q1", "a1"], "q2"]', ['"history"[1] is a string', "[query, response] pair of strings"]),
        ('[["q1", "a1", "extra"]]', ['"history"[0] is an array of 3 items']),
        ('[["q1"]]', ['"history"[0] is an array of 1 item,']),
        (
            '[["q1", "a1"], ["q2", 5]]',
            ['"history"[1][1] (the response) is a number, but it must be a string'],
        ),
        ('[[null, "a1"]]', ['"history"[0][0] (the query) is null, but it must be a string']),
    ],
    ids=["string", "object", "item-string", "item-three", "item-one", "response-number", "query-null"],
)
def test_history_wrong_shape(tmp_path, history, phrases):
    text = '{"content": "a", "summary": "b"}\n{"content": "a", "summary": "b", "history": ' + history + "}\n"
    path = write_file(tmp_path, "train.json", text)

    error = read_error(path, history_column="history")

    assert_error(error, path, 2, "history", *phrases)


# --- Several files and the error type ----------------------------------------------------------------


def test_validate_files_collects_one_error_per_file(tmp_path):
    good = write_file(tmp_path, "train.json", '{"content": "a", "summary": "b"}\n')
    no_response = write_file(tmp_path, "dev.json", '{"content": "a"}\n{"content": "b"}\n')
    test_file = write_file(tmp_path, "test.json", '{"content": "a"}\n')
    missing = tmp_path / "extra.json"
    specs = [
        DataFileSpec(good),
        DataFileSpec(no_response, split_name="validation"),
        DataFileSpec(test_file, split_name="test", require_response=False),
        DataFileSpec(missing),
    ]

    errors = validate_files(specs)

    assert [error.path for error in errors] == [no_response, missing]
    assert errors[0].line == 1
    assert errors[0].field == "summary"
    assert errors[1].line is None


def test_validate_files_all_valid(tmp_path):
    good = write_file(tmp_path, "train.json", '{"content": "a", "summary": "b"}\n')

    assert validate_files([DataFileSpec(good)]) == []


def test_data_file_error_pickles_with_all_fields():
    error = DataFileError("/data/train.json", 7, "summary", 'field "summary" is missing.')

    copy = pickle.loads(pickle.dumps(error))

    assert isinstance(copy, ValueError)
    assert str(copy) == 'data file /data/train.json, line 7: field "summary" is missing.'
    assert copy.path == Path("/data/train.json")
    assert copy.line == 7
    assert copy.field == "summary"
    assert copy.detail == 'field "summary" is missing.'


def test_large_file_reads_in_linear_time(tmp_path):
    # Reading takes about 0.3 s per format on a 2-core x86 development machine. The bound only
    # catches a quadratic scan, which would take minutes.
    row = {
        "content": "类型#上衣*材质#棉*颜色#白色*风格#简约*图案#条纹",
        "summary": "这件白色上衣采用棉面料。" * 4,
    }
    line = json.dumps(row, ensure_ascii=False)
    json_lines = write_file(tmp_path, "big.jsonl", (line + "\n") * 100_000)
    json_array = write_file(tmp_path, "big.json", "[\n" + ",\n".join([line] * 100_000) + "\n]\n")

    for path in (json_lines, json_array):
        started = time.perf_counter()
        records = read_records(path)
        elapsed = time.perf_counter() - started

        assert len(records) == 100_000
        assert records[-1].line == 100_000 + (path == json_array)
        assert elapsed < 15, f"reading {path.name} took {elapsed:.1f} s"


# --- Shipped and real data ---------------------------------------------------------------------------


@pytest.mark.parametrize(("split_name", "size"), [("train", 400), ("dev", 40), ("test", 40)])
def test_sample_data_reads_cleanly(split_name, size):
    path = sample_data_dir() / f"{split_name}.json"

    records = read_records(path, split_name=split_name)

    assert len(records) == size
    assert all(record.response for record in records)
    assert max(len(record.prompt) for record in records) <= 50
    assert max(len(record.response) for record in records) <= 60
    assert all(record.prompt.startswith("类型#") for record in records)


def test_sample_data_splits_do_not_overlap():
    prompts = {
        split_name: {record.prompt for record in read_records(sample_data_dir() / f"{split_name}.json")}
        for split_name in ("train", "dev", "test")
    }

    assert len(prompts["train"]) == 400
    assert not prompts["train"] & prompts["dev"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["dev"] & prompts["test"]


def test_sample_data_matches_generator(tmp_path):
    script = REPO_ROOT / "tools" / "make_sample_data.py"
    if not script.is_file():
        pytest.skip(f"{script} is not present; it ships with the repository, not the wheel")
    spec = importlib.util.spec_from_file_location("make_sample_data", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    assert module.main(["--output-dir", str(tmp_path)]) == 0
    for split_name in ("train", "dev", "test"):
        generated = (tmp_path / f"{split_name}.json").read_bytes()
        shipped = (sample_data_dir() / f"{split_name}.json").read_bytes()
        assert generated == shipped, f"{split_name}.json is stale; rerun python tools/make_sample_data.py"


@pytest.mark.skipif(not ADGEN_DEV.is_file(), reason=f"real ADGEN dev split not found at {ADGEN_DEV}")
def test_adgen_dev_split_reads_all_records():
    records = read_records(ADGEN_DEV, split_name="validation")

    assert len(records) == 1070
    assert records[-1].line == 1070
    assert all(record.response for record in records)
