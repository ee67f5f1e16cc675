"""The small record each run leaves in its folder: resolved config, package versions, git commit, command."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ptuning_pl.versions import package_versions


def git_commit(directory: Path) -> dict[str, Any] | None:
    """Commit and dirty flag of the git checkout containing `directory`, or None outside a checkout."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(directory), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "-C", str(directory), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def write_run_record(cfg: DictConfig, output_dir: str | os.PathLike) -> Path:
    """Write `run_record.json` and the resolved `config.yaml` into `output_dir`; return the record's path."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # The `hydra` node exists only in configs composed with return_hydra_config (tests); Hydra saves it anyway.
    cfg = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
    resolved = OmegaConf.to_container(cfg, resolve=True)

    record = {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        # orig_argv keeps "-m ptuning_pl.train" where argv has the module's file path.
        "command": list(getattr(sys, "orig_argv", [sys.executable, *sys.argv])),
        "cwd": os.getcwd(),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "packages": package_versions(),
        "git": git_commit(Path(__file__).resolve().parent),
        "config": resolved,
    }
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved), encoding="utf-8")
    path = output_dir / "run_record.json"
    path.write_text(json.dumps(record, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    return path
