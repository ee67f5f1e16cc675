"""The measured workloads: training steps in two batch layouts, generation batched and one at a time, scaling.

Every workload runs the product's own code: `AdgenDataModule` encodes the records, `LengthGroupedBatchSampler`
and `pad_batch` batch them, `PrefixTuningModule.configure_model()` builds backbone and prefix,
`token_losses` computes the loss and `generate_ids` generates. Only the training loop is written here: a plain
loop of forward, backward and AdamW step on the prefix, without Lightning's Trainer, so that the two layouts
share everything except batching and the timings contain no logging or checkpointing.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from ptuning_pl.backbones import BackboneSpec, load_backbone
from ptuning_pl.config import config_dir
from ptuning_pl.data import AdgenDataModule, EncodedDataset, pad_batch
from ptuning_pl.generation import GenerationSettings
from ptuning_pl.module import PrefixTuningModule, is_prefix_key
from ptuning_pl.prompts import IGNORE_INDEX
from ptuning_pl.records import Record, read_records
from ptuning_pl.sampling import LengthGroupedBatchSampler

from machine import measure_peak_memory

# A plan lists optimizer steps; each step lists micro-batches; each micro-batch lists dataset indices.
Plan = list[list[list[int]]]


# ------------------------------------------------------------------------------------------------ building
def write_tiny_backbone_for(folder: Path, texts: list[str]) -> Path:
    """Write the tiny GLM of conf/model/tiny_glm.yaml into `folder`, with a tokenizer trained on `texts`."""
    from ptuning_pl.backbones.tiny import write_tiny_backbone

    settings = OmegaConf.to_container(OmegaConf.load(config_dir() / "model" / "tiny_glm.yaml").tiny)
    vocab_size = settings.pop("vocab_size")
    return write_tiny_backbone(folder, texts, vocab_size=vocab_size, **settings)


def read_data(data_file: str) -> list[Record]:
    """Read and validate every record of `data_file` (prompt column content, response column summary)."""
    return read_records(data_file, split_name="benchmark")


def encode_data(
    data_file: str, prompt_format, max_source_length: int, max_target_length: int
) -> tuple[EncodedDataset, EncodedDataset]:
    """Encode every record of `data_file` twice: for training, and as generation prompts.

    The same file is given as training and validation file, so `AdgenDataModule` does not split it.
    """
    datamodule = AdgenDataModule(
        prompt_format=prompt_format,
        train_file=data_file,
        validation_file=data_file,
        max_source_length=max_source_length,
        max_target_length=max_target_length,
    )
    datamodule.setup("fit")
    return datamodule.datasets["train"], datamodule.datasets["validation"]


class ModuleFactory:
    """Build `PrefixTuningModule`s of one backbone with different pre_seq_len, loading the backbone once.

    `configure_model()` calls `load_backbone` for every new module. The factory patches that name in
    `ptuning_pl.module` with a cached loader, so a multi-GB backbone is read once, not once per module.
    """

    def __init__(
        self, spec: BackboneSpec, prefix: dict[str, Any], optim: dict[str, Any], device: torch.device
    ):
        self.spec = spec
        self.prefix = dict(prefix)
        self.optim = dict(optim)
        self.device = device
        self._backbone = None

    def _load_backbone_once(self, spec: BackboneSpec, *args, **kwargs):
        if self._backbone is None:
            self._backbone = load_backbone(spec, *args, **kwargs)
        return self._backbone

    def build(
        self, pre_seq_len: int, module_class: type[PrefixTuningModule] = PrefixTuningModule
    ) -> PrefixTuningModule:
        module = module_class(
            backbone=asdict(self.spec), prefix={**self.prefix, "pre_seq_len": pre_seq_len}, optim=self.optim
        )
        with mock.patch("ptuning_pl.module.load_backbone", self._load_backbone_once):
            module.configure_model()
        return module.to(self.device)


def make_optimizer(module: PrefixTuningModule, optim: dict[str, Any]) -> torch.optim.AdamW:
    """AdamW on the prefix with the settings `configure_optimizers` uses, at a constant learning rate."""
    params = [p for name, p in module.named_parameters() if is_prefix_key(name)]
    return torch.optim.AdamW(
        params,
        lr=float(optim.get("lr", 2e-2)),
        betas=tuple(optim.get("betas", (0.9, 0.999))),
        eps=float(optim.get("eps", 1e-8)),
        weight_decay=float(optim.get("weight_decay", 0.0)),
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


# ----------------------------------------------------------------------------------------------- batching
@dataclass(frozen=True)
class Layout:
    """Batch layout of training examples.

    `fixed_length` pads every example to that many tokens (the reference layout); None pads each micro-batch
    to its longest example (dynamic padding). `group_by_length` forms micro-batches of similar length.
    """

    name: str
    micro_batch_size: int
    accumulation: int
    fixed_length: int | None = None
    group_by_length: bool = True

    @property
    def effective_batch_size(self) -> int:
        return self.micro_batch_size * self.accumulation


class Collate:
    """Collate function of a layout: `pad_batch` (right padding), then padding up to `fixed_length` if set."""

    def __init__(self, pad_token_id: int, fixed_length: int | None) -> None:
        self.pad_token_id = pad_token_id
        self.fixed_length = fixed_length

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = pad_batch(items, self.pad_token_id, padding_side="right")
        if self.fixed_length is None:
            return batch
        extra = self.fixed_length - batch["input_ids"].shape[1]
        if extra < 0:
            raise ValueError(
                f"an example has {batch['input_ids'].shape[1]} tokens, more than the fixed length "
                f"{self.fixed_length}"
            )
        batch["input_ids"] = F.pad(batch["input_ids"], (0, extra), value=self.pad_token_id)
        batch["attention_mask"] = F.pad(batch["attention_mask"], (0, extra), value=0)
        batch["labels"] = F.pad(batch["labels"], (0, extra), value=IGNORE_INDEX)
        return batch


def grouped_plan(lengths: Sequence[int], layout: Layout, steps: int, seed: int) -> Plan:
    """Take `steps` optimizer steps of micro-batches from `LengthGroupedBatchSampler`, epoch after epoch.

    Each epoch's last micro-batch may be smaller than the others. It is skipped, so every step has
    `layout.effective_batch_size` examples.
    """
    sampler = LengthGroupedBatchSampler(
        lengths, layout.micro_batch_size, seed=seed, group_by_length=layout.group_by_length
    )
    plan: Plan = []
    step: list[list[int]] = []
    epoch = 0
    while len(plan) < steps:
        sampler.set_epoch(epoch)
        full_batches = [batch for batch in sampler if len(batch) == layout.micro_batch_size]
        if not full_batches:
            raise ValueError(
                f"the data has {len(lengths)} examples, fewer than one micro-batch of "
                f"{layout.micro_batch_size}; lower --micro-batch-size"
            )
        for batch in full_batches:
            step.append(batch)
            if len(step) == layout.accumulation:
                plan.append(step)
                step = []
                if len(plan) == steps:
                    break
        epoch += 1
    return plan


def shuffled_plan(indices: Sequence[int], layout: Layout, seed: int) -> Plan:
    """Arrange `indices` in a seeded random order into micro-batches and steps of `layout`."""
    generator = torch.Generator().manual_seed(seed)
    order = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
    micro = [
        order[start : start + layout.micro_batch_size]
        for start in range(0, len(order), layout.micro_batch_size)
    ]
    return [micro[start : start + layout.accumulation] for start in range(0, len(micro), layout.accumulation)]


def flatten(plan: Plan) -> list[int]:
    return [index for step in plan for batch in step for index in batch]


def token_counts(plan: Plan, lengths: Sequence[int], fixed_length: int | None) -> dict[str, int]:
    """Count examples, real tokens and padded tokens (real plus padding) that `plan` feeds the model."""
    real = padded = examples = 0
    for step in plan:
        for batch in step:
            batch_lengths = [lengths[i] for i in batch]
            examples += len(batch)
            real += sum(batch_lengths)
            padded += len(batch) * (fixed_length or max(batch_lengths))
    return {"examples": examples, "real_tokens": real, "padded_tokens": padded}


# ----------------------------------------------------------------------------------------------- training
def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()
    }


def run_steps(
    module: PrefixTuningModule,
    optimizer: torch.optim.Optimizer,
    plan: Plan,
    dataset: EncodedDataset,
    collate: Callable,
    device: torch.device,
) -> None:
    """Run one optimizer step per plan entry: forward and backward on each micro-batch, then AdamW.

    Each micro-batch's loss is its mean token loss divided by the number of micro-batches in the step, as
    Lightning scales losses under gradient accumulation. Collation runs inside the loop, as in a DataLoader
    with num_workers=0.
    """
    for step in plan:
        for indices in step:
            batch = to_device(collate([dataset[i] for i in indices]), device)
            loss_sum, count = module.token_losses(batch)
            (loss_sum / count.clamp(min=1) / len(step)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@dataclass
class TrainingRun:
    """Timed configuration: a module, its encoded data, a layout, and its warm-up and timed step plans."""

    module: PrefixTuningModule
    dataset: EncodedDataset
    layout: Layout
    warmup: Plan
    timed: Plan


def _start_run(
    run: TrainingRun, initial_state: dict[str, torch.Tensor], optim: dict[str, Any]
) -> torch.optim.AdamW:
    run.module.train()
    run.module.load_state_dict(initial_state, strict=False)
    return make_optimizer(run.module, optim)


def _prefix_states(runs: dict[str, TrainingRun]) -> dict[str, dict[str, torch.Tensor]]:
    return {
        name: {key: value.clone() for key, value in run.module.prefix_state_dict().items()}
        for name, run in runs.items()
    }


def _alternating(names: list[str], index: int) -> list[str]:
    """Return `names` in order for an even `index` and reversed for an odd one."""
    return names if index % 2 == 0 else list(reversed(names))


def time_training(
    runs: dict[str, TrainingRun],
    optim: dict[str, Any],
    pad_token_id: int,
    repeats: int,
    device: torch.device,
    seed: int,
) -> dict[str, list[float]]:
    """Time the timed steps of every run `repeats` times and return each run's total seconds per repeat.

    The runs take turns step by step (step i of every run, then step i + 1, in alternating order), so a change
    in machine load during a repeat affects all runs alike. Runs must not share a module, because each keeps
    its own prefix weights and optimizer. Every repeat restarts them from their initial prefix weights, then
    runs the untimed warm-up steps.
    """
    modules = [id(run.module) for run in runs.values()]
    if len(set(modules)) != len(modules):
        raise ValueError(
            "runs timed together need a module each; build one per run with ModuleFactory.build, which "
            "shares the backbone"
        )
    initial_states = _prefix_states(runs)
    names = list(runs)
    collates = {name: Collate(pad_token_id, run.layout.fixed_length) for name, run in runs.items()}
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        torch.manual_seed(seed + repeat)
        optimizers = {name: _start_run(run, initial_states[name], optim) for name, run in runs.items()}
        for name in names:
            run = runs[name]
            run_steps(run.module, optimizers[name], run.warmup, run.dataset, collates[name], device)

        elapsed = dict.fromkeys(names, 0.0)
        for step in range(max(len(run.timed) for run in runs.values())):
            for name in _alternating(names, step):
                run = runs[name]
                if step >= len(run.timed):
                    continue
                synchronize(device)
                start = time.perf_counter()
                run_steps(
                    run.module,
                    optimizers[name],
                    run.timed[step : step + 1],
                    run.dataset,
                    collates[name],
                    device,
                )
                synchronize(device)
                elapsed[name] += time.perf_counter() - start
        for name in names:
            seconds[name].append(elapsed[name])
    for name, run in runs.items():
        run.module.load_state_dict(initial_states[name], strict=False)
    return seconds


def measure_training_memory(
    runs: dict[str, TrainingRun], optim: dict[str, Any], pad_token_id: int, device: torch.device
) -> dict[str, dict[str, Any]]:
    """Return each run's peak memory over its timed steps, measured in an untimed run after its warm-up."""
    initial_states = _prefix_states(runs)
    results = {}
    for name, run in runs.items():
        optimizer = _start_run(run, initial_states[name], optim)
        collate = Collate(pad_token_id, run.layout.fixed_length)

        warmup = partial(run_steps, run.module, optimizer, run.warmup, run.dataset, collate, device)
        work = partial(run_steps, run.module, optimizer, run.timed, run.dataset, collate, device)
        results[name] = measure_peak_memory(device, warmup, work)
        run.module.load_state_dict(initial_states[name], strict=False)
    return results


def summarize_training(run: TrainingRun, seconds: list[float]) -> dict[str, Any]:
    """Return a run's token counts, padding fraction and the medians over repeats of its timings."""
    plan = run.timed
    counts = token_counts(plan, run.dataset.lengths, run.layout.fixed_length)
    return {
        "layout": asdict(run.layout),
        "optimizer_steps": len(plan),
        **counts,
        "padding_fraction": 1.0 - counts["real_tokens"] / counts["padded_tokens"],
        "seconds": seconds,
        "median_seconds": median(seconds),
        "median_step_seconds": median(seconds) / len(plan),
        "real_tokens_per_second": median([counts["real_tokens"] / s for s in seconds]),
        "samples_per_second": median([counts["examples"] / s for s in seconds]),
    }


# --------------------------------------------------------------------------------------------- generation
def generate_in_batches(
    module: PrefixTuningModule,
    prompts: list[list[int]],
    settings: GenerationSettings,
    batch_size: int,
    sort_by_length: bool,
) -> list[list[int]]:
    """Generate for `prompts` in batches of `batch_size` and return the outputs in input order.

    With `sort_by_length`, the batches are formed from the prompts sorted longest first.
    """
    order = list(range(len(prompts)))
    if sort_by_length:
        order.sort(key=lambda i: -len(prompts[i]))
    outputs: list[list[int] | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        for index, ids in zip(chunk, module.generate_ids([prompts[i] for i in chunk], settings)):
            outputs[index] = ids
    return outputs


@dataclass(frozen=True)
class GenerationMode:
    """Generation setting: examples per `generate_ids` call, and whether prompts are sorted by length."""

    name: str
    batch_size: int
    sort_by_length: bool = False


def time_generation(
    module: PrefixTuningModule,
    prompts: list[list[int]],
    settings: GenerationSettings,
    modes: list[GenerationMode],
    repeats: int,
    device: torch.device,
) -> dict[str, Any]:
    """Time every mode `repeats` times on the same prompts and compare its outputs with the first mode's.

    The first mode is the baseline (one at a time). Modes alternate inside each repeat, in reversed order on
    odd repeats. Raises RuntimeError when a mode's greedy output differs between repeats.
    """
    module.eval()
    # Warm-up: one call per mode, so the first timed repeat does not pay for lazy initialisation.
    for mode in modes:
        generate_in_batches(
            module, prompts[: mode.batch_size], settings, mode.batch_size, mode.sort_by_length
        )

    seconds: dict[str, list[float]] = {mode.name: [] for mode in modes}
    outputs: dict[str, list[list[int]]] = {}
    for repeat in range(repeats):
        for mode in modes if repeat % 2 == 0 else reversed(modes):
            synchronize(device)
            start = time.perf_counter()
            generated = generate_in_batches(module, prompts, settings, mode.batch_size, mode.sort_by_length)
            synchronize(device)
            seconds[mode.name].append(time.perf_counter() - start)
            previous = outputs.setdefault(mode.name, generated)
            if generated != previous:
                raise RuntimeError(
                    f"greedy generation in mode {mode.name!r} returned other tokens in repeat {repeat} than "
                    "in an earlier repeat"
                )

    baseline = outputs[modes[0].name]
    results = {}
    for mode in modes:
        mismatches = [
            i for i, (ids, expected) in enumerate(zip(outputs[mode.name], baseline)) if ids != expected
        ]
        tokens = sum(len(ids) for ids in outputs[mode.name])
        results[mode.name] = {
            "batch_size": mode.batch_size,
            "sorted_by_prompt_length": mode.sort_by_length,
            "examples": len(prompts),
            "generated_tokens": tokens,
            "seconds": seconds[mode.name],
            "median_seconds": median(seconds[mode.name]),
            "generated_tokens_per_second": median([tokens / s for s in seconds[mode.name]]),
            "identical_to_baseline": not mismatches,
            "mismatched_examples": mismatches,
        }
    return results


# ------------------------------------------------------------------------------------------------ scaling
def time_forward(
    runs: dict[str, TrainingRun], pad_token_id: int, repeats: int, device: torch.device
) -> dict[str, list[float]]:
    """Time the loss forward pass (no gradient, eval mode) over each run's timed micro-batches, repeatedly.

    Runs take turns step by step as in `time_training`, after one untimed pass over each warm-up plan.
    """
    names = list(runs)
    collates = {name: Collate(pad_token_id, run.layout.fixed_length) for name, run in runs.items()}

    def forward(name: str, plan: Plan) -> None:
        run = runs[name]
        for step in plan:
            for indices in step:
                run.module.token_losses(to_device(collates[name]([run.dataset[i] for i in indices]), device))

    seconds: dict[str, list[float]] = {name: [] for name in names}
    with torch.no_grad():
        for run in runs.values():
            run.module.eval()
        for name in names:
            forward(name, runs[name].warmup)
        for _ in range(repeats):
            elapsed = dict.fromkeys(names, 0.0)
            for step in range(max(len(run.timed) for run in runs.values())):
                for name in _alternating(names, step):
                    if step >= len(runs[name].timed):
                        continue
                    synchronize(device)
                    start = time.perf_counter()
                    forward(name, runs[name].timed[step : step + 1])
                    synchronize(device)
                    elapsed[name] += time.perf_counter() - start
            for name in names:
                seconds[name].append(elapsed[name])
    return seconds
