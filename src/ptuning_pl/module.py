"""The LightningModule: a frozen backbone and a trainable P-Tuning v2 prefix encoder.

One predicate, `is_prefix_key`, defines what trains: it drives freezing, the optimizer's parameter list, the
checkpoint filter (a checkpoint holds prefix weights only, never a backbone weight) and the logged counts.

The module is usable without Hydra: build it from plain dictionaries, call `configure_model()` (the Trainer
does it for you), and use `prefix_kv()` / `backbone`.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from transformers import get_linear_schedule_with_warmup

from ptuning_pl.backbones import Backbone, BackboneSpec, load_backbone
from ptuning_pl.prefix import PrefixEncoder
from ptuning_pl.prompts import IGNORE_INDEX

log = logging.getLogger(__name__)

PREFIX_MODULE = "prefix_encoder"


def is_prefix_key(name: str) -> bool:
    """True for the parameters (and checkpoint keys) of the trainable prefix."""
    return name.startswith(PREFIX_MODULE + ".")


class CheckpointMismatchError(RuntimeError):
    """A checkpoint's prefix keys or shapes do not match the configured prefix."""


class PrefixTuningModule(pl.LightningModule):
    """P-Tuning v2 on a frozen causal LM.

    Args:
        backbone: fields of `BackboneSpec` (path, family, revision, dtype, ...).
        prefix: pre_seq_len, prefix_projection, prefix_hidden_size, dropout.
        optim: lr, weight_decay, betas, eps, warmup_steps, warmup_ratio.
    """

    def __init__(self, backbone: dict[str, Any], prefix: dict[str, Any], optim: dict[str, Any]) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.spec = BackboneSpec(**backbone)
        self.prefix_config = dict(prefix)
        self.optim_config = dict(optim)

        self.backbone: Backbone | None = None
        self.prefix_encoder: PrefixEncoder | None = None
        self.val_loss = MeanMetric()
        # Checkpoints hold the prefix only; on_load_checkpoint checks those keys strictly instead.
        self.strict_loading = False

    # ------------------------------------------------------------------------------------------ building
    @property
    def pre_seq_len(self) -> int:
        return int(self.prefix_config.get("pre_seq_len", 0))

    def configure_model(self) -> None:
        """Load the frozen backbone and build the prefix encoder (once; the Trainer calls this)."""
        if self.backbone is not None:
            return
        backbone = load_backbone(self.spec)
        backbone.model.requires_grad_(False)
        backbone.model.eval()
        self.backbone = backbone
        # Registered as a submodule so Lightning moves it to the device; it is never trained or saved.
        self.backbone_model = backbone.model

        if self.pre_seq_len > 0:
            self.prefix_encoder = PrefixEncoder(
                pre_seq_len=self.pre_seq_len,
                geometry=backbone.geometry,
                prefix_projection=bool(self.prefix_config.get("prefix_projection", False)),
                prefix_hidden_size=self.prefix_config.get("prefix_hidden_size"),
                dropout=float(self.prefix_config.get("dropout", 0.1)),
                family=backbone.prefix_family,
            )

    def train(self, mode: bool = True) -> PrefixTuningModule:
        """Switch the prefix to `mode`; the frozen backbone always stays in eval mode (no dropout)."""
        super().train(mode)
        if self.backbone is not None:
            self.backbone.model.eval()
        return self

    # ------------------------------------------------------------------------------------------- counting
    def prefix_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: value for name, value in self.state_dict().items() if is_prefix_key(name)}

    def parameter_counts(self) -> dict[str, int]:
        trainable = sum(p.numel() for name, p in self.named_parameters() if is_prefix_key(name))
        frozen = sum(p.numel() for name, p in self.named_parameters() if not is_prefix_key(name))
        return {"trainable": trainable, "frozen": frozen}

    def on_fit_start(self) -> None:
        counts = self.parameter_counts()
        geometry = self.backbone.geometry
        log.info(
            "trainable parameters: %d (prefix: pre_seq_len %d, %d layers, kv width %d, projection %s); "
            "frozen backbone parameters: %d",
            counts["trainable"],
            self.pre_seq_len,
            geometry.num_layers,
            geometry.kv_width,
            bool(self.prefix_config.get("prefix_projection", False)),
            counts["frozen"],
        )
        for logger in self.loggers:
            logger.log_hyperparams({"params/trainable": counts["trainable"], "params/frozen": counts["frozen"]})

    # -------------------------------------------------------------------------------------------- forward
    def prefix_kv(self, batch_size: int):
        """The prefix keys and values for `batch_size` sequences, or None without a prefix."""
        if self.prefix_encoder is None:
            return None
        return self.prefix_encoder(batch_size, dtype=self.backbone.compute_dtype)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits (batch, seq, vocab) for a padded batch, with the prefix in front of every layer."""
        cache = self.backbone.new_cache(self.prefix_kv(input_ids.shape[0]), input_ids.shape[0])
        return self.backbone.forward(input_ids, attention_mask, cache)

    def token_losses(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (sum of token losses, number of supervised tokens) for a batch with labels."""
        logits = self(batch["input_ids"], batch["attention_mask"])
        labels = batch["labels"][:, 1:]
        logits = logits[:, :-1]
        supervised = labels != IGNORE_INDEX
        loss_sum = F.cross_entropy(
            logits[supervised].float(), labels[supervised], reduction="sum"
        )
        return loss_sum, supervised.sum()

    # ------------------------------------------------------------------------------------------- training
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss_sum, count = self.token_losses(batch)
        loss = loss_sum / count.clamp(min=1)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0], on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        if "labels" not in batch:
            return
        loss_sum, count = self.token_losses(batch)
        self.val_loss.update(loss_sum / count.clamp(min=1), weight=count)
        self.log("val/loss", self.val_loss, on_step=False, on_epoch=True, prog_bar=True)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        if "labels" not in batch:
            return
        loss_sum, count = self.token_losses(batch)
        self.val_loss.update(loss_sum / count.clamp(min=1), weight=count)
        self.log("test/loss", self.val_loss, on_step=False, on_epoch=True)

    def configure_optimizers(self):
        params = [p for name, p in self.named_parameters() if is_prefix_key(name)]
        if not params:
            raise RuntimeError("nothing to train: model.prefix.pre_seq_len is 0")
        config = self.optim_config
        optimizer = torch.optim.AdamW(
            params,
            lr=float(config.get("lr", 2e-2)),
            betas=tuple(config.get("betas", (0.9, 0.999))),
            eps=float(config.get("eps", 1e-8)),
            weight_decay=float(config.get("weight_decay", 0.0)),
        )
        total_steps = int(self.trainer.estimated_stepping_batches)
        warmup_steps = int(config.get("warmup_steps", 0) or round(float(config.get("warmup_ratio", 0.0)) * total_steps))
        scheduler = get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {
            name: value for name, value in checkpoint["state_dict"].items() if is_prefix_key(name)
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_prefix_state(checkpoint["state_dict"], self.prefix_state_dict(), source="checkpoint")


def check_prefix_state(
    loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str
) -> None:
    """Raise CheckpointMismatchError unless `loaded` has exactly the prefix keys and shapes of `expected`."""
    loaded_keys = {name for name in loaded if is_prefix_key(name)}
    backbone_keys = sorted(name for name in loaded if not is_prefix_key(name))
    missing = sorted(set(expected) - loaded_keys)
    unexpected = sorted(loaded_keys - set(expected))
    problems = []
    if missing:
        problems.append(f"missing prefix keys {missing}")
    if unexpected:
        problems.append(f"unexpected prefix keys {unexpected}")
    if backbone_keys:
        problems.append(f"{len(backbone_keys)} non-prefix keys such as {backbone_keys[:3]}")
    for name in sorted(loaded_keys & set(expected)):
        if tuple(loaded[name].shape) != tuple(expected[name].shape):
            problems.append(
                f"{name} has shape {tuple(loaded[name].shape)} in the {source} but the configured prefix needs "
                f"{tuple(expected[name].shape)} (pre_seq_len, projection, layer count or kv width differ)"
            )
    if problems:
        raise CheckpointMismatchError(f"{source} does not match the configured prefix: " + "; ".join(problems))
