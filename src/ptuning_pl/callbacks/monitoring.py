"""Throughput metrics during training and a report at the end of a run.

`ThroughputLogger` logs `perf/` metrics every `trainer.log_every_n_steps` optimizer steps: real
(non-padding) and padded tokens per second, samples per second, the padding fraction and the step time. Token
counts accumulate on the device and are read once per logging interval, so they add no per-step host
synchronisation.

`RunReport` prints, at the end of fit, the wall time, steps, mean throughput, peak memory, the sizes of the
checkpoints and the export, and where the files are.
"""

from __future__ import annotations

import logging
import resource
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)


class ThroughputLogger(pl.Callback):
    """Logs perf/tokens_per_sec, perf/padded_tokens_per_sec, perf/samples_per_sec, perf/padding_fraction."""

    def __init__(self) -> None:
        self._real: torch.Tensor | None = None
        self._padded = 0
        self._samples = 0
        self._window_start = 0.0
        self._window_steps = 0
        self.total_real_tokens = 0
        self.total_seconds = 0.0
        self.total_samples = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._window_start = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch: dict[str, Any], batch_idx: int) -> None:
        mask = batch["attention_mask"]
        real = mask.sum()
        self._real = real if self._real is None else self._real + real
        self._padded += mask.numel()
        self._samples += mask.shape[0]

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module, optimizer) -> None:
        # Called once per optimizer step (after the last micro-batch's backward); global_step is the step's index.
        self._window_steps += 1
        if (trainer.global_step + 1) % max(trainer.log_every_n_steps, 1) != 0 or self._real is None:
            return

        elapsed = max(time.perf_counter() - self._window_start, 1e-9)
        real = int(self._real)  # one read of the device counter per logging interval
        metrics = {
            "perf/tokens_per_sec": real / elapsed,
            "perf/padded_tokens_per_sec": self._padded / elapsed,
            "perf/samples_per_sec": self._samples / elapsed,
            "perf/padding_fraction": 1.0 - real / max(self._padded, 1),
            "perf/step_time": elapsed / max(self._window_steps, 1),
        }
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)
        self.total_real_tokens += real
        self.total_seconds += elapsed
        self.total_samples += self._samples
        self._real, self._padded, self._samples, self._window_steps = None, 0, 0, 0
        self._window_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        # Validation time does not count as training time.
        self._window_start = time.perf_counter()


def folder_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file()) if path.is_dir() else 0


def human_size(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"


class RunReport(pl.Callback):
    """Prints a summary at the end of fit (rank 0)."""

    def __init__(self) -> None:
        self._start = 0.0

    def on_fit_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module) -> None:
        wall = time.perf_counter() - self._start
        run_dir = Path(trainer.default_root_dir)
        throughput = next((cb for cb in trainer.callbacks if isinstance(cb, ThroughputLogger)), None)
        lines = [f"run finished: {trainer.global_step} optimizer steps in {wall:.1f} s"]
        if throughput is not None and throughput.total_seconds > 0:
            lines.append(
                f"  throughput: {throughput.total_real_tokens / throughput.total_seconds:.0f} real tokens/s, "
                f"{throughput.total_samples / throughput.total_seconds:.1f} samples/s"
            )
        if torch.cuda.is_available():
            lines.append(f"  peak GPU memory: {human_size(torch.cuda.max_memory_allocated())}")
        # ru_maxrss is in KiB on Linux.
        lines.append(f"  peak process memory (RSS): {human_size(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)}")
        nonfinite = getattr(pl_module, "nonfinite_steps", 0)
        if nonfinite:
            lines.append(f"  skipped optimizer steps with a non-finite loss: {nonfinite}")
        checkpoint = trainer.checkpoint_callback
        if checkpoint is not None and checkpoint.dirpath and Path(checkpoint.dirpath).is_dir():
            folder = Path(checkpoint.dirpath)
            lines.append(f"  checkpoints: {folder} ({human_size(folder_size(folder))})")
            if checkpoint.best_model_path:
                lines.append(f"  best: {checkpoint.best_model_path} ({checkpoint.monitor}={checkpoint.best_model_score})")
        lines.append(f"  run folder: {run_dir}")
        log.info("\n".join(lines))
