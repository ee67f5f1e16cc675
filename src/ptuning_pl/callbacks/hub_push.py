"""Publish export folders of a training run to a Hugging Face Hub model repo while the run goes on.

`HubPushCallback` takes snapshots on the training thread: each is an export folder (`write_export`) under
`<run_dir>/hub_staging/`. `HubPusher` commits them to the Hub from one background thread, oldest first, so a
slow or unreachable Hub never holds up a training step. Only the end of fit waits, and for a bounded time.
When a newer snapshot is queued before an older one could be pushed, the older one is skipped and the log
names the snapshot that superseded it.

When snapshots are taken (`push_on`):

- `every_save`: at every checkpoint save (`on_save_checkpoint`, once per global step even with `save_last`).
- `best`: at a checkpoint save that gives the run's ModelCheckpoint a new `best_model_path` (every save when
  the ModelCheckpoint has no monitor).
- `end`: only the final push.

Whatever `push_on` says, `on_fit_end` takes a final snapshot and waits for the queue to empty, for at most
`final_timeout_s`, then logs what was not pushed and lets the process go on. The final snapshot holds the
prefix the run's own export holds: the best checkpoint's prefix when the ModelCheckpoint has one, else the
current weights. When fit raises, `on_exception` takes no new snapshot (the weights may be half updated) but
gives the queued pushes the same bounded wait; after a KeyboardInterrupt it does not wait at all.

Only global rank 0 snapshots and uploads. The hooks contain no collective operation, so other ranks never
wait on rank 0 inside them.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import lightning.pytorch as pl
import torch
from huggingface_hub import CommitOperationAdd, HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

from ptuning_pl import __version__
from ptuning_pl.export import ExportError, write_export
from ptuning_pl.module import PREFIX_MODULE, PrefixTuningModule, is_prefix_key

log = logging.getLogger(__name__)

PUSH_ON = ("every_save", "best", "end")
# Client error statuses that mark a transient failure (request timeout, rate limit), so a retry can succeed.
RETRYABLE_STATUSES = frozenset({408, 429})
# Strings shaped like Hugging Face access tokens ("hf_" and a long run of letters and digits), scrubbed from
# logged errors besides the token in use. 30 or more characters leaves names like hf_transfer alone.
TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{30,}")

PUSHED, SKIPPED, FAILED, NOT_PUSHED = "pushed", "skipped", "failed", "not pushed"


@dataclass
class Snapshot:
    """An export folder waiting to be committed to the Hub."""

    step: int
    folder: Path
    commit_message: str
    final: bool = False

    @property
    def label(self) -> str:
        return f"step {self.step} (final)" if self.final else f"step {self.step}"


@dataclass
class PushOutcome:
    """The result of one snapshot: pushed, skipped (superseded), failed, or not pushed (out of time)."""

    snapshot: Snapshot
    status: str
    #: The commit id when pushed, else the reason in words.
    detail: str
    attempts: int = 0


def scrub_secrets(text: str, token: str | None) -> str:
    """Return `text` with `token` and anything shaped like a Hugging Face token replaced by `***`."""
    if token:
        text = text.replace(token, "***")
    return TOKEN_PATTERN.sub("***", text)


def is_retryable(error: Exception) -> bool:
    """Return False for errors that a retry would repeat (rejected token, no permission, invalid metadata)."""
    if isinstance(error, HfHubHTTPError):
        status = error.response.status_code
        return status >= 500 or status in RETRYABLE_STATUSES
    # ValueError covers invalid repo ids and README metadata; OfflineModeIsEnabled is raised before sending.
    return not isinstance(error, (ValueError, OfflineModeIsEnabled))


def retry_delay(attempt: int, base_delay_s: float, max_delay_s: float) -> float:
    """Seconds to wait after failed attempt number `attempt` (1-based): base * 2^(attempt-1), capped."""
    return min(max_delay_s, base_delay_s * 2 ** (attempt - 1))


class HubPusher:
    """Uploader of snapshot folders to one Hub model repo, from a single background thread, in order.

    `submit` only takes a lock and never waits on the network. `finish` waits a bounded time for the queue to
    empty, stops the worker and returns one PushOutcome per submitted snapshot.
    """

    def __init__(
        self,
        repo_id: str,
        *,
        private: bool | None = True,
        revision: str | None = None,
        path_in_repo: str = "",
        endpoint: str | None = None,
        token: str | None = None,
        max_attempts: int = 5,
        retry_base_delay_s: float = 2.0,
        retry_max_delay_s: float = 60.0,
        keep_pushed_snapshots: bool = False,
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts={max_attempts} must be at least 1")
        self.repo_id = repo_id
        self.private = private
        self.revision = revision
        self.path_in_repo = path_in_repo.strip("/")
        self.max_attempts = max_attempts
        self.retry_base_delay_s = retry_base_delay_s
        self.retry_max_delay_s = retry_max_delay_s
        self.keep_pushed_snapshots = keep_pushed_snapshots
        self._token = token
        self._api = HfApi(
            endpoint=endpoint, token=token, library_name="ptuning-pl", library_version=__version__
        )
        self._repo_ready = False
        self._last_commit_id: str | None = None

        self.outcomes: list[PushOutcome] = []
        self._pending: list[Snapshot] = []
        self._current: Snapshot | None = None
        self._stopping = False
        self._condition = threading.Condition()
        self._thread = threading.Thread(target=self._work, name="hub-push", daemon=True)

    def __repr__(self) -> str:
        # The token stays out of reprs, which loggers and debuggers print.
        return f"HubPusher(repo_id={self.repo_id!r}, revision={self.revision!r})"

    @property
    def target(self) -> str:
        return f"{self.repo_id}@{self.revision or 'main'}"

    def start(self) -> None:
        self._thread.start()

    def submit(self, snapshot: Snapshot) -> None:
        """Queue `snapshot` behind the ones already queued; returns at once."""
        with self._condition:
            if self._stopping:
                self.outcomes.append(PushOutcome(snapshot, NOT_PUSHED, "submitted after the pusher finished"))
                return
            self._pending.append(snapshot)
            self._condition.notify_all()

    def finish(self, timeout_s: float) -> list[PushOutcome]:
        """Wait up to `timeout_s` seconds for queued pushes, stop the worker and return every outcome.

        A push still running at the deadline is reported as not pushed. Its HTTP request may still complete
        afterwards because nothing interrupts the daemon thread, and the log then records that.
        """
        with self._condition:
            self._condition.wait_for(lambda: not self._pending and self._current is None, timeout=timeout_s)
            self._stopping = True
            self._condition.notify_all()
            reason = f"still queued or uploading when the final wait of {timeout_s:g} s ran out"
            unfinished = ([self._current] if self._current is not None else []) + self._pending
            self._pending = []
            outcomes = list(self.outcomes) + [
                PushOutcome(snapshot, NOT_PUSHED, reason) for snapshot in unfinished
            ]
        return sorted(outcomes, key=lambda outcome: (outcome.snapshot.step, outcome.snapshot.final))

    # ------------------------------------------------------------------------------------- worker thread
    def _work(self) -> None:
        # Folders are deleted under the lock, so finish() never returns before the cleanup it reports.
        while True:
            with self._condition:
                self._condition.wait_for(lambda: self._pending or self._stopping)
                if self._stopping:
                    return
                # Take the newest snapshot: anything older that is still queued can only be stale.
                snapshot = self._pending.pop()
                for older in self._pending:
                    self._record(self._skip(older, snapshot))
                self._pending = []
                self._current = snapshot

            outcome = self._push_with_retries(snapshot)

            with self._condition:
                self._current = None
                if not self._stopping:
                    self._record(outcome)
                elif outcome.status == PUSHED:
                    # finish() has already reported this snapshot as not pushed, so its folder stays.
                    log.info(
                        "hub push: %s reached %s after the final wait ended", snapshot.label, self.target
                    )
                self._condition.notify_all()

    def _record(self, outcome: PushOutcome) -> None:
        """Store `outcome`, deleting the folder of a pushed or superseded one (the caller holds the lock)."""
        self.outcomes.append(outcome)
        if outcome.status in (PUSHED, SKIPPED) and not self.keep_pushed_snapshots:
            shutil.rmtree(outcome.snapshot.folder, ignore_errors=True)

    @staticmethod
    def _skip(snapshot: Snapshot, newer: Snapshot, attempts: int = 0) -> PushOutcome:
        """Log and return the outcome of a snapshot that a newer queued one makes stale."""
        detail = f"superseded by {newer.label}"
        if attempts:
            detail += f" after {attempts} failed attempt(s)"
        log.info("hub push: skipped step %d: %s", snapshot.step, detail)
        return PushOutcome(snapshot, SKIPPED, detail, attempts)

    def _push_with_retries(self, snapshot: Snapshot) -> PushOutcome:
        """Push `snapshot`, retrying transient failures, until it is pushed, failed, superseded or stopped."""
        for attempt in range(1, self.max_attempts + 1):
            try:
                commit_id = self.upload(snapshot)
            except Exception as error:
                # Every failure is logged and reported here; none may reach the training thread.
                message = self._describe(error)
                if self._stopping:
                    # finish() has already reported this snapshot as not pushed; nothing is retried now.
                    log.info("hub push: %s failed after the final wait ended: %s", snapshot.label, message)
                    return PushOutcome(snapshot, NOT_PUSHED, message, attempt)
                if not is_retryable(error):
                    log.error("hub push: %s failed and is not retried: %s", snapshot.label, message)
                    return PushOutcome(snapshot, FAILED, message, attempt)
                if attempt == self.max_attempts:
                    log.error("hub push: %s failed after %d attempts: %s", snapshot.label, attempt, message)
                    return PushOutcome(
                        snapshot, FAILED, f"{attempt} attempts failed, the last with: {message}", attempt
                    )

                delay = retry_delay(attempt, self.retry_base_delay_s, self.retry_max_delay_s)
                log.warning(
                    "hub push: %s failed (attempt %d of %d), retrying in %.1f s: %s",
                    snapshot.label,
                    attempt,
                    self.max_attempts,
                    delay,
                    message,
                )
                with self._condition:
                    # A newer snapshot or finish() ends the wait early.
                    self._condition.wait_for(lambda: self._pending or self._stopping, timeout=delay)
                    if self._stopping:
                        return PushOutcome(
                            snapshot, NOT_PUSHED, f"stopped while waiting to retry: {message}", attempt
                        )
                    if self._pending:
                        return self._skip(snapshot, self._pending[-1], attempt)
            else:
                if commit_id == self._last_commit_id:
                    # create_commit leaves out unchanged files and makes no empty commit; it returns the head.
                    log.info(
                        "hub push: %s has no changes, %s stays at commit %s",
                        snapshot.label,
                        self.target,
                        commit_id,
                    )
                else:
                    log.info("hub push: pushed %s to %s in commit %s", snapshot.label, self.target, commit_id)
                self._last_commit_id = commit_id
                return PushOutcome(snapshot, PUSHED, commit_id, attempt)
        raise AssertionError("unreachable: the last attempt returns")

    def upload(self, snapshot: Snapshot) -> str:
        """Commit `snapshot.folder` to the repo (creating the repo and branch once); return the commit id."""
        if not self._repo_ready:
            url = self._api.create_repo(self.repo_id, private=self.private, exist_ok=True, repo_type="model")
            # A repo id without a namespace lands in the token owner's namespace; use the full id from now on.
            self.repo_id = url.repo_id
            if self.revision and self.revision != "main":
                self._api.create_branch(self.repo_id, branch=self.revision, exist_ok=True)
            self._repo_ready = True

        operations = [
            CommitOperationAdd(
                path_in_repo=str(
                    PurePosixPath(self.path_in_repo, path.relative_to(snapshot.folder).as_posix())
                ),
                path_or_fileobj=str(path),
            )
            for path in sorted(snapshot.folder.rglob("*"))
            if path.is_file()
        ]
        info = self._api.create_commit(
            self.repo_id, operations, commit_message=snapshot.commit_message, revision=self.revision
        )
        return info.oid

    def _describe(self, error: Exception) -> str:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        return scrub_secrets(f"{type(error).__name__}: {' '.join(lines)}", self._token)


class HubPushCallback(pl.Callback):
    """Push export folders of the prefix to a Hugging Face Hub model repo during and at the end of fit.

    Args:
        repo_id: the model repo, `namespace/name`; created (with `private`) when it does not exist.
        push_on: `every_save`, `best` or `end` (see the module docstring); a final push always happens.
        private: visibility of a repo this callback creates; an existing repo keeps its visibility.
        revision: the branch to commit to, created from main when missing; None commits to main.
        path_in_repo: folder inside the repo for the export files; "" puts them at the top.
        endpoint: Hub URL; None uses HF_ENDPOINT or https://huggingface.co.
        monitor: metric named in commit messages; None takes the ModelCheckpoint's monitor.
        max_attempts: tries per snapshot, counting the first; failures the Hub will repeat (401, 403, 404,
            invalid metadata) are not retried.
        retry_base_delay_s, retry_max_delay_s: the wait after failed try k is base * 2^(k-1) seconds, capped.
        final_timeout_s: maximum seconds on_fit_end (or on_exception) waits for queued pushes. Keep it below
            the DDP process group timeout (torch's default_pg_timeout, 30 minutes) because the other ranks
            wait for rank 0.
        staging_dir: where snapshots are written; None uses `<trainer.default_root_dir>/hub_staging`.
        keep_pushed_snapshots: keep the folders of pushed and superseded snapshots; failed ones always stay.

    The token comes from HF_TOKEN or the stored `hf auth login`, never from the config, so it cannot end up in
    config.yaml, a checkpoint or a log.
    """

    def __init__(
        self,
        repo_id: str,
        push_on: str = "best",
        private: bool | None = True,
        revision: str | None = None,
        path_in_repo: str = "",
        endpoint: str | None = None,
        monitor: str | None = None,
        max_attempts: int = 5,
        retry_base_delay_s: float = 2.0,
        retry_max_delay_s: float = 60.0,
        final_timeout_s: float = 300.0,
        staging_dir: str | None = None,
        keep_pushed_snapshots: bool = False,
    ) -> None:
        problems = []
        if not repo_id or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", repo_id):
            problems.append(f"repo_id={repo_id!r} is not a Hub repo id; set it to namespace/name")
        if push_on not in PUSH_ON:
            problems.append(f"push_on={push_on!r} is invalid; use one of {', '.join(PUSH_ON)}")
        if max_attempts < 1:
            problems.append(f"max_attempts={max_attempts} must be at least 1")
        if not 0 <= retry_base_delay_s <= retry_max_delay_s:
            problems.append(
                f"retry_base_delay_s={retry_base_delay_s} and retry_max_delay_s={retry_max_delay_s} must "
                "satisfy 0 <= retry_base_delay_s <= retry_max_delay_s"
            )
        if not (0 <= final_timeout_s and math.isfinite(final_timeout_s)):
            problems.append(f"final_timeout_s={final_timeout_s} must be a finite number of seconds >= 0")
        if problems:
            raise ValueError("invalid HubPushCallback settings: " + "; ".join(problems))

        self.repo_id = repo_id
        self.push_on = push_on
        self.private = private
        self.revision = revision
        self.path_in_repo = path_in_repo
        self.endpoint = endpoint
        self.monitor = monitor
        self.max_attempts = max_attempts
        self.retry_base_delay_s = retry_base_delay_s
        self.retry_max_delay_s = retry_max_delay_s
        self.final_timeout_s = final_timeout_s
        self.staging_dir = staging_dir
        self.keep_pushed_snapshots = keep_pushed_snapshots

        self.pusher: HubPusher | None = None
        #: Every outcome of the last fit, filled in when it ends (rank 0 only).
        self.outcomes: list[PushOutcome] = []
        self._staging: Path | None = None
        self._last_snapshot_step: int | None = None
        self._seen_best_path = ""

    # ------------------------------------------------------------------------------------------- hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or not trainer.is_global_zero:
            return
        self._staging = Path(self.staging_dir or Path(trainer.default_root_dir) / "hub_staging")
        self._last_snapshot_step = None
        self.outcomes = []
        token = self._resolve_token()
        self.pusher = HubPusher(
            self.repo_id,
            private=self.private,
            revision=self.revision,
            path_in_repo=self.path_in_repo,
            endpoint=self.endpoint,
            token=token,
            max_attempts=self.max_attempts,
            retry_base_delay_s=self.retry_base_delay_s,
            retry_max_delay_s=self.retry_max_delay_s,
            keep_pushed_snapshots=self.keep_pushed_snapshots,
        )
        self.pusher.start()
        if self.push_on == "best" and trainer.checkpoint_callback is None:
            log.warning(
                "hub push: push_on=best needs a ModelCheckpoint callback; only the final push will happen"
            )
        log.info(
            "hub push: publishing to %s (push_on=%s, final wait at most %g s), snapshots in %s",
            self.pusher.target,
            self.push_on,
            self.final_timeout_s,
            self._staging,
        )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Checkpoint callback states are restored after setup; a resumed run's best is not a new best.
        checkpoint_callback = trainer.checkpoint_callback
        self._seen_best_path = checkpoint_callback.best_model_path if checkpoint_callback else ""

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.pusher is None or not trainer.is_global_zero or self.push_on == "end":
            return
        step = trainer.global_step
        if self.push_on == "every_save":
            if step != self._last_snapshot_step:
                self._snapshot(trainer, pl_module, step, self._latest_metric(trainer))
            return

        # ModelCheckpoint sets best_model_path before it saves, so a changed path means this save is the best.
        checkpoint_callback = trainer.checkpoint_callback
        best_path = checkpoint_callback.best_model_path if checkpoint_callback else ""
        if best_path and best_path != self._seen_best_path:
            self._seen_best_path = best_path
            score = checkpoint_callback.best_model_score
            self._snapshot(trainer, pl_module, step, None if score is None else float(score))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.pusher is None or not trainer.is_global_zero:
            return
        try:
            self._final_snapshot(trainer, pl_module)
        finally:
            self._finish("fit ended")

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self.pusher is None or not trainer.is_global_zero:
            return
        reason = f"fit raised {type(exception).__name__}, so no final snapshot was taken"
        # Lightning ignores further Ctrl+C while it shuts down, so an interrupted run must not wait here.
        self._finish(reason, wait=not isinstance(exception, KeyboardInterrupt))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.pusher is not None:
            self._finish("fit was torn down")

    # --------------------------------------------------------------------------------------- snapshots
    def _resolve_token(self) -> str | None:
        try:
            token = get_token()
        except Exception as error:
            # For example a failed OIDC token exchange. Pushes then go without a token and fail.
            log.error("hub push: reading the Hugging Face token failed: %s", scrub_secrets(str(error), None))
            return None
        if token is None:
            log.warning(
                "hub push: no Hugging Face token found (set HF_TOKEN or run `hf auth login`); the Hub will "
                "reject the pushes, but training and the local export go on"
            )
        return token

    def _monitor(self, trainer: pl.Trainer) -> str | None:
        if self.monitor:
            return self.monitor
        checkpoint_callback = trainer.checkpoint_callback
        return checkpoint_callback.monitor if checkpoint_callback else None

    def _latest_metric(self, trainer: pl.Trainer) -> float | None:
        """Return the monitored metric's latest logged value (for val/* metrics, the last validation's)."""
        value = trainer.callback_metrics.get(self._monitor(trainer) or "")
        return None if value is None else float(value)

    def _commit_message(self, trainer: pl.Trainer, step: int, value: float | None, final: bool) -> str:
        subject = f"Upload final prefix from step {step}" if final else f"Upload prefix at step {step}"
        monitor = self._monitor(trainer)
        if monitor and value is not None:
            subject += f" ({monitor}={value:.4f})"
        return subject

    def _snapshot(
        self,
        trainer: pl.Trainer,
        module: PrefixTuningModule,
        step: int,
        value: float | None,
        final: bool = False,
    ) -> None:
        """Write the export of `module` to the staging folder and queue it; a failed write is only logged."""
        assert self.pusher is not None and self._staging is not None
        # NOTE: write_export reads module.state_dict() on rank 0 alone. That is local under DDP, but with a
        # sharded strategy (FSDP, DeepSpeed) gathering the state is a collective and this would hang.
        folder = self._staging / (f"final-step-{step}" if final else f"step-{step}")
        metrics = {
            name: float(tensor) for name, tensor in trainer.callback_metrics.items() if tensor.numel() == 1
        }
        started = time.perf_counter()
        try:
            write_export(module, folder, config_yaml=self._config_yaml(trainer), metrics=metrics)
        except (OSError, ExportError) as error:
            log.error(
                "hub push: writing the snapshot of step %d to %s failed, nothing queued: %s",
                step,
                folder,
                error,
            )
            return
        self._last_snapshot_step = step
        log.debug("hub push: snapshot of step %d written in %.3f s", step, time.perf_counter() - started)
        self.pusher.submit(Snapshot(step, folder, self._commit_message(trainer, step, value, final), final))

    def _final_snapshot(self, trainer: pl.Trainer, module: PrefixTuningModule) -> None:
        """Queue the prefix the run's export will hold: the best checkpoint's, else the current weights."""
        checkpoint_callback = trainer.checkpoint_callback
        best_path = checkpoint_callback.best_model_path if checkpoint_callback else ""
        if best_path and Path(best_path).is_file() and module.prefix_encoder is not None:
            try:
                checkpoint = torch.load(best_path, map_location="cpu", weights_only=True)
                score = checkpoint_callback.best_model_score
                with prefix_loaded_from(module, checkpoint["state_dict"]):
                    value = None if score is None else float(score)
                    self._snapshot(trainer, module, checkpoint["global_step"], value, final=True)
                return
            except (OSError, KeyError, RuntimeError) as error:
                log.error(
                    "hub push: reading the best checkpoint %s failed (%s); the final push has the current "
                    "weights",
                    best_path,
                    error,
                )
        self._snapshot(trainer, module, trainer.global_step, self._latest_metric(trainer), final=True)

    @staticmethod
    def _config_yaml(trainer: pl.Trainer) -> str | None:
        """Read the run's resolved config from `<run_dir>/config.yaml`, which train() writes before fit."""
        path = Path(trainer.default_root_dir) / "config.yaml"
        if path.is_file():
            return path.read_text(encoding="utf-8")
        return None

    # ------------------------------------------------------------------------------------------ the end
    def _finish(self, reason: str, wait: bool = True) -> None:
        assert self.pusher is not None
        pusher, self.pusher = self.pusher, None
        started = time.monotonic()
        outcomes = pusher.finish(self.final_timeout_s if wait else 0.0)
        self.outcomes = outcomes
        log_report(outcomes, pusher.target, reason, time.monotonic() - started)
        if self._staging is not None and self._staging.is_dir() and not any(self._staging.iterdir()):
            self._staging.rmdir()


@contextmanager
def prefix_loaded_from(module: PrefixTuningModule, state_dict: dict[str, torch.Tensor]) -> Iterator[None]:
    """Put the prefix of a checkpoint's `state_dict` into `module` for the block, then restore the old one."""
    current = {name: tensor.detach().clone() for name, tensor in module.prefix_encoder.state_dict().items()}
    prefix = {
        name.removeprefix(PREFIX_MODULE + "."): tensor
        for name, tensor in state_dict.items()
        if is_prefix_key(name)
    }
    module.prefix_encoder.load_state_dict(prefix)
    try:
        yield
    finally:
        module.prefix_encoder.load_state_dict(current)


def log_report(outcomes: list[PushOutcome], target: str, reason: str, waited_s: float) -> None:
    """Log one line on what reached the Hub and one warning per snapshot that did not."""
    pushed = [outcome.snapshot.label for outcome in outcomes if outcome.status == PUSHED]
    log.info(
        "hub push: %s; waited %.1f s; pushed %d of %d snapshots to %s%s",
        reason,
        waited_s,
        len(pushed),
        len(outcomes),
        target,
        f" ({', '.join(pushed)})" if pushed else "",
    )
    for outcome in outcomes:
        if outcome.status in (FAILED, NOT_PUSHED):
            log.warning(
                "hub push: %s was not pushed: %s; its export stays in %s",
                outcome.snapshot.label,
                outcome.detail,
                outcome.snapshot.folder,
            )
        elif outcome.status == SKIPPED:
            log.info("hub push: %s was skipped: %s", outcome.snapshot.label, outcome.detail)


__all__ = ["PUSH_ON", "HubPushCallback", "HubPusher", "PushOutcome", "Snapshot"]
