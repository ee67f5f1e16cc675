"""End-to-end training through train(cfg): outputs, checkpoints with prefix keys only, and exact resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from conftest import ADGEN_DEV
from ptuning_pl.train import train

pytestmark = pytest.mark.slow


def read_losses(run_dir: Path, key: str) -> list[tuple[int, float]]:
    with open(run_dir / "csv" / "metrics.csv", encoding="utf-8") as handle:
        return [(int(row["step"]), float(row[key])) for row in csv.DictReader(handle) if row.get(key)]


def prefix_of(checkpoint_path: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint_path, map_location="cpu", weights_only=True)["state_dict"]


def test_tiny_run_writes_outputs_and_loss_falls(make_config, tmp_path):
    cfg = make_config(["experiment=adgen_tiny", "trainer.max_steps=60", "trainer.val_check_interval=20"])
    metrics = train(cfg)
    run_dir = tmp_path / "run"

    for name in ["config.yaml", "run_record.json", "metrics.json", "checkpoints/last.ckpt", "backbone/config.json",
                 "backbone/tokenizer.json", "backbone/model.safetensors", "csv/metrics.csv"]:
        assert (run_dir / name).is_file(), name

    record = json.loads((run_dir / "run_record.json").read_text())
    assert record["config"]["model"]["prefix"]["pre_seq_len"] == 16
    assert "torch" in record["packages"]
    assert "lightning" in record["packages"]
    assert record["git"] is None or len(record["git"]["commit"]) == 40

    validation = read_losses(run_dir, "val/loss")
    assert [step for step, _ in validation] == [19, 39, 59]
    assert validation[-1][1] < validation[0][1] - 0.1
    assert metrics["test/loss"] == pytest.approx(json.loads((run_dir / "metrics.json").read_text())["test/loss"])


@pytest.mark.parametrize("pre_seq_len,projection", [(4, False), (8, False), (4, True)])
def test_checkpoint_holds_exactly_prefix_keys(make_config, tmp_path, pre_seq_len, projection):
    cfg = make_config(
        [
            "experiment=adgen_tiny",
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
            "test=false",
            f"model.prefix.pre_seq_len={pre_seq_len}",
            f"model.prefix.prefix_projection={str(projection).lower()}",
        ]
    )
    train(cfg)
    state = prefix_of(tmp_path / "run" / "checkpoints" / "last.ckpt")

    layers, kv_width, hidden = 2, 2 * 16, 64
    if projection:
        output = layers * 2 * kv_width
        assert set(state) == {
            "prefix_encoder.embedding.weight",
            "prefix_encoder.trans.0.weight",
            "prefix_encoder.trans.0.bias",
            "prefix_encoder.trans.2.weight",
            "prefix_encoder.trans.2.bias",
        }
        assert state["prefix_encoder.embedding.weight"].shape == (pre_seq_len, output)
        assert state["prefix_encoder.trans.0.weight"].shape == (hidden, output)
    else:
        assert set(state) == {"prefix_encoder.embedding.weight"}
        # Size scales with pre_seq_len x layers x 2 (key and value) x kv width.
        assert state["prefix_encoder.embedding.weight"].numel() == pre_seq_len * layers * 2 * kv_width
    assert all(value.dtype == torch.float32 for value in state.values())


def write_records(path: Path, count: int) -> Path:
    lines = [json.dumps({"content": f"类型#裙*颜色#{i}号色", "summary": f"这是第{i}条描述，颜色很好看。"}, ensure_ascii=False)
             for i in range(count)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("resume_step", [5, 9, 10])
def test_resume_mid_epoch_matches_uninterrupted_run(make_config, tmp_path, resume_step):
    """Resuming after step 5 (epoch 0), 9 (the end of epoch 0) or 10 (epoch 1) of 9-batch epochs ends with the
    uninterrupted run's prefix."""
    data = write_records(tmp_path / "train.json", 30)
    common = [
        "experiment=adgen_tiny",
        f"data.train_file={data}",
        "data.validation_file=null",
        "data.test_file=null",
        "data.split=[0.9,0.1,0.0]",
        "data.batch_size=3",
        "trainer.max_steps=20",
        "trainer.val_check_interval=4",
        "test=false",
        "model.prefix.dropout=0.3",
        "callbacks.model_checkpoint.monitor=null",
        "callbacks.model_checkpoint.save_top_k=-1",
        f"callbacks.model_checkpoint.every_n_train_steps={resume_step}",
    ]
    train(make_config(common, name="full"))
    full_dir = tmp_path / "full"
    checkpoint = full_dir / "checkpoints" / f"step{resume_step:06d}.ckpt"
    assert checkpoint.is_file()

    resumed_cfg = make_config([*common, f"model.path={full_dir / 'backbone'}", f"ckpt_path={checkpoint}"], name="resumed")
    train(resumed_cfg)

    final_full = prefix_of(full_dir / "checkpoints" / "last.ckpt")
    final_resumed = prefix_of(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert set(final_full) == set(final_resumed)
    for name in final_full:
        assert torch.equal(final_full[name], final_resumed[name]), name

    # The resumed run logs the same training losses after the resume step as the uninterrupted one.
    full_losses = dict(read_losses(full_dir, "train/loss"))
    resumed_losses = dict(read_losses(tmp_path / "resumed", "train/loss"))
    assert resumed_losses and min(resumed_losses) >= resume_step
    for step, loss in resumed_losses.items():
        assert loss == full_losses[step], step


@pytest.mark.skipif(not ADGEN_DEV.exists(), reason=f"real ADGEN sample not found at {ADGEN_DEV}")
def test_real_adgen_sample_split_runs(make_config, tmp_path):
    cfg = make_config(
        [
            "experiment=adgen_tiny",
            f"data.train_file={ADGEN_DEV}",
            "data.validation_file=null",
            "data.test_file=null",
            "trainer.max_steps=10",
            "trainer.val_check_interval=10",
            "test=false",
        ]
    )
    metrics = train(cfg)
    assert metrics["val/loss"] > 0
    record = json.loads((tmp_path / "run" / "run_record.json").read_text())
    assert record["config"]["data"]["train_file"] == str(ADGEN_DEV)
