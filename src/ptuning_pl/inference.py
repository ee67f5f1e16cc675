"""A small Python API for notebooks and scripts: load an export (with its backbone) and generate.

    from ptuning_pl.inference import PrefixModel
    model = PrefixModel.from_export("runs/x/export")          # or "user/repo@revision" on the Hub
    model.generate(["类型#上衣*颜色#白色", "类型#裙*材质#针织"])
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from ptuning_pl.export import module_from_export
from ptuning_pl.generation import GenerationSettings, iterate_tokens
from ptuning_pl.module import PrefixTuningModule

log = logging.getLogger(__name__)


def resolve_export_dir(export_dir: str | os.PathLike) -> Path:
    """Return a local export folder as it is, or download a Hub repo id `owner/name[@revision]` to the cache."""
    text = str(export_dir)
    local = Path(text).expanduser()
    if local.is_dir():
        return local
    repo_id, _, revision = text.partition("@")
    if text.startswith((".", "/", "~")) or repo_id.count("/") != 1:
        raise FileNotFoundError(f"export folder {text} does not exist (a Hub export is given as owner/name[@revision])")
    from huggingface_hub import snapshot_download

    log.info("downloading export %s (revision %s) from the Hugging Face Hub", repo_id, revision or "main")
    return Path(snapshot_download(repo_id=repo_id, revision=revision or None))


class PrefixModel:
    """A frozen backbone with a trained prefix, ready to generate."""

    def __init__(self, module: PrefixTuningModule, device: str | torch.device | None = None) -> None:
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.module = module.to(device).eval()
        self.device = torch.device(device)

    @classmethod
    def from_export(
        cls,
        export_dir: str | os.PathLike,
        device: str | torch.device | None = None,
        model_path: str | None = None,
    ) -> PrefixModel:
        """Load an export folder or Hub repo; `model_path` points at a local copy of the base model."""
        overrides = {"path": model_path} if model_path else None
        return cls(module_from_export(resolve_export_dir(export_dir), backbone_overrides=overrides), device)

    @property
    def prompt_format(self):
        return self.module.prompt_format

    def _prompt_ids(self, prompt: str, history: Sequence[tuple[str, str]]) -> list[int]:
        budget = self.module.evaluation.max_source_length
        return self.prompt_format.encode_prompt(prompt, list(history), budget).input_ids

    def settings(self, preset: str = "greedy", **overrides) -> GenerationSettings:
        overrides.setdefault("max_new_tokens", self.module.evaluation.max_new_tokens)
        return GenerationSettings.from_preset(preset, **overrides)

    def generate(
        self,
        prompts: Sequence[str],
        histories: Sequence[Sequence[tuple[str, str]]] | None = None,
        batch_size: int = 16,
        preset: str = "greedy",
        **overrides,
    ) -> list[str]:
        """Generate one response per prompt (batched, left-padded)."""
        if isinstance(prompts, str):
            raise TypeError("generate takes a list of prompts; for one prompt use generate([prompt])[0]")
        histories = histories or [[] for _ in prompts]
        settings = self.settings(preset, **overrides)
        responses: list[str] = []
        for start in range(0, len(prompts), batch_size):
            ids = [self._prompt_ids(p, h) for p, h in zip(prompts[start : start + batch_size], histories[start:])]
            generated = self.module.generate_ids(ids, settings)
            responses += [self.prompt_format.decode(tokens) for tokens in generated]
        return responses

    def stream(
        self, prompt: str, history: Sequence[tuple[str, str]] = (), preset: str = "greedy", **overrides
    ) -> Iterator[str]:
        """Yield the response text as it grows, one decoding step at a time."""
        settings = self.settings(preset, **overrides)
        stop = set(self.prompt_format.stop_token_ids)
        tokens: list[int] = []
        shown = ""
        steps = iterate_tokens(
            self.module.backbone,
            self.module.prefix_kv,
            [self._prompt_ids(prompt, history)],
            self.prompt_format.pad_token_id,
            self.prompt_format.stop_token_ids,
            settings,
            device=self.device,
        )
        for next_tokens, _ in steps:
            token = int(next_tokens[0])
            if token in stop:
                break
            tokens.append(token)
            text = self.prompt_format.decode(tokens)
            # Hold back text ending in an incomplete character (a multi-byte character split over tokens).
            if text.endswith("\ufffd"):
                continue
            if text.startswith(shown):
                yield text[len(shown) :]
            shown = text
