"""Score a JSON-lines file of predictions and references on the ADGEN metrics.

Usage: ``python -m ptuning_pl.score FILE``. The scoring rules are those of ``ptuning_pl.metrics``.
"""

from __future__ import annotations

import argparse
import codecs
import json
import sys
from pathlib import Path

# Accepted keys for each field, in order of preference. The second key of each is the name used in
# generated_predictions.txt by the ChatGLM-6B reference implementation.
PREDICTION_KEYS = ("prediction", "predict")
REFERENCE_KEYS = ("reference", "labels")

EXIT_BAD_INPUT = 2

_ROW_EXAMPLE = '{"prediction": "...", "reference": "..."}'


class InputFileError(Exception):
    """Invalid input file. The message names the file, the line if there is one, and the fix."""


def _json_type_name(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if value is None:
        return "null"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "string"


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise InputFileError(
            f"{path}: file not found. Pass the path of an existing JSON-lines file."
        ) from None
    except IsADirectoryError:
        raise InputFileError(f"{path}: is a directory. Pass the path of a JSON-lines file.") from None
    except OSError as error:
        raise InputFileError(
            f"{path}: cannot read the file ({error.strerror}). Check the path and its permissions."
        ) from None


def _field(row: dict, keys: tuple[str, ...], location: str) -> str:
    """Return the value of the first key in ``keys`` that the row contains, checked to be a string."""
    for key in keys:
        if key in row:
            value = row[key]
            if not isinstance(value, str):
                raise InputFileError(
                    f"{location}: field '{key}' must be a string, got a JSON {_json_type_name(value)}. "
                    f"Write the text as a JSON string."
                )
            return value

    preferred, alternative = keys
    raise InputFileError(
        f"{location}: missing field '{preferred}'. Add a '{preferred}' string to the row "
        f"('{alternative}' is accepted too)."
    )


def read_pairs(path: Path) -> tuple[list[str], list[str], list[int]]:
    """Read a JSON-lines file and return its predictions, references and 1-based line numbers.

    Each non-blank line must be a JSON object with a string prediction (key ``prediction`` or
    ``predict``) and a string reference (key ``reference`` or ``labels``). Blank lines and a UTF-8
    byte order mark at the start are skipped. Raises InputFileError on the first invalid line, or when
    the file contains no rows.
    """
    data = _read_bytes(path)
    data = data.removeprefix(codecs.BOM_UTF8)

    predictions: list[str] = []
    references: list[str] = []
    line_numbers: list[int] = []
    for line_number, raw_line in enumerate(data.split(b"\n"), start=1):
        location = f"{path}:{line_number}"
        try:
            line = raw_line.decode("utf-8")
        except UnicodeDecodeError as error:
            raise InputFileError(
                f"{location}: invalid UTF-8 at byte {error.start + 1} of the line. Save the file as UTF-8."
            ) from None
        if not line.strip():
            continue

        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputFileError(
                f"{location}: invalid JSON ({error.msg} at column {error.colno}). "
                f"Write each row as one JSON object on its own line, such as {_ROW_EXAMPLE}."
            ) from None
        if not isinstance(row, dict):
            raise InputFileError(
                f"{location}: the row is a JSON {_json_type_name(row)}, not an object. "
                f"Write each row as an object such as {_ROW_EXAMPLE}."
            )

        predictions.append(_field(row, PREDICTION_KEYS, location))
        references.append(_field(row, REFERENCE_KEYS, location))
        line_numbers.append(line_number)

    if not predictions:
        raise InputFileError(
            f"{path}: the file contains no rows. Write one JSON object per line, such as {_ROW_EXAMPLE}."
        )
    return predictions, references, line_numbers


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ptuning_pl.score",
        description=(
            "Score generated text against references with the ADGEN metrics of the ChatGLM-6B P-Tuning "
            "example: ROUGE-1, ROUGE-2 and ROUGE-L F1 on jieba words and BLEU-4 on characters. Prints one "
            "JSON object with the mean of each metric in points (0 to 100), the number of pairs (count) and "
            "the number of empty or whitespace-only predictions (empty_predictions), which score 0."
        ),
        epilog=(
            f"Each non-blank line of FILE is a JSON object such as {_ROW_EXAMPLE}. The keys 'predict' and "
            "'labels' of the reference implementation's generated_predictions.txt are accepted too. "
            "Exit status 2 means invalid input, and the message names the line and the fix."
        ),
    )
    parser.add_argument(
        "file", metavar="FILE", type=Path, help="JSON-lines file of prediction and reference pairs"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    arguments = parser.parse_args(argv)

    try:
        predictions, references, line_numbers = read_pairs(arguments.file)
    except InputFileError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT

    # Imported after the input is read because importing torch takes seconds, and --help and input
    # errors should return at once.
    from ptuning_pl.metrics import METRIC_NAMES, is_blank, score_corpus

    blank_reference_lines = [number for number, text in zip(line_numbers, references) if is_blank(text)]
    if blank_reference_lines:
        first_line = blank_reference_lines[0]
        print(
            f"{parser.prog}: warning: the reference is empty or whitespace-only on "
            f"{len(blank_reference_lines)} of {len(references)} rows (first at line {first_line}). "
            f"Those rows score 0 on every metric.",
            file=sys.stderr,
        )

    result = score_corpus(predictions, references)
    ordered = {name: result[name] for name in (*METRIC_NAMES, "count", "empty_predictions")}
    print(json.dumps(ordered))
    return 0


if __name__ == "__main__":
    sys.exit(main())
