"""ChatGLM2/ChatGLM3 tokenizer and prompt formats against the outputs of the original remote code.

The goldens come from the real `tokenizer.model` run through the original `tokenization_chatglm.py` of each
model under transformers 4.30, and from the reference preprocessing functions: ChatGLM2's `ptuning/main.py`
(source and target budgets 64 and 128) and ChatGLM3's `finetune_demo/finetune_hf.py` (256 and 512).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers_chatglm import load_json, shared_dir
from ptuning_pl.backbones.chatglm2 import (
    ChatGLM2PromptFormat,
    ChatGLM3PromptFormat,
    load_chatglm2_tokenizer_and_format,
)
from ptuning_pl.chatglm.tokenization_v2 import ChatGLM2Tokenizer

IGNORE_INDEX = -100
FAMILIES = {"chatglm2": "v2", "chatglm3": "v3"}
# Budgets of the reference preprocessing that built the training and evaluation goldens.
V2_SOURCE, V2_TARGET, V2_EVAL_TARGET = 64, 128, 64
V3_SOURCE, V3_TARGET = 256, 512
SPECIAL_LITERAL_CASES = ("special_glm", "special_sp", "special_roles", "special_spaces_around")


def fixture_dir(version: str) -> Path:
    folder = shared_dir() / "fixtures" / version
    if not (folder / "tokenizer_goldens.json").is_file():
        pytest.skip(f"ChatGLM2/ChatGLM3 golden fixtures not found in {folder}; set PTUNING_SHARED_DIR")
    return folder


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def goldens(family) -> dict:
    return load_json(fixture_dir(FAMILIES[family]) / "tokenizer_goldens.json")


@pytest.fixture(scope="module")
def tokenizer(family) -> ChatGLM2Tokenizer:
    return ChatGLM2Tokenizer.from_pretrained(fixture_dir(FAMILIES[family]) / "tokenizer", family)


@pytest.fixture(scope="module")
def v2_goldens() -> dict:
    return load_json(fixture_dir("v2") / "tokenizer_goldens.json")


@pytest.fixture(scope="module")
def v3_goldens() -> dict:
    return load_json(fixture_dir("v3") / "tokenizer_goldens.json")


@pytest.fixture(scope="module")
def v2_format() -> ChatGLM2PromptFormat:
    _, prompt_format = load_chatglm2_tokenizer_and_format(fixture_dir("v2") / "tokenizer", family="chatglm2")
    return prompt_format


@pytest.fixture(scope="module")
def v3_format() -> ChatGLM3PromptFormat:
    _, prompt_format = load_chatglm2_tokenizer_and_format(fixture_dir("v3") / "tokenizer", family="chatglm3")
    return prompt_format


def case_id(case: dict) -> str:
    return case.get("name") or f"{case['group']}[{case['source_index']}]"


def adgen_texts(goldens: dict) -> dict[int, tuple[str, str]]:
    """Return source index -> (content, summary) of the ADGEN lines in the goldens."""
    content = {
        case["source_index"]: case["text"] for case in goldens["cases"] if case["group"] == "adgen_content"
    }
    summary = {
        case["source_index"]: case["text"] for case in goldens["cases"] if case["group"] == "adgen_summary"
    }
    assert content.keys() == summary.keys()
    return {index: (content[index], summary[index]) for index in content}


# ------------------------------------------------------------------------------------------------ tokenizer


def test_vocabulary_matches_original(tokenizer, family):
    facts = load_json(fixture_dir(FAMILIES[family]) / "manifest.json")["tokenizer_goldens"]["tokenizer_facts"]
    assert len(tokenizer) == facts["len_tokenizer"]
    assert tokenizer.vocab_size == facts["vocab_size_property"]
    assert tokenizer.special_tokens == facts["special_token_ids"]
    for name, index in facts["commands"].items():
        assert tokenizer.get_command(name) == index, name
    assert tokenizer.pad_token_id == facts["pad_token_id"]
    assert tokenizer.eos_token_id == facts["eos_token_id"]
    assert tokenizer.prefix_tokens == facts["prefix_tokens"]
    assert tokenizer.encode_plain("\n") == facts["newline_ids"]
    assert tokenizer.convert_ids_to_tokens(range(20)) == facts["ids_0_to_20_pieces"]


def test_encoding_matches_original(tokenizer, goldens):
    assert len(goldens["cases"]) == 77
    for case in goldens["cases"]:
        name = case_id(case)
        assert tokenizer.tokenize(case["text"]) == case["tokens"], name
        assert tokenizer.encode(case["text"], add_special_tokens=False) == case["ids"], name
        assert tokenizer(case["text"]) == case["call"], name


def test_decoding_matches_original(tokenizer, goldens, family):
    for case in goldens["cases"]:
        name = case_id(case)
        call_ids = case["call"]["input_ids"]
        assert tokenizer.decode(case["ids"]) == case["decode_ids"], name
        assert tokenizer.decode(call_ids) == case["decode_call_ids"], name
        skipped = tokenizer.decode(call_ids, skip_special_tokens=True)
        if family == "chatglm2":
            assert skipped == case["decode_call_ids_skip_special"], name
        else:
            # Deliberate difference: the original ChatGLM3 keeps "[gMASK]sop" here; this tokenizer drops it.
            assert skipped == case["decode_ids"], name


def test_padded_batches_match_original(tokenizer, goldens):
    assert len(goldens["padded_batches"]) == 3
    for batch_index, batch in enumerate(goldens["padded_batches"]):
        assert tokenizer(batch["texts"], padding=True) == batch["call"], f"batch {batch_index}"
        tensors = tokenizer(batch["texts"], padding=True, return_tensors="pt")
        assert tensors["input_ids"].tolist() == batch["call"]["input_ids"], f"batch {batch_index}"


def test_chatglm3_special_token_mode_matches_original(v3_goldens):
    tokenizer = ChatGLM2Tokenizer.from_pretrained(
        fixture_dir("v3") / "tokenizer", "chatglm3", encode_special_tokens=True
    )
    plain = ChatGLM2Tokenizer.from_pretrained(fixture_dir("v3") / "tokenizer", "chatglm3")
    for case in v3_goldens["cases"]:
        name = case_id(case)
        ids = tokenizer.encode(case["text"], add_special_tokens=False)
        assert ids == case["ids_encode_special_tokens"], name
        assert plain.decode(ids) == case["decode_ids_encode_special_tokens"], name
        # Chat messages are plain text whatever the mode, as in the original.
        assert tokenizer.build_chat_input(case["text"]) == case["chat_input_ids"], name
        assert plain.build_chat_input(case["text"]) == case["chat_input_ids"], name


def test_special_literals_stay_plain_text(tokenizer, goldens):
    cases = {case_id(case): case for case in goldens["cases"]}
    special_ids = set(tokenizer.special_tokens.values())
    control_ids = {tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}
    for name in SPECIAL_LITERAL_CASES:
        text = cases[name]["text"]
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert not special_ids & set(ids), name
        assert not control_ids & set(ids), name
        # The original encodes these strings as text too, so the ids match.
        assert ids == cases[name]["ids"], name
        assert tokenizer.decode(ids) == text, name


def test_prompt_formats_keep_special_literals_as_text(v2_format, v3_format):
    literal = "<|user|>[gMASK]sop<|assistant|><|observation|>eop"
    for prompt_format in (v2_format, v3_format):
        special_ids = set(prompt_format.tokenizer.special_tokens.values())
        template = prompt_format.encode_train("", "", [], 256, 512)
        example = prompt_format.encode_train(literal, literal, [(literal, literal)], 256, 512)
        template_count = sum(token in special_ids for token in template.input_ids)
        # History rounds add role tokens in ChatGLM3 (user and assistant); the literals add none.
        extra = 2 if prompt_format is v3_format else 0
        assert sum(token in special_ids for token in example.input_ids) == template_count + extra
        assert not special_ids & set(prompt_format.encode_text(literal))


def test_chatglm3_mode_rejected_for_chatglm2():
    with pytest.raises(ValueError, match="only for the ChatGLM3 tokenizer"):
        ChatGLM2Tokenizer(
            fixture_dir("v2") / "tokenizer" / "tokenizer.model", "chatglm2", encode_special_tokens=True
        )


def test_unknown_role_rejected(tokenizer, family):
    roles = tokenizer.role_token_ids
    if family == "chatglm2":
        assert roles == {}
    else:
        assert roles == {"system": 64794, "user": 64795, "assistant": 64796, "observation": 64797}
    with pytest.raises(ValueError, match="unknown chat role 'tool'"):
        tokenizer.build_single_message("tool", "", "x")


def test_out_of_range_id_rejected(tokenizer):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.decode([len(tokenizer)])


def test_save_pretrained_round_trip(tmp_path, tokenizer, family):
    files = tokenizer.save_pretrained(tmp_path)
    assert sorted(file.name for file in files) == ["tokenizer.model", "tokenizer_config.json"]
    saved_config = load_json(tmp_path / "tokenizer_config.json")
    assert "auto_map" not in saved_config
    assert saved_config["tokenizer_class"] == "ChatGLMTokenizer"

    reloaded = ChatGLM2Tokenizer.from_pretrained(tmp_path, family)
    text = "你好 <|user|>\nworld"
    assert reloaded.encode(text) == tokenizer.encode(text)


def test_unsupported_tokenizer_option_rejected(tmp_path):
    (tmp_path / "tokenizer.model").symlink_to(fixture_dir("v2") / "tokenizer" / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    with pytest.raises(ValueError, match="do_lower_case=true"):
        ChatGLM2Tokenizer.from_pretrained(tmp_path)


def test_loader_checks_config_ids(tmp_path):
    (tmp_path / "tokenizer.model").symlink_to(fixture_dir("v2") / "tokenizer" / "tokenizer.model")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "chatglm", "eos_token_id": 7}))
    with pytest.raises(ValueError, match="eos: tokenizer 2, config 7"):
        load_chatglm2_tokenizer_and_format(tmp_path)


# ------------------------------------------------------------------------------------- ChatGLM2 preprocessing


def test_chatglm2_training_examples_match_reference(v2_format, v2_goldens):
    texts = adgen_texts(v2_goldens)
    examples = v2_goldens["training_examples"]
    assert len(examples) == 20
    padded_length = V2_SOURCE + V2_TARGET + 1
    for expected in examples:
        index = expected["source_index"]
        content, summary = texts[index]
        assert v2_format.build_prompt(content, []) == expected["prompt_text"], index

        encoded = v2_format.encode_train(content, summary, [], V2_SOURCE, V2_TARGET)
        # The reference pads every example to max_source_length + max_target_length + 1.
        padding = padded_length - len(encoded.input_ids)
        assert encoded.input_ids + [0] * padding == expected["input_ids"], index
        assert encoded.labels + [IGNORE_INDEX] * padding == expected["labels"], index


def test_chatglm2_eval_examples_match_reference(v2_format, v2_goldens):
    tokenizer = v2_format.tokenizer
    texts = adgen_texts(v2_goldens)
    examples = v2_goldens["eval_examples"]
    assert len(examples) == 20
    for expected in examples:
        index = expected["source_index"]
        content, summary = texts[index]
        prompt = v2_format.encode_prompt(content, [], V2_SOURCE)
        assert prompt.input_ids == expected["input_ids"], index
        _, attention_mask, position_ids = tokenizer.pad(prompt.input_ids, 0)
        assert attention_mask == expected["attention_mask"], index
        assert position_ids == expected["position_ids"], index
        # The reference's labels are the target text encoded by tokenizer(text_target=..., truncation=True).
        target = tokenizer(summary, max_length=V2_EVAL_TARGET, truncation=True)["input_ids"]
        assert target == expected["labels"], index


def test_chatglm2_history_rounds():
    tokenizer = ChatGLM2Tokenizer.from_pretrained(fixture_dir("v2") / "tokenizer")
    prompt_format = ChatGLM2PromptFormat(tokenizer, source_prefix="P:")
    history = [("q1", "a1"), ("q2", "a2")]
    expected_text = (
        "P:[Round 1]\n\n问：q1\n\n答：a1\n\n[Round 2]\n\n问：q2\n\n答：a2\n\n[Round 3]\n\n问：q3\n\n答："
    )
    assert prompt_format.build_prompt("q3", history) == expected_text

    encoded = prompt_format.encode_train("q3", "a3", history, 512, 16)
    prompt_ids = tokenizer.prefix_tokens + tokenizer.encode_plain(expected_text)
    response_ids = tokenizer.encode_plain("a3") + [tokenizer.eos_token_id]
    assert encoded.input_ids == prompt_ids + response_ids
    assert encoded.labels == [IGNORE_INDEX] * len(prompt_ids) + response_ids
    assert prompt_format.encode_prompt("q3", history, 512).input_ids == prompt_ids


def test_chatglm2_truncation_keeps_eos(v2_format):
    tokenizer = v2_format.tokenizer
    encoded = v2_format.encode_train("很长的输入" * 50, "很长的回答" * 50, [], 10, 5)
    assert len(encoded.input_ids) == 10 + 5 + 1
    assert encoded.input_ids[:2] == tokenizer.prefix_tokens
    assert encoded.input_ids[-1] == tokenizer.eos_token_id
    assert encoded.labels[-6:] == encoded.input_ids[-6:]
    assert encoded.prompt_truncated
    assert encoded.response_truncated
    assert v2_format.stop_token_ids == [tokenizer.eos_token_id]


# ------------------------------------------------------------------------------------- ChatGLM3 preprocessing


def test_chatglm3_training_examples_match_reference(v3_format, v3_goldens):
    texts = adgen_texts(v3_goldens)
    examples = v3_goldens["training_examples"]
    assert len(examples) == 20
    for expected in examples:
        index = expected["source_index"]
        content, summary = texts[index]
        assert expected["conversation"] == [
            {"role": "user", "content": content},
            {"role": "assistant", "content": summary},
        ]

        encoded = v3_format.encode_train(content, summary, [], V3_SOURCE, V3_TARGET)
        assert encoded.input_ids == expected["input_ids"], index
        assert encoded.labels == expected["labels"], index
        assert not encoded.prompt_truncated
        assert not encoded.response_truncated

        conversation = v3_format.encode_messages(expected["conversation"], V3_SOURCE + V3_TARGET + 1)
        assert conversation.input_ids == expected["input_ids"], index
        assert conversation.labels == expected["labels"], index


def test_chatglm3_eval_examples_match_reference(v3_format, v3_goldens):
    tokenizer = v3_format.tokenizer
    texts = adgen_texts(v3_goldens)
    examples = v3_goldens["eval_examples"]
    assert len(examples) == 20
    for expected in examples:
        index = expected["source_index"]
        content, summary = texts[index]
        assert v3_format.encode_prompt(content, [], V3_SOURCE).input_ids == expected["input_ids"], index
        messages = [{"role": "user", "content": content}]
        assert v3_format.encode_messages_prompt(messages, V3_SOURCE).input_ids == expected["input_ids"], index
        assert tokenizer.build_chat_input(content) == expected["chat_input_ids"], index

        # The reference scores against <newline> + summary + eos, cut to max_output_length.
        output_ids = v3_format.newline_ids + tokenizer.encode_plain(summary) + [tokenizer.eos_token_id]
        assert output_ids[:V3_TARGET] == expected["output_ids"], index
        assert v3_format.decode(expected["output_ids"]) == summary, index


def test_chatglm3_multi_turn_loss_on_assistant_turns(v3_format):
    tokenizer = v3_format.tokenizer
    messages = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "observation", "content": "obs", "metadata": "tool"},
        {"role": "assistant", "content": "a2"},
    ]
    encoded = v3_format.encode_messages(messages, 1000)

    parts = [tokenizer.build_single_message(m["role"], m.get("metadata", ""), m["content"]) for m in messages]
    joined = [token for part in parts for token in part]
    assert encoded.input_ids == tokenizer.prefix_tokens + joined + [tokenizer.eos_token_id]

    # Expected labels: the tokens after each assistant token, that is, the assistant turn without its role
    # token, plus the first token of the next message (or eos).
    system, user, first_answer, observation, second_answer = parts
    unsupervised = [IGNORE_INDEX] * (2 + len(system) + len(user) + 1)
    expected = (
        unsupervised
        + first_answer[1:]
        + [observation[0]]
        + [IGNORE_INDEX] * (len(observation) - 1)
        + [IGNORE_INDEX]
        + second_answer[1:]
        + [tokenizer.eos_token_id]
    )
    assert encoded.labels == expected
    assert parts[3][:1] == [tokenizer.get_command("<|observation|>")]
    assert not encoded.response_truncated

    cut = v3_format.encode_messages(messages, 12)
    assert cut.input_ids == encoded.input_ids[:12]
    assert cut.labels == encoded.labels[:12]
    assert cut.response_truncated


def test_chatglm3_messages_prompt(v3_format):
    tokenizer = v3_format.tokenizer
    messages = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
    ]
    prompt = v3_format.encode_messages_prompt(messages, 100)
    expected = tokenizer.build_chat_input("q2", history=messages[:2])
    assert prompt.input_ids == expected
    assert prompt.labels == []

    short = v3_format.encode_messages_prompt(messages, 6)
    assert short.input_ids == expected[:6] + [tokenizer.get_command("<|assistant|>")]
    assert short.prompt_truncated

    with pytest.raises(ValueError, match="must not be an assistant message"):
        v3_format.encode_messages_prompt(messages[:2], 100)


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        ([], ValueError),
        ([{"role": "tool", "content": "x"}], ValueError),
        ([{"role": "user"}], TypeError),
        ([{"role": "user", "content": "x", "metadata": 3}], TypeError),
    ],
)
def test_chatglm3_invalid_messages_rejected(v3_format, messages, error):
    with pytest.raises(error):
        v3_format.encode_messages(messages, 100)


def test_chatglm3_history_and_truncation(v3_format):
    tokenizer = v3_format.tokenizer
    history = [("第一个问题" * 10, "第一个回答" * 10), ("q2", "a2")]
    full = v3_format.encode_prompt("q3", history, 1000)
    expected = tokenizer.build_chat_input(
        "q3",
        history=[
            {"role": "user", "content": history[0][0]},
            {"role": "assistant", "content": history[0][1]},
            {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "a2"},
        ],
    )
    assert full.input_ids == expected
    assert not full.prompt_truncated

    # A budget too small for the first round drops it whole and keeps the newest round and the query.
    budget = len(expected) - 2
    short = v3_format.encode_prompt("q3", history, budget)
    assert short.prompt_truncated
    assert short.input_ids == tokenizer.build_chat_input(
        "q3", history=[{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    )

    # History is context only: the labels cover the response side alone, which keeps its eos.
    example = v3_format.encode_train("长问题" * 100, "长回答" * 100, history, 20, 8)
    assert example.prompt_truncated
    assert example.response_truncated
    assert len(example.input_ids) == 20 + 1 + 8
    assert example.input_ids[20] == tokenizer.get_command("<|assistant|>")
    assert example.input_ids[-1] == tokenizer.eos_token_id
    assert example.labels[:21] == [IGNORE_INDEX] * 21
    assert example.labels[21:] == example.input_ids[21:]
    assert v3_format.stop_token_ids == [2, 64795, 64797]


def test_chatglm3_budgets_rejected_when_too_small(v3_format):
    with pytest.raises(ValueError, match="max_source_length must be at least 5"):
        v3_format.encode_prompt("q", [], 4)
    with pytest.raises(ValueError, match="max_target_length must be at least 3"):
        v3_format.encode_train("q", "a", [], 10, 2)


def test_chatglm3_format_needs_chat_roles():
    tokenizer = ChatGLM2Tokenizer.from_pretrained(fixture_dir("v2") / "tokenizer", "chatglm2")
    with pytest.raises(ValueError, match="family='chatglm3'"):
        ChatGLM3PromptFormat(tokenizer)


def test_decode_drops_special_tokens(v3_format):
    tokenizer = v3_format.tokenizer
    ids = tokenizer.encode_plain("答案") + [tokenizer.get_command("<|user|>"), tokenizer.eos_token_id]
    assert v3_format.decode(torch.tensor(ids).tolist()) == "答案"
