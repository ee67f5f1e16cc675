"""`python -m ptuning_pl.chat export_dir=EXPORT_DIR`: a terminal chat with a trained prefix.

Responses stream as they are generated; earlier rounds are kept as history. Type `clear` to forget the
history and `exit` (or Ctrl-D) to quit. Settings: `export_dir=` (folder or owner/name[@revision]),
`model_path=` (a local copy of the base model), `preset=greedy|reference`, `max_new_tokens=N`.
"""

from __future__ import annotations

import sys

from ptuning_pl.cli_args import parse_key_values


def main(argv: list[str] | None = None) -> int:
    options = parse_key_values(
        argv if argv is not None else sys.argv[1:],
        required=("export_dir",),
        optional={"model_path": None, "preset": "greedy", "max_new_tokens": None, "device": None},
        usage=__doc__,
    )
    from ptuning_pl.export import ExportError
    from ptuning_pl.inference import PrefixModel

    try:
        model = PrefixModel.from_export(options["export_dir"], device=options["device"], model_path=options["model_path"])
    except (ExportError, FileNotFoundError) as error:
        print(str(error), file=sys.stderr)
        return 2
    overrides = {}
    if options["max_new_tokens"]:
        overrides["max_new_tokens"] = int(options["max_new_tokens"])

    history: list[tuple[str, str]] = []
    print("ptuning-pl chat: type a message; `clear` forgets the history, `exit` quits.", flush=True)
    while True:
        try:
            query = input("\n用户: ")
        except EOFError:
            print()
            return 0
        command = query.strip()
        if command == "exit":
            return 0
        if command == "clear":
            history.clear()
            print("(history cleared)", flush=True)
            continue
        if not command:
            continue

        print("模型: ", end="", flush=True)
        pieces = []
        for piece in model.stream(query, history, preset=options["preset"], **overrides):
            pieces.append(piece)
            print(piece, end="", flush=True)
        print(flush=True)
        history.append((query, "".join(pieces)))


if __name__ == "__main__":
    sys.exit(main())
