"""HubPushCallback against a loopback Hub stand-in, with the real huggingface_hub client and training runs.

No request leaves the machine: the `hub` fixture points every Hub setting at a stand-in on 127.0.0.1 and
installs an HTTP client hook that raises on any other host. Tests assert the stand-in saw no request it does
not implement.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
import threading
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import safetensors.torch
import torch
import yaml
from huggingface_hub import constants, set_client_factory
from huggingface_hub.utils import _http as hub_http
from hydra.utils import get_class

from conftest import REPO_ROOT, run_cli
from hub_stand_in import HubStandIn, unused_loopback_url
from ptuning_pl.callbacks.hub_push import (
    FAILED,
    PUSHED,
    SKIPPED,
    HubPushCallback,
    HubPusher,
    Snapshot,
    retry_delay,
    scrub_secrets,
)
from ptuning_pl.train import train

TOKEN = "hf_StandInToken0123456789abcdef"
REPO_ID = "stand-in-user/prefix"
LOGGER = "ptuning_pl.callbacks.hub_push"
EXPORT_FILES = {"README.md", "config.yaml", "metrics.json", "prefix.safetensors", "prefix_config.json"}
COMMIT_MESSAGE = re.compile(r"^Upload (prefix at|final prefix from) step (\d+) \(val/loss=\d+\.\d{4}\)$")

# A short CPU run with two validations (steps 2 and 4), each followed by a checkpoint save.
SHORT_RUN = [
    "experiment=adgen_tiny",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "test=false",
    "evaluation.val_examples=0",
]


def hub_environment(endpoint: str, home: Path) -> dict[str, str]:
    """Environment that sends every huggingface_hub request to `endpoint` and reads no stored login."""
    return {
        "HF_ENDPOINT": endpoint,
        "HF_TOKEN": TOKEN,
        "HF_HOME": str(home),
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }


@pytest.fixture
def start_hub(monkeypatch, tmp_path):
    """Factory: start_hub(**settings) starts a stand-in and confines this process's Hub traffic to it."""
    started: list[HubStandIn] = []
    off_loopback: list[str] = []

    def refuse_other_hosts(request) -> None:
        if request.url.host != "127.0.0.1":
            off_loopback.append(str(request.url))
            raise RuntimeError(f"test guard: refused a Hub request to {request.url}, which is not loopback")

    def loopback_client():
        # NOTE: huggingface_hub 2.4 does not export default_client_factory; this wraps the client it builds.
        client = hub_http.default_client_factory()
        client.event_hooks["request"] = [refuse_other_hosts, *client.event_hooks["request"]]
        return client

    def factory(**settings) -> HubStandIn:
        hub = HubStandIn(token=TOKEN, **settings).start()
        started.append(hub)
        for name, value in hub_environment(hub.url, tmp_path / "hf_home").items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
        # huggingface_hub reads these at import time, before this test set the environment.
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
        return hub

    set_client_factory(loopback_client)
    yield factory
    for hub in started:
        hub.stop()
    set_client_factory(hub_http.default_client_factory)
    assert off_loopback == [], f"requests to hosts other than 127.0.0.1: {off_loopback}"


@pytest.fixture
def upload_threads(monkeypatch):
    """Record (thread id, monotonic time) of every HubPusher.upload call."""
    calls: list[tuple[int, float]] = []
    original = HubPusher.upload

    def recording_upload(self, snapshot):
        calls.append((threading.get_ident(), time.monotonic()))
        return original(self, snapshot)

    monkeypatch.setattr(HubPusher, "upload", recording_upload)
    return calls


def hub_overrides(hub: HubStandIn, **settings) -> list[str]:
    """Overrides that add the hub_push callback group, pointed at `hub`."""
    overrides = ["callbacks=[default,hub_push]", f"callbacks.hub_push.repo_id={REPO_ID}"]
    overrides.append(f"callbacks.hub_push.endpoint={hub.url}")
    overrides += [f"callbacks.hub_push.{key}={value}" for key, value in settings.items()]
    return overrides


class RaiseAtStep(pl.Callback):
    """Raise RuntimeError when training reaches global step `step`, to end fit with an exception."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            raise RuntimeError(f"test stop at step {trainer.global_step}")


def make_snapshot(root: Path, step: int, final: bool = False) -> Snapshot:
    folder = root / f"step-{step}"
    folder.mkdir(parents=True)
    (folder / "prefix.safetensors").write_bytes(bytes([step]) * 64)
    (folder / "README.md").write_text(
        f"---\nlibrary_name: ptuning-pl\n---\n# step {step}\n", encoding="utf-8"
    )
    return Snapshot(step, folder, f"Upload prefix at step {step}", final)


def assert_same_tensors(pushed: bytes, local: Path) -> None:
    """Compare safetensors by content: the header's metadata order differs between two saves of one state."""
    pushed_tensors, local_tensors = safetensors.torch.load(pushed), safetensors.torch.load_file(local)
    assert sorted(pushed_tensors) == sorted(local_tensors)
    for name, tensor in local_tensors.items():
        assert torch.equal(pushed_tensors[name], tensor), name


# ------------------------------------------------------------------------------------------- unit level
def test_config_documents_every_argument():
    path = REPO_ROOT / "conf" / "callbacks" / "hub_push.yaml"
    entry = yaml.safe_load(path.read_text(encoding="utf-8"))["hub_push"]
    assert get_class(entry["_target_"]) is HubPushCallback
    parameters = [name for name in inspect.signature(HubPushCallback).parameters]
    assert [key for key in entry if key != "_target_"] == parameters
    assert entry["repo_id"] == "???"

    lines = path.read_text(encoding="utf-8").splitlines()
    for index, line in enumerate(lines):
        if re.match(r"^  \w+:", line) and not line.startswith("  _target_"):
            assert lines[index - 1].lstrip().startswith("#"), f"no comment above {line.strip()!r}"


def test_invalid_settings_listed_together():
    with pytest.raises(ValueError) as caught:
        HubPushCallback(
            repo_id="not a repo", push_on="sometimes", max_attempts=0, final_timeout_s=float("inf")
        )
    message = str(caught.value)
    assert "repo_id='not a repo'" in message
    assert "push_on='sometimes'" in message
    assert "max_attempts=0" in message
    assert "final_timeout_s=inf" in message


def test_retry_delay_doubles_up_to_cap():
    assert [retry_delay(attempt, 0.5, 3.0) for attempt in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_scrub_secrets_hides_tokens():
    assert scrub_secrets(f"401 for Bearer {TOKEN}", TOKEN) == "401 for Bearer ***"
    # Token-shaped strings ("hf_" and 30 or more letters or digits) go; shorter hf_ names stay.
    assert scrub_secrets(f"header hf_{'a1' * 17} echoed", None) == "header *** echoed"
    assert (
        scrub_secrets("hf_hub_download and hf_transfer stay", None) == "hf_hub_download and hf_transfer stay"
    )


def test_pusher_skips_superseded_snapshots(start_hub, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    hub = start_hub()
    hub.hold_requests()
    pusher = HubPusher(REPO_ID, endpoint=hub.url, token=TOKEN, retry_base_delay_s=0.1, retry_max_delay_s=0.1)
    pusher.start()
    snapshots = [make_snapshot(tmp_path, step) for step in (1, 2, 3)] + [
        make_snapshot(tmp_path, 4, final=True)
    ]
    pusher.submit(snapshots[0])
    deadline = time.monotonic() + 10
    while not hub.requests and time.monotonic() < deadline:
        time.sleep(0.02)
    for snapshot in snapshots[1:]:
        pusher.submit(snapshot)
    hub.release_requests()

    outcomes = {outcome.snapshot.step: outcome for outcome in pusher.finish(timeout_s=30)}

    assert {step: outcome.status for step, outcome in outcomes.items()} == {
        1: PUSHED,
        2: SKIPPED,
        3: SKIPPED,
        4: PUSHED,
    }
    assert "skipped step 2: superseded by step 4 (final)" in caplog.text
    assert "skipped step 3: superseded by step 4 (final)" in caplog.text
    assert [commit.message for commit in hub.commits(REPO_ID)] == [
        "Upload prefix at step 1",
        "Upload prefix at step 4",
    ]
    # Pushed and superseded snapshot folders are deleted.
    assert not any(snapshot.folder.exists() for snapshot in snapshots)
    assert hub.unexpected == []


def test_pusher_connection_refused_keeps_folder(start_hub, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    start_hub()
    pusher = HubPusher(
        REPO_ID,
        endpoint=unused_loopback_url(),
        token=TOKEN,
        max_attempts=3,
        retry_base_delay_s=0.1,
        retry_max_delay_s=0.2,
    )
    pusher.start()
    snapshot = make_snapshot(tmp_path, 7, final=True)
    pusher.submit(snapshot)

    (outcome,) = pusher.finish(timeout_s=30)

    assert outcome.status == FAILED
    assert outcome.attempts == 3
    assert "ConnectError" in outcome.detail
    assert "step 7 (final) failed (attempt 1 of 3), retrying in 0.1 s" in caplog.text
    assert "step 7 (final) failed (attempt 2 of 3), retrying in 0.2 s" in caplog.text
    assert "step 7 (final) failed after 3 attempts" in caplog.text
    assert (snapshot.folder / "prefix.safetensors").is_file()


def test_pusher_does_not_retry_rejected_token(start_hub, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    hub = start_hub()
    pusher = HubPusher(REPO_ID, endpoint=hub.url, token="hf_WrongToken0000000000", max_attempts=5)
    pusher.start()
    pusher.submit(make_snapshot(tmp_path, 1))

    (outcome,) = pusher.finish(timeout_s=30)

    assert outcome.status == FAILED
    assert outcome.attempts == 1
    assert "401" in outcome.detail
    # create_repo(exist_ok=True) checks on a 401 whether the repo exists after all; nothing is sent again.
    assert hub.paths() == ["POST /api/repos/create", f"GET /api/models/{REPO_ID}"]
    assert "hf_WrongToken" not in caplog.text


# ---------------------------------------------------------------------------------------- training runs
@pytest.mark.slow
def test_push_lands_files_and_messages(start_hub, make_config, upload_threads, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    hub = start_hub()
    cfg = make_config([*SHORT_RUN, *hub_overrides(hub, push_on="every_save", final_timeout_s=60)])
    run_dir = Path(cfg.paths.output_dir)

    metrics = train(cfg)

    assert metrics["val/loss"] > 0
    commits = hub.commits(REPO_ID)
    assert commits, f"no commit reached the stand-in; requests: {hub.paths()}"
    for commit in commits:
        assert COMMIT_MESSAGE.match(commit.message), commit.message
    assert hub.repos[REPO_ID].private is True

    # The repo ends with the run's own export (the best checkpoint's prefix). The final push makes no commit
    # when its files equal the last pushed snapshot's, which happens when the last step is also the best.
    head = commits[-1]
    assert set(head.files) == EXPORT_FILES
    export = run_dir / "export"
    assert_same_tensors(head.files["prefix.safetensors"], export / "prefix.safetensors")
    assert head.files["prefix_config.json"] == (export / "prefix_config.json").read_bytes()
    assert json.loads(head.files["metrics.json"])["val/loss"] > 0
    final_step = re.search(r"(?:pushed|hub push:) step (\d+) \(final\)", caplog.text)
    assert final_step, "the final push was not reported as pushed"
    assert int(final_step[1]) in (2, 4)

    # Each snapshot taken at a checkpoint save (steps 2 and 4) was pushed or reported as superseded.
    for step in (2, 4):
        pushed = f"pushed step {step} to {REPO_ID}" in caplog.text
        skipped = f"skipped step {step}: superseded by step" in caplog.text
        assert pushed or skipped, f"step {step} was neither pushed nor reported as skipped"
    assert "pushed 3 of 3 snapshots" in caplog.text or "skipped step" in caplog.text
    assert not (run_dir / "hub_staging").exists()
    assert upload_threads
    assert threading.get_ident() not in {thread for thread, _ in upload_threads}
    assert hub.unexpected == []


@pytest.mark.slow
def test_slow_hub_does_not_stall_training(start_hub, make_config, upload_threads, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    # Each request takes a minute: one upload on the training thread would take longer than this whole run.
    hub = start_hub(delay_s=60.0)
    final_timeout_s = 2.0
    fit_end_durations: list[float] = []
    original_on_fit_end = HubPushCallback.on_fit_end

    def timed_on_fit_end(self, trainer, pl_module):
        started = time.monotonic()
        original_on_fit_end(self, trainer, pl_module)
        fit_end_durations.append(time.monotonic() - started)

    monkeypatch.setattr(HubPushCallback, "on_fit_end", timed_on_fit_end)
    cfg = make_config(
        [*SHORT_RUN, *hub_overrides(hub, push_on="every_save", final_timeout_s=final_timeout_s)]
    )
    run_dir = Path(cfg.paths.output_dir)

    started = time.monotonic()
    train(cfg)
    run_s = time.monotonic() - started

    print(f"\nslow Hub: train() took {run_s:.1f} s, on_fit_end {fit_end_durations[0]:.2f} s")
    assert run_s < 45, f"train() took {run_s:.1f} s; uploads seem to block training"
    assert final_timeout_s <= fit_end_durations[0] < final_timeout_s + 3
    assert upload_threads, "no upload started"
    assert threading.get_ident() not in {thread for thread, _ in upload_threads}
    # The first upload started before the final wait began, while training still ran.
    assert upload_threads[0][1] < started + run_s - final_timeout_s
    assert hub.commits(REPO_ID) == []
    assert "still queued or uploading when the final wait of 2 s ran out" in caplog.text
    assert re.search(r"step \d+ \(final\) was not pushed", caplog.text)
    assert "pushed 0 of" in caplog.text
    assert any((run_dir / "hub_staging").glob("final-step-*/prefix.safetensors"))
    assert hub.unexpected == []


@pytest.mark.slow
def test_refusing_hub_keeps_exports(start_hub, make_config, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    hub = start_hub(fail_status=503, echo_authorization_in_errors=True)
    settings = {
        "push_on": "best",
        "max_attempts": 3,
        "retry_base_delay_s": 0.1,
        "retry_max_delay_s": 0.2,
        "final_timeout_s": 30,
    }
    refusing_cfg = make_config([*SHORT_RUN, *hub_overrides(hub, **settings)], name="refusing")
    plain_cfg = make_config(SHORT_RUN, name="plain")

    started = time.monotonic()
    train(plain_cfg)
    plain_s = time.monotonic() - started
    started = time.monotonic()
    metrics = train(refusing_cfg)
    refusing_s = time.monotonic() - started

    print(f"\ntrain() wall time: {plain_s:.1f} s without the callback, {refusing_s:.1f} s, refusing Hub")
    assert metrics["val/loss"] > 0
    assert "failed (attempt 1 of 3), retrying in 0.1 s" in caplog.text
    assert "failed (attempt 2 of 3), retrying in 0.2 s" in caplog.text
    assert "failed after 3 attempts" in caplog.text
    assert re.search(r"step \d+ \(final\) was not pushed: 3 attempts failed", caplog.text)
    assert TOKEN not in caplog.text
    assert "Bearer ***" in caplog.text
    assert hub.commits(REPO_ID) == []
    assert all(request.status == 503 for request in hub.requests)

    run_dir = Path(refusing_cfg.paths.output_dir)
    assert (run_dir / "export" / "prefix.safetensors").is_file()
    assert list((run_dir / "hub_staging").glob("final-step-*/prefix.safetensors"))
    assert refusing_s < plain_s + 15
    assert hub.unexpected == []


@pytest.mark.slow
def test_push_lands_after_two_failures(start_hub, make_config, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    hub = start_hub(fail_status=500, fail_times=2)
    settings = {
        "push_on": "end",
        "max_attempts": 4,
        "retry_base_delay_s": 0.1,
        "retry_max_delay_s": 1.0,
        "final_timeout_s": 30,
    }
    cfg = make_config([*SHORT_RUN, *hub_overrides(hub, **settings)])

    train(cfg)

    (commit,) = hub.commits(REPO_ID)
    assert COMMIT_MESSAGE.match(commit.message)
    assert set(commit.files) == EXPORT_FILES
    assert "failed (attempt 1 of 4), retrying in 0.1 s" in caplog.text
    assert "failed (attempt 2 of 4), retrying in 0.2 s" in caplog.text
    assert "(attempt 3 of 4)" not in caplog.text
    assert "pushed 1 of 1 snapshots" in caplog.text
    assert [request.status for request in hub.requests[:3]] == [500, 500, 200]
    assert hub.unexpected == []


@pytest.mark.slow
def test_failed_fit_pushes_queued_only(start_hub, make_config, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    hub = start_hub()
    cfg = make_config(
        [
            *SHORT_RUN,
            *hub_overrides(hub, push_on="every_save", final_timeout_s=60),
            "+callbacks.raise_at_step._target_=test_hub_push.RaiseAtStep",
            "+callbacks.raise_at_step.step=3",
        ]
    )
    run_dir = Path(cfg.paths.output_dir)

    with pytest.raises(RuntimeError, match="test stop at step 3"):
        train(cfg)

    # The snapshot of step 2 was queued before the exception; on_exception waited for it.
    (commit,) = hub.commits(REPO_ID)
    assert commit.message.startswith("Upload prefix at step 2 (val/loss=")
    assert "fit raised RuntimeError, so no final snapshot was taken" in caplog.text
    assert "pushed 1 of 1 snapshots" in caplog.text
    assert not list(run_dir.glob("hub_staging/final-step-*"))
    assert hub.unexpected == []


@pytest.mark.slow
def test_ddp_pushes_once_from_rank_zero(start_hub, tmp_path):
    hub = start_hub()
    run_dir = tmp_path / "ddp"
    result = run_cli(
        [
            *SHORT_RUN,
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "callbacks.progress_bar=null",
            "callbacks=[default,hub_push]",
            f"callbacks.hub_push.repo_id={REPO_ID}",
            "callbacks.hub_push.push_on=end",
            "callbacks.hub_push.final_timeout_s=60",
            f"hydra.run.dir={run_dir}",
        ],
        timeout=300,
        env=hub_environment(hub.url, tmp_path / "hf_home"),
    )

    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in output
    (commit,) = hub.commits(REPO_ID)
    assert set(commit.files) == EXPORT_FILES
    assert_same_tensors(commit.files["prefix.safetensors"], run_dir / "export" / "prefix.safetensors")
    assert hub.paths() == [
        "POST /api/repos/create",
        "POST /api/validate-yaml",
        f"POST /api/models/{REPO_ID}/preupload/main",
        f"POST /api/models/{REPO_ID}/commit/main",
    ]
    assert "pushed 1 of 1 snapshots" in output
    assert hub.unexpected == []
