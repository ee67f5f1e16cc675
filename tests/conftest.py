"""Shared test helpers: Hydra composition of the real config tree, tiny backbones and shared fixture paths."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from ptuning_pl.config import config_dir

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """The shared data folder beside the repository (override with PTUNING_SHARED_DIR)."""
    return Path(os.environ.get("PTUNING_SHARED_DIR", REPO_ROOT.parent / "shared"))


ADGEN_DEV = shared_dir() / "data" / "adgen" / "dev.json"
FIXTURES = shared_dir() / "fixtures"

# Quiet, fast settings for runs inside tests.
FAST = [
    "callbacks.progress_bar=null",
    "trainer.log_every_n_steps=1",
    "trainer.enable_model_summary=false",
]


def compose_config(output_dir: Path, overrides: list[str] | None = None) -> DictConfig:
    """Compose conf/train.yaml as `python -m ptuning_pl.train` would, with the run directory `output_dir`."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[*(overrides or []), f"hydra.run.dir={output_dir}"],
            return_hydra_config=True,
        )
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


@pytest.fixture
def make_config(tmp_path):
    """Factory: make_config(overrides, name="run") composes a config whose run directory is tmp_path/name."""

    def factory(overrides: list[str] | None = None, name: str = "run") -> DictConfig:
        return compose_config(tmp_path / name, [*FAST, *(overrides or [])])

    yield factory
    GlobalHydra.instance().clear()


def run_cli(args: list[str], cwd: Path | None = None, timeout: float = 600, env: dict | None = None):
    """Run `python -m ptuning_pl.train ARGS` in a subprocess and return the CompletedProcess."""
    import subprocess

    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "ptuning_pl.train", *args],
        cwd=cwd or REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )
