"""A DDP strategy that keeps the frozen backbone out of DDP's synchronisation.

Plain DDP broadcasts every registered parameter and buffer from rank 0 when it wraps the model, which for a
multi-GB frozen backbone costs start-up time and bandwidth, although every rank loaded the same weights from
the same files. This strategy lists everything that is not a prefix parameter in DDP's ignore list, so DDP
broadcasts and all-reduces the prefix only.
"""

from __future__ import annotations

from itertools import chain

from lightning.pytorch.strategies import DDPStrategy
from torch.nn import Module
from torch.nn.parallel import DistributedDataParallel

from ptuning_pl.module import PREFIX_MODULE


class PrefixDDPStrategy(DDPStrategy):
    """DDPStrategy whose DDP wrapper synchronises the prefix parameters only."""

    def _setup_model(self, model: Module) -> DistributedDataParallel:
        # Lightning 2.6 calls this hook with its wrapper around the LightningModule; DDP reads the attribute
        # `_ddp_params_and_buffers_to_ignore` (names relative to `model`) when it is constructed.
        marker = f"{PREFIX_MODULE}."
        frozen = [
            name
            for name, _ in chain(model.named_parameters(), model.named_buffers())
            if marker not in name
        ]
        model._ddp_params_and_buffers_to_ignore = frozen
        return super()._setup_model(model)
