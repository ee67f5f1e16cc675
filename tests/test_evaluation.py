"""Generation-based validation and test, the predictions file, `ptuning_pl.predict`, and DDP evaluation."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, run_cli
from ptuning_pl.metrics import score_corpus
from ptuning_pl.train import train

pytestmark = pytest.mark.slow

SCORES = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def write_test_file(path: Path, count: int, with_response: bool = True) -> Path:
    rows = []
    for i in range(count):
        row = {"content": f"类型#裤*颜色#{'红黄蓝绿黑白灰'[i % 7]}色*版型#{'宽松修身'[i % 2 * 2:][:2]}{i}"}
        if with_response and i != 1:
            row["summary"] = f"这条裤子颜色好看，穿着舒适。编号{i}。"
        rows.append(row)
    path.write_text("\n".join(json.dumps(row, ensure_ascii=False) for row in rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One short adgen_tiny run with validation generation and a test set of 7 records (one without response)."""
    from conftest import FAST, compose_config

    root = tmp_path_factory.mktemp("evaluation")
    test_file = write_test_file(root / "test.json", 7)
    cfg = compose_config(
        root / "run",
        [
            *FAST,
            "experiment=adgen_tiny",
            f"data.test_file={test_file}",
            "trainer.max_steps=20",
            "trainer.val_check_interval=10",
            "evaluation.val_examples=8",
            "evaluation.max_new_tokens=12",
        ],
    )
    metrics = train(cfg)
    return root, metrics


def test_validation_logs_generation_metrics(trained_run):
    root, metrics = trained_run
    with open(root / "run" / "csv" / "metrics.csv", encoding="utf-8") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("val/rouge-l")]
    assert [int(row["step"]) for row in rows] == [9, 19]
    for row in rows:
        for name in SCORES:
            assert 0 <= float(row[f"val/{name}"]) <= 100
        assert float(row["val/count"]) == 8


def test_test_predictions_file_in_input_order(trained_run):
    root, metrics = trained_run
    rows = read_jsonl(root / "run" / "predictions" / "test_generated_predictions.jsonl")
    assert [row["id"] for row in rows] == list(range(7))
    assert all(set(row) == {"id", "prompt", "prediction", "reference"} for row in rows)
    assert rows[1]["reference"] is None
    assert rows[0]["prompt"].startswith("类型#裤")

    # metrics.json has the scores of the six rows with a reference, recomputed here from the file.
    scored = [row for row in rows if row["reference"] is not None]
    expected = score_corpus([row["prediction"] for row in scored], [row["reference"] for row in scored])
    saved = json.loads((root / "run" / "metrics.json").read_text())
    for name in SCORES:
        assert saved[f"test/{name}"] == pytest.approx(expected[name], abs=1e-9)
    assert saved["test/count"] == 6


def test_predict_reproduces_test_metrics(trained_run):
    root, _ = trained_run
    run_dir = root / "run"
    (checkpoint,) = (run_dir / "checkpoints").glob("step*.ckpt")
    predict_dir = root / "predict"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ptuning_pl.predict",
            f"ckpt_path={checkpoint}",
            f"data.test_file={root / 'test.json'}",
            f"hydra.run.dir={predict_dir}",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    trained = json.loads((run_dir / "metrics.json").read_text())
    predicted = json.loads((predict_dir / "metrics.json").read_text())
    for name in [*SCORES, "count", "loss"]:
        assert predicted[f"test/{name}"] == trained[f"test/{name}"], name
    assert (predict_dir / "predictions" / "test_generated_predictions.jsonl").read_text() == (
        run_dir / "predictions" / "test_generated_predictions.jsonl"
    ).read_text()


def test_predict_without_responses_writes_predictions_only(trained_run, tmp_path):
    root, _ = trained_run
    (checkpoint,) = (root / "run" / "checkpoints").glob("step*.ckpt")
    test_file = write_test_file(tmp_path / "no_response.json", 3, with_response=False)
    result = subprocess.run(
        [sys.executable, "-m", "ptuning_pl.predict", f"ckpt_path={checkpoint}", f"data.test_file={test_file}",
         f"hydra.run.dir={tmp_path / 'out'}"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_jsonl(tmp_path / "out" / "predictions" / "test_generated_predictions.jsonl")
    assert [row["reference"] for row in rows] == [None, None, None]
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert not any(name.startswith("test/rouge") for name in saved)


def test_predict_missing_checkpoint_is_clear(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "ptuning_pl.predict", f"ckpt_path={tmp_path / 'nope.ckpt'}", "data.test_file=x.json",
         f"hydra.run.dir={tmp_path / 'out'}"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "nope.ckpt is not a file" in result.stderr + result.stdout


def test_ddp_test_matches_single_process(trained_run, tmp_path):
    """Two gloo ranks with 7 test records (odd): every example once, same file and scores as one process."""
    root, _ = trained_run
    run_dir = root / "run"
    (checkpoint,) = (run_dir / "checkpoints").glob("step*.ckpt")
    ddp_dir = tmp_path / "ddp"
    result = run_cli(
        [
            "experiment=adgen_tiny",
            "train=false",
            "test=true",
            f"ckpt_path={checkpoint}",
            f"model.path={run_dir / 'backbone'}",
            f"data.test_file={root / 'test.json'}",
            "evaluation.max_new_tokens=12",
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "data.eval_batch_size=2",
            "callbacks.progress_bar=null",
            f"hydra.run.dir={ddp_dir}",
        ]
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in result.stdout + result.stderr
    assert (ddp_dir / "predictions" / "test_generated_predictions.jsonl").read_text() == (
        run_dir / "predictions" / "test_generated_predictions.jsonl"
    ).read_text()
    single = json.loads((run_dir / "metrics.json").read_text())
    ddp = json.loads((ddp_dir / "metrics.json").read_text())
    for name in [*SCORES, "count", "empty_predictions"]:
        assert ddp[f"test/{name}"] == pytest.approx(single[f"test/{name}"], abs=1e-9), name
    assert ddp["test/loss"] == pytest.approx(single["test/loss"], rel=1e-6)
