"""Start-up checks of the library versions this package depends on in ways a user cannot see."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from packaging.version import Version

# transformers 5.24 renamed the forward argument `past_key_values` to `cache`; older 5.x releases accept
# `cache=` silently and drop it, so the prefix would vanish without an error.
TRANSFORMERS_RANGE = (Version("5.24"), Version("6"))

REPORTED_PACKAGES = (
    "ptuning-pl",
    "torch",
    "lightning",
    "transformers",
    "tokenizers",
    "hydra-core",
    "omegaconf",
    "torchmetrics",
    "huggingface-hub",
    "safetensors",
    "sentencepiece",
    "jieba",
    "wandb",
)


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that decide a run's numbers (absent ones omitted)."""
    found = {}
    for name in REPORTED_PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def check_transformers_version(installed: str | None = None) -> None:
    installed = installed or version("transformers")
    low, high = TRANSFORMERS_RANGE
    if not low <= Version(installed) < high:
        raise RuntimeError(
            f"transformers {installed} is not supported: ptuning-pl needs >={low},<{high} because older "
            "releases ignore the `cache` argument that carries the prefix. "
            f'Run: pip install "transformers>={low},<{high}"'
        )
