"""A tiny randomly initialised GLM and a byte-level BPE tokenizer trained on the training texts.

It exists so that the whole pipeline runs offline in minutes on a CPU. `write_tiny_backbone` saves weights and
tokenizer once into a folder (normally `<run_dir>/backbone/`); from then on that folder is an ordinary
`model.path`, so prediction, export and reload see the identical backbone.

The tokenizer carries GLM-4's special tokens and a GLM-4-style chat template, so the tiny model exercises the
same prompt path as a real GLM-4 chat model.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GlmConfig, GlmForCausalLM, PreTrainedTokenizerFast

from ptuning_pl.files import make_user_readable

log = logging.getLogger(__name__)

GMASK, SOP, EOS = "[gMASK]", "<sop>", "<|endoftext|>"
SPECIAL_TOKENS = [EOS, GMASK, SOP, "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]

# GLM-4's layout: "[gMASK]<sop>" once, then "<|role|>\n" before each message's content.
CHAT_TEMPLATE = (
    "[gMASK]<sop>"
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` (deterministic for the same texts)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS,
        pad_token=EOS,
        additional_special_tokens=SPECIAL_TOKENS[1:],
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
    )


def build_tiny_glm(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    head_dim: int = 16,
    intermediate_size: int = 160,
    initializer_range: float = 0.02,
    seed: int = 0,
) -> GlmForCausalLM:
    """Build a randomly initialised GLM with grouped-query attention (kv heads < attention heads)."""
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    config = GlmConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=head_dim,
        partial_rotary_factor=0.5,
        attention_bias=True,
        max_position_embeddings=2048,
        pad_token_id=eos_id,
        eos_token_id=[eos_id, tokenizer.convert_tokens_to_ids("<|user|>")],
        tie_word_embeddings=False,
        initializer_range=initializer_range,
    )
    # Its own seed, without touching the global generator: a run that writes the backbone and one that
    # reloads it must draw the same prefix initialisation afterwards.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GlmForCausalLM(config)
    model.generation_config.pad_token_id = eos_id
    return model


def write_tiny_backbone(
    output_dir: str | os.PathLike,
    texts: Iterable[str],
    vocab_size: int = 1200,
    **model_kwargs,
) -> Path:
    """Write tokenizer and weights to `output_dir` unless it already holds a backbone; return the folder.

    The folder appears atomically (written beside it, then renamed), so a concurrent process or a crash never
    sees half a backbone.
    """
    output_dir = Path(output_dir)
    if (output_dir / "config.json").exists():
        log.info("reusing tiny backbone in %s", output_dir)
        return output_dir

    tokenizer = train_tokenizer(texts, vocab_size)
    model = build_tiny_glm(tokenizer, **model_kwargs)

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".backbone-", dir=output_dir.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        make_user_readable(staging)
        staging.rename(output_dir)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (output_dir / "config.json").exists():
            raise
    log.info(
        "wrote tiny backbone to %s (%d parameters, vocabulary %d)",
        output_dir,
        sum(p.numel() for p in model.parameters()),
        len(tokenizer),
    )
    return output_dir
