"""Prompt formats for transformers-native backbones: the tokenizer's chat template, or plain text.

`ChatTemplateFormat` renders the chat template with placeholder strings where the user's text goes, then
encodes the template pieces with special tokens recognised and the user's text with special tokens split, so a
record that contains "<|user|>" or "[gMASK]" cannot change the layout of an example.

Budgets (the reference's rule, applied to a chat template): the prompt side, template tokens included, gets at
most `max_source_length` tokens; the response gets at most `max_target_length` tokens including the end token.
When the prompt is too long, the oldest history rounds go first, then the query is cut from the right.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from ptuning_pl.backbones.base import EncodedExample, PromptFormat

IGNORE_INDEX = -100


class PromptTooLongError(ValueError):
    """The template alone does not fit in max_source_length."""


class _TransformersFormat(PromptFormat):
    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer of {tokenizer.name_or_path} has no eos token; set one in its config")

    def encode_text(self, text: str) -> list[int]:
        """Encode user text as plain text (special-token strings stay text)."""
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def encode_template(self, text: str) -> list[int]:
        """Encode template text, where special-token strings are control tokens."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id

    @property
    def stop_token_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id}
        generation_eos = getattr(self, "extra_stop_ids", ())
        ids.update(generation_eos)
        return sorted(ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    def _prompt_ids(self, prompt: str, history: Sequence[tuple[str, str]], max_source_length: int):
        """Return (ids, truncated) for the prompt side, dropping old history first, then cutting the query."""
        history = list(history)
        truncated = False
        while True:
            pieces = self._render(prompt, history)
            ids = self._encode_pieces(pieces)
            if len(ids) <= max_source_length:
                return ids, truncated
            truncated = True
            if history:
                history.pop(0)
                continue

            # Only the query is left to cut: keep its beginning, as the reference does.
            overflow = len(ids) - max_source_length
            query_ids = self.encode_text(prompt)
            if overflow > len(query_ids):
                raise PromptTooLongError(
                    f"the prompt template of {self.name} needs {len(ids) - len(query_ids)} tokens, more than "
                    f"max_source_length={max_source_length}; raise data.max_source_length"
                )
            return self._encode_pieces(pieces, query_ids=query_ids[: len(query_ids) - overflow]), truncated

    def _render(self, prompt: str, history: Sequence[tuple[str, str]]) -> list[tuple[str, str | None]]:
        raise NotImplementedError

    def _encode_pieces(self, pieces, query_ids: list[int] | None = None) -> list[int]:
        ids: list[int] = []
        for kind, text in pieces:
            if kind == "template":
                ids += self.encode_template(text)
            elif kind == "query" and query_ids is not None:
                ids += query_ids
            else:
                ids += self.encode_text(text)
        return ids

    def encode_prompt(self, prompt, history, max_source_length) -> EncodedExample:
        ids, truncated = self._prompt_ids(prompt, history, max_source_length)
        return EncodedExample(input_ids=ids, labels=[], prompt_truncated=truncated)

    def encode_train(self, prompt, response, history, max_source_length, max_target_length) -> EncodedExample:
        prompt_ids, prompt_truncated = self._prompt_ids(prompt, history, max_source_length)
        response_ids = self.encode_text(response)
        response_truncated = len(response_ids) > max_target_length - 1
        response_ids = response_ids[: max_target_length - 1] + [self.tokenizer.eos_token_id]
        return EncodedExample(
            input_ids=prompt_ids + response_ids,
            labels=[IGNORE_INDEX] * len(prompt_ids) + response_ids,
            prompt_truncated=prompt_truncated,
            response_truncated=response_truncated,
        )


class ChatTemplateFormat(_TransformersFormat):
    """Prompts rendered with the tokenizer's chat template (GLM-4 and other chat models)."""

    name = "chat_template"

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__(tokenizer)
        if not tokenizer.chat_template:
            raise ValueError(
                f"tokenizer of {tokenizer.name_or_path} has no chat template; set model.prompt_format=plain"
            )
        self.extra_stop_ids = [
            tokenizer.convert_tokens_to_ids(token)
            for token in ("<|user|>", "<|observation|>")
            if token in tokenizer.get_vocab()
        ]

    def _render(self, prompt, history):
        # Placeholders are random so no user text can collide with them.
        marker = f"@@{uuid.uuid4().hex}@@"
        messages, contents = [], []
        for query, answer in history:
            messages += [
                {"role": "user", "content": f"{marker}{len(contents)}{marker}"},
                {"role": "assistant", "content": f"{marker}{len(contents) + 1}{marker}"},
            ]
            contents += [("text", query), ("text", answer)]
        messages.append({"role": "user", "content": f"{marker}{len(contents)}{marker}"})
        contents.append(("query", prompt))

        rendered = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        parts = rendered.split(marker)
        # parts alternate: template, index, template, index, ..., template
        pieces: list[tuple[str, str]] = []
        for position, part in enumerate(parts):
            if position % 2 == 0:
                pieces.append(("template", part))
            else:
                pieces.append(contents[int(part)])
        return pieces


class PlainFormat(_TransformersFormat):
    """No template: history rounds and the query joined by newlines, then the response (base models)."""

    name = "plain"

    def _render(self, prompt, history):
        pieces: list[tuple[str, str]] = []
        if self.tokenizer.bos_token_id is not None:
            pieces.append(("template", self.tokenizer.bos_token))
        for query, answer in history:
            pieces += [("text", query), ("text", "\n"), ("text", answer), ("text", "\n")]
        pieces.append(("query", prompt))
        return pieces


def build_prompt_format(tokenizer: PreTrainedTokenizerBase, prompt_format: str = "auto") -> PromptFormat:
    """Choose the prompt format: "auto" takes the chat template when the tokenizer has one."""
    if prompt_format == "auto":
        prompt_format = "chat_template" if tokenizer.chat_template else "plain"
    if prompt_format == "chat_template":
        return ChatTemplateFormat(tokenizer)
    if prompt_format == "plain":
        return PlainFormat(tokenizer)
    raise ValueError(f"unknown model.prompt_format {prompt_format!r}; expected auto, chat_template or plain")
