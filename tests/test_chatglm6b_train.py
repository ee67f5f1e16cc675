"""experiment=adgen on a tiny random ChatGLM-6B checkpoint in the official layout with the real tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import FIXTURES, compose_config
from ptuning_pl.chatglm import ChatGLM6BConfig, ChatGLM6BForCausalLM, ChatGLM6BTokenizer
from ptuning_pl.sample_data import sample_data_dir
from ptuning_pl.train import train

pytestmark = pytest.mark.slow

TOKENIZER_DIR = FIXTURES / "v1" / "tokenizer"


@pytest.fixture(scope="module")
def chatglm_folder(tmp_path_factory) -> Path:
    """A random 2-layer ChatGLM-6B with the real vocabulary, written as the official repository lays it out."""
    if not (TOKENIZER_DIR / "ice_text.model").is_file():
        pytest.skip(f"the real ChatGLM-6B tokenizer is not in {TOKENIZER_DIR}")
    folder = tmp_path_factory.mktemp("chatglm-6b-tiny")
    for name in ("ice_text.model", "tokenizer_config.json"):
        shutil.copy(TOKENIZER_DIR / name, folder / name)
    tokenizer = ChatGLM6BTokenizer.from_pretrained(folder)

    config = {
        "architectures": ["ChatGLMModel"],
        "model_type": "chatglm",
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "inner_hidden_size": 64,
        "num_layers": 2,
        "num_attention_heads": 4,
        "layernorm_epsilon": 1e-5,
        "max_sequence_length": 2048,
        "position_encoding_2d": True,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "mask_token_id": tokenizer.mask_token_id,
        "gmask_token_id": tokenizer.gmask_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "torch_dtype": "float16",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    torch.manual_seed(0)
    model = ChatGLM6BForCausalLM(ChatGLM6BConfig.from_dict(config))
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, folder / "model.safetensors")
    return folder


@pytest.fixture
def adgen_dir(tmp_path) -> Path:
    folder = tmp_path / "AdvertiseGen"
    folder.mkdir()
    for name in ("train.json", "dev.json"):
        lines = (sample_data_dir() / name).read_text(encoding="utf-8").splitlines()[:24]
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.mark.parametrize("checkpointing", [False, True])
def test_adgen_runs_on_tiny_chatglm6b(chatglm_folder, adgen_dir, tmp_path, checkpointing):
    cfg = compose_config(
        tmp_path / "run",
        [
            "experiment=adgen",
            f"data.dir={adgen_dir}",
            f"model.path={chatglm_folder}",
            "model.dtype=float32",
            f"model.gradient_checkpointing={str(checkpointing).lower()}",
            "model.prefix.pre_seq_len=8",
            "trainer=cpu",
            "trainer.max_steps=3",
            "trainer.val_check_interval=3",
            "data.batch_size=4",
            "evaluation.val_examples=4",
            "evaluation.max_new_tokens=6",
            "+trainer.limit_test_batches=1",
            "callbacks.progress_bar=null",
        ],
    )
    assert cfg.model.family == "chatglm"
    metrics = train(cfg)
    assert metrics["train/loss"] > 0
    assert {"val/loss", "val/rouge-l", "test/loss", "test/bleu-4"} <= set(metrics)

    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    # ChatGLM-6B without projection: one embedding of num_layers * 2 * hidden (4 heads x 8).
    assert {name: tuple(value.shape) for name, value in state.items()} == {"prefix_encoder.embedding.weight": (8, 2 * 2 * 32)}
