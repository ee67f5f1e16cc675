"""INT8 and INT4 quantization of the frozen backbone with bitsandbytes, on the ChatGLM2/ChatGLM3 fixtures.

The fixture models have 2 layers of hidden size 64 with random N(0, 1/fan_in) weights, and their logits
average about 1.6 in absolute value. The tolerances against the fp32 logits at real tokens were measured with
bitsandbytes 0.50.2 on CPU and set with margin:

- INT8: relative L2 error at most 0.03 (measured 0.01), max error 0.25 (measured 0.12).
- INT4 (NF4): relative L2 error at most 0.35 (measured 0.21).

Against a full-precision model with the dequantized weights, the logits agree within 1e-4.
"""

from __future__ import annotations

import copy
import sys

import pytest
import safetensors.torch
import torch
from torch import nn

from ptuning_pl.backbones.chatglm2 import load_chatglm2_backbone
from ptuning_pl.quantization import import_bitsandbytes, quantize_backbone, quantize_linear_layers
from test_chatglm2_model import fixture_dir, make_prefix_encoder, shifted_loss, train_forward

# bitsandbytes 0.50.2 calls torch.compile at import, which imports torch.utils.mkldnn, and torch 2.13 reports
# that module's TorchScript decorator as deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

BITS = (8, 4)
DEQUANTIZED_TOLERANCE = 1e-4
INT8_RELATIVE_ERROR = 0.03
INT8_MAX_ERROR = 0.25
INT8_TOP1_AGREEMENT = 0.9
INT4_RELATIVE_ERROR = 0.35
# q, k, v, o, gate_up and down projections of the 2 decoder layers.
QUANTIZED_LAYER_COUNT = 12


@pytest.fixture(scope="module")
def bitsandbytes():
    # import_bitsandbytes keeps bitsandbytes' kernel lookup on the Hub offline; a plain import would not.
    try:
        return import_bitsandbytes()
    except ImportError:
        pytest.skip("bitsandbytes is not installed (pip install 'ptuning-pl[quantization]')")


@pytest.fixture(scope="module", params=["v2", "v3"])
def version(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def goldens(version) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(fixture_dir(version) / "goldens.safetensors"))


def dequantized_copy(bitsandbytes, model: nn.Module) -> nn.Module:
    """Return a copy of a quantized model with its bitsandbytes layers as `nn.Linear` of the same weights."""
    copied = copy.deepcopy(model)
    for name, module in list(copied.named_modules()):
        if isinstance(module, bitsandbytes.nn.Linear8bitLt):
            # Int8 rows times their absmax scale over 127.
            weight = module.weight.data.float() * module.weight.SCB.float()[:, None] / 127
        elif isinstance(module, bitsandbytes.nn.Linear4bit):
            weight = bitsandbytes.functional.dequantize_4bit(
                module.weight.data, module.weight.quant_state
            ).float()
        else:
            continue
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
        parent_name, _, child_name = name.rpartition(".")
        setattr(copied.get_submodule(parent_name), child_name, linear)
    return copied


@pytest.mark.parametrize("bits", BITS)
def test_linear_layers_replaced(bitsandbytes, bits):
    backbone = load_chatglm2_backbone(fixture_dir("v2"))
    names = quantize_linear_layers(backbone.model, bits)

    assert "model.layers.0.self_attn.q_proj" in names
    if bits == 8:
        assert len(names) == QUANTIZED_LAYER_COUNT
        assert "model.layers.1.mlp.down_proj" in names
    else:
        # down_proj reads the 160-wide MLP activation, not a multiple of NF4's 64-block: it stays unquantized.
        assert len(names) == QUANTIZED_LAYER_COUNT - 2
        assert "model.layers.1.mlp.down_proj" not in names
        assert type(backbone.model.get_submodule("model.layers.1.mlp.down_proj")) is nn.Linear
    assert type(backbone.model.lm_head) is nn.Linear
    quantized_class = bitsandbytes.nn.Linear8bitLt if bits == 8 else bitsandbytes.nn.Linear4bit
    storage_dtype = torch.int8 if bits == 8 else torch.uint8
    for name in names:
        layer = backbone.model.get_submodule(name)
        assert isinstance(layer, quantized_class), name
        assert layer.weight.dtype == storage_dtype, name
    assert backbone.model.model.layers[0].self_attn.q_proj.bias is not None
    assert backbone.compute_dtype == torch.float32


@pytest.mark.parametrize("bits", BITS)
def test_quantized_logits_close(bitsandbytes, version, goldens, bits):
    backbone = load_chatglm2_backbone(fixture_dir(version))
    encoder = make_prefix_encoder(version, backbone, "prefix_proj")
    real = goldens["train.attention_mask"].bool()
    with torch.no_grad():
        expected, _ = train_forward(backbone, goldens, encoder(2))
        quantize_backbone(backbone, bits, device="cpu")
        dequantized = type(backbone)(dequantized_copy(bitsandbytes, backbone.model))
        logits, _ = train_forward(backbone, goldens, encoder(2))
        reference, _ = train_forward(dequantized, goldens, encoder(2))

    # The quantized layers compute with exactly their dequantized weights.
    assert (logits - reference)[real].abs().max() < DEQUANTIZED_TOLERANCE

    error = (logits - expected)[real]
    relative_error = error.norm() / expected[real].norm()
    if bits == 8:
        assert relative_error < INT8_RELATIVE_ERROR
        assert error.abs().max() < INT8_MAX_ERROR
        agreement = (logits.argmax(-1) == expected.argmax(-1))[real].float().mean()
        assert agreement >= INT8_TOP1_AGREEMENT
    else:
        assert relative_error < INT4_RELATIVE_ERROR
    # Quantization changes the logits: the comparison above is not between identical models.
    assert error.abs().max() > 0


@pytest.mark.parametrize("bits", BITS)
def test_prefix_trains_on_quantized_backbone(bitsandbytes, version, goldens, bits):
    backbone = quantize_backbone(load_chatglm2_backbone(fixture_dir(version)), bits)
    encoder = make_prefix_encoder(version, backbone, "prefix_proj")
    encoder.train()
    encoder.dropout.p = 0.0
    optimizer = torch.optim.Adam(encoder.parameters(), lr=1e-2)
    assert all(parameter.dtype == torch.float32 for parameter in encoder.parameters())

    losses = []
    for step in range(5):
        optimizer.zero_grad()
        logits, _ = train_forward(backbone, goldens, encoder(2))
        loss = shifted_loss(logits, goldens["train.labels"])
        loss.backward()
        if step == 0:
            for name, parameter in encoder.named_parameters():
                assert torch.isfinite(parameter.grad).all(), name
                assert parameter.grad.abs().sum() > 0, name
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert not any(parameter.requires_grad for parameter in backbone.model.parameters())


@pytest.mark.parametrize("bits", BITS)
def test_gradient_checkpointing_on_quantized_backbone(bitsandbytes, version, goldens, bits):
    backbone = quantize_backbone(load_chatglm2_backbone(fixture_dir(version)), bits)
    encoder = make_prefix_encoder(version, backbone, "prefix")

    def embedding_gradient():
        encoder.zero_grad()
        logits, _ = train_forward(backbone, goldens, encoder(2))
        shifted_loss(logits, goldens["train.labels"]).backward()
        return encoder.embedding.weight.grad.clone()

    expected = embedding_gradient()
    backbone.enable_gradient_checkpointing()
    torch.testing.assert_close(embedding_gradient(), expected, rtol=1e-5, atol=1e-7)


def test_unsupported_bits_rejected(bitsandbytes):
    backbone = load_chatglm2_backbone(fixture_dir("v2"))
    with pytest.raises(ValueError, match=r"quantization_bit must be one of \(4, 8\) or null, got 3"):
        quantize_backbone(backbone, 3)
    assert quantize_backbone(backbone, None) is backbone
    assert type(backbone.model.model.layers[0].mlp.down_proj) is nn.Linear


def test_missing_library_named_in_error(monkeypatch):
    backbone = load_chatglm2_backbone(fixture_dir("v2"))
    # A None entry in sys.modules makes `import bitsandbytes` raise ImportError.
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match=r"ptuning-pl\[quantization\]"):
        quantize_backbone(backbone, 8)
