"""ChatGLM-6B (GLM v1) behind the `Backbone` seam: the backbone, its prompt format and checkpoint loading.

`load_chatglm6b` reads the official checkpoint layout from a local folder or a Hub snapshot: `config.json` in
the original format plus `model.safetensors` (optionally sharded with `model.safetensors.index.json`) or
`pytorch_model.bin` (optionally sharded with `pytorch_model.bin.index.json`). The key check is strict. The
original's rotary `inv_freq` buffers are ignored, and `lm_head.weight` may be absent because the head is tied
to the word embeddings.

`import_reference_prefix` and `export_reference_prefix` convert between our `PrefixEncoder` state dict and the
`transformer.prefix_encoder.*` keys that the reference P-Tuning v2 scripts save.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import huggingface_hub
import safetensors
import safetensors.torch
import torch

from ptuning_pl.backbones.base import Backbone, EncodedExample, KVGeometry, PrefixKV, PromptFormat
from ptuning_pl.chatglm.modeling_v1 import (
    ChatGLM6BCache,
    ChatGLM6BConfig,
    ChatGLM6BForCausalLM,
    ChatGLM6BOutput,
)
from ptuning_pl.chatglm.tokenization_v1 import CONFIG_FILE_NAME, VOCAB_FILE_NAME, ChatGLM6BTokenizer

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX_FILE = "pytorch_model.bin.index.json"

# Files fetched from the Hub. Both weight formats are listed because a repository may hold either.
HUB_ALLOW_PATTERNS = [
    CONFIG_FILE,
    CONFIG_FILE_NAME,
    VOCAB_FILE_NAME,
    "*.safetensors",
    SAFETENSORS_INDEX_FILE,
    "pytorch_model*.bin",
    BIN_INDEX_FILE,
]

TIED_HEAD_KEY = "lm_head.weight"
EMBEDDING_KEY = "transformer.word_embeddings.weight"
ROTARY_BUFFER_SUFFIX = ".attention.rotary_emb.inv_freq"
REFERENCE_PREFIX_PREFIX = "transformer.prefix_encoder."
PREFIX_PARAMETER_NAMES = (
    "embedding.weight",
    "trans.0.weight",
    "trans.0.bias",
    "trans.2.weight",
    "trans.2.bias",
)
# Keys listed in full in a key-mismatch error; longer lists are cut with a count.
MAX_LISTED_KEYS = 50


class CheckpointMismatchError(ValueError):
    """A checkpoint's keys or shapes do not match the ChatGLM-6B layout."""


# --------------------------------------------------------------------------------------------------------
# Backbone and prompt format


class ChatGLM6BBackbone(Backbone):
    """Frozen ChatGLM-6B; computes 2-D positions and the prompt-bidirectional attention layout itself."""

    prefix_family = "chatglm"

    def __init__(self, model: ChatGLM6BForCausalLM) -> None:
        self.model = model.eval().requires_grad_(False)
        config = model.config
        self.config = config
        self.geometry = KVGeometry(
            num_layers=config.num_layers,
            kv_heads=config.num_attention_heads,
            head_dim=config.head_dim,
            hidden_size=config.hidden_size,
        )

    def new_cache(self, prefix: PrefixKV | None, batch_size: int) -> ChatGLM6BCache:
        """Return a fresh `ChatGLM6BCache` holding `prefix` (or nothing) for `batch_size` rows."""
        return self.model.new_cache(None if prefix is None else list(prefix), batch_size)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: ChatGLM6BCache
    ) -> torch.Tensor:
        """Return logits (batch, n, vocab) for the new tokens; see `ChatGLM6BForCausalLM.forward`."""
        return self.model(input_ids, attention_mask, cache).logits

    def forward_hidden(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: ChatGLM6BCache
    ) -> torch.Tensor:
        return self.model(input_ids, attention_mask, cache, compute_logits=False).last_hidden_state

    def output_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.output_logits(hidden)

    def forward_with_hidden_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: ChatGLM6BCache
    ) -> ChatGLM6BOutput:
        """Like `forward`, but also return the input of every layer and the final normed hidden state."""
        return self.model(input_ids, attention_mask, cache, output_hidden_states=True)

    def enable_gradient_checkpointing(self) -> None:
        self.model.gradient_checkpointing = True

    def reorder_cache(self, cache: ChatGLM6BCache, index: torch.Tensor) -> ChatGLM6BCache:
        return cache.reorder(index)


class ChatGLM6BPromptFormat(PromptFormat):
    """Builds examples as the reference ChatGLM-6B `ptuning/main.py` does.

    Training: prompt ids (cut to max_source_length - 1), [gMASK], <sop>, answer ids (cut to
    max_target_length - 2), <eop>. Labels are -100 over the prompt and [gMASK]. Generation prompts: prompt
    ids cut to max_source_length - 2, then [gMASK] <sop>. With history, the prompt reads
    "[Round i]\\n问：…\\n答：…\\n" per past round, then "[Round n]\\n问：{prompt}\\n答：". An empty history gives
    the bare prompt in both cases.

    NOTE: the reference training function writes the round format even for an empty history when a history
    column is configured. That case is not reproduced.
    """

    name = "chatglm6b"

    def __init__(self, tokenizer: ChatGLM6BTokenizer, source_prefix: str = "") -> None:
        self.tokenizer = tokenizer
        self.source_prefix = source_prefix

    def build_prompt(self, prompt: str, history: Sequence[tuple[str, str]]) -> str:
        if not history:
            return self.source_prefix + prompt
        text = ""
        for round_index, (old_query, response) in enumerate(history):
            text += f"[Round {round_index}]\n问：{old_query}\n答：{response}\n"
        text += f"[Round {len(history)}]\n问：{prompt}\n答："
        return self.source_prefix + text

    def encode_train(
        self,
        prompt: str,
        response: str,
        history: Sequence[tuple[str, str]],
        max_source_length: int,
        max_target_length: int,
    ) -> EncodedExample:
        if max_source_length < 1 or max_target_length < 2:
            raise ValueError(
                f"max_source_length must be at least 1 and max_target_length at least 2 (room for <sop> and "
                f"<eop>), got {max_source_length} and {max_target_length}"
            )
        tokenizer = self.tokenizer
        prompt_ids = tokenizer.encode(self.build_prompt(prompt, history), add_special_tokens=False)
        response_ids = tokenizer.encode(response, add_special_tokens=False)

        prompt_truncated = len(prompt_ids) > max_source_length - 1
        response_truncated = len(response_ids) > max_target_length - 2
        prompt_ids = prompt_ids[: max_source_length - 1]
        response_ids = response_ids[: max_target_length - 2]

        input_ids = tokenizer.build_inputs_with_special_tokens(prompt_ids, response_ids)
        # Loss starts at <sop>: the prompt and [gMASK] are masked.
        context_length = len(prompt_ids) + 1
        labels = [-100] * context_length + input_ids[context_length:]
        return EncodedExample(
            input_ids=input_ids,
            labels=labels,
            prompt_truncated=prompt_truncated,
            response_truncated=response_truncated,
        )

    def encode_prompt(
        self, prompt: str, history: Sequence[tuple[str, str]], max_source_length: int
    ) -> EncodedExample:
        if max_source_length < 2:
            raise ValueError(
                f"max_source_length must be at least 2 (room for [gMASK] <sop>), got {max_source_length}"
            )
        tokenizer = self.tokenizer
        prompt_ids = tokenizer.encode(self.build_prompt(prompt, history), add_special_tokens=False)
        prompt_truncated = len(prompt_ids) > max_source_length - 2
        input_ids = tokenizer.build_inputs_with_special_tokens(prompt_ids[: max_source_length - 2])
        return EncodedExample(input_ids=input_ids, labels=[], prompt_truncated=prompt_truncated)

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def stop_token_ids(self) -> list[int]:
        return [self.tokenizer.eos_token_id]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)


# --------------------------------------------------------------------------------------------------------
# Loading


def resolve_model_folder(path: str | Path, revision: str | None = None) -> Path:
    """Return `path` if it is a local folder; otherwise download the Hub repository `path` at `revision`."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder
    text = str(path)
    # A Hub id is "owner/name"; anything else that does not exist is a mistyped local path.
    looks_like_local_path = text.startswith((".", "/", "~")) or text.count("/") != 1
    if looks_like_local_path:
        raise FileNotFoundError(
            f"model folder {text} does not exist; pass a local folder or a Hub id such as owner/name"
        )
    logger.info("Downloading %s (revision %s) from the Hugging Face Hub", text, revision or "main")
    return Path(
        huggingface_hub.snapshot_download(repo_id=text, revision=revision, allow_patterns=HUB_ALLOW_PATTERNS)
    )


def find_checkpoint_files(folder: Path) -> list[Path]:
    """Return the weight files of `folder`, preferring safetensors; raise FileNotFoundError if none."""
    for index_name, single_name in ((SAFETENSORS_INDEX_FILE, SAFETENSORS_FILE), (BIN_INDEX_FILE, BIN_FILE)):
        index_file = folder / index_name
        if index_file.is_file():
            weight_map: dict[str, str] = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
            shards = [folder / name for name in sorted(set(weight_map.values()))]
            missing = [shard.name for shard in shards if not shard.is_file()]
            if missing:
                raise FileNotFoundError(f"{index_file} lists shards that are not in {folder}: {missing}")
            return shards
        if (folder / single_name).is_file():
            return [folder / single_name]
    raise FileNotFoundError(
        f"no weights in {folder}: expected {SAFETENSORS_FILE}, {SAFETENSORS_INDEX_FILE}, {BIN_FILE} or "
        f"{BIN_INDEX_FILE}"
    )


def iterate_checkpoint_tensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, tensor) pairs of one safetensors or PyTorch weight file, on the CPU."""
    if file.suffix == ".safetensors":
        with safetensors.safe_open(str(file), framework="pt", device="cpu") as reader:
            names = reader.keys()
            for key in names:
                yield key, reader.get_tensor(key)
    else:
        yield from torch.load(file, map_location="cpu", weights_only=True).items()


def _format_keys(keys: Sequence[str]) -> str:
    keys = sorted(keys)
    listed = ", ".join(keys[:MAX_LISTED_KEYS])
    if len(keys) > MAX_LISTED_KEYS:
        listed += f", and {len(keys) - MAX_LISTED_KEYS} more"
    return listed


def load_chatglm6b_weights(
    config: ChatGLM6BConfig, files: Sequence[Path], dtype: torch.dtype, device: str | torch.device
) -> ChatGLM6BForCausalLM:
    """Build the model from checkpoint files, checking every key and shape; raise CheckpointMismatchError.

    The model is built on the meta device and takes the loaded tensors as its parameters, so the weights are
    held in memory once, in `dtype` on `device`.
    """
    with torch.device("meta"):
        model = ChatGLM6BForCausalLM(config)
    expected_shapes = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}

    loaded: dict[str, torch.Tensor] = {}
    tied_head: torch.Tensor | None = None
    unexpected: list[str] = []
    wrong_shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        for key, tensor in iterate_checkpoint_tensors(file):
            if key.endswith(ROTARY_BUFFER_SUFFIX):
                continue
            if key == TIED_HEAD_KEY:
                tied_head = tensor.to(device=device, dtype=dtype)
                continue
            if key not in expected_shapes:
                unexpected.append(key)
                continue
            if tuple(tensor.shape) != expected_shapes[key]:
                wrong_shapes[key] = tuple(tensor.shape)
                continue
            loaded[key] = tensor.to(device=device, dtype=dtype)

    missing = [key for key in expected_shapes if key not in loaded and key not in wrong_shapes]
    if missing or unexpected or wrong_shapes:
        problems = []
        if missing:
            problems.append(f"missing keys: {_format_keys(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {_format_keys(unexpected)}")
        if wrong_shapes:
            shapes = [
                f"{key} {shape} (expected {expected_shapes[key]})"
                for key, shape in sorted(wrong_shapes.items())
            ]
            problems.append(f"keys with the wrong shape: {', '.join(shapes)}")
        hint = "Pass the folder of a ChatGLM-6B (GLM v1) checkpoint with its own config.json."
        if any(key.startswith(REFERENCE_PREFIX_PREFIX) for key in unexpected):
            hint += (
                " Prefix-encoder weights belong in a separate file; load them with import_reference_prefix."
            )
        raise CheckpointMismatchError(
            f"checkpoint {', '.join(str(file) for file in files)} does not match the ChatGLM-6B layout; "
            + "; ".join(problems)
            + ". "
            + hint
        )

    if tied_head is not None and not torch.equal(tied_head, loaded[EMBEDDING_KEY]):
        raise CheckpointMismatchError(
            f"{TIED_HEAD_KEY} differs from {EMBEDDING_KEY}, but ChatGLM-6B ties them and this model cannot "
            "hold an untied head"
        )

    model.load_state_dict(loaded, strict=True, assign=True)
    return model


def load_chatglm6b_backbone(
    path: str | Path,
    revision: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> ChatGLM6BBackbone:
    """Load the frozen ChatGLM-6B backbone from a local folder or a Hub id (see `load_chatglm6b`)."""
    folder = resolve_model_folder(path, revision)
    config_file = folder / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {folder}; pass the folder of a ChatGLM-6B checkpoint")
    config = ChatGLM6BConfig.from_json_file(config_file)
    model = load_chatglm6b_weights(config, find_checkpoint_files(folder), dtype, device)
    return ChatGLM6BBackbone(model)


def check_tokenizer_matches_config(tokenizer: ChatGLM6BTokenizer, config: ChatGLM6BConfig) -> None:
    """Raise ValueError if the tokenizer's special-token ids differ from those in the model config."""
    pairs = {
        "bos (<sop>)": (tokenizer.bos_token_id, config.bos_token_id),
        "eos (<eop>)": (tokenizer.eos_token_id, config.eos_token_id),
        "[MASK]": (tokenizer.mask_token_id, config.mask_token_id),
        "[gMASK]": (tokenizer.gmask_token_id, config.gmask_token_id),
        "pad": (tokenizer.pad_token_id, config.pad_token_id),
    }
    mismatched = [
        f"{name}: tokenizer {ours}, config {theirs}"
        for name, (ours, theirs) in pairs.items()
        if ours != theirs
    ]
    if mismatched:
        raise ValueError(
            "the tokenizer and the model config disagree on special-token ids ("
            + "; ".join(mismatched)
            + "); load the tokenizer files that belong to this checkpoint"
        )


def load_chatglm6b(
    path: str | Path,
    revision: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    tokenizer_path: str | Path | None = None,
) -> tuple[ChatGLM6BBackbone, ChatGLM6BTokenizer]:
    """Load the ChatGLM-6B backbone and tokenizer from a local folder or a Hub id.

    `tokenizer_path` is a folder with `ice_text.model`; by default the model folder is used. The tokenizer's
    special-token ids must equal those in `config.json`.
    """
    folder = resolve_model_folder(path, revision)
    backbone = load_chatglm6b_backbone(folder, dtype=dtype, device=device)
    tokenizer = ChatGLM6BTokenizer.from_pretrained(tokenizer_path if tokenizer_path is not None else folder)
    check_tokenizer_matches_config(tokenizer, backbone.config)
    return backbone, tokenizer


def load_chatglm6b_tokenizer_and_format(
    path: str | Path, revision: str | None = None
) -> tuple[ChatGLM6BTokenizer, ChatGLM6BPromptFormat]:
    """Load only the tokenizer (no weights) and the reference prompt format of a ChatGLM-6B folder or hub id."""
    folder = resolve_model_folder(path, revision)
    tokenizer = ChatGLM6BTokenizer.from_pretrained(folder)
    config_path = folder / "config.json"
    if config_path.is_file():
        check_tokenizer_matches_config(tokenizer, ChatGLM6BConfig.from_json_file(config_path))
    return tokenizer, ChatGLM6BPromptFormat(tokenizer)


# --------------------------------------------------------------------------------------------------------
# Prefix exchange with the reference implementation


def _read_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    return dict(iterate_checkpoint_tensors(path))


def import_reference_prefix(path: str | Path) -> dict[str, torch.Tensor]:
    """Return a `PrefixEncoder` state dict from a reference P-Tuning v2 checkpoint.

    `path` is a `pytorch_model.bin` or `.safetensors` file, or a folder holding `pytorch_model.bin` or
    `model.safetensors` (the reference scripts save the prefix as `pytorch_model.bin`). The file must have
    `transformer.prefix_encoder.embedding.weight` and either all or none of `trans.{0,2}.{weight,bias}`; other
    keys are ignored.
    """
    source = Path(path)
    if source.is_dir():
        candidates = [source / SAFETENSORS_FILE, source / BIN_FILE]
        found = [candidate for candidate in candidates if candidate.is_file()]
        if not found:
            raise FileNotFoundError(f"no {SAFETENSORS_FILE} or {BIN_FILE} in {source}")
        source = found[0]
    tensors = _read_tensor_file(source)

    state = {
        key[len(REFERENCE_PREFIX_PREFIX) :]: tensor
        for key, tensor in tensors.items()
        if key.startswith(REFERENCE_PREFIX_PREFIX)
    }
    unknown = sorted(set(state) - set(PREFIX_PARAMETER_NAMES))
    if unknown:
        raise ValueError(f"{source} has prefix-encoder keys this PrefixEncoder does not have: {unknown}")
    if "embedding.weight" not in state:
        raise ValueError(
            f"{source} has no {REFERENCE_PREFIX_PREFIX}embedding.weight; it is not a P-Tuning v2 checkpoint"
        )
    projection_keys = [name for name in PREFIX_PARAMETER_NAMES if name.startswith("trans.")]
    present = [name for name in projection_keys if name in state]
    if present and len(present) != len(projection_keys):
        missing = sorted(set(projection_keys) - set(present))
        raise ValueError(f"{source} has an incomplete prefix projection; missing {missing}")
    return state


def export_reference_prefix(state_dict: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Write a `PrefixEncoder` state dict under the reference key names; return the file written.

    A path ending in `.safetensors` gets safetensors, one ending in `.bin` a PyTorch file, and a folder gets
    `pytorch_model.bin`, the file name the reference loader reads.
    """
    unknown = sorted(set(state_dict) - set(PREFIX_PARAMETER_NAMES))
    if unknown:
        raise ValueError(
            f"not PrefixEncoder parameters: {unknown}; expected names among {list(PREFIX_PARAMETER_NAMES)}"
        )
    if "embedding.weight" not in state_dict:
        raise ValueError("the state dict has no embedding.weight; pass PrefixEncoder.state_dict()")

    target = Path(path)
    if target.suffix not in (".safetensors", ".bin"):
        target.mkdir(parents=True, exist_ok=True)
        target = target / BIN_FILE
    else:
        target.parent.mkdir(parents=True, exist_ok=True)

    # Copies, so that safetensors gets contiguous tensors that share no memory with the live encoder.
    tensors: dict[str, Any] = {
        REFERENCE_PREFIX_PREFIX + name: tensor.detach().to("cpu").contiguous().clone()
        for name, tensor in state_dict.items()
    }
    if target.suffix == ".safetensors":
        safetensors.torch.save_file(tensors, str(target))
    else:
        torch.save(tensors, target)
    return target
