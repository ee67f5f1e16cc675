"""Sweep bookkeeping: a Hydra callback that records every point of a multirun as it ends.

After each point, the sweep folder gets an updated `summary.jsonl` (one object per point), `summary.csv`,
`summary.md` (a Markdown table of overrides, status, metric and run folder) and `summary.svg` (the metric of
every point, labelled with its overrides). Writing after each point, rather than once at the end, keeps the
summary complete when a point fails: Hydra's basic sweeper raises the first failure only after every point has
run, and skips its end-of-sweep hook in that case.
"""

from __future__ import annotations

import csv
import html
import json
import logging
import math
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def point_record(config: DictConfig, job_return: JobReturn) -> dict[str, Any]:
    """Build the summary row of a finished sweep point."""
    metric_name = config.get("optimized_metric")
    record: dict[str, Any] = {
        "job": int(job_return.hydra_cfg.hydra.job.num) if job_return.hydra_cfg else None,
        "overrides": list(job_return.overrides or []),
        "status": "completed" if job_return.status == JobStatus.COMPLETED else "failed",
        "metric": metric_name,
        "value": None,
        "run_dir": str(job_return.hydra_cfg.hydra.runtime.output_dir) if job_return.hydra_cfg else None,
        "error": None,
    }
    try:
        value = job_return.return_value
    except Exception as error:  # the point's own exception, already logged into its run folder
        record["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:300]
    else:
        if isinstance(value, (int, float)) and not math.isnan(float(value)):
            record["value"] = float(value)
    return record


def write_summary(sweep_dir: Path, records: list[dict[str, Any]]) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with open(sweep_dir / "summary.jsonl", "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")

    with open(sweep_dir / "summary.csv", "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["job", "overrides", "status", "metric", "value", "run_dir", "error"])
        for record in records:
            writer.writerow(
                [record["job"], " ".join(record["overrides"]), record["status"], record["metric"],
                 record["value"], record["run_dir"], record["error"] or ""]
            )

    (sweep_dir / "summary.md").write_text(summary_table(records) + "\n", encoding="utf-8")
    (sweep_dir / "summary.svg").write_text(summary_plot(records), encoding="utf-8")


def swept_overrides(records: list[dict[str, Any]]) -> list[list[str]]:
    """Return each point's overrides restricted to the keys whose value differs between points (all if none do)."""
    values: dict[str, set[str]] = {}
    for record in records:
        for override in record["overrides"]:
            key, _, value = override.partition("=")
            values.setdefault(key, set()).add(value)
    varying = {key for key, seen in values.items() if len(seen) > 1}
    return [
        [override for override in record["overrides"] if override.partition("=")[0] in varying] or record["overrides"]
        for record in records
    ]


def summary_table(records: list[dict[str, Any]]) -> str:
    metric = next((record["metric"] for record in records if record["metric"]), "metric")
    lines = [f"| job | swept values | status | {metric} | run folder |", "|---|---|---|---|---|"]
    for record, overrides in zip(records, swept_overrides(records)):
        value = "" if record["value"] is None else f"{record['value']:.4f}"
        status = record["status"] if not record["error"] else f"failed: {record['error']}"
        lines.append(
            f"| {record['job']} | {' '.join(overrides)} | {status.replace('|', '/')} | {value} | {record['run_dir']} |"
        )
    return "\n".join(lines)


def summary_plot(records: list[dict[str, Any]]) -> str:
    """Draw an SVG bar chart of the metric per point (failed points as an empty frame)."""
    width, bar_height, gap, label_width = 760, 22, 8, 360
    height = 40 + len(records) * (bar_height + gap)
    values = [record["value"] for record in records if record["value"] is not None]
    high = max(values) if values else 1.0
    low = min(0.0, min(values)) if values else 0.0
    span = (high - low) or 1.0
    metric = next((record["metric"] for record in records if record["metric"]), "metric")

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
        'font-size="12">',
        f'<text x="10" y="20" font-size="14">{html.escape(str(metric))} per sweep point</text>',
    ]
    for row, (record, overrides) in enumerate(zip(records, swept_overrides(records))):
        y = 32 + row * (bar_height + gap)
        label = html.escape(" ".join(overrides) or f"job {record['job']}")
        parts.append(f'<text x="10" y="{y + 15}">{label[:60]}</text>')
        if record["value"] is None:
            parts.append(
                f'<rect x="{label_width}" y="{y}" width="40" height="{bar_height}" fill="none" stroke="#c0392b"/>'
                f'<text x="{label_width + 48}" y="{y + 15}" fill="#c0392b">failed</text>'
            )
            continue
        bar = max(1.0, (record["value"] - low) / span * (width - label_width - 90))
        parts.append(f'<rect x="{label_width}" y="{y}" width="{bar:.1f}" height="{bar_height}" fill="#2e86c1"/>')
        parts.append(f'<text x="{label_width + bar + 6:.1f}" y="{y + 15}">{record["value"]:.4f}</text>')
    parts.append("</svg>\n")
    return "\n".join(parts)


class SweepSummary(Callback):
    """Writes the sweep summary after every point (see the module docstring)."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.sweep_dir: Path | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.sweep_dir = Path(str(config.hydra.sweep.dir))
        self.records = []

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if self.sweep_dir is None:  # a single run, not a sweep
            return
        record = point_record(config, job_return)
        self.records.append(record)
        write_summary(self.sweep_dir, self.records)
        if record["status"] == "failed":
            log.error("sweep point %s (%s) failed: %s", record["job"], " ".join(record["overrides"]), record["error"])

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.sweep_dir is not None and self.records:
            log.info("sweep summary (%s):\n%s", self.sweep_dir / "summary.csv", summary_table(self.records))
