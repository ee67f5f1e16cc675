"""ChatGLM-6B tokenizer and prompt format against the original tokenizer and the reference preprocessing.

The goldens were recorded with the original `tokenization_chatglm.py` under transformers 4.30 and the real
`ice_text.model`. One deliberate difference is checked separately: the original turns the literal strings
below into control tokens, while this tokenizer encodes them as plain text.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from helpers_chatglm import load_json, v1_fixture_dir
from ptuning_pl.backbones.chatglm6b import ChatGLM6BPromptFormat
from ptuning_pl.chatglm.tokenization_v1 import ChatGLM6BTokenizer

# Strings that the original's transformers base class splits out as special tokens.
SPECIAL_LITERALS = ("<sop>", "<eop>", "[MASK]", "<pad>", "<unk>")
# The reference preprocessing ran with these lengths.
MAX_SOURCE_LENGTH = 64
MAX_TARGET_LENGTH = 64


def has_special_literal(text: str) -> bool:
    return any(literal in text for literal in SPECIAL_LITERALS)


@pytest.fixture(scope="module")
def fixture_dir() -> Path:
    return v1_fixture_dir()


@pytest.fixture(scope="module")
def tokenizer(fixture_dir) -> ChatGLM6BTokenizer:
    return ChatGLM6BTokenizer.from_pretrained(fixture_dir / "tokenizer")


@pytest.fixture(scope="module")
def goldens(fixture_dir) -> dict:
    return load_json(fixture_dir / "tokenizer_goldens.json")


@pytest.fixture(scope="module")
def golden_masks(fixture_dir) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(fixture_dir / "tokenizer_goldens_masks.safetensors"))


def case_id(case: dict) -> str:
    return case.get("name") or f"{case['group']}_{case['source_index']}"


def plain_cases(goldens: dict) -> list[dict]:
    return [case for case in goldens["cases"] if not has_special_literal(case["text"])]


def literal_cases(goldens: dict) -> list[dict]:
    return [case for case in goldens["cases"] if has_special_literal(case["text"])]


# --------------------------------------------------------------------------------------------------------
# Tokenizer against the original


def test_special_token_ids_match_original(fixture_dir, tokenizer):
    facts = load_json(fixture_dir / "manifest.json")["tokenizer_goldens"]["tokenizer_facts"]
    special_ids = facts["special_token_ids"]
    assert tokenizer.vocab_size == facts["vocab_size_property"]
    assert tokenizer.bos_token_id == facts["bos_token_id"]
    assert tokenizer.eos_token_id == facts["eos_token_id"]
    assert tokenizer.mask_token_id == facts["mask_token_id"]
    assert tokenizer.gmask_token_id == facts["gmask_token_id"]
    assert tokenizer.end_token_id == facts["end_token_id"]
    assert tokenizer.pad_token_id == special_ids["<pad>"]
    assert tokenizer.unk_token_id == special_ids["<unk>"]
    assert tokenizer.convert_tokens_to_ids(["<|tab|>", "<|blank_80|>"]) == [
        special_ids["<|tab|>"],
        special_ids["<|blank_80|>"],
    ]


def test_encoding_matches_original(tokenizer, goldens):
    cases = plain_cases(goldens)
    assert len(cases) == len(goldens["cases"]) - 3
    for case in cases:
        text = case["text"]
        name = case_id(case)
        assert tokenizer.tokenize(text) == case["tokens"], name
        assert tokenizer.encode(text, add_special_tokens=False) == case["ids"], name
        assert tokenizer(text) == case["call"], name


def test_padding_layout_matches_original(tokenizer, goldens, golden_masks):
    for case in plain_cases(goldens):
        name = case_id(case)
        expected = case["call_padding_true"]
        result = tokenizer(case["text"], padding=True)
        assert result["input_ids"] == expected["input_ids"], name
        assert result["position_ids"] == expected["position_ids"], name
        expected_mask = golden_masks[expected["attention_mask"]["safetensors_key"]].bool()
        assert result["attention_mask"] == expected_mask.tolist(), name


def test_decoding_matches_original(tokenizer, goldens):
    # Decoding starts from the original's ids, so the cases with special literals are included.
    for case in goldens["cases"]:
        name = case_id(case)
        call_ids = case["call"]["input_ids"]
        assert tokenizer.decode(case["ids"]) == case["decode_ids"], name
        assert tokenizer.decode(call_ids) == case["decode_call_ids"], name
        assert tokenizer.decode(call_ids, skip_special_tokens=True) == case["decode_call_ids_skip_special"], (
            name
        )


@pytest.mark.parametrize("call_name", ["call", "call_max_length_16_truncation"])
def test_padded_batches_match_original(tokenizer, goldens, golden_masks, call_name):
    options = {"padding": True}
    if call_name == "call_max_length_16_truncation":
        options.update(max_length=16, truncation=True)

    for batch_index, batch in enumerate(goldens["padded_batches"]):
        expected = batch[call_name]
        expected_masks = golden_masks[expected["attention_mask"]["safetensors_key"]].bool()
        texts = batch["texts"]
        if any(has_special_literal(text) for text in texts):
            # Padding depends on the longest row, so compare each plain row without its padding.
            plain_rows = [row for row, text in enumerate(texts) if not has_special_literal(text)]
            result = tokenizer([texts[row] for row in plain_rows], **options, return_tensors=None)
            for position, row in enumerate(plain_rows):
                ours = result["input_ids"][position]
                theirs = [token for token in expected["input_ids"][row] if token != tokenizer.pad_token_id]
                ours_unpadded = [token for token in ours if token != tokenizer.pad_token_id]
                assert ours_unpadded == theirs, f"batch {batch_index} row {row}"
            continue

        result = tokenizer(texts, **options)
        assert result["input_ids"] == expected["input_ids"], f"batch {batch_index}"
        assert result["position_ids"] == expected["position_ids"], f"batch {batch_index}"
        assert result["attention_mask"] == [mask.tolist() for mask in expected_masks], f"batch {batch_index}"

        tensors = tokenizer(texts, **options, return_tensors="pt")
        assert torch.equal(tensors["attention_mask"], expected_masks)
        assert tensors["position_ids"].tolist() == expected["position_ids"]


def test_special_literals_stay_plain_text(tokenizer, goldens):
    cases = literal_cases(goldens)
    assert [case_id(case) for case in cases] == ["special_glm", "special_sp", "special_spaces_around"]
    control_ids = {
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.mask_token_id,
        tokenizer.pad_token_id,
    }
    for case in cases:
        name = case_id(case)
        ids = tokenizer.encode(case["text"], add_special_tokens=False)
        assert not control_ids & set(ids), name
        assert tokenizer.unk_token_id not in ids, name
        # The original turned these into control tokens; here they are ordinary pieces.
        assert ids != case["ids"], name
        assert tokenizer.decode(ids, clean_up_tokenization_spaces=False) == case["text"], name

        layout = tokenizer(case["text"], padding=True)
        assert layout["input_ids"].count(tokenizer.bos_token_id) == 1, name
        assert layout["position_ids"][1].count(1) == 1, name


def test_image_token_offset_shifts_every_id(fixture_dir, tokenizer):
    shifted = ChatGLM6BTokenizer(fixture_dir / "tokenizer" / "ice_text.model", num_image_tokens=20000)
    text = "你好\tworld  !"
    assert shifted.encode(text) == [token + 20000 for token in tokenizer.encode(text)]
    assert shifted.bos_token_id == tokenizer.bos_token_id + 20000
    assert shifted.pad_token_id == tokenizer.pad_token_id + 20000
    assert shifted.vocab_size == tokenizer.vocab_size + 20000
    assert shifted.decode(shifted.encode(text)) == tokenizer.decode(tokenizer.encode(text))
    assert shifted.convert_ids_to_tokens([5]) == ["<image_5>"]
    assert shifted.convert_tokens_to_ids(["<image_5>"]) == [5]


def test_config_without_image_tokens_uses_original_default(tmp_path, fixture_dir):
    config = load_json(fixture_dir / "tokenizer" / "tokenizer_config.json")
    del config["num_image_tokens"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "ice_text.model").symlink_to(fixture_dir / "tokenizer" / "ice_text.model")

    tokenizer = ChatGLM6BTokenizer.from_pretrained(tmp_path)
    assert tokenizer.num_image_tokens == 20000
    assert tokenizer.bos_token_id == 150004


def test_save_pretrained_round_trip(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path)
    reloaded = ChatGLM6BTokenizer.from_pretrained(tmp_path)
    saved_config = load_json(tmp_path / "tokenizer_config.json")

    assert saved_config["tokenizer_class"] == "ChatGLMTokenizer"
    assert saved_config["num_image_tokens"] == 0
    assert reloaded.encode("类型#上衣\n  a") == tokenizer.encode("类型#上衣\n  a")
    assert reloaded.all_special_ids == tokenizer.all_special_ids


def test_missing_vocabulary_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="no ice_text.model"):
        ChatGLM6BTokenizer.from_pretrained(tmp_path)


def test_truncation_keeps_special_tokens(tokenizer):
    with pytest.raises(ValueError, match="leaves no room"):
        tokenizer("abc", max_length=1, truncation=True)
    ids = tokenizer("一二三四五六七八九十", max_length=5, truncation=True)["input_ids"]
    assert len(ids) == 5
    assert ids[-2:] == [tokenizer.gmask_token_id, tokenizer.bos_token_id]


# --------------------------------------------------------------------------------------------------------
# Prompt format against the reference preprocessing


@pytest.fixture(scope="module")
def adgen_records(fixture_dir) -> list[dict]:
    cases = load_json(fixture_dir / "tokenizer_goldens.json")["cases"]
    contents = {case["source_index"]: case["text"] for case in cases if case["group"] == "adgen_content"}
    summaries = {case["source_index"]: case["text"] for case in cases if case["group"] == "adgen_summary"}
    return [{"content": contents[index], "summary": summaries[index]} for index in sorted(contents)]


def test_training_examples_match_reference(tokenizer, goldens, adgen_records):
    prompt_format = ChatGLM6BPromptFormat(tokenizer)
    max_length = MAX_SOURCE_LENGTH + MAX_TARGET_LENGTH
    assert len(goldens["training_examples"]) == 20
    for expected in goldens["training_examples"]:
        record = adgen_records[expected["source_index"]]
        example = prompt_format.encode_train(
            record["content"], record["summary"], [], MAX_SOURCE_LENGTH, MAX_TARGET_LENGTH
        )
        # The reference pads every example to max_source_length + max_target_length.
        padding = max_length - len(example.input_ids)
        input_ids = example.input_ids + [prompt_format.pad_token_id] * padding
        labels = example.labels + [-100] * padding
        assert input_ids == expected["input_ids"], expected["source_index"]
        assert labels == expected["labels"], expected["source_index"]


def test_eval_examples_match_reference(tokenizer, goldens, golden_masks, adgen_records):
    prompt_format = ChatGLM6BPromptFormat(tokenizer)
    assert len(goldens["eval_examples"]) == 20
    for expected in goldens["eval_examples"]:
        index = expected["source_index"]
        record = adgen_records[index]
        example = prompt_format.encode_prompt(record["content"], [], MAX_SOURCE_LENGTH)
        assert example.input_ids == expected["input_ids"], index
        assert example.labels == []

        assert tokenizer.build_position_ids(example.input_ids).tolist() == expected["position_ids"], index
        expected_mask = golden_masks[expected["attention_mask"]["safetensors_key"]].bool()
        assert torch.equal(tokenizer.build_attention_mask(example.input_ids), expected_mask), index

        # The reference labels of evaluation are the summary encoded like a prompt.
        target = tokenizer(record["summary"], max_length=MAX_TARGET_LENGTH, truncation=True)["input_ids"]
        assert target == expected["labels"], index


def test_prompt_format_history_rounds(tokenizer):
    prompt_format = ChatGLM6BPromptFormat(tokenizer)
    history = [("你好", "你好！"), ("今天天气", "晴")]
    expected_text = (
        "[Round 0]\n问：你好\n答：你好！\n[Round 1]\n问：今天天气\n答：晴\n[Round 2]\n问：穿什么\n答："
    )

    assert prompt_format.build_prompt("穿什么", history) == expected_text
    example = prompt_format.encode_prompt("穿什么", history, 256)
    assert example.input_ids == tokenizer.encode(expected_text)


def test_prompt_format_truncation_budgets(tokenizer):
    prompt_format = ChatGLM6BPromptFormat(tokenizer)
    prompt = "一二三四五六七八九十" * 3
    response = "甲乙丙丁戊己庚辛壬癸" * 3

    example = prompt_format.encode_train(prompt, response, [], max_source_length=8, max_target_length=6)
    assert example.prompt_truncated
    assert example.response_truncated
    assert len(example.input_ids) == 8 + 6
    assert example.input_ids[7:9] == [tokenizer.gmask_token_id, tokenizer.bos_token_id]
    assert example.input_ids[-1] == tokenizer.eos_token_id
    assert example.labels[:8] == [-100] * 8
    assert example.labels[8:] == example.input_ids[8:]

    prompt_only = prompt_format.encode_prompt(prompt, [], max_source_length=8)
    assert prompt_only.prompt_truncated
    assert len(prompt_only.input_ids) == 8

    short = prompt_format.encode_train("短", "好", [], max_source_length=8, max_target_length=6)
    assert not short.prompt_truncated
    assert not short.response_truncated


def test_prompt_format_rejects_tiny_budgets(tokenizer):
    prompt_format = ChatGLM6BPromptFormat(tokenizer)
    with pytest.raises(ValueError, match="max_target_length at least 2"):
        prompt_format.encode_train("a", "b", [], max_source_length=4, max_target_length=1)
    with pytest.raises(ValueError, match="at least 2"):
        prompt_format.encode_prompt("a", [], max_source_length=1)


def test_record_cannot_inject_control_tokens(tokenizer):
    prompt_format = ChatGLM6BPromptFormat(tokenizer)
    example = prompt_format.encode_train("a <sop> b [MASK] [gMASK]", "x <eop> y <pad>", [], 64, 64)

    assert example.input_ids.count(tokenizer.bos_token_id) == 1
    assert example.input_ids.count(tokenizer.gmask_token_id) == 1
    assert example.input_ids.count(tokenizer.eos_token_id) == 1
    assert tokenizer.mask_token_id not in example.input_ids
    assert tokenizer.pad_token_id not in example.input_ids
    context_length = example.input_ids.index(tokenizer.bos_token_id)
    assert example.labels[:context_length] == [-100] * context_length
    assert prompt_format.decode(example.input_ids[context_length:]) == "x <eop> y <pad>"


def test_prompt_format_decode_skips_special_tokens(tokenizer):
    prompt_format = ChatGLM6BPromptFormat(tokenizer)
    ids = tokenizer.encode("  你好 ", add_special_tokens=False)
    generated = (
        [tokenizer.bos_token_id]
        + ids
        + [tokenizer.unk_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    )
    assert prompt_format.decode(generated) == "你好"
    assert prompt_format.stop_token_ids == [tokenizer.eos_token_id]
    assert prompt_format.pad_token_id == tokenizer.pad_token_id
