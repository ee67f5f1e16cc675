"""Batched generation with the prefix: batch-size invariance, stop tokens, sampling presets."""

from __future__ import annotations

import pytest
import torch
from transformers import GlmConfig, GlmForCausalLM

from ptuning_pl.backbones.hf import HFBackbone
from ptuning_pl.generation import GenerationSettings, generate, left_pad
from ptuning_pl.prefix import PrefixEncoder


def tiny_backbone(seed: int = 0) -> HFBackbone:
    torch.manual_seed(seed)
    config = GlmConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        partial_rotary_factor=0.5,
        attention_bias=True,
        initializer_range=0.5,
        pad_token_id=0,
        eos_token_id=1,
    )
    return HFBackbone(GlmForCausalLM(config).eval())


PROMPTS = [[5, 9, 13], [7, 8, 9, 10, 11, 12, 2], [3], [20, 21, 22, 23], [30, 31], [40, 41, 42, 43, 44], [50], [60, 61]]


@pytest.mark.parametrize("projection", [False, True])
def test_greedy_same_for_batch_size_1_and_8(projection):
    backbone = tiny_backbone()
    torch.manual_seed(1)
    encoder = PrefixEncoder(pre_seq_len=3, geometry=backbone.geometry, prefix_projection=projection).eval()
    with torch.no_grad():
        encoder.embedding.weight.normal_(std=1.0)
    settings = GenerationSettings(max_new_tokens=10)
    kwargs = dict(pad_token_id=0, stop_token_ids=[1], settings=settings)

    batched = generate(backbone, encoder, PROMPTS, **kwargs)
    one_by_one = [generate(backbone, encoder, [prompt], **kwargs)[0] for prompt in PROMPTS]

    assert batched == one_by_one
    assert any(len(tokens) > 3 for tokens in batched)
    # The prefix changes what is generated.
    without_prefix = generate(backbone, lambda batch_size: None, PROMPTS, **kwargs)
    assert without_prefix != batched


def test_generation_stops_at_stop_token():
    backbone = tiny_backbone()
    settings = GenerationSettings(max_new_tokens=8)
    free = generate(backbone, lambda n: None, [[5, 6]], pad_token_id=0, stop_token_ids=[63], settings=settings)[0]
    position = next(i for i in range(1, len(free)) if free[i] not in free[:i])
    stopped = generate(backbone, lambda n: None, [[5, 6]], pad_token_id=0, stop_token_ids=[free[position]], settings=settings)
    # Output ends before the first stop token, which is not included.
    assert stopped == [free[:position]]


def test_sampling_is_seeded():
    backbone = tiny_backbone()
    settings = GenerationSettings.from_preset("reference", max_new_tokens=6, seed=7)
    assert (settings.do_sample, settings.top_p, settings.temperature) == (True, 0.7, 0.95)
    first = generate(backbone, lambda n: None, PROMPTS[:3], pad_token_id=0, stop_token_ids=[1], settings=settings)
    second = generate(backbone, lambda n: None, PROMPTS[:3], pad_token_id=0, stop_token_ids=[1], settings=settings)
    assert first == second


def test_unknown_preset_rejected():
    with pytest.raises(ValueError, match="unknown generation preset 'beam'"):
        GenerationSettings.from_preset("beam")


def test_left_pad_layout():
    ids, mask = left_pad([[4, 5, 6], [7]], pad_token_id=0)
    assert ids.tolist() == [[4, 5, 6], [0, 0, 7]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
