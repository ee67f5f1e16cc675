"""Hydra multirun sweeps: each point once, a summary, failures reported, DDP points, Optuna."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT

pytestmark = pytest.mark.slow

QUICK = [
    "experiment=adgen_tiny",
    "trainer.max_steps=4",
    "trainer.val_check_interval=4",
    "evaluation.val_examples=2",
    "evaluation.max_new_tokens=4",
    "test=false",
    "callbacks.progress_bar=null",
]


def run_sweep(args: list[str], sweep_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ptuning_pl.train", "-m", *QUICK, *args, f"hydra.sweep.dir={sweep_dir}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
    )


def read_summary(sweep_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (sweep_dir / "summary.jsonl").read_text().splitlines()]


def point_folders(sweep_dir: Path) -> list[str]:
    return sorted(path.name for path in sweep_dir.iterdir() if path.is_dir())


def test_sweep_runs_each_point_once(tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = run_sweep(["model.prefix.pre_seq_len=4,8", "optim.lr=1e-2,2e-2"], sweep_dir)
    assert result.returncode == 0, result.stderr[-3000:]

    assert point_folders(sweep_dir) == ["0", "1", "2", "3"]
    records = read_summary(sweep_dir)
    assert [record["status"] for record in records] == ["completed"] * 4
    points = {tuple(sorted(o for o in record["overrides"] if o.startswith(("model.prefix", "optim")))) for record in records}
    assert points == {
        ("model.prefix.pre_seq_len=4", "optim.lr=0.01"),
        ("model.prefix.pre_seq_len=4", "optim.lr=0.02"),
        ("model.prefix.pre_seq_len=8", "optim.lr=0.01"),
        ("model.prefix.pre_seq_len=8", "optim.lr=0.02"),
    }
    for record in records:
        metrics = json.loads((Path(record["run_dir"]) / "metrics.json").read_text())
        assert record["value"] == pytest.approx(metrics["val/loss"])
        # Each point trained with its own pre_seq_len (checked in the point's own checkpoint).
        assert (Path(record["run_dir"]) / "checkpoints" / "last.ckpt").is_file()

    with open(sweep_dir / "summary.csv", encoding="utf-8") as handle:
        assert len(list(csv.DictReader(handle))) == 4
    assert "model.prefix.pre_seq_len=8 optim.lr=0.02" in (sweep_dir / "summary.md").read_text()
    assert (sweep_dir / "summary.svg").read_text().startswith("<svg")


def test_failing_point_reported_and_others_run(tmp_path):
    """The point allowing one bad step stops at the injected NaN; the others skip it and finish."""
    sweep_dir = tmp_path / "sweep"
    result = run_sweep(
        ["training.inject_nonfinite_at_steps=[1]", "training.max_consecutive_nonfinite=1,5,9"], sweep_dir
    )
    assert result.returncode != 0
    records = read_summary(sweep_dir)
    assert [record["status"] for record in records] == ["failed", "completed", "completed"]
    assert "NonFiniteLossError" in records[0]["error"]
    # The traceback went into the failed point's own log file.
    log_text = (Path(records[0]["run_dir"]) / "adgen_tiny.log").read_text(encoding="utf-8")
    assert "Traceback" in log_text
    assert "NonFiniteLossError" in log_text
    assert "failed: NonFiniteLossError" in (sweep_dir / "summary.md").read_text()


def test_sweep_with_ddp_points(tmp_path):
    """A two-process DDP trainer in a sweep: each point runs once, with no nested sweep folders."""
    sweep_dir = tmp_path / "sweep"
    result = run_sweep(
        ["model.prefix.pre_seq_len=4,8", "optim.lr=1e-2,2e-2", "trainer=ddp", "trainer.accelerator=cpu",
         "trainer.devices=2"],
        sweep_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert point_folders(sweep_dir) == ["0", "1", "2", "3"]
    records = read_summary(sweep_dir)
    assert [record["status"] for record in records] == ["completed"] * 4
    # Rank 1 started once per point, never a second sweep.
    assert (result.stdout + result.stderr).count("GLOBAL_RANK: 1, MEMBER: 2/2") == 4
    for record in records:
        run_dir = Path(record["run_dir"])
        assert sorted(path.name for path in run_dir.iterdir() if path.is_dir() and path.name.isdigit()) == []
        assert (run_dir / "checkpoints" / "last.ckpt").is_file()


def test_optuna_search(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep_dir = tmp_path / "optuna"
    result = run_sweep(["hparams_search=adgen_optuna", "hydra.sweeper.n_trials=2"], sweep_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_summary(sweep_dir)
    assert len(records) == 2
    assert all(record["metric"] == "val/rouge-l" and record["value"] is not None for record in records)
    assert (sweep_dir / "optimization_results.yaml").is_file()
