"""Hydra composition of every config group, and config checks that run before anything is built."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import compose_config
from ptuning_pl.config import ConfigError, check_config, config_dir
from ptuning_pl.data import AdgenDataModule
from ptuning_pl.train import DataFilesError, train, validate_data_files

EXPERIMENTS = sorted(path.stem for path in (config_dir() / "experiment").glob("*.yaml"))
# FSDP needs a GPU in Lightning 2.6; it has its own composition test below.
TRAINERS = sorted(path.stem for path in (config_dir() / "trainer").glob("*.yaml") if path.stem != "fsdp")


def test_config_dir_is_the_top_level_conf():
    assert config_dir() == Path(__file__).resolve().parents[1] / "conf"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiments_compose(tmp_path, experiment):
    overrides = [f"experiment={experiment}"]
    if experiment == "adgen":
        overrides.append(f"data.dir={tmp_path}")
    cfg = compose_config(tmp_path, overrides)
    assert OmegaConf.select(cfg, "model.prefix.pre_seq_len") > 0
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"


@pytest.mark.parametrize("trainer", TRAINERS)
def test_trainer_configs_instantiate(tmp_path, trainer):
    cfg = compose_config(tmp_path, [f"trainer={trainer}", "trainer.accelerator=cpu"])
    built = instantiate(cfg.trainer, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    expected_devices = {"ddp": 2, "ddp_spawn": 2, "ddp_multinode": 8}.get(trainer, 1)
    assert built.num_devices == expected_devices
    assert built.num_nodes == (2 if trainer == "ddp_multinode" else 1)


def test_fsdp_config_composes(tmp_path):
    from lightning.pytorch.strategies import FSDPStrategy

    from ptuning_pl.chatglm.modeling_v1 import ChatGLM6BBlock
    from transformers.models.glm.modeling_glm import GlmDecoderLayer

    cfg = compose_config(tmp_path, ["trainer=fsdp"])
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    assert cfg.trainer.accelerator == "gpu"
    policy = instantiate(cfg.trainer.strategy.auto_wrap_policy)
    assert policy == {GlmDecoderLayer, ChatGLM6BBlock}


def test_adgen_experiment_matches_reference_recipe(tmp_path):
    cfg = compose_config(tmp_path, ["experiment=adgen", "data.dir=/data/AdvertiseGen"])
    assert cfg.model.prefix.pre_seq_len == 128
    assert cfg.model.prefix.prefix_projection is False
    assert cfg.optim.lr == 2e-2
    assert cfg.optim.warmup_steps == 0
    assert cfg.trainer.max_steps == 3000
    assert cfg.data.batch_size * cfg.trainer.accumulate_grad_batches == 16
    assert (cfg.data.max_source_length, cfg.data.max_target_length) == (64, 64)
    assert cfg.seed == 42
    assert cfg.data.train_file == "/data/AdvertiseGen/train.json"
    assert cfg.data.validation_file == "/data/AdvertiseGen/dev.json"
    assert cfg.model.family == "chatglm"
    assert cfg.model.path == "THUDM/chatglm-6b"
    assert cfg.model.dtype == "float16"
    assert cfg.trainer.precision == "32-true"


def test_adgen_experiment_without_data_dir_is_reported(tmp_path):
    cfg = compose_config(tmp_path, ["experiment=adgen"])
    with pytest.raises(ConfigError, match="data.dir"):
        check_config(cfg)


@pytest.mark.slow
def test_adgen_experiment_runs_with_tiny_backbone(tmp_path):
    """The reference recipe cannot load 9B weights here; with the tiny backbone substituted it trains."""
    from ptuning_pl.sample_data import sample_data_dir

    data_dir = tmp_path / "adgen"
    data_dir.mkdir()
    for name in ("train.json", "dev.json"):
        (data_dir / name).write_bytes((sample_data_dir() / name).read_bytes())
    cfg = compose_config(
        tmp_path / "run",
        [
            "experiment=adgen",
            f"data.dir={data_dir}",
            "model=tiny_glm",
            "model.prefix.pre_seq_len=128",
            "trainer=cpu",
            "trainer.precision=32-true",
            "trainer.max_steps=3",
            "trainer.val_check_interval=3",
            "+trainer.limit_val_batches=1",
            "+trainer.limit_test_batches=1",
            "callbacks.progress_bar=null",
        ],
    )
    metrics = train(cfg)
    assert {"train/loss", "val/loss", "test/loss"} <= set(metrics)


def test_config_errors_are_reported_together(tmp_path):
    cfg = compose_config(
        tmp_path,
        [
            "model.prefix.pre_seq_len=0",
            "data.max_source_length=-3",
            "model.family=llama-ish",
            "optim.lr=0",
            "trainer.precision=bf16-true",
            "model.dtype=int3",
        ],
    )
    with pytest.raises(ConfigError) as caught:
        check_config(cfg)
    problems = caught.value.problems
    # Six bad values; the unknown family also cannot use the tiny backbone of the default model config.
    assert len(problems) == 7
    message = str(caught.value)
    assert "model.prefix.pre_seq_len=0 leaves nothing to train" in message
    assert "data.max_source_length=-3 is invalid" in message
    assert "model.family='llama-ish' is unknown" in message
    assert "optim.lr=0 is invalid" in message
    assert "trainer.precision=bf16-true" in message
    assert "model.dtype='int3' is unknown" in message
    assert "model.family=llama-ish cannot use model.tiny" in message


def test_unusable_paths_and_devices_reported(tmp_path):
    cfg = compose_config(
        tmp_path,
        ["model=hf", f"model.path={tmp_path / 'missing-model'}", f"ckpt_path={tmp_path / 'x.ckpt'}", "trainer=gpu"],
    )
    with pytest.raises(ConfigError) as caught:
        check_config(cfg)
    message = str(caught.value)
    assert f"model.path={tmp_path / 'missing-model'} does not exist" in message
    assert f"ckpt_path={tmp_path / 'x.ckpt'} is not a file" in message
    if not torch.cuda.is_available():
        assert "trainer.accelerator=gpu but no CUDA device is visible" in message


def test_prompt_budget_too_small_is_a_config_error(make_config):
    cfg = make_config(["experiment=adgen_tiny", "data.max_source_length=3"])
    with pytest.raises(ConfigError, match="raise data.max_source_length"):
        train(cfg)
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()


def test_pre_seq_len_zero_is_valid_for_evaluation(tmp_path):
    cfg = compose_config(tmp_path, ["model.prefix.pre_seq_len=0", "train=false", "test=true"])
    check_config(cfg)


def test_negative_pre_seq_len_rejected(tmp_path):
    cfg = compose_config(tmp_path, ["model.prefix.pre_seq_len=-1"])
    with pytest.raises(
        ConfigError, match=r"model.prefix.pre_seq_len=-1 is invalid: expected an integer >= 0"
    ):
        check_config(cfg)


def test_every_bad_data_file_reported_before_model(tmp_path):
    train_file = tmp_path / "train.json"
    train_file.write_text('{"content": "a", "summary": "b"}\n{"content": "a"}\n', encoding="utf-8")
    validation_file = tmp_path / "dev.json"
    validation_file.write_text('{"content": "a", "summary": "b"}\nnot json\n', encoding="utf-8")
    cfg = compose_config(
        tmp_path / "run",
        [f"data.train_file={train_file}", f"data.validation_file={validation_file}", "data.test_file=null"],
    )
    with pytest.raises(DataFilesError) as caught:
        validate_data_files(cfg)
    message = str(caught.value)
    assert f"{train_file}, line 2" in message
    assert "data.response_column" in message
    assert f"{validation_file}, line 2" in message
    assert len(caught.value.errors) == 2
    # Nothing was built: no backbone folder in the run directory.
    assert not (tmp_path / "run" / "backbone").exists()


def test_data_module_instantiates_from_config(tmp_path):
    cfg = compose_config(tmp_path, ["experiment=adgen_tiny"])
    datamodule = instantiate(cfg.data)
    assert isinstance(datamodule, AdgenDataModule)
    records = datamodule.load_records()
    assert {name: len(records[name]) for name in records} == {"train": 400, "validation": 40, "test": 40}
