"""Smoke test of the benchmark harness: `benchmarks/run.py --quick` on the bundled sample data.

It checks that every section runs and that the JSON result and the Markdown page have their keys and markers.
It asserts no timing: the numbers of a quick run on a shared machine mean nothing.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_TRAIN = REPO_ROOT / "src" / "ptuning_pl" / "sample_data" / "train.json"

# benchmarks/ is no package; load its report module under a name of its own, without touching sys.path.
_spec = importlib.util.spec_from_file_location("benchmarks_report", REPO_ROOT / "benchmarks" / "report.py")
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)
RESULTS_START, RESULTS_END = report.RESULTS_START, report.RESULTS_END

PROSE = "Hand-written text that a benchmark run must keep."


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """Run the harness once in --quick mode; return (completed process, JSON result, Markdown page)."""
    folder = tmp_path_factory.mktemp("benchmark")
    output = folder / "result.json"
    page = folder / "benchmarks.md"
    page.write_text(
        f"# Benchmarks\n\n{PROSE}\n\n{RESULTS_START}\nold results\n{RESULTS_END}\n\nEnd.\n", encoding="utf-8"
    )
    completed = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "benchmarks" / "run.py"),
            "--quick",
            "--proposals",
            "--threads",
            "1",
            "--data",
            str(SAMPLE_TRAIN),
            "--output",
            str(output),
            "--markdown",
            str(page),
        ],
        check=False,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return completed, json.loads(output.read_text(encoding="utf-8")), page.read_text(encoding="utf-8")


def test_quick_run_top_level_keys(quick_run):
    _, result, _ = quick_run
    for key in (
        "created",
        "command",
        "machine",
        "versions",
        "load_average",
        "data",
        "settings",
        "models",
        "targets",
    ):
        assert key in result, key
    for key in ("cpu_model", "logical_cores", "usable_cores", "torch_threads", "device"):
        assert key in result["machine"], key
    for package in ("torch", "transformers", "lightning", "ptuning-pl"):
        assert package in result["versions"], package
    assert set(result["load_average"]) == {"before", "after"}
    assert result["command"].startswith("python benchmarks/run.py --quick")
    assert result["settings"]["quick"] is True
    assert result["data"]["records"] == 400


def test_quick_run_training_section(quick_run):
    _, result, _ = quick_run
    [model] = result["models"]
    assert model["name"] == "tiny"
    training = model["training"]
    assert set(training["layouts"]) == {
        "ours",
        "reference",
        "reference_unpadded",
        "ours_proposed_loss",
        "reference_proposed_loss",
    }
    for name, layout in training["layouts"].items():
        for key in (
            "median_step_seconds",
            "real_tokens_per_second",
            "samples_per_second",
            "padding_fraction",
            "peak_memory_increase_mib",
            "real_tokens",
            "padded_tokens",
        ):
            assert key in layout, (name, key)
        assert layout["layout"]["micro_batch_size"] * layout["layout"]["accumulation"] == 16, name
    reference = training["layouts"]["reference"]
    assert reference["layout"]["fixed_length"] == 128
    assert reference["padded_tokens"] == 128 * reference["examples"]
    # Every layout trains on the same examples, so the real token counts match.
    assert reference["real_tokens"] == training["layouts"]["ours"]["real_tokens"]
    assert training["speedups"]["reference"] == pytest.approx(1.0)


def test_quick_run_proposal_rows(quick_run):
    _, result, _ = quick_run
    training = result["models"][0]["training"]
    assert "ours_proposed_loss" in training["layouts"]
    assert "reference_proposed_loss" in training["layouts"]
    proposal = training["proposal"]
    # The proposed loss is checked against the current one before timing; both sum the same token losses.
    assert proposal["relative_loss_difference"] <= 1e-5
    assert "ours_vs_reference" in proposal
    assert "ours_vs_current_ours" in proposal


def test_quick_run_evaluation_outputs_identical(quick_run):
    _, result, _ = quick_run
    evaluation = result["models"][0]["evaluation"]
    assert evaluation["baseline"] == "one at a time"
    assert evaluation["headline"] in evaluation["modes"]
    for name, mode in evaluation["modes"].items():
        assert mode["identical_to_baseline"], (name, mode["mismatched_examples"])
        assert mode["examples"] == 4, name
        assert "generated_tokens_per_second" in mode, name


def test_quick_run_scaling_section(quick_run):
    _, result, _ = quick_run
    scaling = result["models"][0]["scaling"]
    assert [row["pre_seq_len"] for row in scaling["pre_seq_len"]] == [0, 4]
    # pre_seq_len 0 has no prefix to train: only its forward pass is timed.
    assert scaling["pre_seq_len"][0]["median_step_seconds"] is None
    assert scaling["pre_seq_len"][1]["median_step_seconds"] is not None
    assert [row["max_source_length"] for row in scaling["sequence_length"]] == [32]


def test_quick_run_targets_listed(quick_run):
    _, result, _ = quick_run
    names = [target["name"] for target in result["targets"]]
    assert len(names) == 2
    assert all(target["model"] == "tiny" for target in result["targets"])
    assert all(isinstance(target["met"], bool) for target in result["targets"])


def test_quick_run_page_keeps_prose(quick_run):
    _, _, page = quick_run
    assert PROSE in page
    assert page.endswith("End.\n")
    assert "old results" not in page
    assert page.count(RESULTS_START) == 1
    assert page.count(RESULTS_END) == 1
    assert "| ours | 16 x 1 |" in page
