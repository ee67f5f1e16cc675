"""`python -m ptuning_pl.predict`: generate with a trained prefix for a test file and score the output.

Writes `<run_dir>/predictions/test_generated_predictions.jsonl` (id, prompt, prediction, reference, in input
order) and `<run_dir>/metrics.json` (`test/rouge-1`, ...). Records without a response get a prediction and no
score.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ptuning_pl.backbones import load_tokenizer_and_format
from ptuning_pl.export import ExportError, checkpoint_hparams, module_from_export, read_export
from ptuning_pl.inference import resolve_export_dir
from ptuning_pl.config import ConfigError, config_dir, missing_keys
from ptuning_pl.module import PrefixTuningModule
from ptuning_pl.records import DataFileSpec, validate_files
from ptuning_pl.run_record import write_run_record
from ptuning_pl.train import DataFilesError, output_dir, write_metrics
from ptuning_pl.versions import check_transformers_version

log = logging.getLogger("ptuning_pl.predict")


def evaluation_settings(cfg: DictConfig, recorded: dict[str, Any]) -> dict[str, Any]:
    """Return the recorded evaluation settings, overridden by every value set in cfg.evaluation and cfg.data."""
    settings = dict(recorded)
    for key, value in OmegaConf.to_container(cfg.evaluation, resolve=True).items():
        if value is not None:
            settings[key] = value
    for key in ("max_source_length", "max_target_length"):
        if cfg.data.get(key) is not None:
            settings[key] = cfg.data[key]
    if settings.get("max_new_tokens") is None:
        settings["max_new_tokens"] = settings.get("max_target_length") or 64
    return settings


def predict(cfg: DictConfig) -> dict[str, float]:
    """Generate for cfg.data.test_file with the prefix in cfg.ckpt_path; return the test metrics."""
    check_transformers_version()
    problems = [f"{key} is required but not set: give it on the command line, e.g. {key}=..." for key in missing_keys(cfg)]
    if not cfg.data.get("test_file"):
        problems.append("data.test_file is required: give the JSON lines or JSON array file to predict for")
    if bool(cfg.get("ckpt_path")) == bool(cfg.get("export_dir")):
        problems.append("set exactly one of ckpt_path=RUN/checkpoints/X.ckpt and export_dir=EXPORT_DIR")
    if cfg.get("ckpt_path") and not Path(cfg.ckpt_path).is_file():
        problems.append(f"ckpt_path={cfg.ckpt_path} is not a file: give a .ckpt written by ptuning_pl.train")
    if problems:
        raise ConfigError(problems)

    errors = validate_files(
        [
            DataFileSpec(
                path=cfg.data.test_file,
                split_name="test",
                prompt_column=cfg.data.prompt_column,
                response_column=cfg.data.response_column,
                history_column=cfg.data.history_column,
                messages_column=cfg.data.get("messages_column"),
                require_response=False,
            )
        ]
    )
    if errors:
        raise DataFilesError(errors)

    pl.seed_everything(cfg.seed, workers=True)
    backbone_overrides = {"path": cfg.model_path} if cfg.get("model_path") else {}
    if cfg.get("export_dir"):
        description, _ = read_export(resolve_export_dir(cfg.export_dir))
        evaluation = evaluation_settings(cfg, description.get("evaluation") or {})
        module = module_from_export(
            resolve_export_dir(cfg.export_dir),
            prefix_overrides=OmegaConf.to_container(cfg.prefix, resolve=True),
            backbone_overrides=backbone_overrides,
            evaluation=evaluation,
        )
        ckpt_path = None
    else:
        checkpoint = torch.load(cfg.ckpt_path, map_location="cpu", weights_only=True)
        hparams = checkpoint_hparams(checkpoint, cfg.ckpt_path)
        evaluation = evaluation_settings(cfg, hparams.get("evaluation") or {})
        backbone = {**hparams["backbone"], **backbone_overrides}
        module = PrefixTuningModule(backbone=backbone, prefix=hparams["prefix"], optim=hparams["optim"], evaluation=evaluation)
        ckpt_path = cfg.ckpt_path

    _, prompt_format = load_tokenizer_and_format(module.spec)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    data.update(
        max_source_length=evaluation["max_source_length"],
        max_target_length=evaluation["max_target_length"],
    )
    datamodule = instantiate(data, prompt_format=prompt_format, _convert_="partial")

    trainer: pl.Trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    write_run_record(cfg, output_dir(cfg))

    trainer.test(module, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    metrics.update(module.eval_metrics)
    if trainer.is_global_zero:
        write_metrics(metrics, output_dir(cfg))
    return metrics


@hydra.main(config_path=str(config_dir()), config_name="predict", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        predict(cfg)
    except (ConfigError, DataFilesError, ExportError, FileNotFoundError) as error:
        log.error("%s", error)
        if HydraConfig.get().mode.name == "RUN":
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
