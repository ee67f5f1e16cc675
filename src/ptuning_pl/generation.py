"""Batched generation for a prefix-tuned backbone: left-padded prompts, one prefix cache reused per step.

The loop runs through the `Backbone` interface, so every family (transformers GLM, our ChatGLM-6B) shares it.
The prefix keys and values are computed once per batch and sit at the front of the cache for every decoding
step; each row gets its own positions from its padding mask.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from ptuning_pl.backbones.base import Backbone, PrefixKV

PRESETS = {
    # Deterministic and comparable between runs: the default for validation and test.
    "greedy": {"do_sample": False, "top_p": 1.0, "temperature": 1.0},
    # The reference evaluation protocol of ChatGLM-6B's ptuning scripts: nucleus sampling.
    "reference": {"do_sample": True, "top_p": 0.7, "temperature": 0.95},
}


@dataclass
class GenerationSettings:
    """How to decode: greedy by default; `preset` fills the sampling fields."""

    max_new_tokens: int = 64
    do_sample: bool = False
    top_p: float = 1.0
    temperature: float = 1.0
    seed: int | None = None

    @classmethod
    def from_preset(cls, preset: str = "greedy", **overrides) -> GenerationSettings:
        if preset not in PRESETS:
            raise ValueError(f"unknown generation preset {preset!r}; expected one of {sorted(PRESETS)}")
        values = {**PRESETS[preset], **{key: value for key, value in overrides.items() if value is not None}}
        return cls(**values)


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (input_ids, attention_mask), both (batch, longest), with padding on the left."""
    longest = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), longest), pad_token_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros((len(prompts), longest), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        if prompt:
            input_ids[row, longest - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long, device=device)
            attention_mask[row, longest - len(prompt) :] = 1
    return input_ids, attention_mask


def sample_next(logits: torch.Tensor, settings: GenerationSettings, generator: torch.Generator | None) -> torch.Tensor:
    """Pick the next token per row from last-position logits (batch, vocab)."""
    if not settings.do_sample:
        return logits.argmax(dim=-1)
    logits = logits.float() / max(settings.temperature, 1e-5)
    probabilities = logits.softmax(dim=-1)
    if settings.top_p < 1.0:
        sorted_probabilities, order = probabilities.sort(dim=-1, descending=True)
        cumulative = sorted_probabilities.cumsum(dim=-1)
        # Keep the smallest set of tokens whose probability reaches top_p (the first token always stays).
        outside = cumulative - sorted_probabilities > settings.top_p
        sorted_probabilities = sorted_probabilities.masked_fill(outside, 0.0)
        probabilities = torch.zeros_like(probabilities).scatter(-1, order, sorted_probabilities)
    return torch.multinomial(probabilities, num_samples=1, generator=generator).squeeze(-1)


@torch.no_grad()
def iterate_tokens(
    backbone: Backbone,
    prefix_kv: Callable[[int], PrefixKV | None],
    prompts: Sequence[Sequence[int]],
    pad_token_id: int,
    stop_token_ids: Sequence[int],
    settings: GenerationSettings,
    device: torch.device | str | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (next tokens, finished-before-this-step mask) per decoding step until every row has stopped.

    Rows that already stopped receive the pad token. The prefix keys and values are computed once and reused
    from the cache at every step.
    """
    batch_size = len(prompts)
    input_ids, attention_mask = left_pad(prompts, pad_token_id, device=device)
    cache = backbone.new_cache(prefix_kv(batch_size), batch_size)

    generator = None
    if settings.do_sample and settings.seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(settings.seed)

    stop = torch.tensor(sorted(set(stop_token_ids)), device=input_ids.device)
    finished = torch.zeros(batch_size, dtype=torch.bool, device=input_ids.device)

    logits = backbone.forward(input_ids, attention_mask, cache)[:, -1]
    for step in range(settings.max_new_tokens):
        next_tokens = sample_next(logits, settings, generator)
        next_tokens = torch.where(finished, torch.full_like(next_tokens, pad_token_id), next_tokens)
        yield next_tokens, finished.clone()

        finished |= torch.isin(next_tokens, stop)
        # One host synchronisation per step, to stop as soon as every row is done.
        if bool(finished.all()) or step + 1 == settings.max_new_tokens:
            return

        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch_size, 1)], dim=-1)
        logits = backbone.forward(next_tokens.unsqueeze(-1), attention_mask, cache)[:, -1]


def generate(
    backbone: Backbone,
    prefix_kv: Callable[[int], PrefixKV | None],
    prompts: Sequence[Sequence[int]],
    pad_token_id: int,
    stop_token_ids: Sequence[int],
    settings: GenerationSettings,
    device: torch.device | str | None = None,
) -> list[list[int]]:
    """Generate for a batch of prompt ids; return each row's new tokens without the stop token."""
    steps = iterate_tokens(backbone, prefix_kv, prompts, pad_token_id, stop_token_ids, settings, device)
    # Tokens stay on the device until the end: one copy to the host per batch, not per step.
    columns = [next_tokens for next_tokens, _ in steps]
    if not columns:
        return [[] for _ in prompts]
    stop = set(stop_token_ids)
    outputs = []
    for row in torch.stack(columns, dim=1).tolist():
        end = next((i for i, token in enumerate(row) if token in stop), len(row))
        outputs.append(row[:end])
    return outputs
