"""The command line as a user runs it: `python -m ptuning_pl.train ...` in a subprocess."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli

pytestmark = pytest.mark.slow


def test_bad_data_file_exits_2(tmp_path):
    bad = tmp_path / "train.json"
    bad.write_text('{"content": "类型#裙", "summary": "好看"}\n{"content": 5, "summary": "x"}\n', encoding="utf-8")
    run_dir = tmp_path / "run"
    result = run_cli(
        [
            "experiment=adgen_tiny",
            f"data.train_file={bad}",
            "data.validation_file=null",
            "data.test_file=null",
            f"hydra.run.dir={run_dir}",
        ]
    )
    assert result.returncode == 2, result.stderr[-2000:]
    output = result.stdout + result.stderr
    assert f"{bad}, line 2" in output
    assert '"content"' in output
    assert "Traceback" not in output
    assert not (run_dir / "backbone").exists()


def test_config_error_exits_2_listing_problems(tmp_path):
    result = run_cli(["model.prefix.pre_seq_len=0", "data.batch_size=0", f"hydra.run.dir={tmp_path / 'run'}"])
    assert result.returncode == 2
    output = result.stdout + result.stderr
    assert "invalid configuration (2 problem(s))" in output
    assert "model.prefix.pre_seq_len=0" in output
    assert "data.batch_size=0" in output


def test_ddp_two_processes_on_cpu(tmp_path):
    """Two gloo processes train a few steps and leave one run folder with one set of checkpoints."""
    run_dir = tmp_path / "ddp"
    result = run_cli(
        [
            "experiment=adgen_tiny",
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.max_steps=4",
            "trainer.val_check_interval=4",
            "test=false",
            "callbacks.progress_bar=null",
            f"hydra.run.dir={run_dir}",
        ],
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in result.stdout + result.stderr
    checkpoints = sorted(path.name for path in (run_dir / "checkpoints").iterdir())
    assert checkpoints == ["last.ckpt", "step000004.ckpt"]
    assert json.loads((run_dir / "metrics.json").read_text())["val/loss"] > 0
    # No second run folder: Lightning re-launches rank 1 into the same Hydra run directory.
    assert sorted(path.name for path in tmp_path.iterdir()) == ["ddp"]


def test_ddp_training_matches_single_process(tmp_path):
    """Two ranks with batch 4 each train like one process with batch 8 (prefix dropout off).

    Rank r takes the r-th half of every global batch and the loss is normalised by the global token count,
    so the averaged gradients are the single-process gradients up to summation order. Dropout is off because
    each rank draws its own dropout masks.
    """
    import torch

    common = [
        "experiment=adgen_tiny", "trainer.max_steps=6", "trainer.val_check_interval=3", "model.prefix.dropout=0",
        "evaluation.val_examples=6", "evaluation.max_new_tokens=8", "callbacks.progress_bar=null",
    ]
    single_dir, ddp_dir = tmp_path / "single", tmp_path / "ddp"
    single = run_cli([*common, "data.batch_size=8", f"hydra.run.dir={single_dir}"])
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = run_cli(
        [*common, "data.batch_size=4", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
         f"model.path={single_dir / 'backbone'}", f"hydra.run.dir={ddp_dir}"]
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]

    single_prefix = torch.load(single_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    ddp_prefix = torch.load(ddp_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for name in single_prefix:
        torch.testing.assert_close(ddp_prefix[name], single_prefix[name], rtol=0, atol=1e-5)

    single_metrics = json.loads((single_dir / "metrics.json").read_text())
    ddp_metrics = json.loads((ddp_dir / "metrics.json").read_text())
    for name in ("train/loss", "val/loss", "test/loss"):
        assert ddp_metrics[name] == pytest.approx(single_metrics[name], rel=1e-5), name
    for name in ("val/rouge-l", "val/bleu-4", "test/rouge-1", "test/rouge-l", "test/bleu-4", "test/count"):
        assert ddp_metrics[name] == pytest.approx(single_metrics[name], abs=1e-6), name
    assert (ddp_dir / "predictions" / "test_generated_predictions.jsonl").read_text() == (
        single_dir / "predictions" / "test_generated_predictions.jsonl"
    ).read_text()
