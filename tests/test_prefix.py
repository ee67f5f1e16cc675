"""The prefix encoder's shapes and layout, and the prefix path through a transformers GLM."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import GlmConfig, GlmForCausalLM
from transformers.models.glm.modeling_glm import apply_rotary_pos_emb

from conftest import FIXTURES
from ptuning_pl.backbones.base import KVGeometry
from ptuning_pl.backbones.hf import HFBackbone
from ptuning_pl.prefix import PrefixEncoder

# Grouped-query attention: 4 query heads share 2 key/value heads of width 16.
GQA = KVGeometry(num_layers=3, kv_heads=2, head_dim=16, hidden_size=64)


@pytest.mark.parametrize("projection", [False, True])
def test_prefix_shapes_with_gqa(projection):
    encoder = PrefixEncoder(pre_seq_len=5, geometry=GQA, prefix_projection=projection).eval()
    kv = encoder(batch_size=3)

    assert len(kv) == GQA.num_layers
    for key, value in kv:
        assert key.shape == (3, GQA.kv_heads, 5, GQA.head_dim)
        assert value.shape == (3, GQA.kv_heads, 5, GQA.head_dim)
    # kv width is key/value heads x head_dim (32), not the hidden size (64); the ChatGLM2 layout embeds
    # num_layers * 2 * kv_width with and without projection.
    assert encoder.embedding.weight.shape == (5, GQA.num_layers * 2 * 32)


def test_prefix_parameter_counts():
    plain = PrefixEncoder(pre_seq_len=5, geometry=GQA)
    assert sum(p.numel() for p in plain.parameters()) == 5 * 3 * 2 * 32

    chatglm2 = PrefixEncoder(pre_seq_len=5, geometry=GQA, prefix_projection=True, family="chatglm2")
    output = 3 * 2 * 32
    # embedding (5 x output), Linear(output -> hidden 64), Linear(64 -> output)
    assert sum(p.numel() for p in chatglm2.parameters()) == 5 * output + output * 64 + 64 + 64 * output + output

    chatglm = PrefixEncoder(pre_seq_len=5, geometry=GQA, prefix_projection=True, family="chatglm", prefix_hidden_size=40)
    assert chatglm.embedding.weight.shape == (5, 64)
    assert chatglm.trans[0].weight.shape == (40, 64)
    assert chatglm.trans[2].weight.shape == (output, 40)


def test_prefix_layer_slices():
    """Layer i's keys are slice 2i of the encoder output and its values slice 2i + 1."""
    encoder = PrefixEncoder(pre_seq_len=2, geometry=GQA).eval()
    with torch.no_grad():
        encoder.embedding.weight.copy_(torch.arange(encoder.embedding.weight.numel()).view(2, -1).float())
    kv = encoder(batch_size=1)
    width = GQA.kv_width
    row = encoder.embedding.weight[1]
    for layer, (key, value) in enumerate(kv):
        assert torch.equal(key[0, :, 1].reshape(-1), row[2 * layer * width : (2 * layer + 1) * width])
        assert torch.equal(value[0, :, 1].reshape(-1), row[(2 * layer + 1) * width : (2 * layer + 2) * width])


def test_prefix_dropout_per_example_in_training():
    encoder = PrefixEncoder(pre_seq_len=4, geometry=GQA, dropout=0.5).train()
    key = encoder(batch_size=2)[0][0]
    assert not torch.equal(key[0], key[1])
    encoder.eval()
    key = encoder(batch_size=2)[0][0]
    assert torch.equal(key[0], key[1])


def test_prefix_rejects_zero_length():
    with pytest.raises(ValueError, match="pre_seq_len must be positive"):
        PrefixEncoder(pre_seq_len=0, geometry=GQA)


@pytest.mark.parametrize("variant,projection", [("prefix_encoder", False), ("prefix_encoder_proj", True)])
def test_prefix_matches_chatglm2_fixture(variant, projection):
    folder = FIXTURES / "v2"
    if not (folder / "goldens.safetensors").exists():
        pytest.skip(f"ChatGLM2 fixtures not found in {folder}")
    import json

    config = json.loads((folder / "config.json").read_text())
    geometry = KVGeometry(
        num_layers=config["num_layers"],
        kv_heads=config["multi_query_group_num"],
        head_dim=config["kv_channels"],
        hidden_size=config["hidden_size"],
    )
    weights = load_file(folder / f"{variant}.safetensors")
    state = {name.removeprefix("transformer.prefix_encoder."): tensor for name, tensor in weights.items()}
    encoder = PrefixEncoder(pre_seq_len=4, geometry=geometry, prefix_projection=projection).eval()
    encoder.load_state_dict(state)

    goldens = load_file(folder / "goldens.safetensors")
    golden_name = "prefix_kv_proj" if projection else "prefix_kv"
    kv = encoder(batch_size=2)
    for layer in range(geometry.num_layers):
        # The original hands each layer [2 (key, value), pre_seq_len, batch, groups, head_dim].
        expected = goldens[f"{golden_name}.layer{layer}"]
        key, value = kv[layer]
        torch.testing.assert_close(key.permute(2, 0, 1, 3), expected[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(value.permute(2, 0, 1, 3), expected[1], rtol=0, atol=1e-6)


def tiny_glm(layers: int = 1) -> GlmForCausalLM:
    torch.manual_seed(0)
    config = GlmConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        partial_rotary_factor=0.5,
        attention_bias=True,
        initializer_range=0.3,
        pad_token_id=0,
        eos_token_id=1,
    )
    return GlmForCausalLM(config).eval()


def manual_logits(model: GlmForCausalLM, input_ids: torch.Tensor, key_prefix, value_prefix) -> torch.Tensor:
    """One GLM layer written out: prefix keys/values sit in front, visible to every token, without positions."""
    inner = model.model
    layer = inner.layers[0]
    attention = layer.self_attn
    config = model.config
    length = input_ids.shape[1]
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim

    hidden = inner.embed_tokens(input_ids)
    normed = layer.input_layernorm(hidden)
    # (batch, heads, length, head_dim)
    query = attention.q_proj(normed).view(1, length, heads, head_dim).transpose(1, 2)
    key = attention.k_proj(normed).view(1, length, kv_heads, head_dim).transpose(1, 2)
    value = attention.v_proj(normed).view(1, length, kv_heads, head_dim).transpose(1, 2)
    positions = torch.arange(length).unsqueeze(0)
    cos, sin = inner.rotary_emb(hidden, positions)
    query, key = apply_rotary_pos_emb(query, key, cos, sin)

    key = torch.cat([key_prefix, key], dim=2).repeat_interleave(heads // kv_heads, dim=1)
    value = torch.cat([value_prefix, value], dim=2).repeat_interleave(heads // kv_heads, dim=1)
    prefix_length = key_prefix.shape[2]
    scores = query @ key.transpose(-1, -2) / math.sqrt(head_dim)
    # Token i sees the whole prefix and tokens 0..i.
    visible = torch.ones(length, prefix_length + length, dtype=torch.bool).tril(diagonal=prefix_length)
    scores = scores.masked_fill(~visible, float("-inf"))
    attended = (scores.softmax(-1) @ value).transpose(1, 2).reshape(1, length, heads * head_dim)

    hidden = hidden + attention.o_proj(attended)
    hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return model.lm_head(inner.norm(hidden))


def test_forward_with_prefix_equals_manual_computation():
    model = tiny_glm(layers=1)
    backbone = HFBackbone(model)
    encoder = PrefixEncoder(pre_seq_len=3, geometry=backbone.geometry).eval()
    with torch.no_grad():
        encoder.embedding.weight.normal_(std=1.0)
    input_ids = torch.tensor([[5, 17, 3, 42, 8, 21]])

    with torch.no_grad():
        kv = encoder(batch_size=1)
        logits = backbone.forward(input_ids, torch.ones_like(input_ids), backbone.new_cache(kv, 1))
        expected = manual_logits(model, input_ids, kv[0][0], kv[0][1])
        without_prefix = backbone.forward(input_ids, torch.ones_like(input_ids), backbone.new_cache(None, 1))

    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    # The prefix must change the output (a vanished prefix would pass the check above only by accident).
    assert (logits - without_prefix).abs().max() > 1e-2


def test_left_padding_does_not_change_logits():
    model = tiny_glm(layers=2)
    backbone = HFBackbone(model)
    encoder = PrefixEncoder(pre_seq_len=2, geometry=backbone.geometry).eval()
    with torch.no_grad():
        encoder.embedding.weight.normal_()
        ids = torch.tensor([[7, 8, 9, 10]])
        alone = backbone.forward(ids, torch.ones_like(ids), backbone.new_cache(encoder(1), 1))
        padded = torch.tensor([[0, 0, 7, 8, 9, 10]])
        mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
        batch = backbone.forward(padded, mask, backbone.new_cache(encoder(1), 1))
    torch.testing.assert_close(batch[:, 2:], alone, rtol=0, atol=1e-5)


def test_cache_is_fresh_per_forward():
    model = tiny_glm(layers=1)
    backbone = HFBackbone(model)
    encoder = PrefixEncoder(pre_seq_len=2, geometry=backbone.geometry).eval()
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        first = backbone.forward(ids, torch.ones_like(ids), backbone.new_cache(encoder(1), 1))
        second = backbone.forward(ids, torch.ones_like(ids), backbone.new_cache(encoder(1), 1))
    assert torch.equal(first, second)


def test_prefix_gradients_reach_embedding():
    model = tiny_glm(layers=2)
    model.requires_grad_(False)
    backbone = HFBackbone(model)
    encoder = PrefixEncoder(pre_seq_len=2, geometry=backbone.geometry, dropout=0.0)
    ids = torch.tensor([[1, 2, 3, 4]])
    logits = backbone.forward(ids, torch.ones_like(ids), backbone.new_cache(encoder(1), 1))
    logits.sum().backward()
    assert encoder.embedding.weight.grad is not None
    assert encoder.embedding.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_gradient_checkpointing_keeps_prefix_gradients():
    """The transformers path with checkpointing gives the prefix the same gradients as without it."""
    gradients = []
    for checkpointing in (False, True):
        model = tiny_glm(layers=2)
        model.requires_grad_(False)
        backbone = HFBackbone(model)
        if checkpointing:
            backbone.enable_gradient_checkpointing()
        torch.manual_seed(3)
        encoder = PrefixEncoder(pre_seq_len=3, geometry=backbone.geometry, dropout=0.0)
        ids = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
        logits = backbone.forward(ids, torch.ones_like(ids), backbone.new_cache(encoder(2), 2))
        logits.float().pow(2).mean().backward()
        gradients.append(encoder.embedding.weight.grad.clone())
    assert gradients[0].abs().sum() > 0
    torch.testing.assert_close(gradients[1], gradients[0], rtol=1e-5, atol=1e-7)
