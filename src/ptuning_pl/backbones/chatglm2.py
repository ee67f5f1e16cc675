"""ChatGLM2-6B and ChatGLM3-6B behind the `Backbone` seam, running on transformers' `GlmForCausalLM`.

The two models share one architecture, and in fp32 their original modeling files give identical logits. It is
the architecture of transformers' GLM: RMSNorm, grouped-query attention with biased q/k/v projections, rotary
embeddings on the first half of each head in interleaved pairs, and a SwiGLU MLP. So no model is written here.
The loader converts an original checkpoint at load time:

- `config.json` of model type "chatglm" becomes a `GlmConfig` (`glm_config_from_chatglm`), with
  `num_key_value_heads` = multi_query_group_num, `head_dim` = kv_channels, `partial_rotary_factor` 0.5 and
  `rope_theta` = 10000 * rope_ratio.
- Weight keys are renamed (`convert_chatglm_tensor`). The fused `query_key_value` weight and bias split, in
  that order, into q (heads * kv_channels rows), k and v (groups * kv_channels rows each).

The key check is strict: a missing, unexpected or wrongly shaped key raises `ChatGLM2CheckpointMismatchError`,
which lists them. `save_converted` writes the converted model once, as an ordinary transformers folder that
`AutoModelForCausalLM` (family "hf") or this loader reads without conversion.

The prefix enters through `HFBackbone` as past keys and values of groups x head_dim per layer, so a
`PrefixEncoder` of family "chatglm2" has the parameter shapes of the reference P-Tuning v2 scripts.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import huggingface_hub
import torch
from torch.utils.checkpoint import checkpoint
from transformers import GlmConfig, GlmForCausalLM, PreTrainedModel
from transformers.models.glm.modeling_glm import GlmRotaryEmbedding

from ptuning_pl.backbones.base import EncodedExample, PromptFormat
from ptuning_pl.backbones.chatglm6b import (
    BIN_INDEX_FILE,
    CONFIG_FILE,
    SAFETENSORS_INDEX_FILE,
    CheckpointMismatchError,
    export_reference_prefix,
    find_checkpoint_files,
    import_reference_prefix,
    iterate_checkpoint_tensors,
)
from ptuning_pl.backbones.hf import HFBackbone
from ptuning_pl.chatglm import tokenization_v2
from ptuning_pl.chatglm.tokenization_v2 import ROLES, ChatGLM2Tokenizer

logger = logging.getLogger(__name__)

CHATGLM2_FAMILIES = ("chatglm2", "chatglm3")
ORIGINAL_MODEL_TYPE = "chatglm"
CONVERTED_MODEL_TYPE = "glm"
#: Written by `save_converted` beside the converted weights: where they came from and the original config.
CONVERSION_RECORD_FILE = "chatglm_conversion.json"

TOKENIZER_FILE = tokenization_v2.VOCAB_FILE_NAME
TOKENIZER_CONFIG_FILE = tokenization_v2.CONFIG_FILE_NAME
HUB_TOKENIZER_PATTERNS = [CONFIG_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE]
# Both weight formats are listed because a repository may hold either.
HUB_MODEL_PATTERNS = [
    CONFIG_FILE,
    "*.safetensors",
    SAFETENSORS_INDEX_FILE,
    "pytorch_model*.bin",
    BIN_INDEX_FILE,
]

IGNORE_INDEX = -100
# Keys listed in full in a key-mismatch error; longer lists are cut with a count.
MAX_LISTED_KEYS = 50

__all__ = [
    "CHATGLM2_FAMILIES",
    "ChatGLM2Backbone",
    "ChatGLM2CheckpointMismatchError",
    "ChatGLM2PromptFormat",
    "ChatGLM3PromptFormat",
    "convert_chatglm_tensor",
    "enable_prefix_gradient_checkpointing",
    "export_reference_prefix",
    "glm_config_from_chatglm",
    "import_reference_prefix",
    "load_chatglm2_backbone",
    "load_chatglm2_model",
    "load_chatglm2_tokenizer_and_format",
    "save_converted",
]


class ChatGLM2CheckpointMismatchError(CheckpointMismatchError):
    """A checkpoint's keys or shapes do not match the ChatGLM2/ChatGLM3 layout of its config."""


# --------------------------------------------------------------------------------------------------------
# Config conversion

# Original config values that the GLM architecture hard-codes; a config that differs cannot be converted.
REQUIRED_ORIGINAL_VALUES = {
    "rmsnorm": True,
    "add_bias_linear": False,
    "post_layer_norm": True,
    "apply_residual_connection_post_layernorm": False,
    "multi_query_attention": True,
    "fp32_residual_connection": False,
}
REQUIRED_ORIGINAL_KEYS = (
    "padded_vocab_size",
    "hidden_size",
    "ffn_hidden_size",
    "num_layers",
    "num_attention_heads",
    "multi_query_group_num",
    "kv_channels",
    "layernorm_epsilon",
    "seq_length",
)


def glm_config_from_chatglm(original: Mapping[str, Any]) -> GlmConfig:
    """Return the `GlmConfig` of an original ChatGLM2/ChatGLM3 (or GLM-4 "chatglm") `config.json`.

    Raises ValueError, listing every problem, for a ChatGLM-6B (v1) config or values the GLM architecture
    cannot express. `apply_query_key_layer_scaling` and `attention_softmax_in_fp32` change only how the
    original rounds in half precision, so they are not carried over.
    """
    if "position_encoding_2d" in original or "inner_hidden_size" in original:
        raise ValueError(
            "this config.json is a ChatGLM-6B (GLM v1) config; load it with model.family=chatglm"
        )
    problems = [f"{key} is missing" for key in REQUIRED_ORIGINAL_KEYS if key not in original]
    for key, required in REQUIRED_ORIGINAL_VALUES.items():
        if key in original and bool(original[key]) != required:
            problems.append(f"{key}={original[key]} is not supported (expected {required})")
    if problems:
        raise ValueError("cannot convert this ChatGLM2/ChatGLM3 config.json: " + "; ".join(problems))

    # ChatGLM2-6B-32k, ChatGLM3-6B-32k/128k and GLM-4 stretch the rotary base by rope_ratio.
    rope_ratio = float(original.get("rope_ratio", 1.0))
    return GlmConfig(
        vocab_size=original["padded_vocab_size"],
        hidden_size=original["hidden_size"],
        intermediate_size=original["ffn_hidden_size"],
        num_hidden_layers=original["num_layers"],
        num_attention_heads=original["num_attention_heads"],
        num_key_value_heads=original["multi_query_group_num"],
        head_dim=original["kv_channels"],
        hidden_act="silu",
        attention_dropout=float(original.get("attention_dropout", 0.0)),
        max_position_embeddings=original["seq_length"],
        rms_norm_eps=original["layernorm_epsilon"],
        tie_word_embeddings=bool(original.get("tie_word_embeddings", False)),
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0 * rope_ratio,
            "partial_rotary_factor": 0.5,
        },
        attention_bias=bool(original.get("add_qkv_bias", True)),
        pad_token_id=original.get("pad_token_id", 0),
        eos_token_id=original.get("eos_token_id", 2),
        bos_token_id=None,
        use_cache=True,
    )


# --------------------------------------------------------------------------------------------------------
# Key conversion

# Original key -> GlmForCausalLM key, outside the layers.
TOP_LEVEL_KEYS = {
    "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "transformer.encoder.final_layernorm.weight": "model.norm.weight",
    "transformer.output_layer.weight": "lm_head.weight",
}
# Original key suffix -> GlmDecoderLayer key suffix, inside layer N.
LAYER_KEYS = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.dense.weight": "self_attn.o_proj.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
}
FUSED_QKV = "self_attention.query_key_value."
LAYER_KEY_PATTERN = re.compile(r"transformer\.encoder\.layers\.(\d+)\.(.+)")
# The original's rotary buffer; GlmForCausalLM computes its own.
ROTARY_BUFFER_KEY = "transformer.rotary_pos_emb.inv_freq"
REFERENCE_PREFIX_PREFIX = "transformer.prefix_encoder."


def convert_chatglm_tensor(
    key: str, tensor: torch.Tensor, config: GlmConfig
) -> dict[str, torch.Tensor] | None:
    """Return the GlmForCausalLM tensors for one original checkpoint tensor, or None for an unknown key.

    The rotary buffer converts to an empty dict. A fused q/k/v tensor whose first dimension is not
    (heads + 2 * groups) * head_dim raises ValueError.
    """
    if key == ROTARY_BUFFER_KEY:
        return {}
    if key in TOP_LEVEL_KEYS:
        return {TOP_LEVEL_KEYS[key]: tensor}

    match = LAYER_KEY_PATTERN.fullmatch(key)
    if match is None:
        return None
    layer, suffix = match.groups()
    prefix = f"model.layers.{layer}."
    if suffix in LAYER_KEYS:
        return {prefix + LAYER_KEYS[suffix]: tensor}
    if suffix.startswith(FUSED_QKV) and suffix[len(FUSED_QKV) :] in ("weight", "bias"):
        kind = suffix[len(FUSED_QKV) :]
        query_rows = config.num_attention_heads * config.head_dim
        key_value_rows = config.num_key_value_heads * config.head_dim
        expected_rows = query_rows + 2 * key_value_rows
        if tensor.shape[0] != expected_rows:
            raise ValueError(
                f"{key} has {tensor.shape[0]} rows, expected {expected_rows} (query {query_rows}, key and "
                f"value {key_value_rows} each)"
            )
        # Rows are [query | key | value]; each group of head_dim rows is one head.
        query, key_part, value = tensor.split([query_rows, key_value_rows, key_value_rows], dim=0)
        return {
            f"{prefix}self_attn.q_proj.{kind}": query,
            f"{prefix}self_attn.k_proj.{kind}": key_part,
            f"{prefix}self_attn.v_proj.{kind}": value,
        }
    return None


def _format_keys(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    listed = ", ".join(keys[:MAX_LISTED_KEYS])
    if len(keys) > MAX_LISTED_KEYS:
        listed += f", and {len(keys) - MAX_LISTED_KEYS} more"
    return listed


def load_converted_weights(
    config: GlmConfig,
    files: Sequence[Path],
    dtype: torch.dtype | None,
    device: str | torch.device,
) -> GlmForCausalLM:
    """Build `GlmForCausalLM` from original checkpoint files, checking every key and shape.

    The model is built on the meta device and takes the converted tensors as its parameters, so the weights
    are held in memory once, in `dtype` (None keeps the stored dtype) on `device`. Raises
    ChatGLM2CheckpointMismatchError listing the missing, unexpected and wrongly shaped keys.
    """
    with torch.device("meta"):
        model = GlmForCausalLM(config)
    expected_shapes = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}

    loaded: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    wrong_shapes: list[str] = []
    for file in files:
        for key, tensor in iterate_checkpoint_tensors(file):
            try:
                converted = convert_chatglm_tensor(key, tensor, config)
            except ValueError as error:
                wrong_shapes.append(str(error))
                continue
            if converted is None:
                unexpected.append(key)
                continue
            for name, value in converted.items():
                if name not in expected_shapes:
                    unexpected.append(key)
                elif tuple(value.shape) != expected_shapes[name]:
                    wrong_shapes.append(
                        f"{key} gives {name} {tuple(value.shape)}, expected {expected_shapes[name]}"
                    )
                else:
                    loaded[name] = value.to(device=device, dtype=dtype or value.dtype).contiguous()

    missing = [key for key in expected_shapes if key not in loaded]
    if missing or unexpected or wrong_shapes:
        _raise_mismatch(files, missing, unexpected, wrong_shapes)

    model.load_state_dict(loaded, strict=True, assign=True)
    # The rotary buffers are not in the checkpoint: compute them off the meta device.
    model.model.rotary_emb = GlmRotaryEmbedding(config).to(device)
    model.config.dtype = model.lm_head.weight.dtype
    return model


def _raise_mismatch(
    files: Sequence[Path], missing: list[str], unexpected: list[str], wrong_shapes: list[str]
) -> None:
    problems = []
    if missing:
        problems.append(f"missing keys (after conversion): {_format_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_format_keys(unexpected)}")
    if wrong_shapes:
        problems.append(f"wrong shapes: {'; '.join(wrong_shapes[:MAX_LISTED_KEYS])}")
    hint = "Pass the folder of a ChatGLM2-6B or ChatGLM3-6B checkpoint with its own config.json."
    if any(key.startswith(REFERENCE_PREFIX_PREFIX) for key in unexpected):
        hint += " Prefix-encoder weights belong in a separate file; load them with import_reference_prefix."
    if any("weight_scale" in key for key in unexpected):
        hint += " Checkpoints quantized by the original code (the -int4 repositories) cannot be loaded."
    raise ChatGLM2CheckpointMismatchError(
        f"checkpoint {', '.join(str(file) for file in files)} does not match the ChatGLM2/ChatGLM3 layout; "
        + "; ".join(problems)
        + ". "
        + hint
    )


# --------------------------------------------------------------------------------------------------------
# Loading


def resolve_folder(path: str | Path, revision: str | None, allow_patterns: list[str]) -> Path:
    """Return `path` if it is a local folder; otherwise download those files of the Hub repository `path`."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder
    text = str(path)
    # A Hub id is "owner/name"; anything else that does not exist is a mistyped local path.
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise FileNotFoundError(
            f"model folder {text} does not exist; pass a local folder or a Hub id such as owner/name"
        )
    logger.info("Downloading %s (revision %s) from the Hugging Face Hub", text, revision or "main")
    return Path(
        huggingface_hub.snapshot_download(repo_id=text, revision=revision, allow_patterns=allow_patterns)
    )


def read_model_config(folder: Path) -> dict[str, Any]:
    config_file = folder / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(
            f"no {CONFIG_FILE} in {folder}; pass the folder of a ChatGLM2-6B or ChatGLM3-6B checkpoint"
        )
    return json.loads(config_file.read_text(encoding="utf-8"))


def load_chatglm2_model(
    path: str | Path,
    revision: str | None = None,
    dtype: torch.dtype | None = torch.float32,
    device: str | torch.device = "cpu",
) -> GlmForCausalLM:
    """Load a ChatGLM2/ChatGLM3 checkpoint as a frozen `GlmForCausalLM` in eval mode.

    `path` is a local folder or a Hub id. A folder in the original layout (model type "chatglm") is converted
    while loading; a folder written by `save_converted` (model type "glm") loads directly. `dtype` None keeps
    the stored dtype.
    """
    folder = resolve_folder(path, revision, HUB_MODEL_PATTERNS)
    original = read_model_config(folder)
    model_type = original.get("model_type")
    logger.info("Loading %s checkpoint %s (dtype %s)", model_type, folder, dtype)

    if model_type == CONVERTED_MODEL_TYPE:
        model = GlmForCausalLM.from_pretrained(folder, dtype=dtype or "auto").to(device)
    elif model_type == ORIGINAL_MODEL_TYPE:
        config = glm_config_from_chatglm(original)
        model = load_converted_weights(config, find_checkpoint_files(folder), dtype, device)
    else:
        raise ValueError(
            f"{folder / CONFIG_FILE} has model_type {model_type!r}; expected {ORIGINAL_MODEL_TYPE!r} (an "
            f"original ChatGLM2/ChatGLM3 checkpoint) or {CONVERTED_MODEL_TYPE!r} (a folder written by "
            "save_converted)"
        )
    model.requires_grad_(False)
    model.eval()
    return model


def load_chatglm2_backbone(
    path: str | Path,
    revision: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> ChatGLM2Backbone:
    """Load the frozen ChatGLM2/ChatGLM3 backbone from a local folder or a Hub id (`load_chatglm2_model`)."""
    return ChatGLM2Backbone(load_chatglm2_model(path, revision, dtype, device))


def save_converted(
    path: str | Path,
    output_dir: str | Path,
    revision: str | None = None,
    dtype: torch.dtype | None = None,
    max_shard_size: str = "5GB",
) -> Path:
    """Convert an original ChatGLM2/ChatGLM3 checkpoint once and write it as a transformers GLM folder.

    The folder gets the `GlmConfig`, safetensors weights in `dtype` (None keeps the stored dtype, which for
    the released fp16 weights is lossless), the tokenizer files when the source has them, and
    `chatglm_conversion.json` with the source, revision, local folder and original config. Returns the
    folder.
    """
    source = resolve_folder(path, revision, HUB_MODEL_PATTERNS + HUB_TOKENIZER_PATTERNS[1:])
    original = read_model_config(source)
    if original.get("model_type") != ORIGINAL_MODEL_TYPE:
        raise ValueError(f"{source} is not an original ChatGLM2/ChatGLM3 checkpoint (model_type chatglm)")
    model = load_chatglm2_model(source, dtype=dtype)

    target = Path(output_dir)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target, max_shard_size=max_shard_size)
    for name in (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE):
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)
    # For a Hub id, the snapshot folder name is the commit that was converted.
    record = {"source": str(path), "revision": revision, "folder": str(source), "original_config": original}
    (target / CONVERSION_RECORD_FILE).write_text(
        json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return target


# --------------------------------------------------------------------------------------------------------
# Backbone and gradient checkpointing


class _LayerPast:
    """Read-only stand-in for one layer of a cache: returns past + new entries and keeps the new ones.

    Inside a checkpointed layer it replaces the real cache, so the layer can run twice (forward and the
    recomputation in backward) without appending its keys twice.
    """

    def __init__(self, keys: torch.Tensor | None, values: torch.Tensor | None) -> None:
        self.keys = keys
        self.values = values
        self.new_keys: torch.Tensor | None = None
        self.new_values: torch.Tensor | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.new_keys, self.new_values = key_states, value_states
        if self.keys is None:
            return key_states, value_states
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


def _checkpointed_layer_forward(
    layer_forward, layer_index: int, hidden_states: torch.Tensor, *args: Any, cache: Any = None, **kwargs: Any
) -> Any:
    if not torch.is_grad_enabled():
        return layer_forward(hidden_states, *args, cache=cache, **kwargs)

    past_keys = past_values = None
    if (
        cache is not None
        and layer_index < len(cache.layers)
        and cache.layers[layer_index].get_seq_length() > 0
    ):
        past_keys, past_values = cache.layers[layer_index].keys, cache.layers[layer_index].values

    def run_layer(hidden_states, past_keys, past_values):
        past = _LayerPast(past_keys, past_values)
        output = layer_forward(hidden_states, *args, cache=past, **kwargs)
        return output, past.new_keys, past.new_values

    # The prefix keys and values enter as explicit inputs, so their gradients flow through the recomputation.
    output, new_keys, new_values = checkpoint(
        run_layer, hidden_states, past_keys, past_values, use_reentrant=False
    )
    if cache is not None:
        # Extend the real cache outside the checkpoint, once, as an unwrapped layer would.
        cache.update(new_keys, new_values, layer_index)
    return output


def enable_prefix_gradient_checkpointing(model: PreTrainedModel) -> int:
    """Recompute every decoder layer in backward while keeping the past keys and values; return the count.

    transformers' own layer checkpointing (5.25) runs only in training mode and then drops the cache, which
    contains the prefix, while the frozen backbone stays in eval mode. Instead each layer's `forward` is
    wrapped in `torch.utils.checkpoint.checkpoint(use_reentrant=False)` with its past keys and values as
    tensor inputs. The wrapper does nothing without gradients (generation). It fits any decoder whose
    attention calls `cache.update(keys, values, layer_idx)` with a `DynamicCache`, as transformers'
    Llama-style models do.
    """
    layers = model.get_decoder().layers
    for index, layer in enumerate(layers):
        if getattr(layer, "prefix_gradient_checkpointing", False):
            continue
        # An instance attribute shadows the class's forward, so nn.Module.__call__ and hooks stay unchanged.
        layer.forward = functools.partial(_checkpointed_layer_forward, layer.forward, index)
        layer.prefix_gradient_checkpointing = True
    return len(layers)


class ChatGLM2Backbone(HFBackbone):
    """A converted ChatGLM2/ChatGLM3 `GlmForCausalLM`, with gradient checkpointing that keeps the prefix."""

    prefix_family = "chatglm2"

    def enable_gradient_checkpointing(self) -> None:
        count = enable_prefix_gradient_checkpointing(self.model)
        logger.info("Gradient checkpointing enabled on %d decoder layers", count)


# --------------------------------------------------------------------------------------------------------
# Prompt formats


class ChatGLM2PromptFormat(PromptFormat):
    """Builds examples as the reference ChatGLM2-6B `ptuning/main.py` does.

    The prompt is always in the round format, also without history: after `source_prefix`, each past round
    reads "[Round i]\\n\\n问：{query}\\n\\n答：{response}\\n\\n" (i from 1), then the new one reads
    "[Round n]\\n\\n问：{prompt}\\n\\n答：". Training: [gMASK] sop + prompt ids (cut from the right to
    max_source_length - 2), then the response ids (cut to max_target_length) and eos. Labels are -100 over
    [gMASK] sop and the prompt. Generation prompts are the same first part. The reference pads training
    examples to max_source_length + max_target_length + 1, while here the collator pads each batch.
    """

    name = "chatglm2"

    def __init__(self, tokenizer: ChatGLM2Tokenizer, source_prefix: str = "") -> None:
        self.tokenizer = tokenizer
        self.source_prefix = source_prefix

    def build_prompt(self, prompt: str, history: Sequence[tuple[str, str]]) -> str:
        text = ""
        for round_number, (old_query, response) in enumerate(history, start=1):
            text += f"[Round {round_number}]\n\n问：{old_query}\n\n答：{response}\n\n"
        text += f"[Round {len(history) + 1}]\n\n问：{prompt}\n\n答："
        return self.source_prefix + text

    def _prompt_ids(self, prompt: str, history: Sequence[tuple[str, str]], max_source_length: int):
        if max_source_length < 2:
            raise ValueError(
                f"max_source_length must be at least 2 (room for [gMASK] sop), got {max_source_length}"
            )
        text_ids = self.tokenizer.encode_plain(self.build_prompt(prompt, history))
        budget = max_source_length - 2
        return self.tokenizer.prefix_tokens + text_ids[:budget], len(text_ids) > budget

    def encode_train(
        self,
        prompt: str,
        response: str,
        history: Sequence[tuple[str, str]],
        max_source_length: int,
        max_target_length: int,
    ) -> EncodedExample:
        if max_target_length < 0:
            raise ValueError(f"max_target_length must be 0 or more, got {max_target_length}")
        prompt_ids, prompt_truncated = self._prompt_ids(prompt, history, max_source_length)
        response_ids = self.tokenizer.encode_plain(response)
        response_truncated = len(response_ids) > max_target_length
        response_ids = response_ids[:max_target_length] + [self.tokenizer.eos_token_id]
        # As the reference (ignore_pad_token_for_loss), a pad id among the targets takes no loss.
        targets = [IGNORE_INDEX if token == self.pad_token_id else token for token in response_ids]
        return EncodedExample(
            input_ids=prompt_ids + response_ids,
            labels=[IGNORE_INDEX] * len(prompt_ids) + targets,
            prompt_truncated=prompt_truncated,
            response_truncated=response_truncated,
        )

    def encode_prompt(
        self, prompt: str, history: Sequence[tuple[str, str]], max_source_length: int
    ) -> EncodedExample:
        prompt_ids, prompt_truncated = self._prompt_ids(prompt, history, max_source_length)
        return EncodedExample(input_ids=prompt_ids, labels=[], prompt_truncated=prompt_truncated)

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def stop_token_ids(self) -> list[int]:
        return [self.tokenizer.eos_token_id]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode_plain(text)


def _check_messages(messages: Sequence[Mapping[str, Any]]) -> None:
    if not messages:
        raise ValueError("a conversation needs at least one message")
    for position, message in enumerate(messages):
        role = message.get("role") if isinstance(message, Mapping) else None
        if role not in ROLES:
            raise ValueError(
                f"message {position} has role {role!r}; expected one of {ROLES} (tool calls are not "
                "supported)"
            )
        if not isinstance(message.get("content"), str):
            raise TypeError(f"message {position} ({role}) has no text 'content'")
        if not isinstance(message.get("metadata", ""), str):
            raise TypeError(f"message {position} ({role}) has a 'metadata' that is not text")


class ChatGLM3PromptFormat(PromptFormat):
    """Builds examples in the ChatGLM3 chat format, as the reference `finetune_demo/finetune_hf.py` does.

    A conversation is [gMASK] sop, then per message `<|role|>` + ids of "{metadata}\\n" + ids of the content,
    then eos. Loss is taken as the reference takes it, through a mask shifted right by one: every token that
    follows a token of an assistant message is a target. So an assistant turn's own `<|assistant|>` takes no
    loss, while its newline, its content and the token after it (the next `<|user|>`, or the final eos) do.

    For prompt/response records (`encode_train`, `encode_prompt`) the history is context only and the response
    is the one assistant turn with loss. Budgets: the prompt side ([gMASK] sop, the history and the user
    message) gets at most max_source_length tokens, and the response side (its newline, content and eos) at
    most max_target_length. So a generation prompt with its `<|assistant|>` has at most max_source_length + 1
    tokens, as in the reference evaluation.

    NOTE: the reference instead cuts the whole training example to max_source_length + max_target_length + 1
    tokens, which can drop the eos or the whole response, and it cuts a long history from the end. Here the
    oldest history rounds go first, then the query is cut from the right, and the response keeps its eos.
    Without truncation both give the same ids. The reference also takes loss on `<|observation|>` turns,
    which are tool results; here only assistant turns take loss.
    """

    name = "chatglm3"

    def __init__(self, tokenizer: ChatGLM2Tokenizer) -> None:
        if tokenizer.family != "chatglm3":
            raise ValueError(
                "ChatGLM3PromptFormat needs a tokenizer built with family='chatglm3' (chat roles)"
            )
        self.tokenizer = tokenizer
        self.newline_ids = tokenizer.encode_plain("\n")
        self.assistant_id = tokenizer.get_command("<|assistant|>")

    # ------------------------------------------------------------------------------------ conversations
    def message_ids(self, message: Mapping[str, Any]) -> list[int]:
        return self.tokenizer.build_single_message(
            message["role"], message.get("metadata", ""), message["content"]
        )

    def encode_messages(self, messages: Sequence[Mapping[str, Any]], max_length: int) -> EncodedExample:
        """Encode a whole conversation for training, with loss on the assistant turns.

        `messages` are dicts with "role" (system, user, assistant or observation), "content" and an optional
        "metadata". As in the reference, the ids are cut from the right to `max_length` (the reference uses
        max_source_length + max_target_length + 1); `response_truncated` is set when this happened.
        """
        _check_messages(messages)
        input_ids = list(self.tokenizer.prefix_tokens)
        in_assistant_turn = [False] * len(input_ids)
        for message in messages:
            ids = self.message_ids(message)
            input_ids += ids
            in_assistant_turn += [message["role"] == "assistant"] * len(ids)
        input_ids.append(self.tokenizer.eos_token_id)

        # Token i is a target when token i - 1 belongs to an assistant turn.
        labels = [IGNORE_INDEX] + [
            token if previous else IGNORE_INDEX for token, previous in zip(input_ids[1:], in_assistant_turn)
        ]
        truncated = len(input_ids) > max_length
        return EncodedExample(
            input_ids=input_ids[:max_length],
            labels=labels[:max_length],
            response_truncated=truncated,
        )

    def encode_messages_prompt(
        self, messages: Sequence[Mapping[str, Any]], max_length: int
    ) -> EncodedExample:
        """Encode the conversation so far as a generation prompt: ids cut to `max_length`, then <|assistant|>.

        This is the reference evaluation encoding of the assistant turn that follows `messages`.
        """
        _check_messages(messages)
        if messages[-1]["role"] == "assistant":
            raise ValueError("the last message of a generation prompt must not be an assistant message")
        input_ids = list(self.tokenizer.prefix_tokens)
        for message in messages:
            input_ids += self.message_ids(message)
        truncated = len(input_ids) > max_length
        return EncodedExample(
            input_ids=input_ids[:max_length] + [self.assistant_id], labels=[], prompt_truncated=truncated
        )

    # ------------------------------------------------------------------------------ prompt/response records
    def _prompt_ids(
        self, prompt: str, history: Sequence[tuple[str, str]], max_source_length: int
    ) -> tuple[list[int], bool]:
        """Return the prompt side and whether it was cut: old history rounds go first, then the query end."""
        user_template = [self.tokenizer.get_command("<|user|>")] + self.newline_ids
        fixed_length = len(self.tokenizer.prefix_tokens) + len(user_template)
        if max_source_length < fixed_length:
            raise ValueError(
                f"max_source_length must be at least {fixed_length} ([gMASK] sop <|user|> and a newline), "
                f"got {max_source_length}"
            )
        rounds = [
            self.message_ids({"role": "user", "content": query})
            + self.message_ids({"role": "assistant", "content": response})
            for query, response in history
        ]
        query_ids = self.tokenizer.encode_plain(prompt)

        truncated = False
        while rounds and fixed_length + sum(map(len, rounds)) + len(query_ids) > max_source_length:
            rounds.pop(0)
            truncated = True
        budget = max_source_length - fixed_length - sum(map(len, rounds))
        if len(query_ids) > budget:
            query_ids = query_ids[:budget]
            truncated = True

        ids = list(self.tokenizer.prefix_tokens)
        for round_ids in rounds:
            ids += round_ids
        return ids + user_template + query_ids, truncated

    def encode_train(
        self,
        prompt: str,
        response: str,
        history: Sequence[tuple[str, str]],
        max_source_length: int,
        max_target_length: int,
    ) -> EncodedExample:
        response_fixed = len(self.newline_ids) + 1
        if max_target_length < response_fixed:
            raise ValueError(
                f"max_target_length must be at least {response_fixed} (a newline and eos), got "
                f"{max_target_length}"
            )
        prompt_ids, prompt_truncated = self._prompt_ids(prompt, history, max_source_length)
        response_ids = self.tokenizer.encode_plain(response)
        budget = max_target_length - response_fixed
        response_truncated = len(response_ids) > budget
        targets = self.newline_ids + response_ids[:budget] + [self.tokenizer.eos_token_id]
        return EncodedExample(
            input_ids=prompt_ids + [self.assistant_id] + targets,
            labels=[IGNORE_INDEX] * (len(prompt_ids) + 1) + targets,
            prompt_truncated=prompt_truncated,
            response_truncated=response_truncated,
        )

    def encode_prompt(
        self, prompt: str, history: Sequence[tuple[str, str]], max_source_length: int
    ) -> EncodedExample:
        prompt_ids, prompt_truncated = self._prompt_ids(prompt, history, max_source_length)
        return EncodedExample(
            input_ids=prompt_ids + [self.assistant_id], labels=[], prompt_truncated=prompt_truncated
        )

    # ------------------------------------------------------------------------------------------- tokens
    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def stop_token_ids(self) -> list[int]:
        """eos, and the roles that start the next turn, as the reference fine-tuning script sets."""
        return [
            self.tokenizer.eos_token_id,
            self.tokenizer.get_command("<|user|>"),
            self.tokenizer.get_command("<|observation|>"),
        ]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode_plain(text)


def check_tokenizer_matches_config(tokenizer: ChatGLM2Tokenizer, config: Mapping[str, Any]) -> None:
    """Raise ValueError if the tokenizer's eos or pad id differs from the model config's."""
    pairs = {
        "eos": (tokenizer.eos_token_id, config.get("eos_token_id")),
        "pad": (tokenizer.pad_token_id, config.get("pad_token_id")),
    }
    mismatched = []
    for name, (ours, theirs) in pairs.items():
        allowed = theirs if isinstance(theirs, list) else [theirs]
        if theirs is not None and ours not in allowed:
            mismatched.append(f"{name}: tokenizer {ours}, config {theirs}")
    if mismatched:
        raise ValueError(
            "the tokenizer and the model config disagree on special-token ids ("
            + "; ".join(mismatched)
            + "); load the tokenizer files that belong to this checkpoint"
        )


def load_chatglm2_tokenizer_and_format(
    path: str | Path, revision: str | None = None, family: str = "chatglm2"
) -> tuple[ChatGLM2Tokenizer, PromptFormat]:
    """Load only the tokenizer (no weights) and the reference prompt format of a ChatGLM2 or ChatGLM3 folder.

    `family` picks the tokenizer's special tokens and the format: "chatglm2" gives `ChatGLM2PromptFormat`,
    "chatglm3" the chat roles and `ChatGLM3PromptFormat`. A Hub id downloads the tokenizer files only.
    """
    if family not in CHATGLM2_FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {CHATGLM2_FAMILIES}")
    folder = resolve_folder(path, revision, HUB_TOKENIZER_PATTERNS)
    tokenizer = ChatGLM2Tokenizer.from_pretrained(folder, family)
    if (folder / CONFIG_FILE).is_file():
        check_tokenizer_matches_config(tokenizer, read_model_config(folder))
    if family == "chatglm3":
        return tokenizer, ChatGLM3PromptFormat(tokenizer)
    return tokenizer, ChatGLM2PromptFormat(tokenizer)
