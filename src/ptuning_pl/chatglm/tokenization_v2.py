"""The ChatGLM2-6B and ChatGLM3-6B tokenizer on sentencepiece, with the behaviour of the original remote code.

Both models share one `tokenizer.model` (BPE, byte fallback, a dummy-prefix space, no normalisation). What
this tokenizer reproduces from the original `tokenization_chatglm.py` of each model repository (ChatGLM2 at
the 2023-09 revision, ChatGLM3 at the 2023-12 revision, both run with transformers 4.30):

- Text goes to sentencepiece unchanged, so every `encode` starts with the dummy-prefix piece "▁"
  (`encode("\\n") == [30910, 13]`).
- Special tokens follow the sentencepiece vocabulary: [MASK], [gMASK], [sMASK], sop, eop and, for ChatGLM3,
  the chat roles <|system|>, <|user|>, <|assistant|>, <|observation|>. pad = unk = 0, bos = 1, eos = 2.
- `encode` with special tokens prepends [gMASK] sop. `__call__` always returns `attention_mask` and
  `position_ids`, and pads on the left with 0 in all three.
- `decode` drops pad, bos and eos. ChatGLM2 also drops the special tokens, while ChatGLM3 writes them as
  their strings, glued to the text ("[gMASK]sop 你好"), and keeps them with `skip_special_tokens=True` too.
- ChatGLM3's `build_single_message` and `build_chat_input`, and its `encode_special_tokens=True` mode, which
  turns role-token strings in text (not [gMASK] or sop) into role ids.

User text is plain text: no string in text becomes a special id unless a ChatGLM3 tokenizer is built with
`encode_special_tokens=True`. The original behaves the same way, because transformers 4.30 registers no
special token for these tokenizers and so never splits text on them.

One difference is deliberate: with `skip_special_tokens=True`, ChatGLM3 decoding drops the special and role
tokens, where the original still writes them.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch

VOCAB_FILE_NAME = "tokenizer.model"
CONFIG_FILE_NAME = "tokenizer_config.json"

TOKENIZER_FAMILIES = ("chatglm2", "chatglm3")

# Special tokens in id order after the sentencepiece vocabulary.
GLM_SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
ROLES = ("system", "user", "assistant", "observation")

# Matches the role-token strings that `encode_special_tokens=True` turns into ids.
ROLE_TOKEN_PATTERN = re.compile("|".join(re.escape(token) for token in ROLE_TOKENS))


class ChatGLM2Tokenizer:
    """Sentencepiece tokenizer of ChatGLM2-6B (`family="chatglm2"`) and ChatGLM3-6B (`family="chatglm3"`)."""

    padding_side = "left"
    model_input_names = ("input_ids", "attention_mask", "position_ids")

    def __init__(
        self,
        vocab_file: str | Path,
        family: str = "chatglm2",
        *,
        encode_special_tokens: bool = False,
        config: dict[str, Any] | None = None,
    ) -> None:
        if family not in TOKENIZER_FAMILIES:
            raise ValueError(f"unknown tokenizer family {family!r}; expected one of {TOKENIZER_FAMILIES}")
        if encode_special_tokens and family != "chatglm3":
            raise ValueError("encode_special_tokens=True exists only for the ChatGLM3 tokenizer (chat roles)")
        self.vocab_file = Path(vocab_file)
        self.sp_model = spm.SentencePieceProcessor(model_file=str(self.vocab_file))
        self.family = family
        self.encode_special_tokens = encode_special_tokens

        self.unk_token_id = self.sp_model.unk_id()
        self.bos_token_id = self.sp_model.bos_id()
        self.eos_token_id = self.sp_model.eos_id()
        # The original pads with the unk id, because the sentencepiece model has no pad piece.
        self.pad_token_id = self.unk_token_id

        names = GLM_SPECIAL_TOKENS + (ROLE_TOKENS if family == "chatglm3" else ())
        first_id = self.sp_model.get_piece_size()
        #: Special token string -> id, for the tokens that follow the sentencepiece vocabulary.
        self.special_tokens: dict[str, int] = {name: first_id + offset for offset, name in enumerate(names)}
        self.special_token_strings: dict[int, str] = {
            index: name for name, index in self.special_tokens.items()
        }
        # The tokenizer_config.json entries this tokenizer was built from, written back by save_pretrained.
        self.config = dict(config or {})

    # ----------------------------------------------------------------------------------------------------
    # Loading and saving

    @classmethod
    def from_pretrained(
        cls, path: str | Path, family: str = "chatglm2", encode_special_tokens: bool = False
    ) -> ChatGLM2Tokenizer:
        """Load `tokenizer.model` and, if present, `tokenizer_config.json` from the folder `path`."""
        folder = Path(path)
        vocab_file = folder / VOCAB_FILE_NAME
        if not vocab_file.is_file():
            raise FileNotFoundError(
                f"no {VOCAB_FILE_NAME} in {folder}; pass the folder that contains the ChatGLM2/ChatGLM3 "
                "tokenizer files"
            )
        config: dict[str, Any] = {}
        config_file = folder / CONFIG_FILE_NAME
        if config_file.is_file():
            config = json.loads(config_file.read_text(encoding="utf-8"))
        for option in ("do_lower_case", "remove_space"):
            if config.get(option):
                raise ValueError(
                    f"{config_file} sets {option}=true, which the ChatGLM2/ChatGLM3 tokenizer does not "
                    "implement"
                )
        return cls(vocab_file, family, encode_special_tokens=encode_special_tokens, config=config)

    def save_pretrained(self, path: str | Path) -> list[Path]:
        """Write `tokenizer.model` and `tokenizer_config.json` into the folder `path`; return the files."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        vocab_target = folder / VOCAB_FILE_NAME
        if not vocab_target.exists() or vocab_target.resolve() != self.vocab_file.resolve():
            shutil.copyfile(self.vocab_file, vocab_target)

        config = dict(self.config)
        # auto_map names the original remote code, which a saved folder does not carry.
        config.pop("auto_map", None)
        config.update({"tokenizer_class": "ChatGLMTokenizer", "padding_side": self.padding_side})
        config_target = folder / CONFIG_FILE_NAME
        config_target.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return [vocab_target, config_target]

    # ----------------------------------------------------------------------------------------------------
    # Vocabulary

    @property
    def vocab_size(self) -> int:
        return self.sp_model.get_piece_size() + len(self.special_tokens)

    def __len__(self) -> int:
        return self.vocab_size

    def get_command(self, token: str) -> int:
        """Return the id of special token ("[gMASK]", "sop", "<|user|>", ...), "<bos>", "<eos>" or "<pad>"."""
        named = {"<bos>": self.bos_token_id, "<eos>": self.eos_token_id, "<pad>": self.pad_token_id}
        if token in named:
            return named[token]
        if token not in self.special_tokens:
            raise KeyError(f"{token!r} is not a special token of the {self.family} tokenizer")
        return self.special_tokens[token]

    @property
    def prefix_tokens(self) -> list[int]:
        """The ids that start every model input: [gMASK] sop."""
        return [self.special_tokens["[gMASK]"], self.special_tokens["sop"]]

    @property
    def role_token_ids(self) -> dict[str, int]:
        """Role name ("user", ...) -> role token id; empty for ChatGLM2."""
        return {
            role: self.special_tokens[f"<|{role}|>"] for role in ROLES if f"<|{role}|>" in self.special_tokens
        }

    def convert_tokens_to_ids(self, tokens: Sequence[str]) -> list[int]:
        return [self.special_tokens.get(token, self.sp_model.piece_to_id(token)) for token in tokens]

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self._id_to_piece(int(index)) for index in ids]

    def _id_to_piece(self, index: int) -> str:
        if index in self.special_token_strings:
            return self.special_token_strings[index]
        if not 0 <= index < self.sp_model.get_piece_size():
            raise ValueError(f"token id {index} is outside the vocabulary of {self.vocab_size} ids")
        return self.sp_model.id_to_piece(index)

    # ----------------------------------------------------------------------------------------------------
    # Encoding

    def tokenize(self, text: str) -> list[str]:
        """Return the pieces of `text`; role strings stay text unless `encode_special_tokens` is set."""
        if not self.encode_special_tokens:
            return self.sp_model.encode(text, out_type=str)
        pieces: list[str] = []
        start = 0
        for match in ROLE_TOKEN_PATTERN.finditer(text):
            if start < match.start():
                pieces += self.sp_model.encode(text[start : match.start()], out_type=str)
            pieces.append(match.group())
            start = match.end()
        if start < len(text):
            pieces += self.sp_model.encode(text[start:], out_type=str)
        return pieces

    def encode_plain(self, text: str) -> list[int]:
        """Encode `text` with sentencepiece only: special-token strings always stay text."""
        return self.sp_model.encode(text)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Return the ids of `text`, starting with [gMASK] sop when `add_special_tokens` is set."""
        if self.encode_special_tokens:
            ids = self.convert_tokens_to_ids(self.tokenize(text))
        else:
            ids = self.encode_plain(text)
        if add_special_tokens:
            ids = self.prefix_tokens + ids
        return ids

    def build_single_message(self, role: str, metadata: str, message: str) -> list[int]:
        """Return `<|role|>` + ids of metadata and a newline + ids of `message` (ChatGLM3 chat format).

        Both texts are encoded as plain text, as in the original, regardless of `encode_special_tokens`.
        """
        role_ids = self.role_token_ids
        if role not in role_ids:
            raise ValueError(
                f"unknown chat role {role!r} for the {self.family} tokenizer; expected one of "
                f"{sorted(role_ids)}"
            )
        return [role_ids[role]] + self.encode_plain(f"{metadata}\n") + self.encode_plain(message)

    def build_chat_input(
        self, query: str, history: Sequence[dict[str, Any]] | None = None, role: str = "user"
    ) -> list[int]:
        """Return the ids that the original `chat()` feeds the model.

        They are [gMASK] sop, the history, the query and <|assistant|>.

        `history` contains messages with "role", "content" and an optional "metadata". The original also
        appends the JSON of a system message's "tools", which is not implemented.
        """
        ids = list(self.prefix_tokens)
        for message in history or []:
            if message["role"] == "system" and "tools" in message:
                raise NotImplementedError("system messages with tools are not supported")
            ids += self.build_single_message(message["role"], message.get("metadata", ""), message["content"])
        ids += self.build_single_message(role, "", query)
        ids.append(self.get_command("<|assistant|>"))
        return ids

    def __call__(
        self,
        text: str | Sequence[str],
        *,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        max_length: int | None = None,
        truncation: bool = False,
        return_tensors: str | None = None,
    ) -> dict[str, Any]:
        """Encode one text or a batch the way the original `tokenizer(...)` call does.

        Returns `input_ids`, `attention_mask` (1 on tokens, 0 on padding) and `position_ids` (0, 1, ... over
        the tokens, 0 on padding). `padding` is False, True (or "longest") or "max_length"; padding goes on
        the left. With `truncation`, the text ids are cut from the right so that the result, special tokens
        included, fits `max_length`. `return_tensors="pt"` returns torch tensors with a batch dimension.
        """
        if padding is True:
            padding = "longest"
        if padding not in (False, "do_not_pad", "longest", "max_length"):
            raise ValueError(f"padding must be False, True, 'longest' or 'max_length', got {padding!r}")
        if padding == "max_length" and max_length is None:
            raise ValueError("padding='max_length' needs max_length")
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors must be None or 'pt', got {return_tensors!r}")

        is_batch = not isinstance(text, str)
        texts = list(text) if is_batch else [text]
        encoded = [self._encode_truncated(item, add_special_tokens, max_length, truncation) for item in texts]

        if padding == "longest":
            target_length = max(len(ids) for ids in encoded)
        elif padding == "max_length":
            target_length = max_length
        else:
            target_length = 0
        rows = [self.pad(ids, target_length) for ids in encoded]
        result: dict[str, Any] = {
            name: [row[position] for row in rows] for position, name in enumerate(self.model_input_names)
        }

        if return_tensors == "pt":
            if len({len(ids) for ids in result["input_ids"]}) > 1:
                raise ValueError("sequences of different lengths cannot form a tensor; pass padding=True")
            return {name: torch.tensor(values, dtype=torch.long) for name, values in result.items()}
        if not is_batch:
            result = {name: values[0] for name, values in result.items()}
        return result

    def _encode_truncated(
        self, text: str, add_special_tokens: bool, max_length: int | None, truncation: bool
    ) -> list[int]:
        ids = self.encode(text, add_special_tokens=False)
        if truncation and max_length is not None:
            budget = max_length - (len(self.prefix_tokens) if add_special_tokens else 0)
            if budget < 0:
                raise ValueError(f"max_length {max_length} leaves no room for the special tokens [gMASK] sop")
            ids = ids[:budget]
        if add_special_tokens:
            ids = self.prefix_tokens + ids
        return ids

    def pad(self, ids: Sequence[int], length: int) -> tuple[list[int], list[int], list[int]]:
        """Left-pad `ids` to `length`; return (input_ids, attention_mask, position_ids)."""
        difference = max(length - len(ids), 0)
        input_ids = [self.pad_token_id] * difference + list(ids)
        attention_mask = [0] * difference + [1] * len(ids)
        position_ids = [0] * difference + list(range(len(ids)))
        return input_ids, attention_mask, position_ids

    # ----------------------------------------------------------------------------------------------------
    # Decoding

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """Decode ids to text as the original does; see the module docstring for the special tokens."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        elif isinstance(ids, int):
            ids = [ids]
        dropped = {self.pad_token_id, self.bos_token_id, self.eos_token_id}
        keep_special = self.family == "chatglm3" and not skip_special_tokens
        pieces = []
        for index in (int(index) for index in ids):
            if index in dropped or (index in self.special_token_strings and not keep_special):
                continue
            pieces.append(self._id_to_piece(index))
        # Unknown pieces such as "[gMASK]" decode to their own text; "▁" inside the list becomes a space.
        return self.sp_model.decode_pieces(pieces)

    def batch_decode(self, sequences: Sequence[Sequence[int]] | torch.Tensor, **kwargs: Any) -> list[str]:
        return [self.decode(ids, **kwargs) for ids in sequences]
