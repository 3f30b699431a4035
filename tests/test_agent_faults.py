"""Faults against the real daemon process: kill -9 in every update state, a full disk, a broker restart."""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from conftest import ModelFiles
from update_rig import AgentProcess, Rig, wait_for

from agent.update.steps import PAUSE_ENV
from agent.wire import RepoReply, RepoRequest, parse_repo_request_topic, repo_reply_topic
from fleet.dev.broker import start_broker

STATES = ["IDLE", "DOWNLOADING", "VERIFYING", "STAGED", "HEALTH_CHECK", "ACTIVE"]


def store_rows(state_dir: Path, sql: str) -> list[tuple[object, ...]]:
    db = state_dir / "agent.db"
    if not db.exists():
        return []
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as conn:
        try:
            return conn.execute(sql).fetchall()
        except sqlite3.OperationalError:  # tables not created yet
            return []


def active_version(state_dir: Path) -> str | None:
    rows = store_rows(state_dir, "SELECT version FROM installed WHERE status = 'active'")
    return str(rows[0][0]) if rows else None


@pytest.mark.parametrize("state", STATES)
def test_kill_9_in_every_state_then_restart_converges(rig: Rig, tmp_path: Path, state: str) -> None:
    device = f"k9-{state.lower().replace('_', '-')}"
    config = rig.write_config(device)
    state_dir = config.parent
    rig.assign(device, "1.0.0")  # retained: the agent finds it when it connects
    first = AgentProcess(config, tmp_path / "first.log", {PAUSE_ENV: state})
    try:
        wait_for(lambda: f"event=fault.paused state={state}" in first.text(), 90, f"the agent to pause in {state}")
    finally:
        first.kill9()
    job_state = store_rows(state_dir, "SELECT state, offset FROM jobs")
    assert job_state and job_state[0][0] == state, job_state
    second = AgentProcess(config, tmp_path / "second.log")
    try:
        wait_for(
            lambda: (
                store_rows(state_dir, "SELECT state FROM jobs") == [("ACTIVE",)]
                and active_version(state_dir) == "1.0.0"
                and "event=host.swapped model=mlp version=1.0.0" in second.text()
            ),  # serving it, not just recorded
            90,
            "1.0.0 active and serving after the restart",
        )
        if state == "DOWNLOADING":  # resumed from the last verified chunk, not from zero
            resumed = re.search(r"event=update.resume job=\S+ state=DOWNLOADING offset=(\d+)", second.text())
            assert resumed is not None and int(resumed.group(1)) > 0, second.text()[-2000:]
        if state == "ACTIVE":
            assert "event=update.resume" not in second.text()
    finally:
        assert second.stop() == 0
    assert list((state_dir / "downloads").iterdir()) == [] and list((state_dir / "staging").iterdir()) == []
    assert len(list((state_dir / "models").iterdir())) == 1
    assert store_rows(state_dir, "SELECT count(*) FROM installed") == [(1,)]


@contextlib.contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """A size-capped tmpfs (the device's data partition, full)."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        # the set-up runs as root (apt-get); a machine where mount is refused must say so, not pass quietly
        pytest.fail(f"mounting a size-capped tmpfs needs root/CAP_SYS_ADMIN: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_not_enough_disk_fails_before_downloading(rig: Rig, tmp_path: Path) -> None:
    config = rig.write_config("disk-small", disk_reserve_mb=0)
    with small_disk(config.parent / "downloads", "64k"):
        rig.assign("disk-small", "1.0.0")
        agent = AgentProcess(config, tmp_path / "agent.log")
        try:
            rows = wait_for(
                lambda: store_rows(config.parent, "SELECT state, reason, offset FROM jobs WHERE state = 'FAILED'"), 60, "FAILED"
            )
        finally:
            assert agent.stop() == 0
        assert "bytes needed" in str(rows[0][1]) and rows[0][2] == 0
        assert active_version(config.parent) is None


def test_disk_filling_up_during_download_fails_cleanly(rig: Rig, tmp_path: Path) -> None:
    config = rig.write_config("disk-full", disk_reserve_mb=0)
    downloads = config.parent / "downloads"
    with small_disk(downloads, "512k"):
        rig.assign("disk-full", "1.0.0")
        first = AgentProcess(config, tmp_path / "first.log", {PAUSE_ENV: "DOWNLOADING"})
        try:
            wait_for(lambda: "event=fault.paused state=DOWNLOADING" in first.text(), 90, "the download to start")
        finally:
            first.kill9()
        free = os.statvfs(downloads).f_bavail * os.statvfs(downloads).f_frsize
        (downloads / "filler").write_bytes(b"\0" * (free - 8192))  # something else fills the disk meanwhile
        second = AgentProcess(config, tmp_path / "second.log")
        try:
            rows = wait_for(lambda: store_rows(config.parent, "SELECT reason FROM jobs WHERE state = 'FAILED'"), 60, "FAILED")
        finally:
            assert second.stop() == 0
        assert "disk full" in str(rows[0][0])
        assert sorted(p.name for p in downloads.iterdir()) == ["filler"]  # the partial download is gone
        assert list((config.parent / "models").iterdir()) == [] and active_version(config.parent) is None


def test_broker_restart_mid_download_resumes(models: ModelFiles, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    with start_broker(tmp_path_factory.mktemp("own-broker")) as broker:
        rig = Rig(tmp_path, models.path("mlp.onnx"), broker)
        rig.release("1.0.0")
        with rig.controller.server:
            config = rig.write_config("dev-bounce", window=1, request_chunk_kb=1)
            rig.assign("dev-bounce", "1.0.0")
            agent = AgentProcess(config, tmp_path / "agent.log")
            try:
                wait_for(lambda: (store_rows(config.parent, "SELECT offset FROM jobs") or [(0,)])[0][0] > 0, 60, "download progress")
                broker.start_again()  # every connection drops mid-download
                wait_for(lambda: active_version(config.parent) == "1.0.0", 90, "1.0.0 active after the broker came back")
            finally:
                assert agent.stop() == 0
            text = (tmp_path / "agent.log").read_text()
            assert "event=download.bad_chunk" not in text
            assert len(re.findall(r"event=update.state job=\S+ state=DOWNLOADING", text)) == 1  # never started over
            resumes = re.findall(r"event=update.resume job=\S+ state=DOWNLOADING offset=(\d+)", text)
            assert all(int(offset) > 0 for offset in resumes)


def test_kill_9_mid_window_leaves_a_resume_offset_only_over_verified_bytes_on_disk(rig: Rig, tmp_path: Path) -> None:
    """The writer thread checks and writes chunks while replies keep arriving: killed at whatever point it had
    reached, the saved offset covers only bytes on disk, every byte on disk matches the artifact (a tampered chunk
    on the way was refused, never written), and the restarted agent resumes from exactly there."""
    hold = 16 * 4096  # the relay answers the artifact up to here, then keeps the agent waiting
    held: list[int] = []
    tampered: list[int] = []

    def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        device = parse_repo_request_topic(msg.topic)
        req = RepoRequest.decode(msg.payload)
        reply = rig.controller.server.serve(req, device)
        if req.path.endswith(".onnx-fp32.tar") and req.offset >= hold:
            held.append(req.offset)
            return
        if req.path.endswith(".onnx-fp32.tar") and req.offset == 5 * 4096 and not tampered:
            tampered.append(req.offset)
            reply = RepoReply(req.request_id, 200, reply.total, req.offset, b"\0" * len(reply.data))
        client.publish(repo_reply_topic(device), reply.encode(), qos=1)

    config = rig.write_config("k9-window", window=4, window_max=8, sync_kb=8, request_chunk_kb=4)  # a reply per chunk
    state_dir = config.parent
    relay = rig.relay("k9-relay", on_message)  # only the relay answers now
    try:
        rig.assign("k9-window", "1.1.0")
        first = AgentProcess(config, tmp_path / "first.log")
        try:
            wait_for(lambda: held and (store_rows(state_dir, "SELECT offset FROM jobs") or [(0,)])[0][0] > 0, 60, "replies held")
        finally:
            first.kill9()
    finally:
        relay.disconnect()
        relay.loop_stop()
        rig.controller.server.start()
    [(state, offset)] = store_rows(state_dir, "SELECT state, offset FROM jobs")
    [partial] = (state_dir / "downloads").iterdir()
    [artifact] = (rig.image.directory / "targets").rglob(partial.name.removesuffix(".part") + "*")
    assert state == "DOWNLOADING" and tampered == [5 * 4096]
    assert 0 < offset <= hold and offset % 4096 == 0
    on_disk = partial.read_bytes()
    assert len(on_disk) >= offset and on_disk == artifact.read_bytes()[: len(on_disk)]  # every byte written verified
    second = AgentProcess(config, tmp_path / "second.log")
    try:
        wait_for(lambda: active_version(state_dir) == "1.1.0", 90, "1.1.0 active after the restart")
    finally:
        assert second.stop() == 0
    assert f"state=DOWNLOADING offset={offset}" in second.text()
