"""Machine description, package versions and peak-memory measurement for the benchmark harness."""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import socket
import subprocess
import traceback
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch

PACKAGES = ("torch", "transformers", "lightning", "tokenizers", "ptuning-pl")

log = logging.getLogger(__name__)

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo, or platform.processor() where that file is missing."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> list[float] | None:
    """Return the 1, 5 and 15 minute load averages, or None where the OS does not report them."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


def describe_machine(device: torch.device) -> dict:
    """Return the host, CPU, core counts, torch thread count and accelerator of this run."""
    try:
        usable_cores = len(os.sched_getaffinity(0))
    except AttributeError:
        usable_cores = os.cpu_count()
    machine = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable_cores,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        machine["accelerator"] = torch.cuda.get_device_name(device)
    return machine


def package_versions() -> dict[str, str | None]:
    """Return the installed version of each benchmarked package (None when it is not installed)."""
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(repo_root: Path) -> str | None:
    """Return the checkout's commit, with "-dirty" when tracked files have changes, or None outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo_root, capture_output=True, text=True, check=True
        ).stdout.strip()
        changes = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo_root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{commit}-dirty" if changes else commit


def _status_kib(field: str) -> int | None:
    with open(_STATUS, encoding="utf-8") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def _glibc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _return_large_blocks_to_os(libc: ctypes.CDLL | None) -> None:
    """Make glibc serve every allocation of 64 KiB or more with its own mmap, unmapped again when freed."""
    if libc is not None:
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 64 * 1024)
        libc.mallopt(m_trim_threshold, 64 * 1024)


def _release_free_heap(libc: ctypes.CDLL | None) -> None:
    """Give the free pages of glibc's heap back to the OS, so that reusing them raises the resident set."""
    if libc is not None:
        libc.malloc_trim(0)


def _peak_rss_increase_in_child(warmup: Callable[[], None], work: Callable[[], None]) -> float | None:
    """Run `warmup`, then `work`, in a forked child, and return how far the peak RSS of `work` rose, in MiB.

    The child shares the parent's loaded model and data, and has its own allocator settings, so the parent's
    heap and timings are untouched. A forked child maps the pages of shared libraries and memory-mapped
    weights only when it first touches them. `warmup` touches them before the peak is reset (Linux: "5"
    written to /proc/self/clear_refs), so they do not count as memory of `work`. Returns None where fork or
    the reset is unavailable, or when the child fails (its traceback goes to stderr).
    """
    if not hasattr(os, "fork") or not _CLEAR_REFS.exists():
        return None
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        exit_code = 1
        try:
            os.close(read_end)
            # The parent's OpenMP worker threads do not exist in a forked child, so it computes on one thread.
            torch.set_num_threads(1)
            # glibc keeps freed memory (the parent's, inherited, and the warm-up's) resident, and a workload
            # that reuses it does not raise the resident set size. These calls release it first.
            libc = _glibc()
            _return_large_blocks_to_os(libc)
            warmup()
            _release_free_heap(libc)
            _CLEAR_REFS.write_text("5")
            start_kib = _status_kib("VmRSS")
            work()
            peak_kib = _status_kib("VmHWM")
            os.write(write_end, str(peak_kib - start_kib).encode())
            exit_code = 0
        except Exception:  # noqa: BLE001 - the child reports any failure through its exit status.
            traceback.print_exc()
        finally:
            os._exit(exit_code)

    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.read()
    _, status = os.waitpid(pid, 0)
    if status != 0 or not message:
        log.warning(
            "the memory measurement in child process %d failed (wait status %d); peak memory shows n/a",
            pid,
            status,
        )
        return None
    return int(message) / 1024


def measure_peak_memory(device: torch.device, warmup: Callable[[], None], work: Callable[[], None]) -> dict:
    """Run `warmup`, then `work`, and return the peak memory of `work` above the memory in use before, in MiB.

    On CUDA this is `torch.cuda.max_memory_allocated` (tensors only), measured in this process. On a CPU it is
    the peak resident set size of a forked child (see `_peak_rss_increase_in_child`), which counts tensors,
    allocator overhead and anything else the work allocates.
    """
    if device.type == "cuda":
        # NOTE: this branch has not been run on a GPU yet.
        warmup()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        work()
        torch.cuda.synchronize(device)
        increase = (torch.cuda.max_memory_allocated(device) - start) / 2**20
        return {"method": "torch.cuda.max_memory_allocated", "increase_mib": increase}
    increase = _peak_rss_increase_in_child(warmup, work)
    method = "peak RSS of a forked child (VmHWM reset through /proc/self/clear_refs)"
    return {"method": method if increase is not None else "unavailable", "increase_mib": increase}
