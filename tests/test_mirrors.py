"""The image repository from HTTP mirrors: nginx and ``python -m http.server`` serving what ``fleet repo publish`` wrote,
hostile mirrors refused one after another, a stock ``tuf.ngclient.Updater`` reading a published mirror.

Real everything: mosquitto, the controller's MQTT repository server, the agent daemon class, nginx (Debian's package,
started here with its own configuration on a free port) and http.server as subprocesses. What came over MQTT is seen
on the broker (a subscriber to the repository request topics), what came over HTTP in the servers' logs.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from update_rig import MODEL, Rig, Subscriber, wait_for

from agent.daemon import Agent
from agent.errors import InvalidOptions
from agent.settings import load_settings
from agent.wire import REPO_REQUESTS, RepoRequest, device_topic, parse_repo_request_topic
from fleet import api
from fleet.cli import main as fleet_cli
from fleet.dev.broker import RunningBroker, free_port

NGINX = Path("/usr/sbin/nginx")
ARTIFACT = re.compile(r"\.onnx-fp32\.tar$")


# -- servers ----------------------------------------------------------------------------------------


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


class Nginx:
    """nginx in the foreground (``daemon off``) serving ``root``, with its pid file, logs and temp paths in ``work``."""

    def __init__(self, root: Path, work: Path) -> None:
        self.work, self.access_log = work, work / "access.log"
        work.mkdir(parents=True, exist_ok=True)
        for _attempt in range(5):  # the free port may be taken between choosing and binding
            self.port = free_port()
            (work / "nginx.conf").write_text(self._config(root))
            self.proc = subprocess.Popen(
                [str(NGINX), "-p", str(work), "-c", str(work / "nginx.conf"), "-e", str(work / "error.log")],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            if wait_listening(self.port, self.proc):
                return
            self.stop()
        raise AssertionError("nginx did not start:\n" + (work / "error.log").read_text(errors="replace"))

    def _config(self, root: Path) -> str:
        temp = "\n".join(f"    {kind}_temp_path {self.work}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        return f"""
daemon off;
master_process on;
worker_processes 1;
{"user root;" if os.geteuid() == 0 else ""}
pid {self.work}/nginx.pid;
error_log {self.work}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log {self.access_log};
{temp}
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{self.port};
        root {root};
    }}
}}
"""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def requests(self) -> list[tuple[str, int]]:
        """(path, status) of every request nginx logged."""
        text = self.access_log.read_text() if self.access_log.exists() else ""
        return [(m.group(1), int(m.group(2))) for m in re.finditer(r'"GET (\S+) HTTP/[\d.]+" (\d{3})', text)]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # nginx's fast shutdown
            self.proc.wait(10)


class HttpServer:
    """``python -m http.server`` on a port it chose itself, its request log (stderr) in a file."""

    def __init__(self, root: Path, log: Path) -> None:
        self.log = log
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory", str(root)],
                stdout=subprocess.PIPE,
                stderr=err,
            )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        match = re.search(r"port (\d+)", line)
        assert match, f"http.server said {line!r}"
        self.port = int(match.group(1))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def requests(self) -> list[tuple[str, int]]:
        return [(m.group(1), int(m.group(2))) for m in re.finditer(r'"GET (\S+) HTTP/[\d.]+" (\d{3})', self.log.read_text())]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class Hostile:
    """One HTTP server, four broken mirrors (``/stall/``, ``/close/``, ``/flip/``, ``/truncate/`` in front of the
    published directory). Metadata and chunk lists are served as they are; the artifact is not:
    stall: five chunks, then nothing; close: two and a half chunks of a promised whole, then the connection closes;
    flip: everything asked for, one byte flipped; truncate: a file 1000 bytes short. ``/meta/`` serves a timestamp whose
    signature was tampered with. Each records where it was
    asked to start (``Range``), and ``truncate`` what the device's partial download held when it was asked."""

    MODES = ("stall", "close", "flip", "truncate")

    def __init__(self, root: Path, part: Path) -> None:
        self.root, self.part = root, part
        self.starts: dict[str, list[int]] = {m: [] for m in self.MODES}
        self.part_when_truncate_asked: bytes | None = None
        self.release = threading.Event()
        hostile = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                hostile.handle(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, mode: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/{mode}/"

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        mode, _, rest = h.path.lstrip("/").partition("/")
        path = self.root / rest
        if mode not in (*self.MODES, "meta") or not path.is_file():
            h.send_error(404)
            return
        data = path.read_bytes()
        match = re.match(r"bytes=(\d+)-$", h.headers.get("Range", ""))
        start = int(match.group(1)) if match else 0
        if mode == "meta" and rest == "metadata/timestamp.json":  # one hex digit of the signature changed
            data = re.sub(rb'("sig":\s*")(.)', lambda m: m.group(1) + (b"0" if m.group(2) != b"0" else b"1"), data, count=1)
        if not ARTIFACT.search(rest):
            self._send(h, data, 0, len(data))
            return
        self.starts[mode].append(start)
        if mode == "stall":
            self._send(h, data[: start + 5 * 4096], start, len(data), promised=len(data) - start)
            self.release.wait(60)  # until the test ends: the device must give up by its own timeout
        elif mode == "close":
            self._send(h, data[: start + 2 * 4096 + 2048], start, len(data), promised=len(data) - start)
        elif mode == "flip":
            body = bytearray(data)
            body[start + 100] ^= 0xFF
            self._send(h, bytes(body), start, len(data))
        else:
            self.part_when_truncate_asked = self.part.read_bytes()
            self._send(h, data[: len(data) - 1000], start, len(data) - 1000)

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, data: bytes, start: int, total: int, promised: int | None = None) -> None:
        body = data[start:]
        h.send_response(206 if start else 200)
        if start:
            h.send_header("Content-Range", f"bytes {start}-{total - 1}/{total}")
        h.send_header("Content-Length", str(promised if promised is not None else len(body)))
        h.end_headers()
        try:
            h.wfile.write(body)
            h.wfile.flush()
        except OSError:
            pass  # the device gave up on us: that is the point

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


# -- the device side ------------------------------------------------------------------------------


class RepoRequests(Subscriber):
    """Every repository request a device sends over MQTT (the broker copies them to us)."""

    def __init__(self, broker: RunningBroker) -> None:
        super().__init__(broker, [REPO_REQUESTS], "watch-repo-requests")

    def paths(self, device: str) -> list[str]:
        with self._lock:
            return [RepoRequest.decode(p).path for t, p in self.messages if parse_repo_request_topic(t) == device]


class Jobs(Subscriber):
    def __init__(self, broker: RunningBroker, device: str) -> None:
        super().__init__(broker, [device_topic(device, "jobs", "#")], f"watch-{device}")

    def states(self) -> list[str]:
        return [m["state"] for m in self.json()]


@pytest.fixture(scope="module")
def mirror_dir(rig: Rig, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("mirror")
    api.repo_publish(dest, rig.image.directory)
    return dest


@pytest.fixture
def repo_requests(rig: Rig) -> Iterator[RepoRequests]:
    watcher = RepoRequests(rig.broker)
    yield watcher
    watcher.close()


@pytest.fixture
def nginx(mirror_dir: Path, tmp_path: Path) -> Iterator[Nginx]:
    if not NGINX.is_file():
        pytest.fail("nginx is not installed: CI's set-up must apt-get install nginx-light")
    server = Nginx(mirror_dir, tmp_path / "nginx")
    yield server
    server.stop()


@pytest.fixture
def agent_for(rig: Rig) -> Iterator[Any]:
    started: list[tuple[Agent, Jobs]] = []

    def start(device: str, **update: Any) -> tuple[Agent, Jobs]:
        jobs = Jobs(rig.broker, device)
        agent = Agent(rig.settings(device, **update)).start()
        assert agent.wait_connected()
        started.append((agent, jobs))
        return agent, jobs

    yield start
    for agent, jobs in started:
        agent.stop()
        jobs.close()


def serving(agent: Agent, version: str) -> bool:
    m = agent.host.get(MODEL)
    return m is not None and m.version == version


def artifact_of(rig: Rig, version: str) -> tuple[str, bytes]:
    """The stored name (targets/…/{sha256}.onnx-fp32.tar) and bytes of ``version``'s artifact."""
    path = next((rig.image.targets_dir / MODEL / version).glob("*.onnx-fp32.tar"))
    return path.relative_to(rig.image.directory).as_posix(), path.read_bytes()


# -- tests ------------------------------------------------------------------------------------------


def test_mirror_settings_come_from_the_toml_and_the_environment_and_only_http(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('device_id = "d"\n[update]\nmirrors = ["https://cdn.example/edgefleet/"]\n')
    assert load_settings(config).update.mirrors == ["https://cdn.example/edgefleet/"]
    monkeypatch.setenv("EDGEFLEET_UPDATE__MIRRORS", '["http://a.example/", "https://b.example/x/"]')
    assert load_settings(config).update.mirrors == ["http://a.example/", "https://b.example/x/"]
    monkeypatch.setenv("EDGEFLEET_UPDATE__MIRRORS", '["file:///etc/"]')
    with pytest.raises(InvalidOptions, match=r"update\.mirrors"):
        load_settings(config)


def test_an_agent_installs_from_nginx_and_not_a_target_byte_over_mqtt(
    rig: Rig, agent_for: Any, nginx: Nginx, repo_requests: RepoRequests
) -> None:
    agent, jobs = agent_for("dev-nginx", mirrors=[nginx.url])
    rig.assign("dev-nginx", "1.0.0")
    wait_for(lambda: serving(agent, "1.0.0"), what="1.0.0 serving")
    wait_for(lambda: "ACTIVE" in jobs.states(), what="ACTIVE on the job topic")
    assert "REJECTED" not in jobs.states()
    stored, _ = artifact_of(rig, "1.0.0")
    assert ("/" + stored, 200) in nginx.requests()  # the artifact, whole, from nginx
    assert ("/metadata/timestamp.json", 200) in nginx.requests()  # and the image metadata
    over_mqtt = repo_requests.paths("dev-nginx")
    assert [p for p in over_mqtt if p.startswith("image/targets/")] == []
    assert any(p.startswith("director/dev-nginx/") for p in over_mqtt)  # the director always comes over MQTT
    assert agent.update_round.mirror_refusals == {}


def test_an_agent_installs_from_http_server_named_by_the_directors_signed_metadata(
    rig: Rig, agent_for: Any, mirror_dir: Path, tmp_path: Path, repo_requests: RepoRequests
) -> None:
    server = HttpServer(mirror_dir, tmp_path / "http.log")
    try:
        rig.director.set_mirrors([server.url], rig.keys)  # in every device's signed targets from now on
        agent, jobs = agent_for("dev-httpd")  # no mirror in its settings
        rig.assign("dev-httpd", "1.0.0")
        wait_for(lambda: serving(agent, "1.0.0"), what="1.0.0 serving")
        wait_for(lambda: "ACTIVE" in jobs.states(), what="ACTIVE on the job topic")
    finally:
        rig.director.set_mirrors([], rig.keys)
        server.stop()
    stored, _ = artifact_of(rig, "1.0.0")
    assert ("/" + stored, 200) in server.requests()
    assert [p for p in repo_requests.paths("dev-httpd") if p.startswith("image/targets/")] == []
    assert "REJECTED" not in jobs.states()


def test_stalled_dying_tampering_and_truncating_mirrors_are_refused_and_nginx_finishes_by_range(
    rig: Rig, agent_for: Any, nginx: Nginx, mirror_dir: Path, repo_requests: RepoRequests, caplog: pytest.LogCaptureFixture
) -> None:
    stored, artifact = artifact_of(rig, "1.1.0")
    sha256 = hashlib.sha256(artifact).hexdigest()
    device = "dev-hostile"
    part = rig.root / "devices" / device / "downloads" / f"{sha256}.part"
    hostile = Hostile(mirror_dir, part)
    try:
        mirrors = [hostile.url(m) for m in Hostile.MODES] + [nginx.url]
        agent, jobs = agent_for(device, mirrors=mirrors, mirror_timeout_s=1.0)
        rig.assign(device, "1.1.0")
        wait_for(lambda: serving(agent, "1.1.0"), what="1.1.0 serving despite four broken mirrors")
    finally:
        hostile.stop()
    # each broken mirror was asked once for the artifact, from where the verified bytes ended, and refused
    stall, close, flip, truncate = (hostile.starts[m] for m in Hostile.MODES)
    assert stall == [0] and close == [5 * 4096] and flip == [7 * 4096] and truncate == [7 * 4096]
    assert agent.update_round.mirror_refusals == {hostile.url(m): 1 for m in Hostile.MODES}
    refused = [r.getMessage() for r in caplog.records if "event=mirror.refused" in r.getMessage()]
    assert len(refused) == 4 and all(stored.rsplit("/", 1)[1] in line for line in refused)
    # nothing unverified was written: after the flipped byte the partial file held exactly the verified chunks
    assert hostile.part_when_truncate_asked == artifact[: 7 * 4096]
    # nginx resumed with a Range request (206) and finished; MQTT served no target byte
    assert ("/" + stored, 206) in nginx.requests() and ("/" + stored, 200) not in nginx.requests()
    assert [p for p in repo_requests.paths(device) if p.startswith("image/targets/")] == []
    wait_for(lambda: "ACTIVE" in jobs.states(), what="ACTIVE on the job topic")
    assert jobs.states() == ["IDLE", "DOWNLOADING", "VERIFYING", "STAGED", "HEALTH_CHECK", "ACTIVE"]
    models = list((agent.settings.state_dir / "models").iterdir())
    assert len(models) == 1 and not part.exists()


def test_a_mirror_behind_the_repository_or_with_tampered_metadata_is_refused_and_mqtt_serves_the_update(
    rig: Rig, agent_for: Any, nginx: Nginx, mirror_dir: Path, repo_requests: RepoRequests, caplog: pytest.LogCaptureFixture
) -> None:
    rig.release("1.3.0")  # after the mirror was published: nginx serves valid metadata that does not list it
    hostile = Hostile(mirror_dir, Path("/nonexistent"))
    try:
        stale, _ = agent_for("dev-stale", mirrors=[nginx.url])
        tampered, _ = agent_for("dev-tampered", mirrors=[hostile.url("meta")])
        rig.assign("dev-stale", "1.3.0")
        rig.assign("dev-tampered", "1.0.0")
        wait_for(lambda: serving(stale, "1.3.0"), what="1.3.0 serving on dev-stale")
        wait_for(lambda: serving(tampered, "1.0.0"), what="1.0.0 serving on dev-tampered")
    finally:
        hostile.stop()
    # refused in each round that found it so (a round may run again after the install: the next assignment message)
    assert set(stale.update_round.mirror_refusals) == {nginx.url}
    assert set(tampered.update_round.mirror_refusals) == {hostile.url("meta")}
    refused = [r.getMessage() for r in caplog.records if "event=mirror.refused" in r.getMessage()]
    assert any("lacks mlp/1.3.0/onnx-fp32.tar" in line for line in refused)
    assert any("metadata refused" in line and "meta" in line for line in refused)
    for device in ("dev-stale", "dev-tampered"):  # the artifact came from the MQTT repository
        assert any(p.startswith("image/targets/") for p in repo_requests.paths(device))


def test_publish_writes_targets_then_versioned_metadata_then_the_timestamp_and_a_stock_updater_verifies_it(
    rig: Rig, tmp_path: Path
) -> None:
    from tuf.ngclient import Updater

    dest = tmp_path / "published"
    written = api.repo_publish(dest, rig.image.directory)
    kinds = ["targets" if w.startswith("targets/") else "metadata" for w in written]
    assert kinds == sorted(kinds, key=["targets", "metadata"].index) and written[-1] == "metadata/timestamp.json"
    mtimes = {w: (dest / w).stat().st_mtime_ns for w in written}
    assert mtimes["metadata/timestamp.json"] == max(mtimes.values())
    assert all((dest / w).stat().st_mode & 0o777 == 0o644 for w in written)  # a web server running as another user reads them
    assert api.repo_publish(dest, rig.image.directory) == []  # nothing changed: nothing written

    rig.release("1.2.0")  # a new release: its targets, then new targets/snapshot versions, then the timestamp
    result = CliRunner().invoke(fleet_cli, ["repo", "publish", str(dest), "--repo", str(rig.image.directory)])
    assert result.exit_code == 0, result.output
    assert "metadata/timestamp.json last" in result.output
    source = sorted(p.relative_to(rig.image.directory).as_posix() for p in rig.image.directory.rglob("*.json") if "metadata" in p.parts)
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*.json")) == source  # pruned versions gone from the mirror too

    server = HttpServer(dest, tmp_path / "http.log")
    try:
        trusted = tmp_path / "client"
        trusted.mkdir()
        shutil.copy(rig.image.metadata / "1.root.json", trusted / "root.json")
        updater = Updater(str(trusted), server.url + "metadata/", str(tmp_path / "dl"), server.url + "targets/", bootstrap=None)
        (tmp_path / "dl").mkdir()
        updater.refresh()
        info = updater.get_targetinfo(f"{MODEL}/1.2.0/onnx-fp32.tar")
        assert info is not None
        downloaded = Path(updater.download_target(info)).read_bytes()
    finally:
        server.stop()
    assert hashlib.sha256(downloaded).hexdigest() == info.hashes["sha256"] == hashlib.sha256(artifact_of(rig, "1.2.0")[1]).hexdigest()
