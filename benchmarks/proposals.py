"""A proposed change to the product, measured by `run.py --proposals` next to the current code.

`SupervisedLogitsModule.token_losses` computes vocabulary logits only at the positions that have a label.
`PrefixTuningModule.token_losses` computes them at every position (prompt and padding included) and then
selects the labelled ones. For a micro-batch of 16 ADGEN examples on the tiny model it therefore builds,
indexes and back-propagates a (16, length, vocabulary) tensor of which roughly half is used.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ptuning_pl.backbones.hf import HFBackbone
from ptuning_pl.module import PrefixTuningModule
from ptuning_pl.prompts import IGNORE_INDEX


class SupervisedLogitsModule(PrefixTuningModule):
    """`PrefixTuningModule` with logits computed at labelled positions only (transformers backbones only)."""

    def token_losses(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(self.backbone, HFBackbone):
            raise TypeError(
                f"the proposed loss supports transformers backbones (HFBackbone) only, not "
                f"{type(self.backbone).__name__}; run without --proposals"
            )
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        batch_size = input_ids.shape[0]
        cache = self.backbone.new_cache(self.prefix_kv(batch_size), batch_size)

        # Positions and prefix mask columns as in HFBackbone.forward.
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        full_mask = torch.cat(
            [attention_mask.new_ones(batch_size, cache.prefix_length), attention_mask], dim=-1
        )
        model = self.backbone.model
        hidden = model.base_model(
            input_ids=input_ids,
            attention_mask=full_mask,
            position_ids=positions,
            cache=cache.cache,
            use_cache=True,
        ).last_hidden_state

        labels = batch["labels"][:, 1:]
        supervised = labels != IGNORE_INDEX
        logits = model.get_output_embeddings()(hidden[:, :-1][supervised])
        loss_sum = F.cross_entropy(logits.float(), labels[supervised], reduction="sum")
        return loss_sum, supervised.sum()


def check_same_loss(
    current: PrefixTuningModule, proposed: PrefixTuningModule, batch: dict[str, Any]
) -> float:
    """Return the relative difference of the two modules' summed losses on `batch` (eval mode, no gradient).

    Raises ValueError above 1e-5, or when the supervised token counts differ. A model that post-processes its
    logits after the output layer (softcapping, scaling) fails here, since the proposal skips that step.
    """
    proposed.load_state_dict(current.prefix_state_dict(), strict=False)
    current.eval()
    proposed.eval()
    with torch.no_grad():
        current_sum, current_count = current.token_losses(batch)
        proposed_sum, proposed_count = proposed.token_losses(batch)
    if int(current_count) != int(proposed_count):
        raise ValueError(f"supervised token counts differ: {int(current_count)} and {int(proposed_count)}")
    difference = abs(float(current_sum) - float(proposed_sum)) / max(abs(float(current_sum)), 1e-12)
    if difference > 1e-5:
        raise ValueError(
            f"the proposed loss differs from the current one by {difference:.2e} (relative); the backbone "
            "probably post-processes its logits, so run without --proposals"
        )
    return difference
