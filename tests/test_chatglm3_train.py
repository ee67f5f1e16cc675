"""model=chatglm3_6b trains on a tiny random ChatGLM3 checkpoint with the real tokenizer, on messages data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import FIXTURES, compose_config
from ptuning_pl.records import DataFileError, read_records
from ptuning_pl.train import train

pytestmark = pytest.mark.slow

TOKENIZER_DIR = FIXTURES / "v3" / "tokenizer"


@pytest.fixture(scope="module")
def chatglm3_folder(tmp_path_factory) -> Path:
    """The v3 fixture's tiny config with the real vocabulary size, random weights in the original key layout."""
    if not (TOKENIZER_DIR / "tokenizer.model").is_file():
        pytest.skip(f"the real ChatGLM3 tokenizer is not in {TOKENIZER_DIR}")
    from ptuning_pl.chatglm.tokenization_v2 import ChatGLM2Tokenizer

    folder = tmp_path_factory.mktemp("chatglm3-tiny")
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(TOKENIZER_DIR / name, folder / name)
    tokenizer = ChatGLM2Tokenizer.from_pretrained(folder, family="chatglm3")

    config = json.loads((FIXTURES / "v3" / "config.json").read_text())
    config.pop("special_token_ids", None)
    config["padded_vocab_size"] = len(tokenizer)
    config["vocab_size"] = len(tokenizer)
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")

    # Random weights named as the original checkpoint (transformer.encoder.layers.N...): the fixture's key
    # names and shapes, with the embedding and output layer widened to the real vocabulary.
    from safetensors.torch import load_file

    shapes = {name: tensor.shape for name, tensor in load_file(FIXTURES / "v3" / "model.safetensors").items()}
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, shape in shapes.items():
        if "word_embeddings" in name or "output_layer" in name:
            shape = (len(tokenizer), shape[1])
        state[name] = torch.randn(shape, generator=generator) * 0.05
        if name.endswith("layernorm.weight"):
            state[name] = torch.ones(shape)
    save_file(state, folder / "model.safetensors")
    return folder


def write_messages(path: Path, count: int) -> Path:
    rows = []
    for i in range(count):
        rows.append({"conversations": [
            {"role": "system", "content": "你是一个服装文案助手。"},
            {"role": "user", "content": f"类型#裙*颜色#{i}号色"},
            {"role": "assistant", "content": f"这条裙子是{i}号色，很好看。"},
            {"role": "user", "content": "再短一点"},
            {"role": "assistant", "content": f"{i}号色裙子。"},
        ]})
    path.write_text("\n".join(json.dumps(row, ensure_ascii=False) for row in rows) + "\n", encoding="utf-8")
    return path


def test_messages_records_read(tmp_path):
    records = read_records(write_messages(tmp_path / "m.json", 2), messages_column="conversations")
    assert records[0].messages[0] == ("system", "你是一个服装文案助手。")
    assert records[0].prompt == "再短一点"
    assert records[0].response == "0号色裙子。"


@pytest.mark.parametrize(
    "row,message",
    [
        ({"conversations": []}, "with no items"),
        ({"conversations": [{"role": "bot", "content": "x"}]}, '.role is "bot"'),
        ({"conversations": [{"role": "user", "content": 3}]}, ".content is a number"),
        ({"conversations": [{"role": "user", "content": "hi"}]}, "has no assistant message"),
        ({"other": 1}, 'field "conversations" is missing'),
    ],
)
def test_bad_messages_rejected(tmp_path, row, message):
    path = tmp_path / "bad.json"
    path.write_text('{"conversations": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
                    + json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    with pytest.raises(DataFileError) as caught:
        read_records(path, messages_column="conversations")
    assert caught.value.line == 2
    assert message in str(caught.value)


@pytest.mark.parametrize("data_format", ["messages", "adgen"])
def test_chatglm3_trains(chatglm3_folder, tmp_path, data_format):
    if data_format == "messages":
        train_file = write_messages(tmp_path / "train.json", 24)
        data = [f"data.train_file={train_file}", "data.messages_column=conversations"]
    else:
        from ptuning_pl.sample_data import sample_data_dir

        data = [f"data.train_file={sample_data_dir() / 'dev.json'}"]
    cfg = compose_config(
        tmp_path / "run",
        [
            "model=chatglm3_6b", f"model.path={chatglm3_folder}", "model.dtype=float32", *data,
            "data.validation_file=null", "data.test_file=null", "data.split=[0.75,0.125,0.125]",
            "data.batch_size=4", "model.prefix.pre_seq_len=4", "trainer.max_steps=3", "trainer.val_check_interval=3",
            "evaluation.val_examples=2", "evaluation.max_new_tokens=4", "test=true", "callbacks.progress_bar=null",
        ],
    )
    metrics = train(cfg)
    assert metrics["train/loss"] > 0
    assert "test/rouge-l" in metrics
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    config = json.loads((chatglm3_folder / "config.json").read_text())
    kv_width = config["multi_query_group_num"] * config["kv_channels"]
    assert state["prefix_encoder.embedding.weight"].shape == (4, config["num_layers"] * 2 * kv_width)


def test_messages_need_a_chat_family(tmp_path):
    from ptuning_pl.config import ConfigError

    train_file = write_messages(tmp_path / "train.json", 8)
    cfg = compose_config(
        tmp_path / "run",
        ["experiment=adgen_tiny", f"data.train_file={train_file}", "data.messages_column=conversations",
         "data.validation_file=null", "data.test_file=null", "callbacks.progress_bar=null"],
    )
    with pytest.raises(ConfigError, match="needs a chat family with roles"):
        train(cfg)
