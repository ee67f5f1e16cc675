"""Export folders, strict reloading, inference from an export, chat, and resume after SIGKILL."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FAST, REPO_ROOT, compose_config
from ptuning_pl.export import ExportError, module_from_export, read_export, write_export
from ptuning_pl.inference import PrefixModel
from ptuning_pl.train import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short run whose export and backbone are moved out, and the run folder deleted."""
    root = tmp_path_factory.mktemp("export")
    cfg = compose_config(
        root / "run",
        [*FAST, "experiment=adgen_tiny", "trainer.max_steps=10", "trainer.val_check_interval=10",
         "evaluation.max_new_tokens=10", "model.prefix.prefix_projection=true"],
    )
    train(cfg)
    run_dir = root / "run"
    predictions = (run_dir / "predictions" / "test_generated_predictions.jsonl").read_text(encoding="utf-8")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return root, run_dir, predictions, metrics


def test_export_folder_contents(trained):
    _, run_dir, _, metrics = trained
    export = run_dir / "export"
    assert sorted(path.name for path in export.iterdir()) == [
        "README.md", "config.yaml", "metrics.json", "prefix.safetensors", "prefix_config.json"
    ]
    description, weights = read_export(export)
    assert description["format_version"] == 1
    assert description["pre_seq_len"] == 16
    assert description["prefix_projection"] is True
    assert description["prefix_hidden_size"] == 64
    assert (description["num_layers"], description["kv_width"]) == (2, 32)
    assert description["base_model"]["path"] == str(run_dir / "backbone")
    assert set(weights) == {"embedding.weight", "trans.0.weight", "trans.0.bias", "trans.2.weight", "trans.2.bias"}
    assert all(tensor.dtype == torch.float32 for tensor in weights.values())
    card = (export / "README.md").read_text(encoding="utf-8")
    assert str(run_dir / "backbone") in card
    assert "test/rouge-l" in card
    assert json.loads((export / "metrics.json").read_text())["test/rouge-l"] == metrics["test/rouge-l"]


def test_reload_after_run_folder_deleted_predicts_same(trained, tmp_path):
    root, run_dir, predictions, metrics = trained
    # Keep only the export and the tiny backbone it names, then remove everything else of the run.
    keep = tmp_path / "keep"
    keep.mkdir()
    shutil.copytree(run_dir / "export", keep / "export")
    shutil.copytree(run_dir / "backbone", keep / "backbone")
    moved = run_dir.with_name("run-moved")
    run_dir.rename(moved)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "ptuning_pl.predict", f"export_dir={keep / 'export'}",
             f"model_path={keep / 'backbone'}", f"data.test_file={REPO_ROOT / 'src/ptuning_pl/sample_data/test.json'}",
             f"hydra.run.dir={tmp_path / 'predict'}"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
        )
    finally:
        moved.rename(run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "predict" / "predictions" / "test_generated_predictions.jsonl").read_text("utf-8") == predictions
    assert json.loads((tmp_path / "predict" / "metrics.json").read_text())["test/rouge-l"] == metrics["test/rouge-l"]


def test_python_api_generates_like_test(trained):
    _, run_dir, predictions, _ = trained
    rows = [json.loads(line) for line in predictions.splitlines()][:3]
    model = PrefixModel.from_export(run_dir / "export", device="cpu")
    assert model.generate([row["prompt"] for row in rows], batch_size=2) == [row["prediction"] for row in rows]
    with pytest.raises(TypeError, match="list of prompts"):
        model.generate(rows[0]["prompt"])
    streamed = "".join(model.stream(rows[0]["prompt"]))
    assert streamed.strip() == rows[0]["prediction"] or rows[0]["prediction"].startswith(streamed.strip()[:5])


def test_conflicting_prefix_settings_rejected(trained):
    _, run_dir, _, _ = trained
    with pytest.raises(ExportError) as caught:
        module_from_export(run_dir / "export", prefix_overrides={"pre_seq_len": 8, "prefix_projection": False})
    message = str(caught.value)
    assert "pre_seq_len: the export has 16 but 8 was requested" in message
    assert "prefix_projection: the export has True but False was requested" in message


def copy_export(run_dir: Path, target: Path) -> Path:
    shutil.copytree(run_dir / "export", target)
    return target


def test_missing_and_unexpected_keys_listed(trained, tmp_path):
    _, run_dir, _, _ = trained
    export = copy_export(run_dir, tmp_path / "export")
    weights = load_file(export / "prefix.safetensors")
    weights["trans.0.extra"] = weights.pop("trans.0.bias")
    save_file(weights, export / "prefix.safetensors")
    with pytest.raises(ExportError) as caught:
        module_from_export(export)
    assert "missing keys ['trans.0.bias']" in str(caught.value)
    assert "unexpected keys ['trans.0.extra']" in str(caught.value)


def test_wrong_shape_rejected(trained, tmp_path):
    _, run_dir, _, _ = trained
    export = copy_export(run_dir, tmp_path / "export")
    weights = load_file(export / "prefix.safetensors")
    weights["embedding.weight"] = weights["embedding.weight"][:4]
    save_file(weights, export / "prefix.safetensors")
    with pytest.raises(ExportError, match=r"embedding.weight has shape \(4, 128\), expected \(16, 128\)"):
        module_from_export(export)


def test_other_backbone_rejected(trained, tmp_path):
    _, run_dir, _, _ = trained
    from ptuning_pl.backbones.tiny import write_tiny_backbone

    other = write_tiny_backbone(tmp_path / "other", ["类型#裙 很好看"] * 5, vocab_size=300, num_layers=3)
    with pytest.raises(ExportError) as caught:
        module_from_export(run_dir / "export", backbone_overrides={"path": str(other)})
    assert "'num_layers': 2" in str(caught.value)
    assert "'num_layers': 3" in str(caught.value)


def test_format_version_checked(trained, tmp_path):
    _, run_dir, _, _ = trained
    export = copy_export(run_dir, tmp_path / "export")
    description = json.loads((export / "prefix_config.json").read_text())
    description["format_version"] = 99
    (export / "prefix_config.json").write_text(json.dumps(description))
    with pytest.raises(ExportError, match="format_version 99; this ptuning-pl reads version 1"):
        read_export(export)


def test_missing_export_folder_is_clear(tmp_path):
    with pytest.raises(ExportError, match="does not exist"):
        read_export(tmp_path / "nothing")
    (tmp_path / "half").mkdir()
    with pytest.raises(ExportError, match="prefix_config.json is missing"):
        read_export(tmp_path / "half")


def test_predict_needs_test_file(trained, tmp_path):
    _, run_dir, _, _ = trained
    result = subprocess.run(
        [sys.executable, "-m", "ptuning_pl.predict", f"export_dir={run_dir / 'export'}", f"hydra.run.dir={tmp_path}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert "data.test_file is required" in result.stderr
    assert "Traceback" not in result.stderr


def test_chat_rejects_bad_export_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "missing"):
        result = subprocess.run(
            [sys.executable, "-m", "ptuning_pl.chat", f"export_dir={folder}"],
            input="exit\n", cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 2, folder
        assert "Traceback" not in result.stderr
        assert str(folder) in result.stderr


def test_export_files_readable_like_user_files(trained):
    _, run_dir, _, _ = trained
    umask = os.umask(0)
    os.umask(umask)
    for path in [run_dir / "export", *(run_dir / "export").iterdir(), run_dir / "backbone"]:
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert path.stat().st_mode & 0o777 == expected, path


def test_predict_refuses_random_prefix(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "ptuning_pl.predict", "data.test_file=x.json", f"hydra.run.dir={tmp_path}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert "set exactly one of ckpt_path" in result.stdout + result.stderr


def test_export_command_from_checkpoint(trained, tmp_path):
    _, run_dir, _, _ = trained
    checkpoint = next((run_dir / "checkpoints").glob("step*.ckpt"))
    result = subprocess.run(
        [sys.executable, "-m", "ptuning_pl.export", f"ckpt_path={checkpoint}", f"output_dir={tmp_path / 'out'}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    _, exported = read_export(tmp_path / "out")
    _, trained_weights = read_export(run_dir / "export")
    for name in trained_weights:
        assert torch.equal(exported[name], trained_weights[name]), name
    assert (tmp_path / "out" / "config.yaml").read_text() == (run_dir / "config.yaml").read_text()


def test_chat_session(trained):
    _, run_dir, _, _ = trained
    result = subprocess.run(
        [sys.executable, "-m", "ptuning_pl.chat", f"export_dir={run_dir / 'export'}", "max_new_tokens=5"],
        input="类型#裙\n类型#上衣\nclear\nexit\n",
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("模型: ") == 2
    assert "(history cleared)" in result.stdout


def read_losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "csv" / "metrics.csv", encoding="utf-8") as handle:
        return {int(row["step"]): float(row["train/loss"]) for row in csv.DictReader(handle) if row.get("train/loss")}


def test_resume_after_sigkill_matches_uninterrupted(tmp_path):
    """Kill a run with SIGKILL after its step-6 checkpoint, resume with ckpt_path=last: same prefix bit for bit."""
    common = [
        "experiment=adgen_tiny", "trainer.max_steps=60", "trainer.val_check_interval=20", "test=false",
        "data.batch_size=4", "evaluation.val_examples=0", "callbacks.progress_bar=null",
        "callbacks.model_checkpoint.every_n_train_steps=3", "callbacks.model_checkpoint.monitor=null",
        "callbacks.model_checkpoint.save_top_k=-1", "trainer.log_every_n_steps=1", "export=false",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    subprocess.run(
        [sys.executable, "-m", "ptuning_pl.train", *common, f"hydra.run.dir={reference_dir}"],
        cwd=REPO_ROOT, check=True, capture_output=True, timeout=600, env=env,
    )

    process = subprocess.Popen(
        [sys.executable, "-m", "ptuning_pl.train", *common, f"hydra.run.dir={killed_dir}",
         f"model.path={reference_dir / 'backbone'}"],
        cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )
    deadline = time.time() + 300
    while time.time() < deadline and not (killed_dir / "checkpoints" / "step000006.ckpt").exists():
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert not (killed_dir / "checkpoints" / "step000060.ckpt").exists()

    subprocess.run(
        [sys.executable, "-m", "ptuning_pl.train", *common, f"hydra.run.dir={killed_dir}",
         f"model.path={reference_dir / 'backbone'}", "ckpt_path=last"],
        cwd=REPO_ROOT, check=True, capture_output=True, timeout=600, env=env,
    )

    def final_prefix(run_dir: Path) -> dict[str, torch.Tensor]:
        return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]

    reference, resumed = final_prefix(reference_dir), final_prefix(killed_dir)
    assert set(reference) == set(resumed)
    for name in reference:
        assert torch.equal(reference[name], resumed[name]), name
    reference_losses, resumed_losses = read_losses(reference_dir), read_losses(killed_dir)
    # The killed run logged steps up to the kill; the resumed run appended the rest: same values.
    for step, loss in resumed_losses.items():
        assert loss == reference_losses[step], step
    assert max(resumed_losses) == max(reference_losses)


def test_failed_checkpoint_write_keeps_previous_last(make_config, tmp_path, monkeypatch):
    """A crash while writing last.ckpt leaves the previous file complete (Lightning writes through a temp file)."""
    import fsspec.implementations.local as local_fs

    cfg = make_config(["experiment=adgen_tiny", "trainer.max_steps=4", "trainer.val_check_interval=4", "test=false",
                       "export=false", "evaluation.val_examples=0"])
    train(cfg)
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    before = last.read_bytes()

    from lightning.fabric.utilities.cloud_io import _atomic_save

    def broken_write(self, data):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(local_fs.LocalFileOpener, "write", broken_write)
    with pytest.raises(OSError, match="simulated"):
        _atomic_save({"state_dict": {"prefix_encoder.embedding.weight": torch.zeros(2)}}, last)
    assert last.read_bytes() == before
    assert "prefix_encoder.embedding.weight" in torch.load(last, weights_only=True)["state_dict"]
