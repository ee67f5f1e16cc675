"""The P-Tuning v2 prefix encoder, with the parameter layout of the ChatGLM reference implementations.

The encoder produces, for every layer, `pre_seq_len` extra keys and values that the frozen backbone attends
to. Its output vector per prefix position has `num_layers * 2 * kv_width` entries; layer i takes slice 2i as
its keys and slice 2i + 1 as its values, each split into (kv_heads, head_dim). This is the layout of
ChatGLM-6B's and ChatGLM2-6B's `PrefixEncoder`, so prefixes trained with the reference scripts import as they
are (parameter names `embedding.weight` and `trans.{0,2}.{weight,bias}`).

Widths of the projection variant differ by family:

- "chatglm" (ChatGLM-6B): embedding of the hidden size, MLP hidden width of the hidden size.
- "chatglm2" (ChatGLM2/3, GLM-4 and every other backbone): embedding of `num_layers * 2 * kv_width`, MLP
  hidden width of the hidden size.

Without projection both families use one embedding of `num_layers * 2 * kv_width`.
"""

from __future__ import annotations

import torch
from torch import nn

from ptuning_pl.backbones.base import KVGeometry

PREFIX_FAMILIES = ("chatglm", "chatglm2")


class PrefixEncoder(nn.Module):
    """Trainable prefix: an embedding, optionally followed by a Linear-Tanh-Linear projection."""

    def __init__(
        self,
        pre_seq_len: int,
        geometry: KVGeometry,
        prefix_projection: bool = False,
        prefix_hidden_size: int | None = None,
        dropout: float = 0.1,
        family: str = "chatglm2",
    ) -> None:
        super().__init__()
        if pre_seq_len <= 0:
            raise ValueError(f"pre_seq_len must be positive to build a prefix encoder, got {pre_seq_len}")
        if family not in PREFIX_FAMILIES:
            raise ValueError(f"unknown prefix family {family!r}; expected one of {PREFIX_FAMILIES}")

        self.pre_seq_len = pre_seq_len
        self.geometry = geometry
        self.prefix_projection = prefix_projection
        self.output_size = geometry.num_layers * 2 * geometry.kv_width

        if prefix_projection:
            embedding_size = geometry.hidden_size if family == "chatglm" else self.output_size
            mlp_hidden = prefix_hidden_size or geometry.hidden_size
            self.embedding = nn.Embedding(pre_seq_len, embedding_size)
            self.trans = nn.Sequential(
                nn.Linear(embedding_size, mlp_hidden),
                nn.Tanh(),
                nn.Linear(mlp_hidden, self.output_size),
            )
        else:
            self.embedding = nn.Embedding(pre_seq_len, self.output_size)
            self.trans = None
        self.dropout = nn.Dropout(dropout)

        # Prefix positions 0..pre_seq_len-1, kept as a buffer so it follows the module's device.
        self.register_buffer("prefix_tokens", torch.arange(pre_seq_len), persistent=False)

    def forward(self, batch_size: int, dtype: torch.dtype | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Return one (key, value) pair per layer, each (batch, kv_heads, pre_seq_len, head_dim)."""
        geometry = self.geometry

        # (pre_seq_len, output_size)
        hidden = self.embedding(self.prefix_tokens)
        if self.trans is not None:
            hidden = self.trans(hidden)

        # (batch, pre_seq_len, output_size). As in the reference, each example gets its own dropout mask
        # while training; without dropout the batch dimension stays a broadcast instead of a copy.
        hidden = hidden.unsqueeze(0).expand(batch_size, -1, -1)
        if self.training and self.dropout.p > 0:
            hidden = self.dropout(hidden)

        # (batch, pre_seq_len, num_layers * 2, kv_heads, head_dim)
        # -> (num_layers * 2, batch, kv_heads, pre_seq_len, head_dim)
        hidden = hidden.reshape(
            batch_size, self.pre_seq_len, geometry.num_layers * 2, geometry.kv_heads, geometry.head_dim
        )
        hidden = hidden.permute(2, 0, 3, 1, 4)
        if dtype is not None:
            hidden = hidden.to(dtype)
        return [(hidden[2 * layer], hidden[2 * layer + 1]) for layer in range(geometry.num_layers)]
