"""ChatGLM-6B (GLM v1) as a plain PyTorch module that loads the official checkpoint layout.

The network follows the original `modeling_chatglm.py` of the chatglm-6b model repo (2023-09 revision):

- Each layer has a fused query/key/value projection whose output is laid out per head as (q, k, v), a
  post-norm "DeepNorm" residual `LN(x) * alpha + sublayer(LN(x))`, and a two-matrix MLP with
  tanh-approximated GELU. Alpha is sqrt(2 * 28) whatever the depth (see `DEEPNORM_ALPHA`). A final
  LayerNorm follows the last layer, and the LM head is tied to the word embeddings.
- Rotary positions are two-dimensional: the first half of every head is rotated by the position id, the
  second half by the block position id. The inverse frequencies are rounded through fp16, as the original
  stores them; exact fp32 frequencies move the logits by about 1e-3.
- The prompt up to and including [gMASK] attends bidirectionally; from <sop> on, attention is causal.
  Position ids count the prompt tokens and stay at the [gMASK] (or [MASK]) index from <sop> on, and block
  position ids are 0 in the prompt and 1, 2, ... from <sop> on.
- A P-Tuning v2 prefix enters as past keys and values in front of each layer's rotated keys. It has no
  position of its own and every token attends to it.

Why a plain `nn.Module` and not a transformers `PreTrainedModel`: the `Backbone` seam owns the cache,
the positions and the generation loop. None of the transformers machinery (cache classes, attention
registry, generation mixin) would be used, and that machinery changes between major versions. Checkpoint
loading lives in `ptuning_pl.backbones.chatglm6b`. Parameter names equal the original checkpoint keys, so
the official `pytorch_model-*.bin` shards load without renaming.

Differences from the original that leave every non-padding position unchanged:

- Attention uses `scaled_dot_product_attention`. The original divides the query by sqrt(head_dim) *
  (layer + 1), fills masked scores with -10000, multiplies by (layer + 1) again and applies softmax in fp32;
  that scaling only guards fp16 overflow, and the -10000 fill gives the same probabilities as -inf for any
  query that sees at least one key.
- A padding query (which sees no key in the original, so it averages all of them) attends to itself here.
  Padding outputs never reach real tokens, because padding keys are masked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

ROTARY_BASE = 10000.0

# The original's ChatGLMModel builds every GLMBlock without passing config.num_layers, so each block uses
# its default num_layers=28 and alpha = sqrt(2 * 28) for any depth. For the 28-layer ChatGLM-6B this equals
# sqrt(2 * num_layers); for smaller test models only this constant reproduces the original's outputs.
DEEPNORM_ALPHA = (2 * 28) ** 0.5


@dataclass(frozen=True)
class ChatGLM6BConfig:
    """Model settings read from the original `config.json`."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    inner_hidden_size: int
    layernorm_epsilon: float
    bos_token_id: int
    eos_token_id: int
    mask_token_id: int
    gmask_token_id: int
    pad_token_id: int
    max_sequence_length: int = 2048
    #: Every other entry of config.json, so that `to_dict` returns the whole file.
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ChatGLM6BConfig:
        """Build a config from an original `config.json`, raising ValueError for an unusable one."""
        required = [
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_attention_heads",
            "bos_token_id",
            "eos_token_id",
            "mask_token_id",
            "gmask_token_id",
            "pad_token_id",
        ]
        missing = [name for name in required if values.get(name) is None]
        if missing:
            raise ValueError(
                f"ChatGLM-6B config is missing {missing}; pass the config.json of the checkpoint"
            )
        if not values.get("position_encoding_2d", True):
            raise ValueError(
                "position_encoding_2d=false is not supported; ChatGLM-6B checkpoints use 2-D positions"
            )
        if values.get("quantization_bit", 0):
            raise ValueError(
                f"quantization_bit={values['quantization_bit']} checkpoints store packed integer weights; "
                "load the unquantized ChatGLM-6B checkpoint instead"
            )
        if values["hidden_size"] % values["num_attention_heads"] != 0:
            raise ValueError(
                f"hidden_size {values['hidden_size']} is not divisible by "
                f"num_attention_heads {values['num_attention_heads']}"
            )

        known = {name for name in cls.__dataclass_fields__ if name != "extra"}
        settings = {name: values[name] for name in known if values.get(name) is not None}
        # The original MLP falls back to 4 * hidden_size when inner_hidden_size is unset.
        settings.setdefault("inner_hidden_size", 4 * values["hidden_size"])
        settings.setdefault("layernorm_epsilon", 1e-5)
        extra = {name: value for name, value in values.items() if name not in known}
        return cls(**settings, extra=extra)

    @classmethod
    def from_json_file(cls, path: str | Path) -> ChatGLM6BConfig:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def to_dict(self) -> dict[str, Any]:
        values = dict(self.extra)
        values.update({name: getattr(self, name) for name in self.__dataclass_fields__ if name != "extra"})
        return values


# --------------------------------------------------------------------------------------------------------
# Cache and attention layout


@dataclass
class ChatGLM6BCache:
    """Keys and values of the tokens seen so far, plus where each row's prompt ends.

    `key_values[i]` is layer i's (key, value) pair, each (batch, heads, prefix_length + seen_length,
    head_dim) with the prefix in front. It is None before the first forward pass when there is no prefix.
    `context_lengths` (batch,) is the number of real prompt tokens before <sop>, and `mask_positions`
    (batch,) the real-token index of [gMASK] (or [MASK]). Both skip padding, and the first forward pass
    sets them.
    """

    key_values: list[tuple[torch.Tensor, torch.Tensor] | None]
    batch_size: int
    prefix_length: int = 0
    seen_length: int = 0
    context_lengths: torch.Tensor | None = None
    mask_positions: torch.Tensor | None = None

    def reorder(self, index: torch.Tensor) -> ChatGLM6BCache:
        """Return a new cache with the batch rows `index` (selected or repeated)."""
        key_values: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        for layer in self.key_values:
            if layer is None:
                key_values.append(None)
            else:
                key, value = layer
                key_values.append((key.index_select(0, index), value.index_select(0, index)))
        return ChatGLM6BCache(
            key_values=key_values,
            batch_size=int(index.numel()),
            prefix_length=self.prefix_length,
            seen_length=self.seen_length,
            context_lengths=None
            if self.context_lengths is None
            else self.context_lengths.index_select(0, index),
            mask_positions=None
            if self.mask_positions is None
            else self.mask_positions.index_select(0, index),
        )


def find_prompt_boundaries(
    input_ids: torch.Tensor, padding_mask: torch.Tensor, config: ChatGLM6BConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return per row the number of real tokens before the first <sop>, and the real-token index of [gMASK].

    Padding (`padding_mask` 0) is not counted. As in the original model, the first [gMASK] is used when a row
    has one, else the first [MASK]. Raises ValueError for a row without <sop> or without either mask token.
    """
    real = padding_mask.bool()
    real_index = padding_mask.long().cumsum(dim=1) - 1
    not_found = torch.full_like(real_index, input_ids.shape[1])

    def first_index(token_id: int) -> torch.Tensor:
        return torch.where(real & (input_ids == token_id), real_index, not_found).min(dim=1).values

    context_lengths = first_index(config.bos_token_id)
    gmask_positions = first_index(config.gmask_token_id)
    mask_positions = torch.where(
        gmask_positions < input_ids.shape[1], gmask_positions, first_index(config.mask_token_id)
    )

    rows_without_sop = (context_lengths == input_ids.shape[1]).nonzero().flatten().tolist()
    if rows_without_sop:
        raise ValueError(
            f"rows {rows_without_sop} have no <sop> token (id {config.bos_token_id}); ChatGLM-6B needs the "
            "whole prompt, ending with [gMASK] <sop>, in the first forward pass of a cache"
        )
    rows_without_mask = (mask_positions == input_ids.shape[1]).nonzero().flatten().tolist()
    if rows_without_mask:
        raise ValueError(
            f"rows {rows_without_mask} have neither [gMASK] (id {config.gmask_token_id}) nor [MASK] "
            f"(id {config.mask_token_id}) in the first forward pass"
        )
    return context_lengths, mask_positions


def build_position_ids(
    padding_mask: torch.Tensor, context_lengths: torch.Tensor, mask_positions: torch.Tensor
) -> torch.Tensor:
    """Return the (batch, 2, seq) position and block position ids of every token in `padding_mask`.

    A real token with real-token index j gets (j, 0) inside the prompt (j < context length c) and
    (mask position, j - c + 1) from <sop> on. Padding gets (0, 0).
    """
    real = padding_mask.long()
    real_index = real.cumsum(dim=1) - 1
    context = context_lengths.unsqueeze(1)
    in_prompt = real_index < context
    positions = torch.where(in_prompt, real_index, mask_positions.unsqueeze(1))
    block_positions = torch.where(in_prompt, torch.zeros_like(real_index), real_index - context + 1)
    return torch.stack([positions * real, block_positions * real], dim=1)


def build_attention_layout(
    padding_mask: torch.Tensor, context_lengths: torch.Tensor, query_length: int, prefix_length: int
) -> torch.Tensor:
    """Return which keys the last `query_length` tokens may attend to, True = allowed.

    The result is (batch, 1, queries, prefix + seq).

    A real query attends to the prefix, every real prompt token before <sop> and every real token up to
    itself. A padding query attends to the prefix and itself only, so that no softmax row is empty.
    """
    batch_size, total_length = padding_mask.shape
    real = padding_mask.bool()
    real_index = padding_mask.long().cumsum(dim=1) - 1
    key_in_prompt = real & (real_index < context_lengths.unsqueeze(1))

    key_index = torch.arange(total_length, device=padding_mask.device)
    query_index = key_index[total_length - query_length :]
    causal = key_index.view(1, 1, -1) <= query_index.view(1, -1, 1)
    is_self = key_index.view(1, 1, -1) == query_index.view(1, -1, 1)

    # (batch, queries, seq)
    allowed = real.unsqueeze(1) & (key_in_prompt.unsqueeze(1) | causal)
    query_is_real = real[:, total_length - query_length :].unsqueeze(2)
    allowed = torch.where(query_is_real, allowed, is_self.expand(batch_size, -1, -1))

    prefix = torch.ones(batch_size, query_length, prefix_length, dtype=torch.bool, device=padding_mask.device)
    return torch.cat([prefix, allowed], dim=2).unsqueeze(1)


# --------------------------------------------------------------------------------------------------------
# Rotary positions


def rotary_inverse_frequencies(config: ChatGLM6BConfig, device: torch.device | None = None) -> torch.Tensor:
    """Return the inverse frequencies of one rotary half (head_dim / 4 values), rounded through fp16."""
    rotary_dim = config.head_dim // 2
    exponents = torch.arange(0, rotary_dim, 2, device=device).float() / rotary_dim
    return (1.0 / (ROTARY_BASE**exponents)).half().float()


def rotary_cos_sin(
    position_ids: torch.Tensor, inverse_frequencies: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return cos and sin (batch, seq, 1, head_dim) for 2-D positions (batch, 2, seq).

    The first half of the head dim uses the position ids and the second half the block position ids. Each
    half repeats its frequencies twice, matching `rotate_half`. Angles are computed in fp32.
    """
    # (batch, 2, seq, head_dim / 4)
    angles = position_ids.float().unsqueeze(-1) * inverse_frequencies
    # (batch, 2, seq, head_dim / 2): the layout cat(freqs, freqs) that rotate_half expects
    angles = torch.cat([angles, angles], dim=-1)
    # (batch, seq, head_dim): positions half, then block positions half
    angles = torch.cat([angles[:, 0], angles[:, 1]], dim=-1)
    return angles.cos().to(dtype).unsqueeze(2), angles.sin().to(dtype).unsqueeze(2)


def rotate_halves_2d(x: torch.Tensor) -> torch.Tensor:
    """Apply `rotate_half` ([a, b] -> [-b, a]) separately to each half of the last dim."""
    quarters = x.chunk(4, dim=-1)
    return torch.cat([-quarters[1], quarters[0], -quarters[3], quarters[2]], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_halves_2d(x) * sin


# --------------------------------------------------------------------------------------------------------
# Layers


class ChatGLM6BAttention(nn.Module):
    def __init__(self, config: ChatGLM6BConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        allowed: torch.Tensor,
        past_key: torch.Tensor | None,
        past_value: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return the attention output and the layer's keys and values including the past ones."""
        batch_size, length, _ = hidden_states.shape

        # The fused projection is laid out per head as (query, key, value): (batch, seq, heads, 3 * head_dim).
        mixed = self.query_key_value(hidden_states).view(
            batch_size, length, self.num_heads, 3 * self.head_dim
        )
        query, key, value = mixed.split(self.head_dim, dim=-1)
        query = apply_rotary(query, cos, sin)
        key = apply_rotary(key, cos, sin)

        # (batch, heads, seq, head_dim)
        query, key, value = (tensor.transpose(1, 2) for tensor in (query, key, value))
        if past_key is not None and past_value is not None:
            key = torch.cat([past_key, key], dim=2)
            value = torch.cat([past_value, value], dim=2)

        context = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed)
        context = context.transpose(1, 2).reshape(batch_size, length, self.num_heads * self.head_dim)
        return self.dense(context), key, value


class ChatGLM6BMLP(nn.Module):
    def __init__(self, config: ChatGLM6BConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.inner_hidden_size)
        self.dense_4h_to_h = nn.Linear(config.inner_hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(hidden_states), approximate="tanh"))


class ChatGLM6BBlock(nn.Module):
    def __init__(self, config: ChatGLM6BConfig) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = ChatGLM6BAttention(config)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = ChatGLM6BMLP(config)
        self.alpha = DEEPNORM_ALPHA

    def forward(
        self,
        hidden_states: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        allowed: torch.Tensor,
        past_key: torch.Tensor | None,
        past_value: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attention_input = self.input_layernorm(hidden_states)
        attention_output, key, value = self.attention(
            attention_input, cos, sin, allowed, past_key, past_value
        )
        hidden_states = attention_input * self.alpha + attention_output

        mlp_input = self.post_attention_layernorm(hidden_states)
        return mlp_input * self.alpha + self.mlp(mlp_input), key, value


class ChatGLM6BTransformer(nn.Module):
    """Embeddings, layers and final LayerNorm; named `transformer` in the checkpoint."""

    def __init__(self, config: ChatGLM6BConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(ChatGLM6BBlock(config) for _ in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)


@dataclass
class ChatGLM6BOutput:
    """Logits (batch, seq, vocab) and, on request, the input of every layer plus the final normed state.

    With `compute_logits=False`, `logits` is None and `last_hidden_state` contains the final normed state.
    """

    logits: torch.Tensor | None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    last_hidden_state: torch.Tensor | None = None


class ChatGLM6BForCausalLM(nn.Module):
    """ChatGLM-6B with its tied LM head. State dict keys equal the original checkpoint keys."""

    def __init__(self, config: ChatGLM6BConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = ChatGLM6BTransformer(config)
        self.gradient_checkpointing = False

    def output_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Apply the tied LM head to final normed hidden states."""
        return F.linear(hidden_states, self.transformer.word_embeddings.weight)

    def new_cache(
        self, prefix: list[tuple[torch.Tensor, torch.Tensor]] | None, batch_size: int
    ) -> ChatGLM6BCache:
        """Return an empty cache for `batch_size` rows, holding the prefix keys and values if given.

        Each prefix pair is (batch or 1, heads, pre_seq_len, head_dim); a batch of 1 is broadcast.
        """
        config = self.config
        if prefix is None:
            return ChatGLM6BCache(key_values=[None] * config.num_layers, batch_size=batch_size)

        if len(prefix) != config.num_layers:
            raise ValueError(f"prefix has {len(prefix)} layers, the model has {config.num_layers}")
        key_values: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        prefix_length = prefix[0][0].shape[2]
        for layer, (key, value) in enumerate(prefix):
            for name, tensor in (("key", key), ("value", value)):
                expected = (config.num_attention_heads, prefix_length, config.head_dim)
                if (
                    tensor.dim() != 4
                    or tuple(tensor.shape[1:]) != expected
                    or tensor.shape[0] not in (1, batch_size)
                ):
                    raise ValueError(
                        f"prefix {name} of layer {layer} has shape {tuple(tensor.shape)}; expected "
                        f"({batch_size}, {', '.join(map(str, expected))})"
                    )
            key_values.append((key.expand(batch_size, -1, -1, -1), value.expand(batch_size, -1, -1, -1)))
        return ChatGLM6BCache(key_values=key_values, batch_size=batch_size, prefix_length=prefix_length)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: ChatGLM6BCache,
        output_hidden_states: bool = False,
        compute_logits: bool = True,
    ) -> ChatGLM6BOutput:
        """Run the new tokens `input_ids` (batch, n) and extend `cache` in place.

        `attention_mask` (batch, seen + n) is 1 for real tokens and 0 for padding, over every token in the
        cache (prefix excluded) and the new ones. The first call on a cache must contain each row's whole
        prompt through <sop>, because the prompt attends bidirectionally.
        """
        batch_size, length = input_ids.shape
        if batch_size != cache.batch_size:
            raise ValueError(f"input_ids has {batch_size} rows, the cache was made for {cache.batch_size}")
        if attention_mask.shape != (batch_size, cache.seen_length + length):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; expected ({batch_size}, "
                f"{cache.seen_length + length}), covering the {cache.seen_length} cached and {length} new "
                "tokens"
            )

        if cache.context_lengths is None or cache.mask_positions is None:
            cache.context_lengths, cache.mask_positions = find_prompt_boundaries(
                input_ids, attention_mask, self.config
            )
        position_ids = build_position_ids(attention_mask, cache.context_lengths, cache.mask_positions)
        position_ids = position_ids[:, :, cache.seen_length :]
        allowed = build_attention_layout(attention_mask, cache.context_lengths, length, cache.prefix_length)

        hidden_states = self.transformer.word_embeddings(input_ids)
        inverse_frequencies = rotary_inverse_frequencies(self.config, device=input_ids.device)
        cos, sin = rotary_cos_sin(position_ids, inverse_frequencies, hidden_states.dtype)

        all_hidden_states: list[torch.Tensor] = []
        for index, layer in enumerate(self.transformer.layers):
            if output_hidden_states:
                all_hidden_states.append(hidden_states)
            past = cache.key_values[index]
            past_key, past_value = past if past is not None else (None, None)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                # The prefix enters as tensor arguments, so its gradient flows through the recomputation.
                hidden_states, key, value = checkpoint(
                    layer, hidden_states, cos, sin, allowed, past_key, past_value, use_reentrant=False
                )
            else:
                hidden_states, key, value = layer(hidden_states, cos, sin, allowed, past_key, past_value)
            cache.key_values[index] = (key, value)

        hidden_states = self.transformer.final_layernorm(hidden_states)
        if output_hidden_states:
            all_hidden_states.append(hidden_states)
        cache.seen_length += length

        if not compute_logits:
            return ChatGLM6BOutput(logits=None, last_hidden_state=hidden_states)
        logits = self.output_logits(hidden_states)
        return ChatGLM6BOutput(
            logits=logits, hidden_states=tuple(all_hidden_states) if output_hidden_states else None
        )
