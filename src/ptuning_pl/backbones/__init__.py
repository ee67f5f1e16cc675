"""Backbone loading: one entry point for every model family."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ptuning_pl.backbones.base import Backbone, KVGeometry, PromptFormat

#: Families that `load_backbone` knows; "hf" is any transformers causal LM (GLM-4 in native format first).
FAMILIES = ("hf", "chatglm", "chatglm2", "chatglm3")

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[str(name).lower()]
    except KeyError:
        raise ValueError(f"unknown model.dtype {name!r}; expected one of {sorted(DTYPES)}") from None


@dataclass(frozen=True)
class BackboneSpec:
    """Primitive description of a backbone; safe to store in hyperparameters and checkpoints."""

    path: str
    family: str = "hf"
    revision: str | None = None
    dtype: str = "float32"
    trust_remote_code: bool = False
    prompt_format: str = "auto"
    gradient_checkpointing: bool = False
    #: 4 or 8 quantizes the frozen backbone's linear layers with bitsandbytes; None keeps `dtype`.
    quantization_bit: int | None = None


def load_tokenizer_and_format(spec: BackboneSpec) -> tuple[PreTrainedTokenizerBase, PromptFormat]:
    """Load only the tokenizer and prompt format (cheap: the data module needs them before the model)."""
    if spec.family == "chatglm":
        from ptuning_pl.backbones.chatglm6b import load_chatglm6b_tokenizer_and_format

        return load_chatglm6b_tokenizer_and_format(spec.path, revision=spec.revision)
    if spec.family in ("chatglm2", "chatglm3"):
        from ptuning_pl.backbones.chatglm2 import load_chatglm2_tokenizer_and_format

        return load_chatglm2_tokenizer_and_format(spec.path, revision=spec.revision, family=spec.family)

    from ptuning_pl.prompts import build_prompt_format

    tokenizer = AutoTokenizer.from_pretrained(
        spec.path, revision=spec.revision, trust_remote_code=spec.trust_remote_code
    )
    return tokenizer, build_prompt_format(tokenizer, spec.prompt_format)


def load_backbone(spec: BackboneSpec, device: torch.device | str | None = None) -> Backbone:
    """Load the frozen network of `spec` (weights only; the tokenizer comes from load_tokenizer_and_format).

    A quantized backbone is quantized on `device`, where it must stay: bitsandbytes layers keep their scales
    beside the weights and are not moved afterwards.
    """
    dtype = parse_dtype(spec.dtype)
    if spec.family == "hf":
        from ptuning_pl.backbones.hf import load_hf_backbone

        backbone = load_hf_backbone(spec.path, spec.revision, dtype, spec.trust_remote_code)
    elif spec.family == "chatglm":
        from ptuning_pl.backbones.chatglm6b import load_chatglm6b_backbone

        backbone = load_chatglm6b_backbone(spec.path, revision=spec.revision, dtype=dtype)
    elif spec.family in ("chatglm2", "chatglm3"):
        from ptuning_pl.backbones.chatglm2 import load_chatglm2_backbone

        backbone = load_chatglm2_backbone(spec.path, revision=spec.revision, dtype=dtype)
    else:
        raise ValueError(f"unknown model.family {spec.family!r}; expected one of {FAMILIES}")

    if spec.quantization_bit is not None:
        from ptuning_pl.quantization import quantize_backbone

        quantize_backbone(backbone, spec.quantization_bit, device=device)
    if spec.gradient_checkpointing:
        backbone.enable_gradient_checkpointing()
    return backbone


__all__ = [
    "Backbone",
    "BackboneSpec",
    "FAMILIES",
    "KVGeometry",
    "PromptFormat",
    "load_backbone",
    "load_tokenizer_and_format",
    "parse_dtype",
]
