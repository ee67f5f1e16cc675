"""Tests of `python -m ptuning_pl.score` run as a subprocess."""

import json
import subprocess
import sys

import pytest

from ptuning_pl.metrics import METRIC_NAMES, score_corpus

OUTPUT_KEYS = [*METRIC_NAMES, "count", "empty_predictions"]


def run_score(*arguments):
    return subprocess.run(
        [sys.executable, "-m", "ptuning_pl.score", *map(str, arguments)],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def assert_bad_input(completed, *fragments):
    assert completed.returncode == 2
    assert completed.stdout == ""
    assert "Traceback" not in completed.stderr
    assert completed.stderr.count("\n") == 1, completed.stderr
    for fragment in fragments:
        assert fragment in completed.stderr


def test_score_prints_corpus_means(tmp_path):
    rows = [
        {
            "prediction": "这件外套版型宽松，适合秋天穿着。",
            "reference": "这件外套采用宽松版型，秋冬都很适合。",
        },
        {"prediction": "白色衣服", "reference": "白色衣服"},
        {"prediction": " ", "reference": "今天天气很好"},
    ]
    path = write_lines(tmp_path / "pairs.jsonl", [json.dumps(row, ensure_ascii=False) for row in rows])

    completed = run_score(path)

    assert completed.returncode == 0, completed.stderr
    assert completed.stderr == ""
    output = json.loads(completed.stdout)
    assert list(output) == OUTPUT_KEYS
    expected = score_corpus([row["prediction"] for row in rows], [row["reference"] for row in rows])
    for name in METRIC_NAMES:
        assert output[name] == pytest.approx(expected[name], abs=1e-9), name
    assert output["count"] == 3
    assert output["empty_predictions"] == 1


def test_score_accepts_reference_implementation_keys(tmp_path):
    lines = [
        json.dumps({"labels": "白色衣服", "predict": "白色衣服"}, ensure_ascii=False),
        "",
        "   ",
        json.dumps({"prediction": "白色衣服", "labels": "白色衣服"}, ensure_ascii=False),
    ]
    path = write_lines(tmp_path / "generated_predictions.txt", lines)

    completed = run_score(path)

    assert completed.returncode == 0, completed.stderr
    output = json.loads(completed.stdout)
    assert output["count"] == 2
    assert output["rouge-1"] == pytest.approx(100.0)
    assert output["bleu-4"] == pytest.approx(100.0)


def test_score_accepts_byte_order_mark(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prediction": "a", "reference": "a"}).encode() + b"\r\n")

    completed = run_score(path)

    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout)["count"] == 1


def test_score_warns_on_blank_reference(tmp_path):
    lines = [
        json.dumps({"prediction": "衣服", "reference": "衣服"}, ensure_ascii=False),
        json.dumps({"prediction": "衣服", "reference": "\n"}, ensure_ascii=False),
    ]
    path = write_lines(tmp_path / "pairs.jsonl", lines)

    completed = run_score(path)

    assert completed.returncode == 0, completed.stderr
    assert (
        "warning: the reference is empty or whitespace-only on 1 of 2 rows (first at line 2)"
        in completed.stderr
    )
    output = json.loads(completed.stdout)
    assert output["count"] == 2
    assert output["empty_predictions"] == 0
    assert output["rouge-1"] == pytest.approx(50.0)


def test_help_describes_input_and_output():
    completed = run_score("--help")

    assert completed.returncode == 0
    assert "JSON-lines" in completed.stdout
    assert "'predict'" in completed.stdout
    assert "empty_predictions" in completed.stdout


def test_missing_file_is_rejected(tmp_path):
    path = tmp_path / "absent.jsonl"

    completed = run_score(path)

    assert_bad_input(completed, f"{path}: file not found", "Pass the path of an existing JSON-lines file")


def test_directory_is_rejected(tmp_path):
    completed = run_score(tmp_path)

    assert_bad_input(completed, f"{tmp_path}: is a directory", "Pass the path of a JSON-lines file")


def test_non_utf8_line_is_rejected(tmp_path):
    path = tmp_path / "gbk.jsonl"
    valid_line = json.dumps({"prediction": "a", "reference": "a"}).encode()
    gbk_line = '{"prediction": "衣服", "reference": "衣服"}'.encode("gbk")
    path.write_bytes(valid_line + b"\n" + gbk_line + b"\n")

    completed = run_score(path)

    assert_bad_input(completed, f"{path}:2: invalid UTF-8 at byte 17 of the line", "Save the file as UTF-8")


@pytest.mark.parametrize("content", ["", "\n\n  \n"], ids=["zero_bytes", "blank_lines"])
def test_empty_file_is_rejected(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")

    completed = run_score(path)

    assert_bad_input(completed, f"{path}: the file contains no rows", "Write one JSON object per line")


def test_invalid_json_line_is_rejected(tmp_path):
    path = write_lines(
        tmp_path / "pairs.jsonl", ['{"prediction": "a", "reference": "a"}', "", '{"prediction": "a",']
    )

    completed = run_score(path)

    assert_bad_input(
        completed,
        f"{path}:3: invalid JSON",
        "at column 20",
        "Write each row as one JSON object on its own line",
    )


def test_row_that_is_not_object_is_rejected(tmp_path):
    path = write_lines(tmp_path / "pairs.jsonl", ['["a", "a"]'])

    completed = run_score(path)

    assert_bad_input(
        completed, f"{path}:1: the row is a JSON array, not an object", "Write each row as an object"
    )


@pytest.mark.parametrize(
    ("row", "message", "fix"),
    [
        ({"reference": "a"}, "missing field 'prediction'", "Add a 'prediction' string to the row ('predict'"),
        ({"predict": "a"}, "missing field 'reference'", "Add a 'reference' string to the row ('labels'"),
    ],
    ids=["prediction", "reference"],
)
def test_missing_field_is_rejected(tmp_path, row, message, fix):
    path = write_lines(tmp_path / "pairs.jsonl", ['{"prediction": "a", "reference": "a"}', json.dumps(row)])

    completed = run_score(path)

    assert_bad_input(completed, f"{path}:2: {message}", fix)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prediction": 3, "reference": "a"}, "field 'prediction' must be a string, got a JSON number"),
        ({"prediction": "a", "labels": None}, "field 'labels' must be a string, got a JSON null"),
        ({"predict": ["a"], "reference": "a"}, "field 'predict' must be a string, got a JSON array"),
        ({"prediction": "a", "reference": True}, "field 'reference' must be a string, got a JSON boolean"),
    ],
    ids=["number", "null", "array", "boolean"],
)
def test_non_string_value_is_rejected(tmp_path, row, message):
    path = write_lines(tmp_path / "pairs.jsonl", [json.dumps(row)])

    completed = run_score(path)

    assert_bad_input(completed, f"{path}:1: {message}", "Write the text as a JSON string")
