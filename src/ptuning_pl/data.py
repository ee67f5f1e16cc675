"""LightningDataModule for ADGEN-style prompt/response files.

Records are read and validated by `ptuning_pl.records` (before any model is built); this module splits them,
encodes them once with the backbone family's `PromptFormat`, and batches them with dynamic padding.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from ptuning_pl.backbones.base import PromptFormat
from ptuning_pl.prompts import IGNORE_INDEX
from ptuning_pl.records import Record, read_records
from ptuning_pl.sampling import EvalBatchSampler, LengthGroupedBatchSampler

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")


@dataclass
class EncodingStats:
    """Counts reported after encoding one split."""

    examples: int = 0
    prompts_truncated: int = 0
    responses_truncated: int = 0
    dropped: list[int] = field(default_factory=list)

    def summary(self, split: str) -> str:
        return (
            f"{split}: {self.examples} examples ({self.prompts_truncated} prompts truncated, "
            f"{self.responses_truncated} responses truncated, {len(self.dropped)} dropped with no supervised token)"
        )


class EncodedDataset(Dataset):
    """Token ids of one split; each item keeps the record index it came from."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]

    @property
    def lengths(self) -> list[int]:
        return [len(item["input_ids"]) for item in self.items]


def pad_batch(items: Sequence[dict[str, Any]], pad_token_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad to the longest item in the batch (not to a fixed length)."""
    longest = max(len(item["input_ids"]) for item in items)

    input_ids = torch.full((len(items), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), longest), dtype=torch.long)
    labels = torch.full((len(items), longest), IGNORE_INDEX, dtype=torch.long)

    for row, item in enumerate(items):
        length = len(item["input_ids"])
        span = slice(0, length) if padding_side == "right" else slice(longest - length, longest)
        input_ids[row, span] = torch.tensor(item["input_ids"])
        attention_mask[row, span] = 1
        labels[row, span] = torch.tensor(item["labels"])

    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "index": torch.tensor([item["index"] for item in items], dtype=torch.long),
        "position": torch.tensor([item.get("position", row) for row, item in enumerate(items)], dtype=torch.long),
    }
    if "prompt_ids" in items[0]:
        # Generation left-pads these itself; strings and ragged lists pass through device transfer untouched.
        batch["prompt_ids"] = [item["prompt_ids"] for item in items]
        batch["prompt"] = [item["prompt"] for item in items]
        batch["reference"] = [item["reference"] for item in items]
    return batch


class Collator:
    """Picklable collate function (DataLoader workers need one)."""

    def __init__(self, pad_token_id: int, padding_side: str) -> None:
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return pad_batch(items, self.pad_token_id, self.padding_side)


def split_records(records: list[Record], fractions: Sequence[float], seed: int) -> dict[str, list[Record]]:
    """Split one file's records into train/validation/test by `fractions` with a seeded permutation."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(records), generator=generator).tolist()
    total = sum(fractions)
    n_validation = round(len(records) * fractions[1] / total)
    n_test = round(len(records) * fractions[2] / total)
    n_train = len(records) - n_validation - n_test

    def pick(indices: list[int]) -> list[Record]:
        return [records[i] for i in sorted(indices)]

    return {
        "train": pick(order[:n_train]),
        "validation": pick(order[n_train : n_train + n_validation]),
        "test": pick(order[n_train + n_validation :]),
    }


class AdgenDataModule(pl.LightningDataModule):
    """Prompt/response files (JSON lines or a JSON array) for P-Tuning v2.

    When `validation_file` and `test_file` are both null, `train_file` is split by `split` fractions
    (train, validation, test) with `split_seed`, so one file serves all three.
    """

    def __init__(
        self,
        prompt_format: PromptFormat | None = None,
        train_file: str | None = None,
        validation_file: str | None = None,
        test_file: str | None = None,
        prompt_column: str = "content",
        response_column: str = "summary",
        history_column: str | None = None,
        messages_column: str | None = None,
        max_source_length: int = 64,
        max_target_length: int = 64,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        split: Sequence[float] = (0.9, 0.05, 0.05),
        split_seed: int = 42,
        shuffle_seed: int = 42,
        group_by_length: bool = True,
        pin_memory: bool | None = None,
        dir: str | None = None,
    ) -> None:
        super().__init__()
        self.prompt_format = prompt_format
        self.files = {"train": train_file, "validation": validation_file, "test": test_file}
        self.prompt_column = prompt_column
        self.response_column = response_column
        self.history_column = history_column
        self.messages_column = messages_column
        self.max_source_length = max_source_length
        self.max_target_length = max_target_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.split = tuple(split)
        self.split_seed = split_seed
        self.shuffle_seed = shuffle_seed
        self.group_by_length = group_by_length
        self.pin_memory = pin_memory
        self.data_dir = dir

        self.records: dict[str, list[Record]] | None = None
        self.datasets: dict[str, EncodedDataset] = {}
        self.stats: dict[str, EncodingStats] = {}
        self._train_sampler: LengthGroupedBatchSampler | None = None
        self._pending_skip: tuple[int, int] | None = None

    # ----------------------------------------------------------------------------------------------- reading
    def load_records(self) -> dict[str, list[Record]]:
        """Read and validate every configured file; raises `DataFileError` naming file, line and fix."""
        if self.records is not None:
            return self.records

        def read(split: str, require_response: bool) -> list[Record]:
            return read_records(
                self.files[split],
                prompt_column=self.prompt_column,
                response_column=self.response_column,
                history_column=self.history_column,
                require_response=require_response,
                split_name=split,
                messages_column=self.messages_column,
            )

        records: dict[str, list[Record]] = {}
        if self.files["train"]:
            records["train"] = read("train", require_response=True)
        if self.files["validation"]:
            records["validation"] = read("validation", require_response=True)
        if self.files["test"]:
            records["test"] = read("test", require_response=False)

        if "train" in records and not self.files["validation"] and not self.files["test"]:
            records.update(split_records(records["train"], self.split, self.split_seed))
            log.info(
                "split %s by %s (seed %d): %s",
                self.files["train"],
                list(self.split),
                self.split_seed,
                ", ".join(f"{name} {len(records[name])}" for name in SPLITS),
            )
        self.records = records
        return records

    def texts_for_tokenizer(self) -> list[str]:
        """Return every prompt, response and history text of the training split (to train a tiny tokenizer)."""
        texts: list[str] = []
        for record in self.load_records().get("train", []):
            texts.append(record.prompt)
            texts.append(record.response or "")
            for query, answer in record.history:
                texts += [query, answer]
            texts += [content for _, content in record.messages]
        return texts

    # ---------------------------------------------------------------------------------------------- encoding
    def setup(self, stage: str | None = None) -> None:
        if self.prompt_format is None:
            raise RuntimeError("AdgenDataModule needs a prompt_format before setup()")
        for split, records in self.load_records().items():
            if split not in self.datasets and records:
                self.datasets[split] = self._encode(split, records)

    def _encode(self, split: str, records: list[Record]) -> EncodedDataset:
        stats = EncodingStats()
        items = []
        for position, record in enumerate(records):
            if split == "train":
                item = self._encode_train(record, stats)
            else:
                item = self._encode_eval(record, stats)
            if item is None:
                stats.dropped.append(record.index)
                continue
            item["index"] = record.index
            item["position"] = len(items)
            items.append(item)

        stats.examples = len(items)
        self.stats[split] = stats
        log.info(stats.summary(split))
        if stats.dropped:
            log.warning("%s: dropped records (0-based index) %s", split, stats.dropped[:20])
        return EncodedDataset(items)

    def _conversation(self, record: Record) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in record.messages]

    def _encode_train(self, record: Record, stats: EncodingStats) -> dict[str, Any] | None:
        if record.messages:
            # The reference budget of a whole conversation: source + target + 1 tokens, cut from the right.
            budget = self.max_source_length + self.max_target_length + 1
            encoded = self.prompt_format.encode_messages(self._conversation(record), budget)
        else:
            encoded = self.prompt_format.encode_train(
                record.prompt, record.response, record.history, self.max_source_length, self.max_target_length
            )
        stats.prompts_truncated += encoded.prompt_truncated
        stats.responses_truncated += encoded.response_truncated
        if all(label == IGNORE_INDEX for label in encoded.labels):
            return None
        return {"input_ids": encoded.input_ids, "labels": encoded.labels}

    def _encode_eval(self, record: Record, stats: EncodingStats) -> dict[str, Any] | None:
        """Validation and test items: the generation prompt, plus the training encoding for the loss.

        A record without a response (allowed in test files) gets no loss: its labels are all -100.
        """
        if record.messages:
            return self._encode_eval_messages(record, stats)
        prompt = self.prompt_format.encode_prompt(record.prompt, record.history, self.max_source_length)
        stats.prompts_truncated += prompt.prompt_truncated
        item = {"prompt_ids": prompt.input_ids, "prompt": record.prompt, "reference": record.response}
        if record.response is None:
            item["input_ids"] = prompt.input_ids
            item["labels"] = [IGNORE_INDEX] * len(prompt.input_ids)
            return item

        encoded = self.prompt_format.encode_train(
            record.prompt, record.response, record.history, self.max_source_length, self.max_target_length
        )
        stats.responses_truncated += encoded.response_truncated
        item["input_ids"] = encoded.input_ids
        item["labels"] = encoded.labels
        return item

    def _encode_eval_messages(self, record: Record, stats: EncodingStats) -> dict[str, Any]:
        """Encode a conversation for evaluation of its last assistant message, generated from what precedes it."""
        conversation = self._conversation(record)
        last_assistant = max((i for i, m in enumerate(conversation) if m["role"] == "assistant"), default=None)
        context = conversation if last_assistant is None else conversation[:last_assistant]
        prompt = self.prompt_format.encode_messages_prompt(context, self.max_source_length)
        stats.prompts_truncated += prompt.prompt_truncated
        item = {"prompt_ids": prompt.input_ids, "prompt": record.prompt, "reference": record.response}
        if last_assistant is None:
            item["input_ids"] = prompt.input_ids
            item["labels"] = [IGNORE_INDEX] * len(prompt.input_ids)
            return item
        encoded = self.prompt_format.encode_messages(
            conversation[: last_assistant + 1], self.max_source_length + self.max_target_length + 1
        )
        stats.responses_truncated += encoded.response_truncated
        item["input_ids"] = encoded.input_ids
        item["labels"] = encoded.labels
        return item

    # ------------------------------------------------------------------------------------------ dataloaders
    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    def _loader(self, dataset: EncodedDataset, batch_sampler, padding_side: str) -> DataLoader:
        pin_memory = self.pin_memory
        if pin_memory is None:
            pin_memory = torch.cuda.is_available()
        return DataLoader(
            dataset,
            batch_sampler=batch_sampler,
            # A generator of its own: creating an iterator draws worker seeds from it instead of from the
            # global generator, so prefix dropout draws the same numbers whether or not a run was resumed.
            generator=torch.Generator().manual_seed(self.shuffle_seed),
            collate_fn=Collator(self.prompt_format.pad_token_id, padding_side),
            num_workers=self.num_workers,
            pin_memory=pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def skip_train_batches(self, epoch: int, count: int) -> None:
        """Start the next training iteration at batch `count` of `epoch` (set by the exact-resume callback)."""
        self._pending_skip = (epoch, count)
        if self._train_sampler is not None:
            self._train_sampler.skip_batches(epoch, count)

    def train_dataloader(self) -> DataLoader:
        dataset = self.datasets["train"]
        world_size, rank = self._world()
        sampler = LengthGroupedBatchSampler(
            dataset.lengths,
            self.batch_size,
            seed=self.shuffle_seed,
            group_by_length=self.group_by_length,
            num_replicas=world_size,
            rank=rank,
        )
        if self._pending_skip is not None:
            sampler.skip_batches(*self._pending_skip)
        self._train_sampler = sampler
        return self._loader(dataset, sampler, padding_side="right")

    def _eval_loader(self, split: str) -> DataLoader | list:
        dataset = self.datasets.get(split)
        if dataset is None:
            return []
        world_size, rank = self._world()
        sampler = EvalBatchSampler(len(dataset), self.eval_batch_size, num_replicas=world_size, rank=rank)
        return self._loader(dataset, sampler, padding_side="right")

    def val_dataloader(self):
        return self._eval_loader("validation")

    def test_dataloader(self):
        return self._eval_loader("test")

    def predict_dataloader(self):
        return self._eval_loader("test")
