"""Exact resume: a run resumed from a mid-epoch checkpoint ends with the same prefix as an uninterrupted run.

Lightning restores weights, optimizer, scheduler and loop counters, but not the random number generators
(prefix dropout draws from them) or the position inside the current epoch of a sampler that is not stateful.
This callback saves both in the checkpoint and puts them back before training continues.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

log = logging.getLogger(__name__)


def capture_rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain Python values, so checkpoints load with torch.load(weights_only=True)."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached_gaussian)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ExactResume(pl.Callback):
    """Saves the RNG states and the number of training batches done in the current epoch."""

    def __init__(self) -> None:
        self.batches_done = 0
        self._pending: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        return "ExactResume"

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pending = self._pending
        if pending is not None and pending["epoch"] == trainer.current_epoch:
            self.batches_done = pending["batches_done"]
        else:
            self.batches_done = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Runs before ModelCheckpoint's hook (Lightning orders checkpoint callbacks last), so a checkpoint
        # written after this batch counts it.
        self.batches_done += 1

    def state_dict(self) -> dict[str, Any]:
        trainer_epoch = getattr(self, "_epoch", 0)
        return {"epoch": trainer_epoch, "batches_done": self.batches_done, "rng": capture_rng_state()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._epoch = trainer.current_epoch

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = dict(state_dict)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Checkpoint state is already loaded here, and the train dataloader is not built yet.
        pending = self._pending
        if pending is None:
            return
        datamodule = trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "skip_train_batches"):
            datamodule.skip_train_batches(pending["epoch"], pending["batches_done"])
        else:
            log.warning("the datamodule cannot skip batches; the resumed epoch restarts from its first batch")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending is not None:
            restore_rng_state(self._pending["rng"])
            log.info(
                "resumed at epoch %d after %d batches with the saved random number generator state",
                self._pending["epoch"],
                self._pending["batches_done"],
            )
