"""The wheel ships the config tree and the sample data, so an installed package runs from any directory."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest

from conftest import REPO_ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(REPO_ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        pytest.fail(f"pip wheel failed: {result.stderr[-2000:]}")
    (path,) = out.glob("ptuning_pl-*.whl")
    return path


def test_wheel_contains_conf_and_sample_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "ptuning_pl/conf/train.yaml" in names
    assert "ptuning_pl/conf/experiment/adgen_tiny.yaml" in names
    assert "ptuning_pl/sample_data/train.json" in names


def test_installed_wheel_composes_outside_checkout(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target), str(wheel)],
        check=True,
        timeout=600,
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run(
        [sys.executable, "-m", "ptuning_pl.train", "experiment=adgen_tiny", "--cfg", "job", "--resolve"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{target}/ptuning_pl/sample_data/train.json" in result.stdout
    assert "pre_seq_len: 16" in result.stdout
