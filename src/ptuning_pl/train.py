"""`python -m ptuning_pl.train`: P-Tuning v2 training, run by Lightning's Trainer and configured by Hydra.

`train(cfg)` does the work and is what tests and notebooks call; `main` is the thin Hydra shell that returns
`cfg.optimized_metric` to sweepers.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from ptuning_pl.backbones import BackboneSpec, load_tokenizer_and_format
from ptuning_pl.config import ConfigError, check_config, config_dir
from ptuning_pl.export import write_export
from ptuning_pl.module import PrefixTuningModule, check_prefix_state
from ptuning_pl.prompts import PromptTooLongError
from ptuning_pl.records import DataFileError, DataFileSpec, validate_files
from ptuning_pl.run_record import write_run_record
from ptuning_pl.versions import check_transformers_version

log = logging.getLogger("ptuning_pl.train")

# The frozen backbone stays in eval mode on purpose (no dropout in it).
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=UserWarning)
# The ExactResume callback restores the position inside the epoch, which Lightning cannot see.
warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch ended")

BACKBONE_SPEC_KEYS = (
    "path",
    "family",
    "revision",
    "dtype",
    "trust_remote_code",
    "prompt_format",
    "gradient_checkpointing",
    "quantization_bit",
)


class DataFilesError(ValueError):
    """Every problem found in the configured data files, one per file."""

    def __init__(self, errors: list[DataFileError]) -> None:
        self.errors = errors
        super().__init__("\n".join(str(error) for error in errors))


def output_dir(cfg: DictConfig) -> Path:
    return Path(cfg.paths.output_dir)


def validate_data_files(cfg: DictConfig) -> None:
    """Read every configured data file once and raise DataFilesError listing each bad file."""
    data = cfg.data
    splits = [("train", data.train_file, True), ("validation", data.validation_file, True), ("test", data.test_file, False)]
    specs = [
        DataFileSpec(
            path=path,
            split_name=split,
            prompt_column=data.prompt_column,
            response_column=data.response_column,
            history_column=data.history_column,
            require_response=require_response,
            messages_column=data.get("messages_column"),
        )
        for split, path, require_response in splits
        if path and (split == "train" or cfg.train or cfg.test or split == "test")
    ]
    errors = validate_files(specs)
    if errors:
        raise DataFilesError(errors)


def prepare_backbone_path(cfg: DictConfig, datamodule) -> None:
    """Write the tiny backbone into <run_dir>/backbone once and point model.path at it."""
    tiny = cfg.model.get("tiny")
    if cfg.model.path or not tiny:
        return
    from ptuning_pl.backbones.tiny import write_tiny_backbone

    settings = OmegaConf.to_container(tiny, resolve=True)
    vocab_size = settings.pop("vocab_size")
    folder = write_tiny_backbone(
        output_dir(cfg) / "backbone", datamodule.texts_for_tokenizer(), vocab_size=vocab_size, **settings
    )
    with open_dict(cfg):
        cfg.model.path = str(folder)


def backbone_spec(cfg: DictConfig) -> BackboneSpec:
    return BackboneSpec(**{key: cfg.model.get(key) for key in BACKBONE_SPEC_KEYS if cfg.model.get(key) is not None})


def choose_wandb_mode() -> None:
    """Log to W&B offline (no network at all) unless an API key is configured or WANDB_MODE is set."""
    if os.environ.get("WANDB_MODE"):
        return
    netrc = Path.home() / ".netrc"
    has_login = netrc.is_file() and "api.wandb.ai" in netrc.read_text(encoding="utf-8", errors="replace")
    if not os.environ.get("WANDB_API_KEY") and not has_login:
        os.environ["WANDB_MODE"] = "offline"
        log.info("W&B: no API key configured, logging offline (sync later with `wandb sync`)")


def finish_wandb(exit_code: int) -> None:
    """Close this process's W&B run, if one was started, also when the job failed."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.run.finish(exit_code=exit_code)


def keep_previous_outputs(run_dir: Path) -> None:
    """Move the files a resumed run would overwrite into <run_dir>/previous/<time>/ (nothing is lost)."""
    names = ["csv/metrics.csv", "csv/hparams.yaml", "run_record.json", "config.yaml", "metrics.json"]
    existing = [name for name in names if (run_dir / name).is_file()]
    if not existing:
        return
    target = run_dir / "previous" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    for name in existing:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).rename(target / name)
    log.info("kept the earlier run's %s in %s", ", ".join(existing), target)


def resolve_ckpt_path(ckpt_path: str | None, run_dir: Path) -> str | None:
    """`last` means the newest last*.ckpt of this run (hydra.run.dir=<the old run directory>)."""
    if ckpt_path != "last":
        return ckpt_path
    candidates = sorted((run_dir / "checkpoints").glob("last*.ckpt"), key=lambda path: path.stat().st_mtime)
    if not candidates:
        raise ConfigError(
            [f"ckpt_path=last but {run_dir / 'checkpoints'} has no last.ckpt: set hydra.run.dir to the run to resume"]
        )
    log.info("resuming from %s", candidates[-1])
    return str(candidates[-1])


def load_best_prefix(module: PrefixTuningModule, ckpt_path: str) -> None:
    """Put the prefix of the best checkpoint into `module` (for the export when no test runs)."""
    import torch

    state = torch.load(ckpt_path, map_location="cpu", weights_only=True)["state_dict"]
    check_prefix_state(state, module.prefix_state_dict(), source=ckpt_path)
    module.load_state_dict(state, strict=False)


def instantiate_group(group: DictConfig | None) -> list[Any]:
    if not group:
        return []
    return [instantiate(entry) for entry in group.values() if entry is not None and "_target_" in entry]


def write_metrics(metrics: dict[str, float], directory: Path, name: str = "metrics.json") -> None:
    path = directory / name
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    log.info("metrics written to %s", path)


def train(cfg: DictConfig) -> dict[str, float]:
    """Train (and optionally test) a prefix as configured by `cfg`; return the final metrics as floats."""
    if rank_zero_only.rank != 0:
        # Every rank runs this function; only rank 0 reports progress.
        logging.getLogger("ptuning_pl").setLevel(logging.WARNING)
    check_transformers_version()
    check_config(cfg)
    validate_data_files(cfg)
    resolved_ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir(cfg))

    pl.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(cfg.data, _convert_="partial")
    datamodule.load_records()
    prepare_backbone_path(cfg, datamodule)

    spec = backbone_spec(cfg)
    try:
        _, prompt_format = load_tokenizer_and_format(spec)
    except (OSError, ValueError) as error:
        raise ConfigError([f"model.path={spec.path}: the tokenizer could not be loaded ({error})"]) from error
    datamodule.prompt_format = prompt_format
    log.info("backbone %s (family %s), prompt format %s", spec.path, spec.family, prompt_format.name)
    if cfg.data.get("messages_column") and not hasattr(prompt_format, "encode_messages"):
        raise ConfigError(
            [f"data.messages_column={cfg.data.messages_column} needs a chat family with roles: use "
             f"model=chatglm3_6b (this model's prompt format, {prompt_format.name}, takes prompt/response records)"]
        )

    # Encode every split now (once), so a budget too small for the prompt template fails before the model loads.
    try:
        datamodule.setup("fit")
    except PromptTooLongError as error:
        raise ConfigError([str(error)]) from error

    module = PrefixTuningModule(
        backbone=vars(spec),
        prefix=OmegaConf.to_container(cfg.model.prefix, resolve=True),
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        evaluation=OmegaConf.to_container(cfg.evaluation, resolve=True),
        guard=OmegaConf.to_container(cfg.training, resolve=True) if cfg.get("training") else None,
    )
    callbacks = instantiate_group(cfg.get("callbacks"))
    if cfg.get("logger") and "wandb" in cfg.logger:
        choose_wandb_mode()
    loggers = instantiate_group(cfg.get("logger"))
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    if rank_zero_only.rank == 0:
        if cfg.get("ckpt_path"):
            keep_previous_outputs(output_dir(cfg))
        write_run_record(cfg, output_dir(cfg))
        resolved = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
        for logger in loggers:
            logger.log_hyperparams({"config": resolved})

    try:
        metrics = run_stages(cfg, trainer, module, datamodule, resolved_ckpt_path)
    except BaseException:
        finish_wandb(exit_code=1)
        raise
    finish_wandb(exit_code=0)
    return metrics


def run_stages(
    cfg: DictConfig, trainer: pl.Trainer, module: PrefixTuningModule, datamodule, resolved_ckpt_path: str | None
) -> dict[str, float]:
    """Validate before training (optional), fit, test, write metrics and the export."""
    if cfg.get("validate_before_training") and cfg.train:
        # The baseline: the freshly initialised prefix (or the bare backbone with pre_seq_len=0), no step taken.
        baseline = trainer.validate(module, datamodule=datamodule, verbose=False)
        log.info("validation before training: %s", baseline[0] if baseline else {})
        if trainer.is_global_zero:
            write_metrics(
                {name.replace("val/", "val_before_training/"): value for name, value in module.eval_metrics.items()},
                output_dir(cfg),
                name="metrics_before_training.json",
            )
        module.eval_metrics.clear()

    if cfg.train:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resolved_ckpt_path)
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}

    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback and cfg.train else ""
    if cfg.test:
        ckpt_path = best or (None if cfg.train else resolved_ckpt_path)
        log.info("testing with %s", ckpt_path or "the current weights")
        trainer.test(module, datamodule=datamodule, ckpt_path=ckpt_path)
        metrics.update({name: float(value) for name, value in trainer.callback_metrics.items()})
    elif best:
        load_best_prefix(module, best)
    metrics.update(module.eval_metrics)

    if trainer.is_global_zero:
        write_metrics(metrics, output_dir(cfg))
        if cfg.train and cfg.get("export", True) and module.prefix_encoder is not None:
            write_export(
                module,
                output_dir(cfg) / "export",
                config_yaml=(output_dir(cfg) / "config.yaml").read_text(encoding="utf-8"),
                metrics=metrics,
                command=" ".join(["python -m ptuning_pl.train", *HydraConfig.get().overrides.task])
                if HydraConfig.initialized()
                else None,
            )
    return metrics


def launches_processes(cfg: DictConfig) -> bool:
    """True when Lightning would re-run the command line for each rank (subprocess DDP on several devices)."""
    trainer = cfg.trainer
    strategy = trainer.get("strategy")
    if strategy is None or isinstance(strategy, str) and not strategy.startswith("ddp"):
        return False
    if isinstance(strategy, str):
        spawned = "spawn" in strategy
    else:
        spawned = strategy.get("start_method", "popen") != "popen"
    devices = trainer.get("devices", 1)
    several = (isinstance(devices, int) and devices > 1) or devices in ("auto", -1) or trainer.get("num_nodes", 1) > 1
    return several and not spawned


def train_in_subprocess(cfg: DictConfig) -> dict[str, float]:
    """Run this sweep point as its own `python -m ptuning_pl.train` in RUN mode, into the point's folder.

    Lightning's DDP launcher starts each rank by re-running the command line. Inside a sweep that command line
    is the whole sweep, so each rank would start the sweep again. A fresh process per point with only this
    point's overrides avoids that, and also isolates every point's global state.
    """
    import subprocess

    hydra_config = HydraConfig.get()
    run_dir = Path(hydra_config.runtime.output_dir)
    command = [
        sys.executable,
        "-m",
        "ptuning_pl.train",
        *hydra_config.overrides.task,
        f"hydra.run.dir={run_dir}",
        f"hydra.job.name={hydra_config.job.name}",
    ]
    log.info("sweep point with a multi-process trainer: running %s", " ".join(command))
    result = subprocess.run(command, cwd=hydra_config.runtime.cwd)
    if result.returncode != 0:
        raise RuntimeError(f"sweep point {run_dir} failed with exit code {result.returncode}; see its log there")
    return json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))


@hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    try:
        if HydraConfig.get().mode.name == "MULTIRUN" and launches_processes(cfg):
            metrics = train_in_subprocess(cfg)
        else:
            metrics = train(cfg)
    except (ConfigError, DataFilesError) as error:
        log.error("%s", error)
        if HydraConfig.get().mode.name == "RUN":
            sys.exit(2)
        raise
    except Exception:
        # Into this job's own log file, so a failed sweep point keeps its traceback beside its outputs.
        log.exception("training failed")
        raise
    finally:
        # Release the model and cached memory before the next sweep point runs in this process.
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    metric_name = cfg.get("optimized_metric")
    return metrics.get(metric_name) if metric_name else None


if __name__ == "__main__":
    main()
