"""The LightningModule: a frozen backbone and a trainable P-Tuning v2 prefix encoder.

One predicate, `is_prefix_key`, defines what trains: it drives freezing, the optimizer's parameter list, the
checkpoint filter (a checkpoint contains prefix weights only, never a backbone weight) and the logged counts.

The module is usable without Hydra: build it from plain dictionaries, call `configure_model()` (the Trainer
does it for you), and use `prefix_kv()` / `backbone`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torch.distributed as dist
from torchmetrics import SumMetric
from transformers import get_linear_schedule_with_warmup

from ptuning_pl.backbones import Backbone, BackboneSpec, PromptFormat, load_backbone, load_tokenizer_and_format
from ptuning_pl.generation import GenerationSettings, generate
from ptuning_pl.metrics import AdgenMetric
from ptuning_pl.prefix import PrefixEncoder
from ptuning_pl.prompts import IGNORE_INDEX

log = logging.getLogger(__name__)

PREFIX_MODULE = "prefix_encoder"
#: Validation examples per sample table sent to loggers such as W&B.
SAMPLE_ROWS = 8


def is_prefix_key(name: str) -> bool:
    """True for the parameters (and checkpoint keys) of the trainable prefix."""
    return name.startswith(PREFIX_MODULE + ".")


class CheckpointMismatchError(RuntimeError):
    """A checkpoint's prefix keys or shapes do not match the configured prefix."""


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had a NaN or infinite loss or gradient."""


@dataclass
class GuardConfig:
    """Protection against NaN and infinite losses."""

    #: Stop the run after this many consecutive optimizer steps with a non-finite loss or gradient.
    max_consecutive_nonfinite: int = 3
    #: Debug: make the loss NaN at these optimizer steps (0-based), to test the guard and sweeps.
    inject_nonfinite_at_steps: list[int] = field(default_factory=list)


@dataclass
class EvaluationConfig:
    """Generation-based evaluation: what to generate during validation and test, and how to score it."""

    #: "greedy" (default) or "reference" (sampling with top_p 0.7 and temperature 0.95, and scoring against
    #: the response encoded, cut to max_target_length tokens and decoded again, as the reference does).
    preset: str = "greedy"
    #: New tokens per prompt; the reference generates up to max_target_length.
    max_new_tokens: int = 64
    top_p: float | None = None
    temperature: float | None = None
    seed: int | None = None
    #: Validation examples to generate for at each validation (the first K of the validation set); 0 = none.
    val_examples: int = 64
    #: Token budgets the data was encoded with; prediction from a checkpoint reuses them.
    max_source_length: int = 64
    max_target_length: int = 64
    #: Folder (under the run directory) for test_generated_predictions.jsonl.
    predictions_dir: str = "predictions"

    def settings(self) -> GenerationSettings:
        return GenerationSettings.from_preset(
            self.preset,
            max_new_tokens=self.max_new_tokens,
            top_p=self.top_p,
            temperature=self.temperature,
            seed=self.seed,
        )


class PrefixTuningModule(pl.LightningModule):
    """P-Tuning v2 on a frozen causal LM.

    Args:
        backbone: fields of `BackboneSpec` (path, family, revision, dtype, ...).
        prefix: pre_seq_len, prefix_projection, prefix_hidden_size, dropout.
        optim: lr, weight_decay, betas, eps, warmup_steps, warmup_ratio.
    """

    def __init__(
        self,
        backbone: dict[str, Any],
        prefix: dict[str, Any],
        optim: dict[str, Any],
        evaluation: dict[str, Any] | None = None,
        guard: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.spec = BackboneSpec(**backbone)
        self.prefix_config = dict(prefix)
        self.optim_config = dict(optim)
        self.evaluation = EvaluationConfig(**(evaluation or {}))
        self.generation_settings = self.evaluation.settings()
        self.guard = GuardConfig(**(guard or {}))
        self.nonfinite_steps = 0
        self._consecutive_nonfinite = 0
        self._nonfinite_in_step: torch.Tensor | None = None
        self._step_loss: torch.Tensor | None = None
        self._step_batches = 0

        self.backbone: Backbone | None = None
        self.prompt_format: PromptFormat | None = None
        self.prefix_encoder: PrefixEncoder | None = None

        # Token-weighted evaluation loss and the ADGEN scores; their states are summed across ranks.
        self.eval_loss_sum = SumMetric()
        self.eval_loss_tokens = SumMetric()
        self.eval_scores = AdgenMetric()
        self._test_rows: list[dict[str, Any]] = []
        self._val_samples: list[dict[str, Any]] = []
        #: The latest evaluation metrics in full precision (Lightning's logged copies are float32).
        self.eval_metrics: dict[str, float] = {}
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
        # Quantized layers are built on the device they run on; others load on the CPU and move with the module.
        device = None
        if self.spec.quantization_bit is not None:
            try:
                device = self.trainer.strategy.root_device
            except RuntimeError:  # not attached to a Trainer (notebooks): quantize on the CPU
                device = None
        backbone = load_backbone(self.spec, device=device)
        _, self.prompt_format = load_tokenizer_and_format(self.spec)
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
        """Return the prefix keys and values for `batch_size` sequences, or None without a prefix."""
        if self.prefix_encoder is None:
            return None
        return self.prefix_encoder(batch_size, dtype=self.backbone.compute_dtype)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits (batch, seq, vocab) for a padded batch, with the prefix in front of every layer."""
        cache = self.backbone.new_cache(self.prefix_kv(input_ids.shape[0]), input_ids.shape[0])
        return self.backbone.forward(input_ids, attention_mask, cache)

    def token_losses(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (sum of token losses, number of supervised tokens) for a batch with labels."""
        input_ids = batch["input_ids"]
        cache = self.backbone.new_cache(self.prefix_kv(input_ids.shape[0]), input_ids.shape[0])
        hidden = self.backbone.forward_hidden(input_ids, batch["attention_mask"], cache)

        # Logits only where a label is: the vocabulary-sized product is skipped at prompt and padding positions.
        labels = batch["labels"][:, 1:]
        supervised = labels != IGNORE_INDEX
        logits = self.backbone.output_logits(hidden[:, :-1][supervised])
        loss_sum = F.cross_entropy(logits.float(), labels[supervised], reduction="sum")
        return loss_sum, supervised.sum()

    # ------------------------------------------------------------------------------------------- training
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss_sum, count = self.token_losses(batch)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Normalise by the supervised tokens of the whole global batch: DDP then averages gradients into
            # exactly the token mean one process computes on that batch. One scalar pair per micro-step.
            totals = torch.stack([loss_sum.detach(), count.to(loss_sum.dtype)])
            dist.all_reduce(totals)
            world = dist.get_world_size()
            loss = loss_sum * world / totals[1].clamp(min=1)
            logged_loss = totals[0] / totals[1].clamp(min=1)
        else:
            loss = loss_sum / count.clamp(min=1)
            logged_loss = loss.detach()
        if self.global_step in self.guard.inject_nonfinite_at_steps:
            loss = loss * float("nan")
            logged_loss = logged_loss * float("nan")

        # Collected on the device; on_before_optimizer_step reads them with the gradients' check in one host
        # synchronisation per optimizer step, and logs the loss then.
        bad = ~torch.isfinite(loss.detach())
        self._nonfinite_in_step = bad if self._nonfinite_in_step is None else self._nonfinite_in_step | bad
        self._step_loss = logged_loss if self._step_loss is None else self._step_loss + logged_loss
        self._step_batches += 1
        return loss

    # ----------------------------------------------------------------------------------------- evaluation
    def generate_ids(self, prompts: list[list[int]], settings: GenerationSettings | None = None) -> list[list[int]]:
        """Generate new token ids for a batch of prompt ids with the prefix."""
        return generate(
            self.backbone,
            self.prefix_kv,
            prompts,
            pad_token_id=self.prompt_format.pad_token_id,
            stop_token_ids=self.prompt_format.stop_token_ids,
            settings=settings or self.generation_settings,
            device=self.device,
        )

    def reference_for_scoring(self, response: str) -> str:
        """Return the raw response, or with the "reference" preset the response as the reference scripts score it."""
        if self.evaluation.preset != "reference":
            return response
        ids = self.prompt_format.encode_text(response)[: self.evaluation.max_target_length]
        return self.prompt_format.decode(ids)

    def _evaluate_batch(self, batch: dict[str, Any], rows: list[int]) -> list[dict[str, Any]]:
        """Generate for `rows` of the batch, update the scores, and return one output row per example."""
        if not rows:
            return []
        generated = self.generate_ids([batch["prompt_ids"][row] for row in rows])
        outputs = []
        predictions, references = [], []
        for row, ids in zip(rows, generated):
            prediction = self.prompt_format.decode(ids)
            reference = batch["reference"][row]
            outputs.append(
                {
                    "position": int(batch["position"][row]),
                    "id": int(batch["index"][row]),
                    "prompt": batch["prompt"][row],
                    "prediction": prediction,
                    "reference": reference,
                }
            )
            if reference is not None:
                predictions.append(prediction)
                references.append(self.reference_for_scoring(reference))
        if predictions:
            self.eval_scores.update(predictions, references)
        return outputs

    def _update_loss(self, batch: dict[str, torch.Tensor]) -> None:
        loss_sum, count = self.token_losses(batch)
        self.eval_loss_sum.update(loss_sum.detach())
        self.eval_loss_tokens.update(count)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._update_loss(batch)
        if self.evaluation.val_examples > 0:
            rows = [row for row, position in enumerate(batch["position"].tolist()) if position < self.evaluation.val_examples]
            outputs = self._evaluate_batch(batch, rows)
            # A few examples per validation for the loggers' sample tables (rank 0 logs them).
            self._val_samples += outputs[: max(0, SAMPLE_ROWS - len(self._val_samples))]

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._update_loss(batch)
        self._test_rows += self._evaluate_batch(batch, list(range(len(batch["position"]))))

    def on_validation_epoch_start(self) -> None:
        self._reset_eval_state()
        self._val_samples = []

    def on_test_epoch_start(self) -> None:
        self._reset_eval_state()
        self._test_rows = []

    def _reset_eval_state(self) -> None:
        self.eval_loss_sum.reset()
        self.eval_loss_tokens.reset()
        self.eval_scores.reset()

    def _log_eval_metrics(self, stage: str, scored: bool) -> dict[str, float]:
        """Log `<stage>/loss` and the ADGEN scores; every value is already summed over ranks."""
        metrics: dict[str, float] = {}
        tokens = float(self.eval_loss_tokens.compute())
        if tokens > 0:
            metrics[f"{stage}/loss"] = float(self.eval_loss_sum.compute()) / tokens
        if scored:
            for name, value in self.eval_scores.compute().items():
                metrics[f"{stage}/{name}"] = float(value)
        for name, value in metrics.items():
            self.log(name, value, prog_bar=name in (f"{stage}/loss", f"{stage}/rouge-l"), sync_dist=False)
        self.eval_metrics.update(metrics)
        return metrics

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        metrics = self._log_eval_metrics("val", scored=self.evaluation.val_examples > 0)
        self._log_sample_table()
        if "val/count" in metrics:
            log.info(
                "validation at step %d: loss %.4f, ROUGE-L %.2f, BLEU-4 %.2f over %d generated examples "
                "(%d empty predictions)",
                self.global_step,
                metrics.get("val/loss", float("nan")),
                metrics["val/rouge-l"],
                metrics["val/bleu-4"],
                metrics["val/count"],
                metrics["val/empty_predictions"],
            )

    def _log_sample_table(self) -> None:
        """Log prompt, prediction and reference of a few validation examples to loggers that take tables."""
        if not self._val_samples:
            return
        columns = ["step", "id", "prompt", "prediction", "reference"]
        data = [[self.global_step, row["id"], row["prompt"], row["prediction"], row["reference"]] for row in self._val_samples]
        for logger in self.loggers:
            log_table = getattr(logger, "log_table", None)
            if callable(log_table):
                log_table(key="val/samples", columns=columns, data=data, step=self.global_step)

    def on_test_epoch_end(self) -> None:
        rows = gather_rows(self._test_rows)
        metrics = self._log_eval_metrics("test", scored=any(row["reference"] is not None for row in rows))
        log.info(
            "test: %d examples generated, %d scored, %d empty predictions",
            len(rows),
            int(metrics.get("test/count", 0)),
            int(metrics.get("test/empty_predictions", 0)),
        )
        if self.trainer.is_global_zero:
            self.write_predictions(rows)

    def write_predictions(self, rows: list[dict[str, Any]]) -> Path:
        """Write one JSON line per test example, in input order: id, prompt, prediction, reference."""
        folder = Path(self.trainer.default_root_dir) / self.evaluation.predictions_dir
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "test_generated_predictions.jsonl"
        with open(path, "w", encoding="utf-8") as handle:
            for row in rows:
                record = {key: row[key] for key in ("id", "prompt", "prediction", "reference")}
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        log.info("predictions written to %s", path)
        return path

    def on_before_optimizer_step(self, optimizer) -> None:
        """Skip the update (drop the gradients) when the loss or a gradient is NaN or infinite."""
        gradients = [p.grad for name, p in self.named_parameters() if is_prefix_key(name) and p.grad is not None]
        bad = torch.stack([~torch.isfinite(g).all() for g in gradients]).any() if gradients else torch.tensor(False)
        if self._nonfinite_in_step is not None:
            bad = bad | self._nonfinite_in_step.to(bad.device)
        step_loss = self._step_loss / max(self._step_batches, 1) if self._step_loss is not None else None
        self._nonfinite_in_step, self._step_loss, self._step_batches = None, None, 0

        # The one host synchronisation of the step: the non-finite flag and the loss to log, read together.
        if step_loss is None:
            is_bad, loss_value = bool(bad), float("nan")
        else:
            is_bad, loss_value = torch.stack([bad.to(step_loss.dtype), step_loss.to(bad.device)]).tolist()
        self.log("train/loss", loss_value, on_step=True, on_epoch=False, prog_bar=True)
        self.log("train/lr", optimizer.param_groups[0]["lr"], on_step=True, on_epoch=False)

        if not is_bad:
            self._consecutive_nonfinite = 0
            return

        for group in optimizer.param_groups:
            for parameter in group["params"]:
                parameter.grad = None
        self.nonfinite_steps += 1
        self._consecutive_nonfinite += 1
        log.warning(
            "non-finite loss or gradient at step %d: update skipped (%d in a row, %d in total)",
            self.global_step,
            self._consecutive_nonfinite,
            self.nonfinite_steps,
        )
        self.log("train/nonfinite_steps", float(self.nonfinite_steps), on_step=True, on_epoch=False)
        if self._consecutive_nonfinite >= self.guard.max_consecutive_nonfinite:
            raise NonFiniteLossError(
                f"{self._consecutive_nonfinite} optimizer steps in a row had a NaN or infinite loss or gradient "
                f"(last at step {self.global_step}). Lower optim.lr (now {self.optim_config.get('lr')}), run "
                "the backbone in bf16 or fp32 instead of fp16 (model.dtype=bfloat16), or check the data for "
                "empty responses; training.max_consecutive_nonfinite sets how many bad steps are tolerated."
            )

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


def gather_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Collect output rows from every rank and return them in input order, each example once."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[list[dict[str, Any]] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, rows)
        rows = [row for part in gathered for row in part or []]
    unique = {row["position"]: row for row in rows}
    return [unique[position] for position in sorted(unique)]


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
