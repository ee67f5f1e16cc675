"""PrefixDDPStrategy leaves everything but the prefix out of DDP's synchronisation."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

from ptuning_pl.strategies import PrefixDDPStrategy


class Wrapper(nn.Module):
    """Stands in for Lightning's wrapper around the LightningModule (`_forward_module`)."""

    def __init__(self) -> None:
        super().__init__()
        inner = nn.Module()
        inner.prefix_encoder = nn.Embedding(4, 8)
        inner.backbone_model = nn.Linear(8, 8).requires_grad_(False)
        inner.backbone_model.register_buffer("inv_freq", torch.ones(4))
        self._forward_module = inner

    def forward(self, x):
        return self._forward_module.backbone_model(self._forward_module.prefix_encoder(x)).sum()


@pytest.fixture
def single_process_group():
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_only_prefix_is_synchronised(single_process_group):
    strategy = PrefixDDPStrategy(parallel_devices=[torch.device("cpu")])
    ddp = strategy._setup_model(Wrapper())
    assert ddp.parameters_to_ignore == {
        "_forward_module.backbone_model.weight",
        "_forward_module.backbone_model.bias",
        "_forward_module.backbone_model.inv_freq",
    }
    ddp(torch.tensor([0, 1])).backward()
    assert ddp.module._forward_module.prefix_encoder.weight.grad is not None
