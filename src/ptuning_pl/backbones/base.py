"""The seam between the prefix-tuning code and a frozen language model.

Everything above this seam (the data module, the prefix encoder, the LightningModule, generation and the
metrics) talks to a `Backbone` and a `PromptFormat` only. A model family plugs in by providing both:

- `Backbone` runs the frozen network. It owns positions and attention layout, because those differ between
  families (transformers' GLM uses 1-D positions, ChatGLM-6B uses 2-D positions and a bidirectional prompt).
  Callers pass a 0/1 padding mask over the real tokens seen so far; the prefix never appears in it.
- `PromptFormat` turns (prompt, response, history) into token ids the way the family's reference does.

A prefix reaches the backbone as `PrefixKV`: one (key, value) pair per layer, each shaped
(batch, kv_heads, pre_seq_len, head_dim), already in the backbone's compute dtype.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

PrefixKV = Sequence[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class KVGeometry:
    """Shape of the key/value cache of a backbone, which fixes the size of a P-Tuning v2 prefix."""

    num_layers: int
    kv_heads: int
    head_dim: int
    hidden_size: int

    @property
    def kv_width(self) -> int:
        """Width of one layer's keys (or values): key/value heads times head dim, not the hidden size."""
        return self.kv_heads * self.head_dim


class Backbone(abc.ABC):
    """A frozen causal language model that accepts a P-Tuning v2 prefix as past keys and values."""

    model: nn.Module
    geometry: KVGeometry
    #: Name of the family's default prefix layout: "chatglm" (embedding of hidden size) or "chatglm2"
    #: (embedding of num_layers * 2 * kv_width); see PrefixEncoder.
    prefix_family: str = "chatglm2"

    @property
    def compute_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @abc.abstractmethod
    def new_cache(self, prefix: PrefixKV | None, batch_size: int) -> Any:
        """Return a fresh cache that contains `prefix` (or nothing) for `batch_size` sequences.

        A new cache is built for every forward pass or generation call; caches are never shared.
        """

    @abc.abstractmethod
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: Any) -> torch.Tensor:
        """Run the new tokens `input_ids` (batch, n) and return logits (batch, n, vocab).

        `attention_mask` (batch, past + n) is 1 for real tokens and 0 for padding, over every token seen so
        far in this cache excluding the prefix. The cache is extended in place with the new tokens.
        """

    def forward_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: Any) -> torch.Tensor:
        """Like `forward`, but return the final hidden states (batch, n, hidden) instead of logits.

        With `output_logits` this lets the training loss compute logits at the supervised positions only,
        which saves the vocabulary-sized product at every prompt and padding position. The default computes
        full logits, for backbones without a separate output layer.
        """
        return self.forward(input_ids, attention_mask, cache)

    def output_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from `forward_hidden` states (identity in the default, whose states are logits already)."""
        return hidden

    def enable_gradient_checkpointing(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not support gradient checkpointing yet")

    def reorder_cache(self, cache: Any, index: torch.Tensor) -> Any:
        """Select or repeat batch rows of `cache` (for beam search and batch expansion)."""
        raise NotImplementedError(f"{type(self).__name__} cannot reorder its cache")


@dataclass(frozen=True)
class EncodedExample:
    """Token ids of one example; `labels` is -100 wherever no loss is taken."""

    input_ids: list[int]
    labels: list[int]
    prompt_truncated: bool = False
    response_truncated: bool = False


class PromptFormat(abc.ABC):
    """Builds training examples and generation prompts the way one model family's reference does.

    User text is always encoded as plain text: a special-token string inside a record never becomes a
    control token.
    """

    #: Name shown in logs, exports and errors.
    name: str

    @abc.abstractmethod
    def encode_train(
        self,
        prompt: str,
        response: str,
        history: Sequence[tuple[str, str]],
        max_source_length: int,
        max_target_length: int,
    ) -> EncodedExample:
        """Return prompt and response ids; the response and its end token always survive truncation."""

    @abc.abstractmethod
    def encode_prompt(
        self, prompt: str, history: Sequence[tuple[str, str]], max_source_length: int
    ) -> EncodedExample:
        """Return the generation prompt (labels empty); the model continues from its last token."""

    @property
    @abc.abstractmethod
    def pad_token_id(self) -> int: ...

    @property
    @abc.abstractmethod
    def stop_token_ids(self) -> list[int]:
        """Ids that end a generated response."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Decode generated ids, skipping special tokens, stripped."""

    def encode_text(self, text: str) -> list[int]:
        """Encode user text as plain text, without template or special tokens."""
        raise NotImplementedError(f"{type(self).__name__} does not implement encode_text")
