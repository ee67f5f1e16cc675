"""Benchmark ptuning-pl's training and evaluation against the batch layouts of the reference P-Tuning scripts.

Run from the repository root (see benchmarks/README.md):

    python benchmarks/run.py --threads 1          # about 4 minutes on 2 shared CPU cores
    python benchmarks/run.py --quick --data FILE  # seconds; what the smoke test runs
    python benchmarks/run.py --model-path DIR     # also benchmark a local backbone

It writes a JSON result to benchmarks/results/<date>-<host>.json and replaces the results section of
docs/benchmarks.md. Every number is a median over --repeats runs inside this one process.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import socket
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from ptuning_pl.backbones import FAMILIES, BackboneSpec, load_tokenizer_and_format
from ptuning_pl.generation import GenerationSettings

from machine import describe_machine, git_commit, load_average, package_versions
from proposals import SupervisedLogitsModule, check_same_loss
from report import render_results, update_results_section
from workloads import (
    Collate,
    GenerationMode,
    Layout,
    ModuleFactory,
    TrainingRun,
    encode_data,
    flatten,
    grouped_plan,
    measure_training_memory,
    median,
    read_data,
    shuffled_plan,
    summarize_training,
    time_forward,
    time_generation,
    time_training,
    token_counts,
    write_tiny_backbone_for,
)

log = logging.getLogger("benchmarks")

REPO_ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("training", "evaluation", "scaling")

# Defaults of a full run and of --quick; an option given on the command line overrides both.
FULL = {
    "repeats": 5,
    "warmup_steps": 2,
    "train_steps": 32,
    "eval_examples": 128,
    "eval_batch_sizes": "16,32",
    "max_new_tokens": None,
    "scaling_pre_seq_lens": "0,16,64,128",
    "scaling_lengths": "32,64,128,256",
    "scaling_steps": 8,
}
QUICK = {
    "repeats": 1,
    "warmup_steps": 1,
    "train_steps": 1,
    "eval_examples": 4,
    "eval_batch_sizes": "2",
    "max_new_tokens": 4,
    "scaling_pre_seq_lens": "0,4",
    "scaling_lengths": "32",
    "scaling_steps": 1,
}

TRAINING_TARGET = 2.0
EVALUATION_TARGET = 8.0


def default_data_file() -> Path:
    shared = Path(os.environ.get("PTUNING_SHARED_DIR", REPO_ROOT.parent / "shared"))
    return shared / "data" / "adgen" / "dev.json"


def int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--data",
        default=str(default_data_file()),
        help="ADGEN-format data file (JSON lines or a JSON array); the default is the real ADGEN sample, "
        "located through PTUNING_SHARED_DIR or ../shared beside the checkout",
    )
    parser.add_argument(
        "--model-path",
        action="append",
        default=[],
        help="local backbone folder to benchmark besides the tiny model; repeat the option for several",
    )
    parser.add_argument("--model-family", choices=FAMILIES, default="hf", help="family of every --model-path")
    parser.add_argument("--model-dtype", default="float32", help="dtype of every --model-path backbone")
    parser.add_argument(
        "--prompt-format", default="auto", help="prompt format of every --model-path backbone"
    )
    parser.add_argument("--skip-tiny", action="store_true", help="benchmark only the --model-path backbones")
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help="comma-separated subset of " + ", ".join(SECTIONS)
    )

    parser.add_argument("--pre-seq-len", type=int, default=16, help="prefix positions per layer")
    parser.add_argument(
        "--prefix-projection", action="store_true", help="reparametrise the prefix through an MLP"
    )
    parser.add_argument("--max-source-length", type=int, default=64, help="maximum prompt tokens")
    parser.add_argument("--max-target-length", type=int, default=64, help="maximum response tokens")
    parser.add_argument(
        "--micro-batch-size", type=int, default=16, help="examples per micro-batch of our layout"
    )
    parser.add_argument(
        "--accumulation",
        type=int,
        default=1,
        help="micro-batches per optimizer step of our "
        "layout; the reference layout uses micro-batch 1 and the same effective batch",
    )
    parser.add_argument("--lr", type=float, default=2e-2, help="AdamW learning rate (constant)")

    parser.add_argument("--repeats", type=int, help=f"timed runs per measurement (default {FULL['repeats']})")
    parser.add_argument(
        "--warmup-steps", type=int, help="untimed optimizer steps before each timed training run"
    )
    parser.add_argument("--train-steps", type=int, help="timed optimizer steps per training run")
    parser.add_argument(
        "--eval-examples", type=int, help="records (the first N of the data file) to generate for"
    )
    parser.add_argument("--eval-batch-sizes", help="comma-separated batch sizes of batched generation")
    parser.add_argument(
        "--max-new-tokens", type=int, help="new tokens per prompt (default max-target-length)"
    )
    parser.add_argument(
        "--scaling-pre-seq-lens", help="comma-separated pre_seq_len values of the scaling table"
    )
    parser.add_argument(
        "--scaling-lengths", help="comma-separated maximum lengths per side of the scaling table"
    )
    parser.add_argument("--scaling-steps", type=int, help="timed optimizer steps per scaling point")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and one repeat, for the smoke test")
    parser.add_argument(
        "--proposals",
        action="store_true",
        help="also time both training layouts with the loss of benchmarks/proposals.py (logits at labelled "
        "positions only; transformers backbones only)",
    )

    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads (default: torch's choice, one per core); on a CPU shared with other "
        "jobs, 1 avoids the stalls of threads waiting for each other",
    )
    parser.add_argument("--seed", type=int, default=42, help="seed of batch order and prefix dropout")
    parser.add_argument(
        "--output", help="JSON result path (default benchmarks/results/<date>-<host>[-quick].json)"
    )
    parser.add_argument(
        "--markdown",
        help="page whose results section is replaced (default docs/benchmarks.md; "
        "with --quick the default is none); 'none' writes no page",
    )
    args = parser.parse_args(argv)

    defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.max_new_tokens is None:
        args.max_new_tokens = args.max_target_length
    if args.markdown is None:
        args.markdown = "none" if args.quick else str(REPO_ROOT / "docs" / "benchmarks.md")

    args.sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown} in --sections; choose from {list(SECTIONS)}")
    args.eval_batch_sizes = int_list(args.eval_batch_sizes)
    args.scaling_pre_seq_lens = int_list(args.scaling_pre_seq_lens)
    args.scaling_lengths = int_list(args.scaling_lengths)
    positive = (
        "repeats",
        "train_steps",
        "eval_examples",
        "micro_batch_size",
        "accumulation",
        "scaling_steps",
    )
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.warmup_steps < 0:
        parser.error(f"--warmup-steps must not be negative, got {args.warmup_steps}")
    if min(args.eval_batch_sizes, default=0) < 1:
        parser.error(f"--eval-batch-sizes needs one or more positive sizes, got {args.eval_batch_sizes}")
    if args.pre_seq_len <= 0:
        parser.error(
            f"--pre-seq-len must be positive (there is nothing to train otherwise), got {args.pre_seq_len}"
        )
    if args.skip_tiny and not args.model_path:
        parser.error("--skip-tiny needs at least one --model-path")
    if not Path(args.data).is_file():
        parser.error(f"data file not found: {args.data}; pass --data FILE or set PTUNING_SHARED_DIR")
    return args


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ---------------------------------------------------------------------------------------------- sections
def benchmark_training(factory, module, train_set, pad_token_id, args, device) -> dict[str, Any]:
    """Time our layout, the reference layout and the reference layout without padding on the same examples."""
    ours = Layout("ours", args.micro_batch_size, args.accumulation)
    effective = ours.effective_batch_size
    reference = Layout(
        "reference",
        1,
        effective,
        fixed_length=args.max_source_length + args.max_target_length,
        group_by_length=False,
    )
    unpadded = Layout("reference_unpadded", 1, effective, group_by_length=False)

    plan = grouped_plan(train_set.lengths, ours, args.warmup_steps + args.train_steps, args.seed)
    ours_warmup, ours_timed = plan[: args.warmup_steps], plan[args.warmup_steps :]
    # The reference layouts see exactly the examples of our plan, in a random order, one per micro-batch.
    reference_warmup = shuffled_plan(flatten(ours_warmup), reference, args.seed)
    reference_timed = shuffled_plan(flatten(ours_timed), reference, args.seed + 1)
    # A module per layout (sharing the backbone) with the same initial prefix weights, so the layouts can take
    # turns step by step.
    modules = {"ours": module}
    for name in ("reference", "reference_unpadded"):
        modules[name] = factory.build(args.pre_seq_len)
        modules[name].load_state_dict(module.prefix_state_dict(), strict=False)
    runs = {
        "ours": TrainingRun(modules["ours"], train_set, ours, ours_warmup, ours_timed),
        "reference": TrainingRun(
            modules["reference"], train_set, reference, reference_warmup, reference_timed
        ),
        "reference_unpadded": TrainingRun(
            modules["reference_unpadded"], train_set, unpadded, reference_warmup, reference_timed
        ),
    }
    loss_difference = None
    if args.proposals:
        for name in ("ours", "reference"):
            proposed = factory.build(args.pre_seq_len, SupervisedLogitsModule)
            loss_difference = check_same_loss(
                module, proposed, Collate(pad_token_id, None)(train_set.items[:4])
            )
            current = runs[name]
            runs[f"{name}_proposed_loss"] = TrainingRun(
                proposed, train_set, current.layout, current.warmup, current.timed
            )
    seconds = time_training(runs, factory.optim, pad_token_id, args.repeats, device, args.seed)
    memory = measure_training_memory(runs, factory.optim, pad_token_id, device)

    layouts = {}
    for name, run in runs.items():
        layouts[name] = summarize_training(run, seconds[name])
        layouts[name]["peak_memory_increase_mib"] = memory[name]["increase_mib"]
        layouts[name]["peak_memory_method"] = memory[name]["method"]
    baseline = layouts["reference"]["real_tokens_per_second"]
    per_repeat = [ref / own for ref, own in zip(seconds["reference"], seconds["ours"])]
    proposal = None
    if args.proposals:
        proposal = {
            "description": "logits at labelled positions only (benchmarks/proposals.py)",
            "relative_loss_difference": loss_difference,
            "ours_vs_reference": layouts["ours_proposed_loss"]["real_tokens_per_second"]
            / layouts["reference_proposed_loss"]["real_tokens_per_second"],
            "ours_vs_current_ours": layouts["ours_proposed_loss"]["real_tokens_per_second"]
            / layouts["ours"]["real_tokens_per_second"],
        }
    return {
        "effective_batch_size": effective,
        "warmup_steps": args.warmup_steps,
        "timed_steps": args.train_steps,
        "layouts": layouts,
        "speedups": {name: layout["real_tokens_per_second"] / baseline for name, layout in layouts.items()},
        "speedup_per_repeat": per_repeat,
        "median_speedup_per_repeat": median(per_repeat),
        "proposal": proposal,
    }


def benchmark_evaluation(module, prompt_set, args, device) -> dict[str, Any]:
    """Time one-at-a-time generation against batched generation on the first --eval-examples records."""
    prompts = [item["prompt_ids"] for item in prompt_set.items[: args.eval_examples]]
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    modes = [GenerationMode("one at a time", 1)]
    modes += [GenerationMode(f"batched {size}, input order", size) for size in args.eval_batch_sizes]
    largest = max(args.eval_batch_sizes)
    modes.append(GenerationMode(f"batched {largest}, sorted by prompt length", largest, sort_by_length=True))
    results = time_generation(module, prompts, settings, modes, args.repeats, device)
    baseline = results[modes[0].name]["median_seconds"]
    return {
        "examples": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "baseline": modes[0].name,
        "headline": f"batched {largest}, input order",
        "modes": results,
        "speedups": {name: baseline / mode["median_seconds"] for name, mode in results.items()},
    }


def benchmark_scaling(factory, module, train_set, prompt_format, args, device) -> dict[str, Any]:
    """Time our layout's training step against pre_seq_len and against the maximum lengths.

    The points of one table take turns step by step, like the layouts of the training section.
    """
    ours = Layout("ours", args.micro_batch_size, args.accumulation)
    pad_token_id = prompt_format.pad_token_id

    def make_run(step_module, dataset) -> TrainingRun:
        plan = grouped_plan(dataset.lengths, ours, 1 + args.scaling_steps, args.seed)
        return TrainingRun(step_module, dataset, ours, plan[:1], plan[1:])

    def measure(runs: dict[str, TrainingRun]) -> dict[str, dict[str, Any]]:
        forward = time_forward(runs, pad_token_id, args.repeats, device)
        trainable = {name: run for name, run in runs.items() if run.module.prefix_encoder is not None}
        training = time_training(trainable, factory.optim, pad_token_id, args.repeats, device, args.seed)
        rows = {}
        for name, run in runs.items():
            counts = token_counts(run.timed, run.dataset.lengths, None)
            row = {
                **counts,
                "padding_fraction": 1.0 - counts["real_tokens"] / counts["padded_tokens"],
                "mean_example_tokens": counts["real_tokens"] / counts["examples"],
                "mean_padded_tokens": counts["padded_tokens"] / counts["examples"],
                "forward_seconds": forward[name],
                "median_forward_seconds": median(forward[name]) / len(run.timed),
                "step_seconds": training.get(name),
                "median_step_seconds": None,
                "real_tokens_per_second": None,
            }
            if name in training:
                row["median_step_seconds"] = median(training[name]) / len(run.timed)
                row["real_tokens_per_second"] = median([counts["real_tokens"] / s for s in training[name]])
            rows[name] = row
        return rows

    log.info("scaling: pre_seq_len %s", args.scaling_pre_seq_lens)
    prefix_runs = {}
    for pre_seq_len in args.scaling_pre_seq_lens:
        step_module = module if pre_seq_len == args.pre_seq_len else factory.build(pre_seq_len)
        prefix_runs[str(pre_seq_len)] = make_run(step_module, train_set)
    by_prefix = [{"pre_seq_len": int(name), **row} for name, row in measure(prefix_runs).items()]
    del prefix_runs

    log.info("scaling: maximum lengths per side %s", args.scaling_lengths)
    length_runs = {}
    for length in args.scaling_lengths:
        dataset, _ = encode_data(args.data, prompt_format, length, length)
        length_runs[str(length)] = make_run(factory.build(args.pre_seq_len), dataset)
    by_length = [
        {"max_source_length": int(name), "max_target_length": int(name), **row}
        for name, row in measure(length_runs).items()
    ]

    return {
        "effective_batch_size": ours.effective_batch_size,
        "timed_steps": args.scaling_steps,
        "pre_seq_len": by_prefix,
        "sequence_length": by_length,
    }


def benchmark_model(name: str, spec: BackboneSpec, args, device: torch.device) -> dict[str, Any]:
    """Run the selected sections on one backbone."""
    _, prompt_format = load_tokenizer_and_format(spec)
    train_set, prompt_set = encode_data(
        args.data, prompt_format, args.max_source_length, args.max_target_length
    )
    prefix = {"prefix_projection": args.prefix_projection, "dropout": 0.1}
    factory = ModuleFactory(spec, prefix, {"lr": args.lr}, device)
    module = factory.build(args.pre_seq_len)
    result: dict[str, Any] = {
        "name": name,
        "spec": asdict(spec),
        "parameters": module.parameter_counts(),
        "training_examples": len(train_set),
    }

    if "training" in args.sections:
        log.info("%s: training", name)
        start = time.perf_counter()
        result["training"] = benchmark_training(
            factory, module, train_set, prompt_format.pad_token_id, args, device
        )
        log.info("%s: training done in %.0f s", name, time.perf_counter() - start)
    if "evaluation" in args.sections:
        log.info("%s: evaluation", name)
        start = time.perf_counter()
        result["evaluation"] = benchmark_evaluation(module, prompt_set, args, device)
        log.info("%s: evaluation done in %.0f s", name, time.perf_counter() - start)
    if "scaling" in args.sections:
        log.info("%s: scaling", name)
        start = time.perf_counter()
        result["scaling"] = benchmark_scaling(factory, module, train_set, prompt_format, args, device)
        log.info("%s: scaling done in %.0f s", name, time.perf_counter() - start)
    return result


def check_targets(models: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Compare the medians with the targets: 2x training tokens/s, 8x generation with identical outputs."""
    targets = []
    for model in models:
        training = model.get("training")
        if training:
            measured = training["speedups"]["ours"]
            targets.append(
                {
                    "model": model["name"],
                    "name": "training real tokens/s, ours vs reference layout",
                    "required": TRAINING_TARGET,
                    "measured": measured,
                    "met": measured >= TRAINING_TARGET,
                }
            )
        evaluation = model.get("evaluation")
        if evaluation:
            headline = evaluation["headline"]
            measured = evaluation["speedups"][headline]
            identical = evaluation["modes"][headline]["identical_to_baseline"]
            targets.append(
                {
                    "model": model["name"],
                    "name": f"generation wall time, {headline} vs one at a time, identical outputs",
                    "required": EVALUATION_TARGET,
                    "measured": measured,
                    "identical_outputs": identical,
                    "met": measured >= EVALUATION_TARGET and identical,
                }
            )
    return targets


def default_output(quick: bool) -> Path:
    date = datetime.now().strftime("%Y-%m-%d")
    host = "".join(c if c.isalnum() or c in "-_." else "_" for c in socket.gethostname())
    suffix = "-quick" if quick else ""
    return REPO_ROOT / "benchmarks" / "results" / f"{date}-{host}{suffix}.json"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    args = parse_args(argv)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    started = time.perf_counter()
    load_before = load_average()
    log.info("load average before: %s", load_before)

    records = read_data(args.data)
    models: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ptuning-bench-") as work_dir:
        specs: list[tuple[str, BackboneSpec]] = []
        if not args.skip_tiny:
            texts = [text for record in records for text in (record.prompt, record.response or "")]
            folder = write_tiny_backbone_for(Path(work_dir) / "tiny", texts)
            specs.append(("tiny", BackboneSpec(path=str(folder))))
        for path in args.model_path:
            spec = BackboneSpec(
                path=path, family=args.model_family, dtype=args.model_dtype, prompt_format=args.prompt_format
            )
            specs.append((Path(path).name, spec))
        for name, spec in specs:
            models.append(benchmark_model(name, spec, args, device))

    output = Path(args.output) if args.output else default_output(args.quick)
    result = {
        "schema_version": 1,
        "created": datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "python benchmarks/run.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "json_path": os.path.relpath(output, REPO_ROOT) if output.is_relative_to(REPO_ROOT) else str(output),
        "machine": describe_machine(device),
        "versions": package_versions(),
        "git_commit": git_commit(REPO_ROOT),
        "load_average": {"before": load_before, "after": load_average()},
        "data": {"name": Path(args.data).name, "path": str(args.data), "records": len(records)},
        "settings": {
            key: value
            for key, value in vars(args).items()
            if key not in ("output", "markdown", "data", "model_path")
        },
        "models": models,
        "targets": check_targets(models),
        "wall_seconds": time.perf_counter() - started,
    }
    log.info("load average after: %s", result["load_average"]["after"])

    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    log.info("wrote %s", output)
    if args.markdown != "none":
        update_results_section(Path(args.markdown), render_results(result))
        log.info("updated the results section of %s", args.markdown)

    print(render_results(result))
    different = [
        (model["name"], name, mode["mismatched_examples"])
        for model in models
        for name, mode in model.get("evaluation", {}).get("modes", {}).items()
        if not mode["identical_to_baseline"]
    ]
    if different:
        for model_name, mode_name, examples in different:
            log.error(
                "%s: %s generated different tokens than one-at-a-time generation for examples %s",
                model_name,
                mode_name,
                examples[:20],
            )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
