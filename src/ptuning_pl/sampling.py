"""Batch samplers that shard across ranks themselves (the trainer runs with use_distributed_sampler=False).

`LengthGroupedBatchSampler` shuffles, then sorts by length inside windows of many batches, so each batch holds
examples of similar length (little padding) while batch order stays random. It can skip the batches of the
current epoch that a resumed run has already trained on.

`EvalBatchSampler` gives every example to exactly one rank, with no padding copies, in input order within a
rank, so predictions can be gathered back into input order.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Random batches of similar-length examples, the same order on every rank for a given seed and epoch.

    With several ranks the sampler forms global batches of `batch_size * num_replicas` examples, exactly as one
    process with that batch size would, and rank r takes the r-th slice of each. An incomplete last global
    batch is dropped, so every rank runs the same number of steps.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        group_by_length: bool = True,
        window_batches: int = 50,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.group_by_length = group_by_length
        # Windows are counted in global batches, so one process and several ranks group alike.
        self.window = batch_size * num_replicas * window_batches
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        # (epoch, count): skip the first `count` batches when that epoch is iterated next.
        self._skip: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def sampler(self) -> LengthGroupedBatchSampler:
        # Lightning calls set_epoch on `dataloader.batch_sampler.sampler` at the start of every epoch
        # (lightning.fabric.utilities.data._set_sampler_epoch, 2.6); pointing it here makes each epoch reshuffle.
        return self

    def skip_batches(self, epoch: int, count: int) -> None:
        """Make the next iteration over `epoch` start after its first `count` batches (for exact resume).

        A resume from the last batch of an epoch continues with the next epoch, which is not skipped.
        """
        self.epoch = epoch
        self._skip = (epoch, count)

    def _all_batches(self, batch_size: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        count = len(self.lengths)
        order = torch.randperm(count, generator=generator).tolist() if self.shuffle else list(range(count))

        if self.group_by_length:
            windows = [order[start : start + self.window] for start in range(0, count, self.window)]
            order = [i for window in windows for i in sorted(window, key=lambda i: -self.lengths[i])]

        batches = [order[start : start + batch_size] for start in range(0, count, batch_size)]
        if self.shuffle and self.group_by_length:
            permutation = torch.randperm(len(batches), generator=generator).tolist()
            batches = [batches[i] for i in permutation]
        return batches

    def _rank_batches(self) -> list[list[int]]:
        if self.num_replicas == 1:
            return self._all_batches(self.batch_size)
        global_size = self.batch_size * self.num_replicas
        slice_start = self.rank * self.batch_size
        return [
            batch[slice_start : slice_start + self.batch_size]
            for batch in self._all_batches(global_size)
            if len(batch) == global_size
        ]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._rank_batches()
        skip = 0
        if self._skip is not None and self._skip[0] == self.epoch:
            skip = self._skip[1]
        self._skip = None
        yield from batches[skip:]

    def __len__(self) -> int:
        if self.num_replicas > 1:
            return len(self.lengths) // (self.batch_size * self.num_replicas)
        return math.ceil(len(self.lengths) / self.batch_size)


class EvalBatchSampler(Sampler[list[int]]):
    """Contiguous, unpadded shards: rank r takes examples r, r + world, r + 2 * world, ... in order."""

    def __init__(self, size: int, batch_size: int, num_replicas: int = 1, rank: int = 0) -> None:
        self.indices = list(range(rank, size, num_replicas))
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for start in range(0, len(self.indices), self.batch_size):
            yield self.indices[start : start + self.batch_size]

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)
