"""Markdown tables of a benchmark result, and the replacement of the results section in docs/benchmarks.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

RESULTS_START = (
    "<!-- benchmark results: start (benchmarks/run.py replaces everything up to the end marker) -->"
)
RESULTS_END = "<!-- benchmark results: end -->"

LAYOUT_LABELS = {
    "reference_unpadded": "reference without padding",
    "ours_proposed_loss": "ours, proposed loss",
    "reference_proposed_loss": "reference, proposed loss",
}


def _number(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}"


def _milliseconds(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:,.1f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _training_table(training: dict[str, Any]) -> list[str]:
    rows = []
    for name, layout in training["layouts"].items():
        shape = layout["layout"]
        padding = (
            "fixed to " + str(shape["fixed_length"])
            if shape["fixed_length"]
            else "to the longest in the micro-batch"
        )
        rows.append(
            [
                LAYOUT_LABELS.get(name, name),
                f"{shape['micro_batch_size']} x {shape['accumulation']}",
                padding,
                "yes" if shape["group_by_length"] else "no",
                _milliseconds(layout["median_step_seconds"]),
                _number(layout["real_tokens_per_second"], 0),
                _number(layout["samples_per_second"], 1),
                f"{layout['padding_fraction']:.1%}",
                _number(layout["peak_memory_increase_mib"], 1),
                f"{training['speedups'][name]:.2f}x",
            ]
        )
    header = [
        "layout",
        "micro-batch x accumulation",
        "padding",
        "length-grouped",
        "step time (ms)",
        "real tokens/s",
        "samples/s",
        "padding fraction",
        "peak memory increase (MiB)",
        "real tokens/s vs reference",
    ]
    return _table(header, rows)


def _evaluation_table(evaluation: dict[str, Any]) -> list[str]:
    baseline = evaluation["modes"][evaluation["baseline"]]["median_seconds"]
    rows = []
    for name, mode in evaluation["modes"].items():
        rows.append(
            [
                name,
                str(mode["batch_size"]),
                "yes" if mode["sorted_by_prompt_length"] else "no",
                _number(mode["median_seconds"], 2),
                _number(mode["generated_tokens_per_second"], 0),
                f"{baseline / mode['median_seconds']:.1f}x",
                "yes" if mode["identical_to_baseline"] else f"no ({len(mode['mismatched_examples'])} differ)",
            ]
        )
    header = [
        "mode",
        "batch size",
        "sorted by prompt length",
        "wall time (s)",
        "generated tokens/s",
        "speed-up",
        "identical outputs",
    ]
    return _table(header, rows)


def _prefix_scaling_table(rows_in: list[dict[str, Any]]) -> list[str]:
    rows = [
        [
            str(row["pre_seq_len"]),
            _milliseconds(row["median_step_seconds"]),
            _milliseconds(row["median_forward_seconds"]),
            _number(row["real_tokens_per_second"], 0),
        ]
        for row in rows_in
    ]
    header = [
        "pre_seq_len",
        "training step (ms)",
        "loss forward, no grad (ms per step's batches)",
        "real tokens/s",
    ]
    return _table(header, rows)


def _length_scaling_table(rows_in: list[dict[str, Any]]) -> list[str]:
    rows = [
        [
            f"{row['max_source_length']} + {row['max_target_length']}",
            _number(row["mean_example_tokens"], 1),
            _number(row["mean_padded_tokens"], 1),
            f"{row['padding_fraction']:.1%}",
            _milliseconds(row["median_step_seconds"]),
            _number(row["real_tokens_per_second"], 0),
        ]
        for row in rows_in
    ]
    header = [
        "max source + target tokens",
        "mean example length",
        "mean padded length",
        "padding fraction",
        "training step (ms)",
        "real tokens/s",
    ]
    return _table(header, rows)


def _targets_table(targets: list[dict[str, Any]]) -> list[str]:
    rows = [
        [
            target["model"],
            target["name"],
            f">= {target['required']:g}x",
            f"{target['measured']:.2f}x",
            "met" if target["met"] else "missed",
        ]
        for target in targets
    ]
    return _table(["model", "target", "required", "measured (median)", "result"], rows)


def _model_section(model: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    """Return the Markdown lines of one model: its training, evaluation and scaling tables."""
    backbone = "tiny GLM (conf/model/tiny_glm.yaml)" if model["name"] == "tiny" else model["spec"]["path"]
    parameters = model["parameters"]
    lines = [
        f"### {model['name']}",
        "",
        (
            f"Backbone `{backbone}`, {parameters['frozen']:,} frozen parameters; prefix pre_seq_len "
            f"{settings['pre_seq_len']}, {parameters['trainable']:,} trainable parameters."
        ),
        "",
    ]

    training = model.get("training")
    if training:
        steps = (
            f"{training['timed_steps']} timed optimizer steps of {training['effective_batch_size']} examples"
        )
        examples = training["layouts"]["reference"]["examples"]
        lines += [
            (
                f"**Training**: {steps} after {training['warmup_steps']} warm-up steps; every layout trains "
                f"on the same {examples} examples."
            ),
            "",
            *_training_table(training),
            "",
        ]
        proposal = training.get("proposal")
        if proposal:
            lines += [
                (
                    f"Proposed change, {proposal['description']}: ours vs reference with it "
                    f"{proposal['ours_vs_reference']:.2f}x; ours with it vs ours now "
                    f"{proposal['ours_vs_current_ours']:.2f}x; relative loss difference "
                    f"{proposal['relative_loss_difference']:.1e}."
                ),
                "",
            ]

    evaluation = model.get("evaluation")
    if evaluation:
        lines += [
            (
                f"**Evaluation**: greedy generation of up to {evaluation['max_new_tokens']} new tokens for "
                f"the first {evaluation['examples']} records of the data file."
            ),
            "",
            *_evaluation_table(evaluation),
            "",
        ]

    scaling = model.get("scaling")
    if scaling:
        steps = f"{scaling['timed_steps']} timed steps of {scaling['effective_batch_size']} examples"
        lengths = f"{settings['max_source_length']} + {settings['max_target_length']}"
        lines += [
            (
                f"**Scaling** (our layout, {steps}): step time against pre_seq_len at max lengths {lengths}, "
                f"then against the maximum lengths at pre_seq_len {settings['pre_seq_len']}. pre_seq_len 0 "
                "has nothing to train, so only its forward pass is timed."
            ),
            "",
            *_prefix_scaling_table(scaling["pre_seq_len"]),
            "",
            *_length_scaling_table(scaling["sequence_length"]),
            "",
        ]
    return lines


def render_results(result: dict[str, Any]) -> str:
    """Return the Markdown results section of one benchmark result."""
    machine = result["machine"]
    versions = result["versions"]
    settings = result["settings"]
    cores = f"{machine['usable_cores']} usable cores of {machine['logical_cores']}"
    accelerator = f" ({machine['accelerator']})" if machine.get("accelerator") else ""
    source, target = settings["max_source_length"], settings["max_target_length"]
    lengths = f"max_source_length {source}, max_target_length {target}"
    lines = [
        (
            f"Recorded {result['created']} by `{result['command']}` "
            f"({result['wall_seconds'] / 60:.1f} min); JSON: `{result['json_path']}`."
        ),
        "",
        (
            f"- Machine: {machine['cpu_model']}, {cores}, {machine['torch_threads']} torch threads, "
            f"device `{machine['device']}`{accelerator}; {machine['platform']}, Python {machine['python']}."
        ),
        (
            f"- Load average (1, 5, 15 min): {result['load_average']['before']} before, "
            f"{result['load_average']['after']} after."
        ),
        "- Versions: " + ", ".join(f"{name} {version}" for name, version in versions.items()) + ".",
        f"- Commit: `{result['git_commit']}`.",
        (
            f"- Data: `{result['data']['name']}`, {result['data']['records']} records; {lengths}; "
            f"{settings['repeats']} repeats, medians reported."
        ),
        "",
    ]

    for model in result["models"]:
        lines += _model_section(model, settings)
    if result["targets"]:
        lines.append("### Targets")
        lines.append("")
        lines += _targets_table(result["targets"])
        lines.append("")
    return "\n".join(lines)


def update_results_section(path: Path, section: str) -> None:
    """Replace the text between the result markers of `path` with `section`, or create the page if missing.

    Raises ValueError when the page exists without both markers, so hand-written text is never overwritten.
    """
    block = f"{RESULTS_START}\n\n{section.rstrip()}\n\n{RESULTS_END}"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# Benchmarks\n\n## Results\n\n{block}\n", encoding="utf-8")
        return
    text = path.read_text(encoding="utf-8")
    start = text.find(RESULTS_START)
    end = text.find(RESULTS_END)
    if start < 0 or end < start:
        raise ValueError(
            f"{path} has no results markers; add the lines {RESULTS_START!r} and {RESULTS_END!r} where the "
            "results belong, or pass --markdown none"
        )
    path.write_text(text[:start] + block + text[end + len(RESULTS_END) :], encoding="utf-8")
