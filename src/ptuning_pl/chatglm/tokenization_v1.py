"""The ChatGLM-6B (GLM v1) tokenizer on sentencepiece, with the behaviour of the original remote code.

What it reproduces from the original `tokenization_chatglm.py` (chatglm-6b model repo, 2023-09 revision,
run with transformers 4.30):

- Before sentencepiece, "\\n" becomes the piece "<n>", "\\t" becomes "<|tab|>", and runs of 80 down to 2
  spaces become "<|blank_N|>", taken greedily from 80 (200 spaces are 80 + 80 + 40).
- Token ids are sentencepiece ids plus `num_image_tokens` (0 in the current `tokenizer_config.json`; the
  original code's default of 20000 applies when the file does not set it).
- `encode` appends [gMASK] and <sop>; a second sequence is followed by <eop>.
- Padding is on the left. When a batch is padded, or a `max_length` is given, the output also has a boolean
  attention mask (1, L, L) with True = masked (bidirectional up to <sop>, causal from there, padding masked)
  and 2-D position ids (2, L): the position within the prompt, frozen at the [MASK] or [gMASK] index from
  <sop> on, and the block position 0 before <sop> and 1, 2, ... from it.
- `decode` drops padding, turns "<n>", "<|tab|>" and "<|blank_N|>" back into whitespace and applies the
  transformers 4.30 clean-up of spaces before punctuation.

One difference is deliberate: the original lets transformers split user text on the strings "<sop>",
"<eop>", "[MASK]", "<pad>" and "<unk>" and turns them into control tokens. This tokenizer passes all text to
sentencepiece unchanged, which never produces a control piece from text, so a record cannot inject <sop> or
[MASK] and change the layout of a training example. The whitespace markers "<n>", "<|tab|>" and
"<|blank_N|>" typed in text still become whitespace tokens, as in the original.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch

VOCAB_FILE_NAME = "ice_text.model"
CONFIG_FILE_NAME = "tokenizer_config.json"

# The original code's default, for tokenizer_config.json files that predate the `num_image_tokens` key.
DEFAULT_NUM_IMAGE_TOKENS = 20000
MAX_BLANK_LENGTH = 80

NEWLINE_PIECE = "<n>"
TAB_PIECE = "<|tab|>"

# Token strings of the original tokenizer_config.json, used when a config leaves one out.
DEFAULT_SPECIAL_TOKENS = {
    "bos_token": "<sop>",
    "eos_token": "<eop>",
    "end_token": "</s>",
    "mask_token": "[MASK]",
    "gmask_token": "[gMASK]",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
}


def blank_piece(length: int) -> str:
    return f"<|blank_{length}|>"


def clean_up_tokenization(text: str) -> str:
    """Remove the spaces before punctuation and English contractions, as transformers 4.30 does on decode."""
    return (
        text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
    )


class ChatGLM6BTokenizer:
    """Sentencepiece tokenizer of ChatGLM-6B (`ice_text.model`); user text is always encoded as plain text."""

    padding_side = "left"
    model_input_names = ("input_ids", "attention_mask", "position_ids")

    def __init__(
        self,
        vocab_file: str | Path,
        *,
        num_image_tokens: int,
        bos_token: str = DEFAULT_SPECIAL_TOKENS["bos_token"],
        eos_token: str = DEFAULT_SPECIAL_TOKENS["eos_token"],
        end_token: str = DEFAULT_SPECIAL_TOKENS["end_token"],
        mask_token: str = DEFAULT_SPECIAL_TOKENS["mask_token"],
        gmask_token: str = DEFAULT_SPECIAL_TOKENS["gmask_token"],
        pad_token: str = DEFAULT_SPECIAL_TOKENS["pad_token"],
        unk_token: str = DEFAULT_SPECIAL_TOKENS["unk_token"],
        do_lower_case: bool = False,
        remove_space: bool = False,
        config: dict[str, Any] | None = None,
    ) -> None:
        if num_image_tokens < 0:
            raise ValueError(f"num_image_tokens must be 0 or more, got {num_image_tokens}")
        self.vocab_file = Path(vocab_file)
        self.sp_model = spm.SentencePieceProcessor(model_file=str(self.vocab_file))
        self.num_image_tokens = num_image_tokens
        self.do_lower_case = do_lower_case
        self.remove_space = remove_space

        self.bos_token = bos_token
        self.eos_token = eos_token
        self.end_token = end_token
        self.mask_token = mask_token
        self.gmask_token = gmask_token
        self.pad_token = pad_token
        self.unk_token = unk_token

        self.bos_token_id = self.piece_to_id(bos_token)
        self.eos_token_id = self.piece_to_id(eos_token)
        self.end_token_id = self.piece_to_id(end_token)
        self.mask_token_id = self.piece_to_id(mask_token)
        self.gmask_token_id = self.piece_to_id(gmask_token)
        self.pad_token_id = self.piece_to_id(pad_token)
        self.unk_token_id = self.piece_to_id(unk_token)

        # The ids that `decode(..., skip_special_tokens=True)` drops: the original's special tokens.
        # [gMASK] is not among them, but sentencepiece decodes it (a control piece) to nothing anyway.
        self.all_special_ids = [
            self.bos_token_id,
            self.eos_token_id,
            self.unk_token_id,
            self.pad_token_id,
            self.mask_token_id,
        ]
        # The tokenizer_config.json entries this tokenizer was built from, written back by save_pretrained.
        self.config = dict(config or {})

    # ----------------------------------------------------------------------------------------------------
    # Loading and saving

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ChatGLM6BTokenizer:
        """Load `ice_text.model` and, if present, `tokenizer_config.json` from the folder `path`."""
        folder = Path(path)
        vocab_file = folder / VOCAB_FILE_NAME
        if not vocab_file.is_file():
            raise FileNotFoundError(
                f"no {VOCAB_FILE_NAME} in {folder}; pass the folder that holds the ChatGLM-6B tokenizer files"
            )
        config: dict[str, Any] = {}
        config_file = folder / CONFIG_FILE_NAME
        if config_file.is_file():
            config = json.loads(config_file.read_text(encoding="utf-8"))

        token_strings = {name: config.get(name, default) for name, default in DEFAULT_SPECIAL_TOKENS.items()}
        return cls(
            vocab_file,
            num_image_tokens=int(config.get("num_image_tokens", DEFAULT_NUM_IMAGE_TOKENS)),
            do_lower_case=bool(config.get("do_lower_case", False)),
            remove_space=bool(config.get("remove_space", False)),
            config=config,
            **token_strings,
        )

    def save_pretrained(self, path: str | Path) -> list[Path]:
        """Write `ice_text.model` and `tokenizer_config.json` into the folder `path`; return the files."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        vocab_target = folder / VOCAB_FILE_NAME
        if vocab_target.resolve() != self.vocab_file.resolve():
            shutil.copyfile(self.vocab_file, vocab_target)

        config = dict(self.config)
        config.update(
            {
                "bos_token": self.bos_token,
                "eos_token": self.eos_token,
                "end_token": self.end_token,
                "mask_token": self.mask_token,
                "gmask_token": self.gmask_token,
                "pad_token": self.pad_token,
                "unk_token": self.unk_token,
                "num_image_tokens": self.num_image_tokens,
                "do_lower_case": self.do_lower_case,
                "remove_space": self.remove_space,
            }
        )
        config_target = folder / CONFIG_FILE_NAME
        config_target.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return [vocab_target, config_target]

    # ----------------------------------------------------------------------------------------------------
    # Vocabulary

    @property
    def vocab_size(self) -> int:
        return self.num_image_tokens + self.sp_model.get_piece_size()

    def __len__(self) -> int:
        return self.vocab_size

    def piece_to_id(self, piece: str) -> int:
        """Return the id of a vocabulary piece; raise KeyError if the piece is not in the vocabulary."""
        sp_id = self.sp_model.piece_to_id(piece)
        if sp_id == self.sp_model.unk_id() and piece != self.sp_model.id_to_piece(sp_id):
            raise KeyError(f"token {piece!r} is not in the vocabulary of {self.vocab_file}")
        return sp_id + self.num_image_tokens

    def convert_tokens_to_ids(self, tokens: Sequence[str]) -> list[int]:
        ids = []
        for token in tokens:
            if token.startswith("<image_") and token.endswith(">") and token[7:-1].isdigit():
                ids.append(int(token[7:-1]))
            else:
                ids.append(self.sp_model.piece_to_id(token) + self.num_image_tokens)
        return ids

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        tokens = []
        for token_id in ids:
            token_id = int(token_id)
            if token_id < self.num_image_tokens:
                tokens.append(f"<image_{token_id}>")
            else:
                tokens.append(self.sp_model.id_to_piece(token_id - self.num_image_tokens))
        return tokens

    # ----------------------------------------------------------------------------------------------------
    # Encoding

    def _preprocess(self, text: str) -> str:
        if self.remove_space:
            text = " ".join(text.strip().split())
        if self.do_lower_case:
            text = text.lower()
        text = text.replace("\n", NEWLINE_PIECE)
        text = text.replace("\t", TAB_PIECE)
        # Longest runs first, as the original does, so each run becomes as few blank pieces as possible.
        for length in range(MAX_BLANK_LENGTH, 1, -1):
            text = text.replace(" " * length, blank_piece(length))
        return text

    def tokenize(self, text: str) -> list[str]:
        """Return the sentencepiece pieces of `text` (no special tokens added)."""
        return self.sp_model.encode(self._preprocess(text), out_type=str)

    def build_inputs_with_special_tokens(
        self, ids: Sequence[int], pair_ids: Sequence[int] | None = None
    ) -> list[int]:
        """Return `ids + [gMASK, <sop>]`, followed by `pair_ids + [<eop>]` when a pair is given."""
        result = list(ids) + [self.gmask_token_id, self.bos_token_id]
        if pair_ids is not None:
            result += list(pair_ids) + [self.eos_token_id]
        return result

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Return the token ids of `text`, ending with [gMASK] <sop> when `add_special_tokens` is set."""
        ids = [piece_id + self.num_image_tokens for piece_id in self.sp_model.encode(self._preprocess(text))]
        if add_special_tokens:
            ids = self.build_inputs_with_special_tokens(ids)
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

        `padding` is False, True (or "longest": pad to the longest sequence of the batch) or "max_length".
        With `truncation`, the text ids are cut so that the result, special tokens included, fits
        `max_length`.
        The attention mask and position ids are returned only when padding is requested or `max_length` is
        given, as in the original. `return_tensors="pt"` returns torch tensors with a batch dimension;
        otherwise the values are nested Python lists.
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

        with_layout = padding in ("longest", "max_length") or max_length is not None
        if not with_layout:
            result: dict[str, Any] = {"input_ids": encoded}
        else:
            if padding == "longest":
                target_length = max(len(ids) for ids in encoded)
            elif padding == "max_length":
                target_length = max_length
            else:
                target_length = None
            padded = [self.pad_with_layout(ids, target_length) for ids in encoded]
            result = {
                "input_ids": [ids for ids, _, _ in padded],
                "attention_mask": [mask for _, mask, _ in padded],
                "position_ids": [positions for _, _, positions in padded],
            }

        if return_tensors == "pt":
            lengths = {len(ids) for ids in result["input_ids"]}
            if len(lengths) > 1:
                raise ValueError("sequences of different lengths cannot form a tensor; pass padding=True")
            tensors = {"input_ids": torch.tensor(result["input_ids"], dtype=torch.long)}
            if with_layout:
                tensors["attention_mask"] = torch.stack(result["attention_mask"])
                tensors["position_ids"] = torch.stack(result["position_ids"])
            return tensors

        if with_layout:
            result["attention_mask"] = [mask.tolist() for mask in result["attention_mask"]]
            result["position_ids"] = [positions.tolist() for positions in result["position_ids"]]
        if not is_batch:
            result = {name: values[0] for name, values in result.items()}
        return result

    def _encode_truncated(
        self, text: str, add_special_tokens: bool, max_length: int | None, truncation: bool
    ) -> list[int]:
        ids = self.encode(text, add_special_tokens=False)
        if truncation and max_length is not None:
            budget = max_length - (2 if add_special_tokens else 0)
            if budget < 0:
                raise ValueError(f"max_length {max_length} leaves no room for the 2 special tokens")
            ids = ids[:budget]
        if add_special_tokens:
            ids = self.build_inputs_with_special_tokens(ids)
        return ids

    # ----------------------------------------------------------------------------------------------------
    # Attention mask, positions and padding

    def build_attention_mask(self, ids: Sequence[int]) -> torch.Tensor:
        """Return the (1, L, L) mask of one unpadded sequence, True = masked: causal except up to <sop>."""
        length = len(ids)
        context_length = list(ids).index(self.bos_token_id) if self.bos_token_id in ids else length
        visible = torch.ones(length, length).tril()
        visible[:, :context_length] = 1
        return (visible < 0.5).unsqueeze(0)

    def build_position_ids(self, ids: Sequence[int]) -> torch.Tensor:
        """Return the (2, L) position and block position ids of one unpadded sequence.

        As in the original tokenizer, [MASK] takes precedence over [gMASK] when both occur; the model
        itself prefers [gMASK] (see `modeling_v1.find_prompt_boundaries`).
        """
        ids = list(ids)
        length = len(ids)
        context_length = ids.index(self.bos_token_id) if self.bos_token_id in ids else length
        positions = torch.arange(length, dtype=torch.long)
        mask_token_id = self.mask_token_id if self.mask_token_id in ids else self.gmask_token_id
        if mask_token_id in ids:
            positions[context_length:] = ids.index(mask_token_id)
        block_positions = torch.cat(
            [
                torch.zeros(context_length, dtype=torch.long),
                torch.arange(1, length - context_length + 1, dtype=torch.long),
            ]
        )
        return torch.stack([positions, block_positions])

    def pad_with_layout(
        self, ids: Sequence[int], max_length: int | None = None
    ) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """Left-pad one sequence to `max_length`; return ids, the (1, L, L) mask and the (2, L) positions.

        Mask and positions are computed on the unpadded sequence; padding rows and columns are masked and
        padding positions are 0.
        """
        ids = list(ids)
        mask = self.build_attention_mask(ids)
        positions = self.build_position_ids(ids)
        if max_length is None or len(ids) >= max_length:
            return ids, mask, positions

        difference = max_length - len(ids)
        mask = torch.nn.functional.pad(mask, (difference, 0, difference, 0), value=True)
        positions = torch.nn.functional.pad(positions, (difference, 0), value=0)
        return [self.pad_token_id] * difference + ids, mask, positions

    # ----------------------------------------------------------------------------------------------------
    # Decoding

    def decode(
        self,
        ids: Sequence[int] | torch.Tensor,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool = True,
    ) -> str:
        """Decode ids to text, as the original does under transformers 4.30.

        Padding is always dropped, and sentencepiece decodes control pieces such as <sop>, <eop>, [MASK] and
        [gMASK] to nothing; <unk> shows as " ⁇ " unless `skip_special_tokens` drops it. Image-token ids
        (below `num_image_tokens`) have no text and are dropped.
        """
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        elif isinstance(ids, int):
            ids = [ids]
        skipped = set(self.all_special_ids) if skip_special_tokens else {self.pad_token_id}
        sp_ids = [int(i) - self.num_image_tokens for i in ids if int(i) not in skipped]
        text = self.sp_model.decode([i for i in sp_ids if i >= 0])

        text = text.replace(NEWLINE_PIECE, "\n").replace(TAB_PIECE, "\t")
        for length in range(2, MAX_BLANK_LENGTH + 1):
            text = text.replace(blank_piece(length), " " * length)
        if clean_up_tokenization_spaces:
            text = clean_up_tokenization(text)
        return text

    def batch_decode(self, sequences: Sequence[Sequence[int]] | torch.Tensor, **kwargs: Any) -> list[str]:
        return [self.decode(ids, **kwargs) for ids in sequences]
