"""The export folder: a trained prefix that loads on its own, without the run that made it.

Layout (format version 1, safetensors and JSON only, no pickle):

- `prefix.safetensors`: the prefix weights in their trainable form (`embedding.weight`, and `trans.*` with
  the projection), fp32.
- `prefix_config.json`: format version, prefix settings, the backbone geometry they fit, the base model (id
  or path, revision, family, dtype), the prompt format, the tokenizer and the token budgets.
- `config.yaml`: the resolved Hydra config of the run, when there is one.
- `metrics.json`: the final metrics, when there are any.
- `README.md`: a model card.

`python -m ptuning_pl.export ckpt_path=RUN/checkpoints/last.ckpt output_dir=DIR` writes one from a checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ptuning_pl.files import make_user_readable
from ptuning_pl.module import PREFIX_MODULE, PrefixTuningModule

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS_FILE = "prefix.safetensors"
CONFIG_FILE = "prefix_config.json"
PREFIX_SETTINGS = ("pre_seq_len", "prefix_projection", "prefix_hidden_size")


class ExportError(ValueError):
    """An export folder is missing, malformed, or does not fit the requested settings or backbone."""


def describe_prefix(module: PrefixTuningModule) -> dict[str, Any]:
    """The JSON description of `module`'s prefix (the module must be built: configure_model())."""
    geometry = module.backbone.geometry
    encoder = module.prefix_encoder
    spec = asdict(module.spec)
    return {
        "format_version": FORMAT_VERSION,
        "pre_seq_len": module.pre_seq_len,
        "prefix_projection": bool(encoder.prefix_projection),
        "prefix_hidden_size": encoder.trans[0].out_features if encoder.trans is not None else None,
        "dropout": float(module.prefix_config.get("dropout", 0.1)),
        "prefix_family": module.backbone.prefix_family,
        "dtype": "float32",
        "num_layers": geometry.num_layers,
        "kv_heads": geometry.kv_heads,
        "head_dim": geometry.head_dim,
        "kv_width": geometry.kv_width,
        "hidden_size": geometry.hidden_size,
        "base_model": {key: spec[key] for key in ("path", "revision", "family", "dtype", "trust_remote_code")},
        "prompt_format": module.prompt_format.name,
        "model_prompt_format": spec["prompt_format"],
        "tokenizer": spec["path"],
        "evaluation": asdict(module.evaluation),
    }


def model_card(description: dict[str, Any], metrics: dict[str, float], command: str | None) -> str:
    base = description["base_model"]
    lines = [
        "---",
        "library_name: ptuning-pl",
        "tags: [p-tuning-v2, prefix-tuning, chatglm]",
        "---",
        "",
        "# P-Tuning v2 prefix",
        "",
        f"A P-Tuning v2 prefix for `{base['path']}`"
        + (f" (revision `{base['revision']}`)" if base.get("revision") else "")
        + f", trained with ptuning-pl. The backbone stays frozen; this folder contains only the prefix.",
        "",
        "| setting | value |",
        "|---|---|",
        f"| base model | `{base['path']}` ({base['family']}, {base['dtype']}) |",
        f"| pre_seq_len | {description['pre_seq_len']} |",
        f"| prefix_projection | {str(description['prefix_projection']).lower()} |",
        f"| layers x kv width | {description['num_layers']} x {description['kv_width']} |",
        f"| prompt format | {description['prompt_format']} |",
        "",
    ]
    if command:
        lines += ["Trained with:", "", "```bash", command, "```", ""]
    if metrics:
        lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {value:.4f} |" for name, value in sorted(metrics.items())]
        lines.append("")
    lines += [
        "## Use",
        "",
        "```bash",
        "python -m ptuning_pl.predict export_dir=THIS_FOLDER data.test_file=test.json",
        "python -m ptuning_pl.chat export_dir=THIS_FOLDER",
        "```",
        "",
        "```python",
        "from ptuning_pl.inference import PrefixModel",
        'model = PrefixModel.from_export("THIS_FOLDER")',
        'print(model.generate(["类型#上衣*颜色#白色"]))',
        "```",
        "",
    ]
    return "\n".join(lines)


def write_export(
    module: PrefixTuningModule,
    output_dir: str | os.PathLike,
    config_yaml: str | None = None,
    metrics: dict[str, float] | None = None,
    command: str | None = None,
) -> Path:
    """Write the export folder of `module`'s prefix to `output_dir`, atomically; return the folder."""
    if module.prefix_encoder is None:
        raise ExportError("nothing to export: the module has no prefix (pre_seq_len is 0)")
    output_dir = Path(output_dir)
    description = describe_prefix(module)
    weights = {
        name.removeprefix(PREFIX_MODULE + "."): tensor.detach().to("cpu", torch.float32).contiguous()
        for name, tensor in module.prefix_state_dict().items()
    }

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}-", dir=output_dir.parent))
    try:
        save_file(weights, staging / WEIGHTS_FILE, metadata={"format": "pt", "ptuning_pl_format": str(FORMAT_VERSION)})
        (staging / CONFIG_FILE).write_text(json.dumps(description, indent=2, ensure_ascii=False) + "\n", "utf-8")
        if config_yaml:
            (staging / "config.yaml").write_text(config_yaml, encoding="utf-8")
        if metrics:
            (staging / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n", "utf-8")
        (staging / "README.md").write_text(model_card(description, metrics or {}, command), encoding="utf-8")

        make_user_readable(staging)

        # Replace an older export only once the new one is complete.
        if output_dir.exists():
            retired = output_dir.with_name(f".{output_dir.name}-old")
            shutil.rmtree(retired, ignore_errors=True)
            output_dir.rename(retired)
            staging.rename(output_dir)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    size = sum(path.stat().st_size for path in output_dir.iterdir() if path.is_file())
    log.info("exported the prefix to %s (%.1f KB)", output_dir, size / 1024)
    return output_dir


def read_export(export_dir: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Return (description, prefix weights) of an export folder, checking its format."""
    folder = Path(export_dir)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not folder.is_dir():
        raise ExportError(f"export folder {folder} does not exist")
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ExportError(f"{path} is missing: {folder} is not a ptuning-pl export folder")
    try:
        description = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ExportError(f"{config_path} is not valid JSON ({error}); export the prefix again") from None
    version = description.get("format_version")
    if version != FORMAT_VERSION:
        raise ExportError(
            f"{config_path} has format_version {version!r}; this ptuning-pl reads version {FORMAT_VERSION}"
        )
    return description, load_file(weights_path)


def resolve_settings(description: dict[str, Any], requested: dict[str, Any] | None) -> dict[str, Any]:
    """Return the prefix settings of an export; raise ExportError when a requested value differs from them."""
    recorded = {key: description[key] for key in PREFIX_SETTINGS}
    conflicts = [
        f"{key}: the export has {recorded[key]!r} but {value!r} was requested"
        for key, value in (requested or {}).items()
        if key in recorded and value is not None and value != recorded[key]
    ]
    if conflicts:
        raise ExportError(
            "requested prefix settings conflict with the export (remove them to use the recorded ones): "
            + "; ".join(conflicts)
        )
    return {**recorded, "dropout": description.get("dropout", 0.1)}


def module_from_export(
    export_dir: str | os.PathLike,
    prefix_overrides: dict[str, Any] | None = None,
    backbone_overrides: dict[str, Any] | None = None,
    evaluation: dict[str, Any] | None = None,
) -> PrefixTuningModule:
    """Build the module of an export with its recorded settings and load its prefix strictly.

    The backbone is loaded here. A backbone of a different layer count or kv width, and a weight file with
    missing, unexpected or misshapen keys, raise ExportError.
    """
    description, weights = read_export(export_dir)
    prefix = resolve_settings(description, prefix_overrides)
    backbone = {
        **description["base_model"],
        "prompt_format": description.get("model_prompt_format", "auto"),
        **(backbone_overrides or {}),
    }
    module = PrefixTuningModule(
        backbone=backbone,
        prefix=prefix,
        optim={},
        evaluation={**description.get("evaluation", {}), **(evaluation or {})},
    )
    module.configure_model()

    geometry = module.backbone.geometry
    expected = {key: description[key] for key in ("num_layers", "kv_heads", "head_dim")}
    actual = {"num_layers": geometry.num_layers, "kv_heads": geometry.kv_heads, "head_dim": geometry.head_dim}
    if expected != actual:
        raise ExportError(
            f"the prefix in {export_dir} was trained for a backbone with {expected} but {backbone['path']} has "
            f"{actual}; load it with the base model it was trained on ({description['base_model']['path']})"
        )

    load_prefix_weights(module, weights, source=str(Path(export_dir) / WEIGHTS_FILE))
    return module


def load_prefix_weights(module: PrefixTuningModule, weights: dict[str, torch.Tensor], source: str) -> None:
    """Load prefix weights (keys without the `prefix_encoder.` prefix) strictly into `module`."""
    expected = module.prefix_encoder.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    for name in sorted(set(expected) & set(weights)):
        if weights[name].shape != expected[name].shape:
            problems.append(f"{name} has shape {tuple(weights[name].shape)}, expected {tuple(expected[name].shape)}")
    if problems:
        raise ExportError(f"{source} does not match the prefix it describes: " + "; ".join(problems))
    module.prefix_encoder.load_state_dict(weights)


def checkpoint_hparams(checkpoint: dict[str, Any], ckpt_path: str | os.PathLike) -> dict[str, Any]:
    """Return the module hyperparameters of a training checkpoint; raise ExportError when they are missing."""
    hparams = checkpoint.get("hyper_parameters") or {}
    if "backbone" not in hparams or "prefix" not in hparams:
        raise ExportError(f"{ckpt_path} has no ptuning-pl hyperparameters: was it written by ptuning_pl.train?")
    return dict(hparams)


def module_from_checkpoint(ckpt_path: str | os.PathLike, model_path: str | None = None) -> PrefixTuningModule:
    """Build the module recorded in a training checkpoint and load its prefix strictly."""
    from ptuning_pl.module import check_prefix_state

    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    hparams = checkpoint_hparams(checkpoint, ckpt_path)
    backbone = dict(hparams["backbone"])
    if model_path:
        backbone["path"] = model_path
    module = PrefixTuningModule(
        backbone=backbone, prefix=hparams["prefix"], optim=hparams.get("optim", {}), evaluation=hparams.get("evaluation")
    )
    module.configure_model()
    state = checkpoint["state_dict"]
    check_prefix_state(state, module.prefix_state_dict(), source=str(ckpt_path))
    module.load_state_dict(state, strict=False)
    return module


def main(argv: list[str] | None = None) -> int:
    """`python -m ptuning_pl.export ckpt_path=RUN/checkpoints/X.ckpt output_dir=DIR [model_path=...]`."""
    import sys

    from ptuning_pl.cli_args import parse_key_values

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    options = parse_key_values(
        argv if argv is not None else sys.argv[1:],
        required=("ckpt_path", "output_dir"),
        optional={"model_path": None},
        usage=main.__doc__ or "",
    )
    ckpt_path = Path(options["ckpt_path"])
    if not ckpt_path.is_file():
        print(f"ckpt_path={ckpt_path} is not a file: give a .ckpt written by ptuning_pl.train", file=sys.stderr)
        return 2
    try:
        module = module_from_checkpoint(ckpt_path, options["model_path"])
    except ExportError as error:
        print(str(error), file=sys.stderr)
        return 2

    # A checkpoint inside a run folder (<run>/checkpoints/x.ckpt) brings the run's config and metrics along.
    run_dir = ckpt_path.resolve().parent.parent
    config_yaml = (run_dir / "config.yaml").read_text("utf-8") if (run_dir / "config.yaml").is_file() else None
    metrics = json.loads((run_dir / "metrics.json").read_text("utf-8")) if (run_dir / "metrics.json").is_file() else None
    write_export(module, options["output_dir"], config_yaml=config_yaml, metrics=metrics)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
