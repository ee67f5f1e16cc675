"""Shared helpers for the ChatGLM-6B tests: locating the golden fixtures and running greedy decoding.

The fixtures live in the `shared/` folder beside the repository root (override with PTUNING_SHARED_DIR). They
hold outputs of the original ChatGLM-6B remote code; tests that need them are skipped when they are absent.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from ptuning_pl.backbones.base import Backbone, PrefixKV


def shared_dir() -> Path:
    override = os.environ.get("PTUNING_SHARED_DIR")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / "shared"


def v1_fixture_dir() -> Path:
    """Return the ChatGLM-6B fixture folder, or skip the test when it is absent."""
    folder = shared_dir() / "fixtures" / "v1"
    if not (folder / "manifest.json").is_file():
        pytest.skip(
            f"ChatGLM-6B golden fixtures not found in {folder}; set PTUNING_SHARED_DIR to the shared folder"
        )
    return folder


def load_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def greedy_generate(
    backbone: Backbone,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prefix: PrefixKV | None,
    max_new_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill the left-padded prompt batch, then feed back the argmax token one step at a time.

    Returns the new tokens (batch, max_new_tokens) and the logits of every step
    (max_new_tokens, batch, vocab).
    The loop does not stop at an end token.
    """
    cache = backbone.new_cache(prefix, input_ids.shape[0])
    mask = attention_mask.clone()
    logits = backbone.forward(input_ids, mask, cache)[:, -1]
    tokens, scores = [], []
    for step in range(max_new_tokens):
        scores.append(logits)
        next_token = logits.argmax(dim=-1, keepdim=True)
        tokens.append(next_token)
        if step + 1 == max_new_tokens:
            break
        mask = torch.cat([mask, torch.ones_like(next_token)], dim=1)
        logits = backbone.forward(next_token, mask, cache)[:, -1]
    return torch.cat(tokens, dim=1), torch.stack(scores)
