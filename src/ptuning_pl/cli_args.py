"""`key=value` arguments for the small commands (export, chat) that do not need a Hydra config tree."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def parse_key_values(
    argv: Sequence[str], required: Sequence[str], optional: dict[str, str | None], usage: str
) -> dict[str, str | None]:
    """Parse `key=value` words; exit with status 2 and the usage text on an unknown or missing key."""
    if any(word in ("-h", "--help") for word in argv):
        print(usage)
        sys.exit(0)
    values: dict[str, str | None] = dict(optional)
    problems = []
    for word in argv:
        key, separator, value = word.partition("=")
        if not separator or key not in (*required, *optional):
            problems.append(f"unknown argument {word!r}: expected key=value with a key among {', '.join((*required, *optional))}")
            continue
        values[key] = value
    problems += [f"{key} is required: add {key}=..." for key in required if not values.get(key)]
    if problems:
        print("\n".join(problems), file=sys.stderr)
        sys.exit(2)
    return values
