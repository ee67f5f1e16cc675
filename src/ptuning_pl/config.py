"""Locating the config tree, OmegaConf resolvers, and checking a composed config before anything heavy runs."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ptuning_pl.backbones import DTYPES, FAMILIES


def config_dir() -> Path:
    """Return the `conf/` tree: inside the installed package (wheel), else at the top of the source checkout."""
    packaged = Path(__file__).resolve().parent / "conf"
    if packaged.is_dir():
        return packaged
    checkout = Path(__file__).resolve().parents[2] / "conf"
    if checkout.is_dir():
        return checkout
    raise FileNotFoundError(f"config tree not found at {packaged} or {checkout}; reinstall ptuning-pl")


def _sample_data(name: str) -> str:
    from ptuning_pl.sample_data import sample_data_dir

    return str(sample_data_dir() / name)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("sample_data"):
        OmegaConf.register_new_resolver("sample_data", _sample_data)


register_resolvers()


class ConfigError(ValueError):
    """One or more invalid config values; the message lists every problem and its fix."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {problem}" for problem in self.problems)
        super().__init__(f"invalid configuration ({len(self.problems)} problem(s)):\n{lines}")


def looks_local(path: str) -> bool:
    """True for a filesystem path; a hub id is exactly `owner/name`."""
    return path.startswith((".", "/", "~")) or path.count("/") != 1


def missing_keys(cfg: DictConfig) -> list[str]:
    """Dotted keys whose value is `???`, found without resolving interpolations (which would fail on them)."""
    found: list[str] = []

    def walk(node, prefix: str) -> None:
        if isinstance(node, dict):
            items = node.items()
        elif isinstance(node, list):
            items = enumerate(node)
        else:
            return
        for key, value in items:
            dotted = f"{prefix}{key}"
            if value == "???":
                found.append(dotted)
            else:
                walk(value, dotted + ".")

    plain = OmegaConf.to_container(cfg, resolve=False)
    walk({key: value for key, value in plain.items() if key != "hydra"}, "")
    return found


def _get(cfg: DictConfig, key: str, problems: list[str]):
    try:
        return OmegaConf.select(cfg, key, throw_on_missing=True)
    except OmegaConfBaseException as error:
        message = str(error).splitlines()[0]
        if "Missing mandatory value" not in message:  # already listed by the missing-keys pass
            problems.append(f"{key}: {message}")
        return None


def _check_int(cfg, key, problems, minimum: int) -> int | None:
    value = _get(cfg, key, problems)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        problems.append(f"{key}={value!r} is invalid: expected an integer >= {minimum}")
        return None
    return value


def check_config(cfg: DictConfig) -> None:
    """Raise ConfigError listing every invalid value of a training config; builds nothing."""
    problems: list[str] = []
    training = bool(cfg.get("train", True))

    for key in missing_keys(cfg):
        problems.append(f"{key} is required but not set: give it on the command line, e.g. {key}=...")

    family = _get(cfg, "model.family", problems)
    if family is not None and family not in FAMILIES:
        problems.append(f"model.family={family!r} is unknown: expected one of {', '.join(FAMILIES)}")

    path = _get(cfg, "model.path", problems)
    if path is None and not OmegaConf.select(cfg, "model.tiny"):
        problems.append("model.path is not set: give a hub id or a local folder, e.g. model.path=THUDM/glm-4-9b-chat-hf")

    if OmegaConf.select(cfg, "model.tiny") and family not in (None, "hf"):
        problems.append(
            f"model.family={family} cannot use model.tiny, which builds a transformers GLM: "
            "set model.family=hf, or choose a model config such as model=chatglm_6b with model.path=..."
        )
    if isinstance(path, str) and looks_local(path) and not Path(path).expanduser().exists():
        problems.append(f"model.path={path} does not exist: give an existing folder or a hub id such as owner/name")

    dtype = _get(cfg, "model.dtype", problems)
    if dtype is not None and str(dtype).lower() not in DTYPES:
        problems.append(f"model.dtype={dtype!r} is unknown: expected one of {', '.join(sorted(DTYPES))}")

    quantization_bit = OmegaConf.select(cfg, "model.quantization_bit")
    if quantization_bit not in (None, 4, 8):
        problems.append(f"model.quantization_bit={quantization_bit!r} is invalid: expected 4, 8 or null")

    prompt_format = _get(cfg, "model.prompt_format", problems)
    if prompt_format not in (None, "auto", "chat_template", "plain"):
        problems.append(f"model.prompt_format={prompt_format!r} is unknown: expected auto, chat_template or plain")

    pre_seq_len = _check_int(cfg, "model.prefix.pre_seq_len", problems, minimum=0)
    if pre_seq_len == 0 and training:
        problems.append(
            "model.prefix.pre_seq_len=0 leaves nothing to train: use a positive length (the reference uses 128); "
            "0 is only for evaluating the untuned backbone (train=false)"
        )
    hidden = _get(cfg, "model.prefix.prefix_hidden_size", problems)
    if hidden is not None and (not isinstance(hidden, int) or hidden <= 0):
        problems.append(f"model.prefix.prefix_hidden_size={hidden!r} is invalid: expected a positive integer or null")
    dropout = _get(cfg, "model.prefix.dropout", problems)
    if dropout is not None and not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
        problems.append(f"model.prefix.dropout={dropout!r} is invalid: expected a number in [0, 1)")

    _check_int(cfg, "data.max_source_length", problems, minimum=1)
    _check_int(cfg, "data.max_target_length", problems, minimum=2)
    _check_int(cfg, "data.batch_size", problems, minimum=1)
    _check_int(cfg, "data.num_workers", problems, minimum=0)
    eval_batch = _get(cfg, "data.eval_batch_size", problems)
    if eval_batch is not None and (not isinstance(eval_batch, int) or eval_batch < 1):
        problems.append(f"data.eval_batch_size={eval_batch!r} is invalid: expected a positive integer or null")

    files = {key: _get(cfg, f"data.{key}", problems) for key in ("train_file", "validation_file", "test_file")}
    if training and not files["train_file"]:
        problems.append("data.train_file is not set: give a JSON lines or JSON array file of prompt/response records")
    split = _get(cfg, "data.split", problems)
    if files["train_file"] and not files["validation_file"] and not files["test_file"]:
        if split is None or len(split) != 3 or any(not isinstance(x, (int, float)) or x < 0 for x in split):
            problems.append(f"data.split={split!r} is invalid: expected three fractions [train, validation, test]")
        elif split[0] <= 0:
            problems.append(f"data.split={list(split)!r} leaves no training records: make the first fraction positive")

    lr = _get(cfg, "optim.lr", problems)
    if lr is not None and not (isinstance(lr, (int, float)) and lr > 0):
        problems.append(f"optim.lr={lr!r} is invalid: expected a positive number such as 2e-2")
    weight_decay = _get(cfg, "optim.weight_decay", problems)
    if weight_decay is not None and not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
        problems.append(f"optim.weight_decay={weight_decay!r} is invalid: expected a number >= 0")
    _check_int(cfg, "optim.warmup_steps", problems, minimum=0)

    max_steps = _get(cfg, "trainer.max_steps", problems)
    if training and (not isinstance(max_steps, int) or (max_steps <= 0 and max_steps != -1)):
        problems.append(f"trainer.max_steps={max_steps!r} is invalid: expected a positive number of optimizer steps")
    precision = str(_get(cfg, "trainer.precision", problems))
    if precision.endswith("-true") and precision not in ("32-true", "64-true"):
        problems.append(
            f"trainer.precision={precision} would cast the prefix to low precision: use 32-true or a *-mixed "
            "mode, and set the backbone's dtype with model.dtype"
        )
    _check_int(cfg, "trainer.accumulate_grad_batches", problems, minimum=1)
    accelerator = str(_get(cfg, "trainer.accelerator", problems))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        problems.append(
            f"trainer.accelerator={accelerator} but no CUDA device is visible: use trainer=cpu, or check the "
            "driver and CUDA_VISIBLE_DEVICES"
        )

    ckpt_path = _get(cfg, "ckpt_path", problems)
    if ckpt_path not in (None, "last") and not Path(str(ckpt_path)).is_file():
        problems.append(f"ckpt_path={ckpt_path} is not a file: give a .ckpt path, or ckpt_path=last to resume this run")

    if problems:
        raise ConfigError(problems)
