"""Encoding, truncation, padding and batching of the data module on the tiny tokenizer."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from ptuning_pl.backbones.base import EncodedExample, PromptFormat
from ptuning_pl.backbones.tiny import train_tokenizer
from ptuning_pl.data import AdgenDataModule, pad_batch, split_records
from ptuning_pl.prompts import IGNORE_INDEX, ChatTemplateFormat, PlainFormat, build_prompt_format
from ptuning_pl.records import read_records
from ptuning_pl.sample_data import sample_data_dir
from ptuning_pl.sampling import EvalBatchSampler, LengthGroupedBatchSampler


@pytest.fixture(scope="module")
def tokenizer():
    texts = [line for name in ("train.json",) for line in (sample_data_dir() / name).read_text("utf-8").splitlines()]
    return train_tokenizer(texts, vocab_size=800)


@pytest.fixture(scope="module")
def chat(tokenizer):
    return build_prompt_format(tokenizer)


def test_auto_picks_chat_template(chat):
    assert isinstance(chat, ChatTemplateFormat)


def test_training_layout_and_labels(chat, tokenizer):
    encoded = chat.encode_train("类型#裙", "很好看", [], max_source_length=64, max_target_length=64)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "类型#裙"}], tokenize=False, add_generation_prompt=True
    )
    prompt_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer("很好看", add_special_tokens=False)["input_ids"]

    assert encoded.input_ids == [*prompt_ids, *response_ids, tokenizer.eos_token_id]
    assert encoded.labels == [IGNORE_INDEX] * len(prompt_ids) + [*response_ids, tokenizer.eos_token_id]
    assert not encoded.prompt_truncated
    assert not encoded.response_truncated


def test_special_token_strings_in_user_text_stay_text(chat, tokenizer):
    literal = "<|assistant|>[gMASK]<|endoftext|>"
    encoded = chat.encode_train(literal, literal, [], 64, 64)
    special_ids = set(tokenizer.all_special_ids)
    prompt_template = chat.encode_prompt("", [], 64).input_ids
    # The only control tokens are the template's and the final end token.
    controls = [token for token in encoded.input_ids if token in special_ids]
    assert controls == [t for t in prompt_template if t in special_ids] + [tokenizer.eos_token_id]
    assert tokenizer.decode(encoded.input_ids).count(literal) == 2


def test_truncation_budgets(chat, tokenizer):
    prompt = "类型#上衣*材质#牛仔布*颜色#白色" * 20
    response = "简约而不简单的牛仔外套，白色的衣身十分百搭。" * 20
    encoded = chat.encode_train(prompt, response, [], max_source_length=24, max_target_length=10)
    prompt_part = [i for i, label in zip(encoded.input_ids, encoded.labels) if label == IGNORE_INDEX]
    response_part = [label for label in encoded.labels if label != IGNORE_INDEX]

    assert len(prompt_part) == 24
    assert len(response_part) == 10
    assert response_part[-1] == tokenizer.eos_token_id
    assert encoded.prompt_truncated and encoded.response_truncated
    # The prompt keeps its beginning and still ends with the generation prompt of the template.
    assert prompt_part[-2:] == chat.encode_prompt("", [], 64).input_ids[-2:]


def test_history_dropped_before_query(chat, tokenizer):
    history = [("第一轮问题" * 5, "第一轮回答" * 5), ("第二轮问题", "第二轮回答")]
    full = chat.encode_prompt("当前问题", history, 400)
    assert not full.prompt_truncated
    assert "第一轮问题" in tokenizer.decode(full.input_ids)

    budget = len(chat.encode_prompt("当前问题", history[1:], 400).input_ids)
    trimmed = chat.encode_prompt("当前问题", history, budget)
    text = tokenizer.decode(trimmed.input_ids)
    assert trimmed.prompt_truncated
    assert "第一轮问题" not in text
    assert "第二轮问题" in text
    assert "当前问题" in text


def test_template_longer_than_budget_is_an_error(chat):
    with pytest.raises(ValueError, match="raise data.max_source_length"):
        chat.encode_prompt("x", [], max_source_length=2)


def test_plain_format(tokenizer):
    plain = PlainFormat(tokenizer)
    encoded = plain.encode_train("问", "答", [("旧问", "旧答")], 64, 64)
    assert tokenizer.decode(encoded.input_ids) == "旧问\n旧答\n问答<|endoftext|>"
    assert encoded.labels[-1] == tokenizer.eos_token_id


def test_pad_batch_is_dynamic_and_masks_labels():
    items = [
        {"index": 0, "input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]},
        {"index": 1, "input_ids": [8, 9], "labels": [IGNORE_INDEX, 9]},
    ]
    right = pad_batch(items, pad_token_id=0)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert right["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [IGNORE_INDEX, 9, IGNORE_INDEX]]
    left = pad_batch(items, pad_token_id=0, padding_side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 8, 9]]
    assert left["index"].tolist() == [0, 1]


class NoSupervisionFormat(PromptFormat):
    """A format that supervises nothing for prompts starting with 'drop'."""

    name = "test"

    def encode_train(self, prompt, response, history, max_source_length, max_target_length):
        label = IGNORE_INDEX if prompt.startswith("drop") else 2
        return EncodedExample(input_ids=[1, 2], labels=[IGNORE_INDEX, label])

    def encode_prompt(self, prompt, history, max_source_length):
        return EncodedExample(input_ids=[1], labels=[])

    pad_token_id = 0
    stop_token_ids = [0]

    def decode(self, ids):
        return ""


def test_sample_without_supervised_token_is_dropped_and_logged(tmp_path, caplog):
    path = tmp_path / "train.json"
    rows = [{"content": "keep", "summary": "a"}, {"content": "drop me", "summary": "b"}, {"content": "keep", "summary": "c"}]
    path.write_text("\n".join(json.dumps(row) for row in rows), encoding="utf-8")
    datamodule = AdgenDataModule(prompt_format=NoSupervisionFormat(), train_file=str(path), validation_file=str(path))
    with caplog.at_level(logging.INFO, logger="ptuning_pl.data"):
        datamodule.setup("fit")
    assert len(datamodule.datasets["train"]) == 2
    assert datamodule.stats["train"].dropped == [1]
    assert "1 dropped with no supervised token" in caplog.text


def test_sample_data_encodes_with_counts(chat, caplog):
    folder = sample_data_dir()
    datamodule = AdgenDataModule(
        prompt_format=chat,
        train_file=str(folder / "train.json"),
        validation_file=str(folder / "dev.json"),
        test_file=str(folder / "test.json"),
        max_source_length=16,
        max_target_length=6,
    )
    with caplog.at_level(logging.INFO, logger="ptuning_pl.data"):
        datamodule.setup("fit")
    stats = datamodule.stats["train"]
    assert stats.examples == 400
    assert stats.prompts_truncated > 0
    assert stats.responses_truncated > 0
    assert "train: 400 examples" in caplog.text
    batch = next(iter(datamodule.train_dataloader()))
    longest = int(batch["attention_mask"].sum(dim=1).max())
    assert batch["input_ids"].shape == (16, longest)


def test_split_is_seeded_and_disjoint():
    records = read_records(sample_data_dir() / "train.json")
    first = split_records(records, (0.8, 0.1, 0.1), seed=3)
    second = split_records(records, (0.8, 0.1, 0.1), seed=3)
    other = split_records(records, (0.8, 0.1, 0.1), seed=4)
    assert [len(first[name]) for name in ("train", "validation", "test")] == [320, 40, 40]
    assert [r.index for r in first["test"]] == [r.index for r in second["test"]]
    assert [r.index for r in first["test"]] != [r.index for r in other["test"]]
    seen = [r.index for name in first for r in first[name]]
    assert sorted(seen) == list(range(400))


def test_length_grouped_sampler_groups_lengths():
    lengths = [(i * 37) % 101 for i in range(200)]
    sampler = LengthGroupedBatchSampler(lengths, batch_size=8, seed=1, window_batches=5)
    batches = list(sampler)
    flat = sorted(i for batch in batches for i in batch)
    assert flat == list(range(200))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 25  # random batches of 8 from 0..100 spread about 78
    sampler.set_epoch(1)
    assert list(sampler) != batches


def test_lightning_sets_sampler_epoch():
    from lightning.fabric.utilities.data import _set_sampler_epoch
    from torch.utils.data import DataLoader

    sampler = LengthGroupedBatchSampler(list(range(20)), 4, seed=0)
    _set_sampler_epoch(DataLoader(list(range(20)), batch_sampler=sampler), 3)
    assert sampler.epoch == 3


def test_length_grouped_sampler_shards_and_skips():
    lengths = list(range(50))
    ranks = [LengthGroupedBatchSampler(lengths, 4, seed=0, num_replicas=2, rank=r) for r in (0, 1)]
    per_rank = [list(s) for s in ranks]
    assert len(per_rank[0]) == len(per_rank[1]) == len(ranks[0]) == 6
    assert not set(sum(per_rank[0], [])) & set(sum(per_rank[1], []))

    single = LengthGroupedBatchSampler(lengths, 4, seed=0)
    full = list(single)
    single.skip_batches(epoch=0, count=5)
    assert list(single) == full[5:]
    assert list(single) == full  # the skip applies to one iteration only

    # A resume after the last batch of epoch 0 goes on with epoch 1, which must not be skipped.
    single.skip_batches(epoch=0, count=len(full))
    single.set_epoch(1)
    epoch_one = list(single)
    assert len(epoch_one) == len(full)
    assert epoch_one != full


def test_eval_sampler_gives_each_example_to_one_rank():
    shards = [list(EvalBatchSampler(7, batch_size=2, num_replicas=2, rank=r)) for r in (0, 1)]
    assert shards[0] == [[0, 2], [4, 6]]
    assert shards[1] == [[1, 3], [5]]
