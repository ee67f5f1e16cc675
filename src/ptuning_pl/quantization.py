"""INT8 and INT4 quantization of a frozen backbone's weights, with bitsandbytes.

`quantize_backbone(backbone, bits)` replaces the backbone's `nn.Linear` layers in place:

- 8 bits: `bitsandbytes.nn.Linear8bitLt`, LLM.int8() with int8 weights per output row and the usual outlier
  threshold of 6.0, so input features with larger values run in the compute dtype.
- 4 bits: `bitsandbytes.nn.Linear4bit` with NF4 weights in blocks of 64, the QLoRA format.

The embeddings and the output layer stay in the compute dtype, as in ChatGLM2's own `quantize()`, which
replaces only the decoder layers' linear layers. Only frozen weights are stored quantized: the key/value cache
and the prefix keep their dtype, and the prefix encoder stays fp32. Gradients reach the prefix through the
quantized layers, whose backward uses the dequantized weights. Weights are quantized on the device they are
on, or on `device` when it is given.

bitsandbytes 0.50.2 runs both formats on CPU and CUDA. On CPU its INT8 layer multiplies by the dequantized
weights; on CUDA LLM.int8() also quantizes the activations (except the outlier features) to int8.

bitsandbytes 0.50.2, when first imported on a CPU with AVX512-BF16 and with the `kernels` package installed,
looks up a CPU kernel on the Hugging Face Hub. `import_bitsandbytes` imports it with the Hub in offline mode,
so it uses a cached kernel or its built-in CPU code and never reaches the network.

NOTE: quantize on the device that runs the model. Moving quantized layers later through a parent module's
`.to()` is untested: bitsandbytes keeps int8 scales beside the weight, and it repacks a 4-bit weight for the
CPU once the layer has run there in eval mode without gradients (on CPUs with AVX512-BF16).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from types import ModuleType

import huggingface_hub.constants
import torch
from torch import nn

from ptuning_pl.backbones.base import Backbone

logger = logging.getLogger(__name__)

QUANTIZATION_BITS = (4, 8)
#: Outlier threshold of LLM.int8(): input features with a larger absolute value skip int8.
INT8_OUTLIER_THRESHOLD = 6.0
INT4_QUANT_TYPE = "nf4"
INSTALL_HINT = "pip install 'ptuning-pl[quantization]' (bitsandbytes>=0.50)"


def import_bitsandbytes() -> ModuleType:
    """Import bitsandbytes with the Hub offline; raise ImportError with the install command when missing."""
    loaded = sys.modules.get("bitsandbytes")
    if loaded is not None:
        return loaded
    # TODO: drop the offline switch once bitsandbytes stops fetching kernels at import (seen in 0.50.2).
    offline = huggingface_hub.constants.HF_HUB_OFFLINE
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        import bitsandbytes
    except ImportError as error:
        raise ImportError(
            f"model.quantization_bit needs bitsandbytes; install it with {INSTALL_HINT}"
        ) from error
    finally:
        huggingface_hub.constants.HF_HUB_OFFLINE = offline
    return bitsandbytes


INT4_BLOCK_SIZE = 64


def _quantized_linear(bitsandbytes: ModuleType, linear: nn.Linear, bits: int) -> nn.Module:
    """Return a bitsandbytes copy of `linear`, quantized on the device of its weight."""
    weight = linear.weight.detach()
    has_bias = linear.bias is not None
    if bits == 8:
        quantized = bitsandbytes.nn.Linear8bitLt(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            has_fp16_weights=False,
            threshold=INT8_OUTLIER_THRESHOLD,
            device="meta",
        )
        quantized.weight = bitsandbytes.nn.Int8Params(
            weight.cpu(), requires_grad=False, has_fp16_weights=False
        )
    else:
        quantized = bitsandbytes.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            compute_dtype=weight.dtype,
            quant_type=INT4_QUANT_TYPE,
            device="meta",
        )
        quantized.weight = bitsandbytes.nn.Params4bit(
            weight.cpu(), requires_grad=False, quant_type=INT4_QUANT_TYPE
        )
    if has_bias:
        quantized.bias = nn.Parameter(linear.bias.detach().cpu(), requires_grad=False)
    # bitsandbytes quantizes an int8 weight on a move from the CPU (to any device, the CPU included) and a
    # 4-bit weight on its first move, so the weights start on the CPU and move to their device here.
    return quantized.to(weight.device)


def quantize_linear_layers(model: nn.Module, bits: int, skip: Iterable[str] = ()) -> list[str]:
    """Replace the `nn.Linear` layers of `model` with `bits`-bit bitsandbytes layers; return their names.

    Layers named in `skip`, and the output embeddings of a transformers model, keep their weights. Raises
    ValueError for `bits` other than 4 or 8, and ImportError when bitsandbytes is not installed.
    """
    if bits not in QUANTIZATION_BITS:
        raise ValueError(f"quantization_bit must be one of {QUANTIZATION_BITS} or null, got {bits!r}")
    bitsandbytes = import_bitsandbytes()

    skipped = set(skip)
    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name not in skipped and module is not output_embeddings
    ]
    if bits == 4:
        # NF4 quantizes the input dimension in blocks of 64; bitsandbytes 0.50.2's CPU kernel fails on a
        # partial block, so such layers (only in toy models) stay unquantized.
        partial = [name for name, module in targets if module.in_features % INT4_BLOCK_SIZE]
        if partial:
            logger.warning(
                "%d linear layers keep their weights: their input width is not a multiple of %d (%s)",
                len(partial),
                INT4_BLOCK_SIZE,
                ", ".join(partial[:4]),
            )
        targets = [(name, module) for name, module in targets if name not in partial]
    for name, linear in targets:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child_name, _quantized_linear(bitsandbytes, linear, bits))
    return [name for name, _ in targets]


def quantize_backbone(
    backbone: Backbone, bits: int | None, device: str | torch.device | None = None
) -> Backbone:
    """Quantize the linear layers of `backbone.model` in place to 4 or 8 `bits`; None leaves it unchanged.

    With `device`, the model moves there first, so the quantized weights are created on that device.
    """
    if bits is None:
        return backbone
    if device is not None:
        backbone.model.to(device)
    with torch.no_grad():
        names = quantize_linear_layers(backbone.model, bits)
    backbone.model.requires_grad_(False)
    logger.info("Quantized %d linear layers of the backbone to %d bits", len(names), bits)
    return backbone
