"""Backbones from transformers' own model classes (GLM-4, ChatGLM2/3 after conversion, any causal LM).

The prefix enters as the first `pre_seq_len` entries of a `DynamicCache`. The real tokens keep positions
0..n-1 (computed from the padding mask, so left padding does not shift them), and the attention mask gets
`pre_seq_len` leading columns of ones, so every token sees the whole prefix.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, DynamicCache, PreTrainedModel

from ptuning_pl.backbones.base import Backbone, KVGeometry, PrefixKV

log = logging.getLogger(__name__)


@dataclass
class HFCache:
    """A transformers cache plus the number of prefix entries at its front."""

    cache: DynamicCache
    prefix_length: int


def geometry_of(model: PreTrainedModel) -> KVGeometry:
    config = model.config.get_text_config()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return KVGeometry(
        num_layers=config.num_hidden_layers,
        kv_heads=kv_heads,
        head_dim=head_dim,
        hidden_size=config.hidden_size,
    )


class HFBackbone(Backbone):
    """A transformers causal LM that takes a key/value cache through the `cache` argument."""

    prefix_family = "chatglm2"

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.geometry = geometry_of(model)

    def new_cache(self, prefix: PrefixKV | None, batch_size: int) -> HFCache:
        cache = DynamicCache(config=self.model.config)
        if not prefix:
            return HFCache(cache, 0)
        for layer_index, (key, value) in enumerate(prefix):
            cache.update(key, value, layer_index)
        return HFCache(cache, prefix[0][0].shape[-2])

    def _inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: HFCache) -> dict:
        batch_size, new_tokens = input_ids.shape

        # Positions count real tokens only: a left-padded prompt starts at 0, and the prefix has no position.
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -new_tokens:]

        prefix_columns = attention_mask.new_ones(batch_size, cache.prefix_length)
        full_mask = torch.cat([prefix_columns, attention_mask], dim=-1)
        return {
            "input_ids": input_ids,
            "attention_mask": full_mask,
            "position_ids": positions,
            "cache": cache.cache,
            "use_cache": True,
        }

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: HFCache) -> torch.Tensor:
        return self.model(**self._inputs(input_ids, attention_mask, cache)).logits

    def forward_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: HFCache) -> torch.Tensor:
        return self.model.base_model(**self._inputs(input_ids, attention_mask, cache)).last_hidden_state

    def output_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.get_output_embeddings()(hidden)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each decoder layer in backward, keeping the prefix (which transformers' own would drop)."""
        from ptuning_pl.backbones.chatglm2 import enable_prefix_gradient_checkpointing

        count = enable_prefix_gradient_checkpointing(self.model)
        log.info("gradient checkpointing enabled on %d decoder layers", count)

    def reorder_cache(self, cache: HFCache, index: torch.Tensor) -> HFCache:
        cache.cache.reorder_cache(index)
        return cache


def load_hf_backbone(
    path: str,
    revision: str | None = None,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
) -> HFBackbone:
    """Load a causal LM from a hub id or a local folder, frozen and in eval mode."""
    log.info("loading backbone %s (revision %s, dtype %s)", path, revision or "default", dtype)
    model = AutoModelForCausalLM.from_pretrained(
        path, revision=revision, dtype=dtype, trust_remote_code=trust_remote_code
    )
    model.requires_grad_(False)
    model.eval()
    return HFBackbone(model)
