"""W&B logging without an API key: offline, with the process's networking disabled."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

pytestmark = pytest.mark.slow

pytest.importorskip("wandb")


def can_unshare_network() -> bool:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
    return probe.returncode == 0


def run_without_network(args: list[str], env: dict) -> subprocess.CompletedProcess:
    """Run the training command in a new network namespace that has only loopback."""
    command = " ".join([sys.executable, "-m", "ptuning_pl.train", *[f"'{arg}'" for arg in args]])
    return subprocess.run(
        ["unshare", "-n", "sh", "-c", f"ip link set lo up && exec {command}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=env,
    )


@pytest.mark.skipif(not can_unshare_network(), reason="needs `unshare -n` (a network namespace) to cut networking")
def test_wandb_offline_without_network(tmp_path):
    env = {key: value for key, value in os.environ.items() if not key.startswith("WANDB_")}
    env["HOME"] = str(tmp_path / "home")  # no ~/.netrc login
    run_dir = tmp_path / "run"
    result = run_without_network(
        ["experiment=adgen_tiny", "logger=wandb", "trainer.max_steps=20", "trainer.val_check_interval=10",
         "evaluation.val_examples=4", "callbacks.progress_bar=null", f"hydra.run.dir={run_dir}"],
        env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "logging offline" in result.stderr

    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    tables = sorted((runs[0] / "files" / "media" / "table" / "val").glob("samples_*.table.json"))
    assert len(tables) == 2  # one per validation
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["step", "id", "prompt", "prediction", "reference"]
    assert len(table["data"]) == 4
    # The run summary printed at the end lists training, validation and throughput metrics.
    for key in ("train/loss", "val/rouge-l", "perf/tokens_per_sec", "test/bleu-4"):
        assert key in result.stderr + result.stdout, key


@pytest.mark.skipif(not can_unshare_network(), reason="needs `unshare -n` (a network namespace) to cut networking")
def test_wandb_run_closed_when_job_fails(tmp_path):
    env = {key: value for key, value in os.environ.items() if not key.startswith("WANDB_")}
    env["HOME"] = str(tmp_path / "home")
    run_dir = tmp_path / "run"
    result = run_without_network(
        ["experiment=adgen_tiny", "logger=wandb", "trainer.max_steps=20", "training.inject_nonfinite_at_steps=[2,3,4]",
         "callbacks.progress_bar=null", f"hydra.run.dir={run_dir}"],
        env,
    )
    assert result.returncode != 0
    assert "NonFiniteLossError" in result.stderr
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    # The run was finished with a failure code: wandb prints its closing summary for the run.
    assert "wandb: Run data is saved locally" in result.stderr or "wandb: Find logs at" in result.stderr


@pytest.mark.skipif(not can_unshare_network(), reason="needs `unshare -n` (a network namespace) to cut networking")
def test_wandb_one_run_per_ddp_job(tmp_path):
    """Two gloo ranks, networking cut: one W&B run (from rank 0) and one run folder for the job."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("WANDB_")}
    env["HOME"] = str(tmp_path / "home")
    run_dir = tmp_path / "run"
    result = run_without_network(
        ["experiment=adgen_tiny", "logger=wandb", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
         "trainer.max_steps=4", "trainer.val_check_interval=4", "evaluation.val_examples=4", "test=false",
         "callbacks.progress_bar=null", f"hydra.run.dir={run_dir}"],
        env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in result.stderr + result.stdout
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    assert sorted(path.name for path in tmp_path.iterdir()) == ["home", "run"]
