"""Several controllers on one store and broker: one leads (the leader lock), the others stand by and take over."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, Root
from update_rig import MODEL, VARIANT, AgentProcess, Rig, copy_tree, wait_for

from fleet.dev.broker import RunningBroker
from fleet.dev.simulate import Simulator, SimulatorThread
from fleet.leader import Leadership
from fleet.rollout import RolloutEngine, RolloutSpec
from fleet.store import FleetStore
from fleet.tuf.director import Director
from fleet.tuf.keys import KeyStore, UntrustedSigningKey, init_keys

CLI = [sys.executable, "-m", "fleet.cli"]


def _one_leads_until_it_lets_go(location: Path | str) -> None:
    first, second = Leadership(location), Leadership(location)
    try:
        assert first.try_acquire() and first.held()
        assert not second.try_acquire() and not second.held()
        assert first.try_acquire(), "taking a held lock again keeps it"
        first.release()
        assert not first.held()
        assert second.try_acquire() and second.held()
        assert not first.try_acquire()
    finally:
        first.release()
        second.release()


def test_leadership_on_postgresql_is_one_advisory_lock() -> None:
    from conftest import fresh_postgres

    with fresh_postgres() as url:
        _one_leads_until_it_lets_go(url)


def test_leadership_on_sqlite_is_a_file_lock_beside_the_database(tmp_path: Path) -> None:
    _one_leads_until_it_lets_go(tmp_path / "fleet.db")
    assert (tmp_path / "fleet.db.leader").exists()


@pytest.fixture(scope="module")
def fleet_rig(models: Any, mqtt_broker: RunningBroker, tmp_path_factory: pytest.TempPathFactory) -> Rig:
    """Keys and both repositories with mlp 1.0.0 and 1.1.0 released; no controller of its own (the tests start theirs)."""
    r = Rig(tmp_path_factory.mktemp("fleet"), models.path("mlp.onnx"), mqtt_broker)
    for version in ("1.0.0", "1.1.0"):
        r.release(version)
    return r


class Serve:
    """One `fleet serve` process; its log tells whether it leads."""

    def __init__(self, rig: Rig, config: Path, name: str, root: Path | None = None, keys: Path | None = None) -> None:
        self.log = config.parent / f"{name}.log"
        cmd = [sys.executable, "-m", "fleet.cli", "serve", str(root or rig.serve), "--keys", str(keys or rig.keys.directory)]
        cmd += ["--config", str(config)]
        cmd += ["--controller-id", name]  # two on one ROOT and host: the default id (host name + ROOT) would be one
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=out)

    def says(self, event: str) -> bool:
        return f"event={event}" in self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _duplicated_batches(store: FleetStore, prefix: str) -> list[dict[str, Any]]:
    return store.db.query(
        "SELECT device, session, seq, model, count(*) AS n FROM telemetry WHERE device LIKE ? GROUP BY device, session, seq, model"
        " HAVING count(*) > 1",
        (f"{prefix}-%",),
    )


def _assert_every_batch_stored_once(store: Any, prefix: str, sim: Any) -> None:
    """Every batch the broker acknowledged is stored, once; at most the ones numbered (a publish the stop cancelled
    before its acknowledgement was counted may have reached the broker, and be stored)."""
    sent = sim.sent["telemetry"]
    wait_for(lambda: _stored_batches(store, prefix) >= sent, 30, f"all {sent} telemetry batches stored")
    assert sent <= _stored_batches(store, prefix) <= sum(d.seq for d in sim.devices)
    assert not _duplicated_batches(store, prefix)


def _stored_batches(store: FleetStore, prefix: str) -> int:
    return int(store.db.query("SELECT count(*) AS n FROM batches WHERE device LIKE ?", (f"{prefix}-%",))[0]["n"])


def test_the_standby_takes_over_a_rollout_when_the_leader_is_killed_and_no_telemetry_is_lost(fleet_rig: Rig, tmp_path: Path) -> None:
    """Two `fleet serve` on one PostgreSQL store and one broker: one leads; killed with SIGKILL in the middle of a
    rollout, the other leads within seconds and finishes it from the store; every telemetry batch the devices sent,
    before, during and after the kill, is stored, and exactly once although two controllers took them."""
    from conftest import fresh_postgres

    rig, prefix, n = fleet_rig, "duo", 12
    with fresh_postgres() as url:
        config = tmp_path / "fleet.toml"
        config.write_text(f'store = "{url}"\n[broker]\nhost = "{rig.broker.host}"\nport = {rig.broker.port}\n')
        FleetStore(url).close()  # the schema made once, before two controllers race to open it
        serves = [Serve(rig, config, "a"), Serve(rig, config, "b")]
        sim = Simulator(rig.broker.host, rig.broker.port, n, prefix, telemetry_s=0.2, initial={MODEL: "1.0.0"})
        for d in sim.devices:
            rig.director.assign(d.id, rig.image, MODEL, "1.0.0", VARIANT, rig.keys)
        sims: SimulatorThread | None = None
        store = FleetStore(url)
        try:
            wait_for(lambda: all(s.says("leader.acquired") or s.says("leader.standby") for s in serves), 60, "both controllers up")
            leaders = [s for s in serves if s.says("leader.acquired")]
            assert len(leaders) == 1, [s.log.read_text() for s in serves]
            leader, standby = leaders[0], next(s for s in serves if s is not leaders[0])
            sims = SimulatorThread(sim).start()
            wait_for(lambda: sum(1 for d in store.devices() if d.id.startswith(prefix) and d.online and d.models) == n, 60, "registered")
            spec = RolloutSpec(MODEL, "1.1.0", selector=f"device={prefix}-*", waves=["25%", "50%", "100%"], soak_s=0.0)
            rid = RolloutEngine(store, rig.image).start(spec)
            moved = lambda: sum(1 for d in store.devices() if d.id.startswith(prefix) and d.models.get(MODEL, {}).get("version") == "1.1.0")  # noqa: E731
            wait_for(lambda: moved() >= 1, 60, "the first wave moving")
            leader.proc.kill()  # SIGKILL: no release, no flush; PostgreSQL frees the lock when the connection drops
            leader.proc.wait(10)
            killed = time.monotonic()
            wait_for(lambda: standby.says("leader.acquired"), 10, "the standby leading")
            took_over_s = time.monotonic() - killed
            assert took_over_s < 5, took_over_s
            wait_for(lambda: getattr(store.rollout(rid), "state", "") == "done", 90, "the rollout finished by the new leader")
            assert moved() == n
            after = sim.sent["telemetry"]
            wait_for(lambda: sim.sent["telemetry"] >= after + 2 * n, 30, "telemetry after the takeover")
            sims.stop()
            sims = None
            _assert_every_batch_stored_once(store, prefix, sim)
            assert standby.proc.poll() is None, standby.log.read_text()
        finally:
            if sims is not None:
                sims.stop()
            for s in serves:
                s.stop()
            store.close()


def _version_of(store: FleetStore, device: str) -> str:
    d = store.device(device)
    return str(d.models.get(MODEL, {}).get("version", "")) if d is not None else ""


def test_a_controller_on_its_own_root_serves_the_director_from_the_store_and_signs_on_when_the_leader_is_killed(
    fleet_rig: Rig, tmp_path: Path
) -> None:
    """Two `fleet serve` with different ROOTs (the second has a copy of the image repository and no director at all) on
    one PostgreSQL store: a real agent installs 1.0.0 through a rollout the first signs, with its director requests
    split between both; the first is killed with SIGKILL; the second leads, copies the director from the store, and a
    rollout of 1.1.0 it signs (versions going on from the store's, or the agent would refuse them) reaches the agent,
    which now has only the second to ask."""
    from conftest import fresh_postgres

    rig, device = fleet_rig, "far-1"
    root_b = tmp_path / "b"
    copy_tree(rig.serve / "image", root_b / "image")
    with fresh_postgres() as url:
        config = tmp_path / "fleet.toml"
        config.write_text(f'store = "{url}"\n[broker]\nhost = "{rig.broker.host}"\nport = {rig.broker.port}\n')
        FleetStore(url).close()
        a = Serve(rig, config, "a")
        b: Serve | None = None
        agent: AgentProcess | None = None
        store = FleetStore(url)
        try:
            wait_for(lambda: a.says("leader.acquired"), 60, "the first controller leading")
            b = Serve(rig, config, "b", root=root_b)
            wait_for(lambda: b is not None and b.says("leader.standby"), 60, "the second standing by")
            agent = AgentProcess(rig.write_config(device), tmp_path / "agent.log")
            wait_for(lambda: (d := store.device(device)) is not None and d.online, 60, "the agent registered")
            engine = RolloutEngine(store, rig.image)
            first = engine.start(RolloutSpec(MODEL, "1.0.0", selector=f"device={device}", waves=["100%"], soak_s=0.0))
            wait_for(lambda: _version_of(store, device) == "1.0.0", 90, "1.0.0 installed")
            wait_for(lambda: getattr(store.rollout(first), "state", "") == "done", 30, "the first rollout done")
            assert not (root_b / "director" / device).exists()  # whatever b served of the director came from the store
            signed_by_a = store.director_versions()[device]
            a.proc.kill()
            a.proc.wait(10)
            wait_for(lambda: b is not None and b.says("leader.acquired"), 15, "the second leading")
            second = engine.start(RolloutSpec(MODEL, "1.1.0", selector=f"device={device}", waves=["100%"], soak_s=0.0))
            wait_for(lambda: _version_of(store, device) == "1.1.0", 90, "1.1.0 installed from the surviving controller")
            wait_for(lambda: getattr(store.rollout(second), "state", "") == "done", 30, "the second rollout done")
            assert store.director_versions()[device] > signed_by_a
            assert not (root_b / "director" / device).exists()  # signed into the store alone
            assert "REJECTED" not in agent.text()
        finally:
            if agent is not None:
                agent.stop()
            for s in (a, b):
                if s is not None:
                    s.stop()
            store.close()


def test_a_leader_whose_director_key_was_rotated_elsewhere_holds_its_rollout_until_the_keys_are_copied(
    fleet_rig: Rig, tmp_path: Path
) -> None:
    """A `fleet serve` leads on PostgreSQL with host a's keys; a real agent runs 1.0.0. On host b the operator runs
    `fleet keys rotate director --store` with b's copy of the keys. The leader's next rollout cannot be signed: it
    logs `UntrustedSigningKey` each step, the device stays pending (not failed: a key on the controller is no
    device's fault) and the agent is told nothing it would refuse. Once b's keys are copied to a, with no restart,
    the rollout installs 1.1.0 under the new root."""
    from conftest import fresh_postgres

    rig, device = fleet_rig, "rot-1"
    root_a, keys_a = tmp_path / "a", _copy_keys(rig.keys.directory, tmp_path / "keys-a")
    keys_b = _copy_keys(rig.keys.directory, tmp_path / "keys-b")
    copy_tree(rig.serve, root_a)  # its own director directory: the rig's keeps the keys the rig holds
    copy_tree(rig.serve / "director", tmp_path / "b" / "director")
    with fresh_postgres() as url:
        config = tmp_path / "fleet.toml"
        config.write_text(f'store = "{url}"\n[broker]\nhost = "{rig.broker.host}"\nport = {rig.broker.port}\n')
        FleetStore(url).close()
        a = Serve(rig, config, "a", root=root_a, keys=keys_a.directory)
        agent: AgentProcess | None = None
        store = FleetStore(url)
        try:
            wait_for(lambda: a.says("leader.acquired"), 60, "the controller leading")
            agent = AgentProcess(rig.write_config(device), tmp_path / "agent.log")
            wait_for(lambda: (d := store.device(device)) is not None and d.online, 60, "the agent registered")
            engine = RolloutEngine(store, rig.image)
            first = engine.start(RolloutSpec(MODEL, "1.0.0", selector=f"device={device}", waves=["100%"], soak_s=0.0))
            wait_for(lambda: getattr(store.rollout(first), "state", "") == "done", 90, "1.0.0 rolled out")
            rotate = [*CLI, "keys", "rotate", "director", "--keys", str(keys_b.directory), "--director", str(tmp_path / "b" / "director")]
            subprocess.run([*rotate, "--store", url], check=True, capture_output=True, timeout=120)
            second = engine.start(RolloutSpec(MODEL, "1.1.0", selector=f"device={device}", waves=["100%"], soak_s=0.0))
            wait_for(lambda: a.log.read_text(errors="replace").count("UntrustedSigningKey") >= 2, 60, "the leader refusing twice")
            assert [m.state for m in store.rollout_devices(second)] == ["pending"]
            assert _version_of(store, device) == "1.0.0"
            _copy_keys(keys_b.directory, keys_a.directory)
            wait_for(lambda: getattr(store.rollout(second), "state", "") == "done", 90, "1.1.0 rolled out with the copied keys")
            wait_for(lambda: _version_of(store, device) == "1.1.0", 30, "1.1.0 reported")
            assert "REJECTED" not in agent.text() and "UnsignedMetadataError" not in agent.text()
        finally:
            if agent is not None:
                agent.stop()
            a.stop()
            store.close()


def test_two_ingestors_in_the_shared_group_split_the_batches_and_store_each_once(mqtt_broker: RunningBroker, tmp_path: Path) -> None:
    """The default with a store on MQTT 5: telemetry goes to one controller of the group, not to all (each stores part,
    none stores a batch the other stored), and the batches are acknowledged only once stored."""
    from fleet.controller import INGEST_GROUP
    from fleet.transport.ingest import Ingestor

    store = FleetStore(tmp_path / "fleet.db")
    ingestors = [Ingestor(store, mqtt_broker.host, mqtt_broker.port, client_id=f"split-{i}", group=INGEST_GROUP).start() for i in (1, 2)]
    sim = Simulator(mqtt_broker.host, mqtt_broker.port, 10, "split", telemetry_s=0.05, initial={MODEL: "1.0.0"})
    sims = SimulatorThread(sim).start()
    try:
        wait_for(lambda: sim.sent["telemetry"] >= 200, 60, "200 batches sent")
    finally:
        sims.stop()
    sent = sim.sent["telemetry"]
    try:
        wait_for(lambda: _stored_batches(store, "split") >= sent, 30, "every batch stored")
        each = [i.counters["telemetry"] for i in ingestors]
        assert all(n > sent // 4 for n in each), each  # both took a share
        assert sent <= sum(each) <= sum(d.seq for d in sim.devices), each  # and no batch reached both
        assert store.duplicates == 0 and not _duplicated_batches(store, "split")
    finally:
        for i in ingestors:
            i.stop(forget=True)
        store.close()


def test_a_controller_killed_mid_stream_and_restarted_under_its_id_loses_no_telemetry(fleet_rig: Rig, tmp_path: Path) -> None:
    """Two `fleet serve` on one PostgreSQL store splitting the ingest; the standby is killed with SIGKILL while 20
    simulated devices send telemetry and started again 3 s later under its id: the broker kept its share (the
    messages it had received and not acknowledged, and those queued since), and every batch is stored exactly once."""
    from conftest import fresh_postgres

    rig, prefix, n = fleet_rig, "k9ingest", 20
    with fresh_postgres() as url:
        config = tmp_path / "fleet.toml"
        config.write_text(f'store = "{url}"\n[broker]\nhost = "{rig.broker.host}"\nport = {rig.broker.port}\n')
        FleetStore(url).close()
        a = Serve(rig, config, "a")
        serves = [a]
        sim = Simulator(rig.broker.host, rig.broker.port, n, prefix, telemetry_s=0.1, initial={MODEL: "1.0.0"})
        sims: SimulatorThread | None = None
        store = FleetStore(url)
        try:
            wait_for(lambda: a.says("leader.acquired"), 60, "the first leading")
            b = Serve(rig, config, "b")
            serves.append(b)
            wait_for(lambda: b.says("leader.standby"), 60, "the second standing by")
            sims = SimulatorThread(sim).start()
            wait_for(lambda: sim.sent["telemetry"] >= 300, 60, "telemetry flowing")
            b.proc.kill()
            b.proc.wait(10)
            at_kill = sim.sent["telemetry"]
            wait_for(lambda: sim.sent["telemetry"] >= at_kill + 300, 60, "telemetry while it is dead")
            b = Serve(rig, config, "b")  # the same id: its session, with what the broker kept for it
            serves.append(b)
            wait_for(lambda: b.says("leader.standby"), 60, "the second back")
            wait_for(lambda: sim.sent["telemetry"] >= at_kill + 600, 60, "telemetry after it came back")
            sims.stop()
            sims = None
            _assert_every_batch_stored_once(store, prefix, sim)
            assert not a.says("ingest.adopted") or a.says("ingest.adoption_ended")  # if a took it over, b got it back
        finally:
            if sims is not None:
                sims.stop()
            for s in serves:
                s.stop()
            store.close()


def test_a_first_lead_pushes_a_directory_signed_without_a_store_in_batches_and_leaves_what_the_store_has_newer(
    fleet_rig: Rig, store_location: Path | str, tmp_path: Path
) -> None:
    """On SQLite and PostgreSQL: a director whose devices were signed with files alone (one box, before PostgreSQL)
    starts to lead on a store: every device's whole set reaches the store, more devices than one batch of
    ``SYNC_BATCH``; a device the store holds newer keeps the store's (its files stay as they were); a second sync
    finds nothing to move."""
    from fleet.tuf.director import Assignment
    from fleet.tuf.director_store import SYNC_BATCH, local_files

    fs = FleetStore(store_location)
    try:
        rig_keys = fleet_rig.keys
        a = Director.create(tmp_path / "a", rig_keys)
        devices = [f"old-{i:04d}" for i in range(SYNC_BATCH * 2 + 3)]
        done = a.assign_many([Assignment(d, MODEL, "1.0.0", VARIANT) for d in devices], fleet_rig.image, rig_keys)
        assert not [d for d, r in done.items() if isinstance(r, Exception)]
        b = Director(tmp_path / "b", store=fs)  # another root on the store: it signs devices[0] anew, version 2 there
        (tmp_path / "b").mkdir()
        shutil.copy(tmp_path / "a" / "1.root.json", tmp_path / "b")  # b's host has the director's root (the keys it trusts)
        fs.put_director_files(devices[0], local_files(a.device_metadata(devices[0])), 1)
        b.assign(devices[0], fleet_rig.image, MODEL, "1.1.0", VARIANT, rig_keys)
        first = local_files(a.device_metadata(devices[0]))
        a.store = fs
        assert a.sync().pushed == len(devices) - 1
        for d in devices[1:]:
            assert fs.director_files(d) == local_files(a.device_metadata(d))
        assert fs.director_versions()[devices[0]] == 2 and local_files(a.device_metadata(devices[0])) == first
        assert a.committed_targets(devices[0]) is not None
        assert "1.1.0" in next(iter(a.committed_targets(devices[0]).signed.targets))  # type: ignore[union-attr]
        assert a.sync().pushed == 0
    finally:
        fs.close()


def test_each_sync_reads_only_the_device_files_that_changed_since_the_last(fleet_rig: Rig, tmp_path: Path) -> None:
    """A controller syncs every round; a leftover directory of 10,000 devices was read and parsed each time. A file
    left as it was (inode, size, mtime) is not read again — shown by bytes put in its place that would not parse,
    with its size and mtime kept — and a file written anew is."""
    import os

    from fleet.tuf.director import Assignment
    from fleet.tuf.director_store import TIMESTAMP

    fs = FleetStore(tmp_path / "fleet.db")
    try:
        files = Director.create(tmp_path / "d", fleet_rig.keys)  # signed without a store, as a one-box fleet was
        devices = ["kept-1", "kept-2"]
        files.assign_many([Assignment(d, MODEL, "1.0.0", VARIANT) for d in devices], fleet_rig.image, fleet_rig.keys)
        leader = Director(tmp_path / "d", store=fs)
        assert leader.sync().pushed == 2
        path = files.device_metadata("kept-1") / TIMESTAMP
        st = path.stat()
        with open(path, "r+b") as f:  # the same inode, size and mtime; bytes that are no metadata
            f.write(b"x" * st.st_size)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert leader.sync().pushed == 0 and leader._seen["kept-1"][1] == 1  # not read: still version 1
        files.assign("kept-2", fleet_rig.image, MODEL, "1.1.0", VARIANT, fleet_rig.keys)  # written anew: version 2
        assert leader.sync().pushed == 1 and fs.director_versions()["kept-2"] == 2
        fresh = Director(tmp_path / "d", store=fs)  # a new process reads everything: the garbage counts as nothing
        assert fresh.sync().pushed == 0 and fresh._seen["kept-1"][1] == 0
    finally:
        fs.close()


def _leading(directory: Path, keys: KeyStore, fs: FleetStore) -> Director:
    """A new director on ``fs`` as a controller starts to lead with it: its roots synced into the store."""
    d = Director.create(directory, keys)
    d.store = fs
    d.sync()
    return d


def test_directors_on_two_roots_share_one_store_and_sign_on_from_its_versions(
    fleet_rig: Rig, store_location: Path | str, tmp_path: Path
) -> None:
    """On SQLite and PostgreSQL: a director with a store signs into it alone (no device files), as the device's whole
    set; a repository server with no director files answers from it (that device's files only); a director on another
    ROOT copies the roots, signs the next versions, the first goes on from those; a copy signed from an older listing
    is refused, and so is a file copy signed elsewhere; files signed on the directory without the store, behind the
    store's, are left alone and counted."""
    from agent.wire import RepoRequest
    from fleet.store import StaleDirectorMetadata
    from fleet.transport.repo_server import RepositoryServer
    from fleet.tuf.director import _Batch
    from fleet.tuf.director_store import Synced, push_device

    rig, device = fleet_rig, "two-1"
    fs = FleetStore(store_location)
    try:
        a = _leading(tmp_path / "a", rig.keys, fs)  # what a controller does when it starts to lead: the director's roots into the store
        a.assign(device, rig.image, MODEL, "1.0.0", VARIANT, rig.keys)
        assert not a.device_metadata(device).exists()
        assert sorted(fs.director_files(device)) == ["1.root.json", "1.snapshot.json", "1.targets.json", "timestamp.json"]
        server = RepositoryServer(tmp_path / "empty", director_store=fs)  # never started: serve() alone
        ts = fs.director_file(device, "timestamp.json")
        assert ts is not None and a.timestamps([device, "nobody"]) == {device: ts}
        reply = server.serve(RepoRequest("r1", f"director/{device}/metadata/timestamp.json", 10, 20), device)
        assert (reply.status, reply.total, reply.data) == (200, len(ts), ts[10:30])
        for path, asker in [(f"director/{device}/metadata/1.root.json", "two-2"), (f"director/{device}/metadata/../x.json", device)]:
            assert server.serve(RepoRequest("r2", path, 0, 100), asker).status == 404
        b = Director(tmp_path / "b", store=fs)
        assert b.sync().pushed == 0 and (tmp_path / "b" / "1.root.json").is_file()
        b.assign(device, rig.image, MODEL, "1.1.0", VARIANT, rig.keys)
        assert fs.director_versions()[device] == 2
        stale = a.repos.listings([device])
        a.assign(device, rig.image, MODEL, "1.0.0", VARIANT, rig.keys)  # goes on from the store's 2
        assert fs.director_versions()[device] == 3 and a.devices() == [device]
        late = _Batch(a, rig.keys, stale)  # signed from the listing at 2 after the store moved to 3 (likely in the same
        # second: then its snapshot and timestamp are a's to the byte, and only its targets differ)
        late.sign(device, {})
        assert not late.failed and len(late.commits) == 1
        assert isinstance(a.repos.commit(late.commits, 3)[device], StaleDirectorMetadata)
        assert fs.director_versions()[device] == 3
        files_only = Director(tmp_path / "a")  # a command run without the store: its files start at version 1
        files_only.assign(device, rig.image, MODEL, "1.1.0", VARIANT, rig.keys)
        assert a.sync() == Synced(0, 1)  # behind the store's: left alone, and counted (the controller logs it)
        elsewhere = Director.create(tmp_path / "c", rig.keys)  # files signed elsewhere from nothing: version 1
        elsewhere.assign(device, rig.image, MODEL, "1.1.0", VARIANT, rig.keys)
        with pytest.raises(StaleDirectorMetadata):
            push_device(fs, elsewhere.device_metadata(device), device)
        assert a.sync().pushed == 0 and fs.director_versions()[device] == 3
    finally:
        fs.close()


def _copy_keys(src: Path, dst: Path) -> KeyStore:
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return KeyStore(dst)


def _signed_under(root: Metadata[Root], body: bytes | None) -> bool:
    """``body`` (a director timestamp) carries the threshold of signatures ``root`` asks for its role."""
    assert body is not None
    try:
        root.verify_delegate("timestamp", Metadata.from_bytes(body))
    except UnsignedMetadataError:
        return False
    return True


def test_a_director_key_rotated_on_another_host_is_never_signed_around(fleet_rig: Rig, store_location: Path | str, tmp_path: Path) -> None:
    """On SQLite and PostgreSQL, two hosts (two ROOTs, each its own keys directory) share the director through the
    store. Host b rotates the director key: a batch host a signed just before is refused by the store (it would
    land after the rotation's re-signing, under the retired key); host a, whose keys the new root no longer
    trusts, refuses to sign at all (one named error for the whole batch, nothing written); with b's keys copied
    over it signs again, under the new root. A rotation from a host whose directory is behind starts from the
    store's newest root, and a second root of one version is refused."""
    from fleet.store import DirectorRootChanged, StaleDirectorMetadata
    from fleet.tuf.director import _Batch

    rig, device = fleet_rig, "host-1"
    keys_a, keys_b = _copy_keys(rig.keys.directory, tmp_path / "keys-a"), _copy_keys(rig.keys.directory, tmp_path / "keys-b")
    fs = FleetStore(store_location)
    try:
        a = _leading(tmp_path / "a", keys_a, fs)
        a.assign(device, rig.image, MODEL, "1.0.0", VARIANT, keys_a)
        b = Director(tmp_path / "b", store=fs)
        b.sync()
        late = _Batch(a, keys_a, a.repos.listings([device]))  # signed under root 1 ...
        late.sign(device, {})
        b.rotate_key(keys_b)  # ... committed after b's rotation (root 2) re-signed every device
        root = b.root()
        assert root.signed.version == 2 and a.root().signed.version == 1  # a's directory has not synced yet
        after_rotation = fs.director_file(device, "timestamp.json")
        assert _signed_under(root, after_rotation)
        refused = a.repos.commit(late.commits, 3)[device]
        assert isinstance(refused, DirectorRootChanged) and "root 2" in str(refused)
        with pytest.raises(UntrustedSigningKey, match="root version 2 trusts other director keys"):
            a.assign(device, rig.image, MODEL, "1.1.0", VARIANT, keys_a)
        with pytest.raises(UntrustedSigningKey):
            a.refresh(keys_a)
        assert fs.director_file(device, "timestamp.json") == after_rotation and a.root().signed.version == 2
        _copy_keys(keys_b.directory, keys_a.directory)  # the operator copies b's keys to a
        a.assign(device, rig.image, MODEL, "1.1.0", VARIANT, keys_a)
        assert _signed_under(root, fs.director_file(device, "timestamp.json"))
        behind = Director(tmp_path / "c", store=fs)  # a host that saw only root 1
        copy_tree(tmp_path / "a", tmp_path / "c")
        (tmp_path / "c" / "2.root.json").unlink()
        assert behind.rotate_key(keys_a).signed.version == 3
        with pytest.raises(StaleDirectorMetadata, match=r"another 3\.root\.json"):
            fs.add_director_files("", {"3.root.json": fs.director_file("", "1.root.json") or b""})
        assert fs.director_file("", "3.root.json") == (tmp_path / "c" / "3.root.json").read_bytes()
    finally:
        fs.close()


def test_a_rotation_racing_another_hosts_leaves_nothing_behind_and_old_root_files_are_not_pushed(
    fleet_rig: Rig, store_location: Path | str, tmp_path: Path
) -> None:
    """On SQLite and PostgreSQL: host c rotates from root 1 after host b's rotation made root 2 (c had not pulled):
    the store refuses c's root 2 before anything holds it (no file in c's directory, no device row, c's new keys
    gone, its keys.json as it was). A device set host a signed with files alone under root 1 after that rotation
    is not pushed by its next sync (it would verify under root 1 with the retired key)."""
    from fleet.store import StaleDirectorMetadata

    rig, device = fleet_rig, "race-1"
    keys_a, keys_b, keys_c = (_copy_keys(rig.keys.directory, tmp_path / f"keys-{h}") for h in "abc")
    fs = FleetStore(store_location)
    try:
        a = Director.create(tmp_path / "a", keys_a)
        for host in "bc":
            (tmp_path / host).mkdir()
            shutil.copy(tmp_path / "a" / "1.root.json", tmp_path / host)
        a.store = fs
        a.sync()
        a.assign(device, rig.image, MODEL, "1.0.0", VARIANT, keys_a)
        b, c = Director(tmp_path / "b", store=fs), Director(tmp_path / "c", store=fs)
        b.rotate_key(keys_b)
        index, pems = (keys_c.directory / "keys.json").read_bytes(), sorted(p.name for p in keys_c.directory.glob("*.pem"))
        with pytest.raises(StaleDirectorMetadata, match=r"another 2\.root\.json"):
            c._chain().rotate_key(keys_c, "director", c.root(), 1, 1, c.write_root, lambda: c.refresh(keys_c))
        assert not (tmp_path / "c" / "2.root.json").exists()
        assert (keys_c.directory / "keys.json").read_bytes() == index and sorted(p.name for p in keys_c.directory.glob("*.pem")) == pems
        assert (
            fs.director_file(device, "2.root.json") == fs.director_file("", "2.root.json") == (tmp_path / "b" / "2.root.json").read_bytes()
        )
        committed = fs.director_file(device, "timestamp.json")
        files_only = Director(tmp_path / "a")  # `fleet assign` without --store on host a: root 1, the retired key
        files_only.assign(device, rig.image, MODEL, "1.1.0", VARIANT, keys_a)
        assert a.sync().pushed == 0 and fs.director_file(device, "timestamp.json") == committed
    finally:
        fs.close()


DROP_ROOTS = "DELETE FROM director_metadata WHERE device = ? AND name LIKE ? AND name <> ?"  # every director root but 1


def test_director_roots_from_the_store_are_taken_only_as_the_next_link_of_the_chain(
    fleet_rig: Rig, store_location: Path | str, tmp_path: Path
) -> None:
    """On SQLite and PostgreSQL: what a hostile writer puts under the director's own files in the store reaches no
    controller's directory and stops its signing with one typed error: a root that is no JSON, one signed by keys
    root 1 does not name, one that skips a version, another root 1; a name that is no root's (a path) is ignored."""
    from tuf.api.metadata import Metadata, Root

    from fleet.tuf.director_store import UntrustedDirectorRoot
    from fleet.tuf.metadata import encode, sign_metadata

    rig, device = fleet_rig, "chain-1"
    keys = rig.keys
    fs = FleetStore(store_location)
    try:
        a = _leading(tmp_path / "a", keys, fs)
        a.assign(device, rig.image, MODEL, "1.0.0", VARIANT, keys)
        thief = init_keys(tmp_path / "thief")
        forged = Metadata(Root(version=2, expires=a.root().signed.expires))
        for role in ("root", "targets", "snapshot", "timestamp"):
            forged.signed.add_key(thief.public_keys("root" if role == "root" else "director")[0], role)
        sign_metadata(forged, thief.signers("root"))
        skipped = Metadata.from_bytes(fs.director_file("", "1.root.json") or b"")
        skipped.signed.version = 3
        sign_metadata(skipped, keys.signers("root"))
        fs.add_director_files("", {"../../escaped.root.json": b"{}"})
        for name, body, why in [
            ("2.root.json", b"not json", "is no root"),
            ("2.root.json", b"[" * 100_000 + b"]" * 100_000, "is no root"),  # nested past any parser's depth
            ("2.root.json", b'{"signed": {"_type": "root", "version": 2}, "signatures": ' + b"0" * 10_000_000 + b"}", "is no root"),
            ("2.root.json", encode(forged), "not the root after 1"),
            ("3.root.json", encode(skipped), "does not follow 1"),
        ]:
            fs.db.execute(
                "DELETE FROM director_metadata WHERE device = ? AND name LIKE ? AND name <> ?", ["", "%.root.json", "1.root.json"]
            )
            fs.add_director_files("", {name: body})
            with pytest.raises(UntrustedDirectorRoot, match=why):
                a.assign(device, rig.image, MODEL, "1.1.0", VARIANT, keys)
            assert sorted(p.name for p in (tmp_path / "a").glob("*.root.json")) == ["1.root.json"]
        fs.db.execute(DROP_ROOTS, ["", "%.root.json", "1.root.json"])
        a.assign(device, rig.image, MODEL, "1.1.0", VARIANT, keys)  # the escaped name was never a root: ignored
        assert not (tmp_path / "escaped.root.json").exists() and not (tmp_path.parent / "escaped.root.json").exists()
        other = Director.create(tmp_path / "other", thief)  # another director's root 1, met by a's directory
        fs.db.execute(
            "UPDATE director_metadata SET body = ? WHERE device = ? AND name = ?",
            [(tmp_path / "other" / "1.root.json").read_bytes(), "", "1.root.json"],
        )
        assert other.root().signed.version == 1
        with pytest.raises(UntrustedDirectorRoot, match="not the one this host has"):
            a.assign(device, rig.image, MODEL, "1.1.0", VARIANT, keys)
    finally:
        fs.close()


def test_a_sync_with_nothing_new_waits_for_no_commit_on_postgresql(fleet_rig: Rig, tmp_path: Path) -> None:
    """The leader's round pushes the director's roots every time; when the store has them all it takes no exclusive
    lock, so it never waits behind a commit holding the roots lock shared (nor makes later commits queue behind it)."""
    import threading

    import psycopg
    from conftest import fresh_postgres

    from fleet.store.director import ROOTS_LOCK

    with fresh_postgres() as url:
        fs = FleetStore(url)
        holder = psycopg.connect(url)
        try:
            a = _leading(tmp_path / "a", fleet_rig.keys, fs)
            holder.execute("SELECT pg_advisory_xact_lock_shared(%s)", [ROOTS_LOCK])  # a commit in progress
            done = threading.Event()
            worker = threading.Thread(target=lambda: (a.sync(), done.set()), daemon=True)
            worker.start()
            assert done.wait(5), "a sync with nothing new waited for the shared roots lock"
        finally:
            holder.rollback()
            holder.close()
            fs.close()


def test_a_step_of_the_leaders_round_that_fails_holds_up_none_of_the_others(
    fleet_rig: Rig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The image's timestamp key was rotated on another host (this controller's copy is retired): the round logs the
    image step's `UntrustedSigningKey` and still re-signs the director's devices and prunes telemetry."""
    import logging
    from datetime import timedelta

    from fleet.controller import Controller
    from fleet.tuf.image_repo import Expiry, ImageRepository

    rig, device = fleet_rig, "round-1"
    root = tmp_path / "root"
    copy_tree(rig.serve, root)
    keys, elsewhere = _copy_keys(rig.keys.directory, tmp_path / "keys"), _copy_keys(rig.keys.directory, tmp_path / "elsewhere")
    ImageRepository(root / "image").rotate_key(elsewhere, "timestamp")
    c = Controller(root, keys, rig.broker.host, rig.broker.port, store=tmp_path / "fleet.db")
    try:
        c.director.sync()
        c.director.assign(device, c.image, MODEL, "1.0.0", VARIANT, keys)
        c.image.expiry = Expiry(timestamp=timedelta(days=3650))  # every timestamp is past half of that: re-sign
        c.director.timestamp_expiry = timedelta(days=3650)
        signed = c.director.timestamps([device])[device]
        image_timestamp = (root / "image" / "metadata" / "timestamp.json").read_bytes()
        with caplog.at_level(logging.ERROR, logger="fleet.controller"):
            c._round()
        assert c.director.timestamps([device])[device] != signed  # re-signed after the image step failed
        assert (root / "image" / "metadata" / "timestamp.json").read_bytes() == image_timestamp
        failed = [r.getMessage() for r in caplog.records if "controller.round_failed" in r.getMessage()]
        assert len(failed) == 1 and "step=image_refresh" in failed[0] and "UntrustedSigningKey" in failed[0], failed
    finally:
        if c.store is not None:
            c.store.close()


def test_a_refresh_on_the_store_re_signs_every_device_past_a_broken_one(fleet_rig: Rig, store_location: Path | str, tmp_path: Path) -> None:
    """On SQLite and PostgreSQL: one device whose repository in the store lost the snapshot its timestamp names does not
    hold up the others' re-signing (each moves one version on); its own error is raised afterwards, naming it."""
    from fleet.tuf.director import AssignError, Assignment

    fs = FleetStore(store_location)
    try:
        a = _leading(tmp_path / "a", fleet_rig.keys, fs)
        devices = ["ok-1", "broken-1", "ok-2"]
        assert not [
            r
            for r in a.assign_many([Assignment(d, MODEL, "1.0.0", VARIANT) for d in devices], fleet_rig.image, fleet_rig.keys).values()
            if isinstance(r, Exception)
        ]
        fs.db.execute("DELETE FROM director_metadata WHERE device = ? AND name = ?", ["broken-1", "1.snapshot.json"])
        before = fs.director_versions()
        with pytest.raises(AssignError, match=r"broken-1 lacks 1\.snapshot\.json"):
            a.refresh(fleet_rig.keys)
        after = fs.director_versions()
        assert (after["ok-1"], after["ok-2"], after["broken-1"]) == (before["ok-1"] + 1, before["ok-2"] + 1, before["broken-1"])
    finally:
        fs.close()


def test_an_assignment_that_loses_a_race_with_another_writer_is_signed_again_from_the_new_listing(
    fleet_rig: Rig, store_location: Path | str, tmp_path: Path
) -> None:
    """On SQLite and PostgreSQL: another director commits a device right after this one listed it (a controller's
    re-signing, a command with --store); this one's commit is refused as stale, listed and signed again, and its
    assignment is what the store ends with, one version above the other writer's."""
    from fleet.tuf.director import Assignment

    class RacedStore(FleetStore):
        """The real store; the first listing of the device lets the other writer commit before the caller signs."""

        other: Director | None = None

        def director_listing(self, devices: Sequence[str]) -> dict[str, dict[str, int]]:
            listing = super().director_listing(devices)
            other, self.other = self.other, None
            if other is not None:
                other.assign("race-1", fleet_rig.image, MODEL, "1.1.0", VARIANT, fleet_rig.keys)
            return listing

    fs = RacedStore(store_location)
    try:
        a = _leading(tmp_path / "a", fleet_rig.keys, fs)
        a.assign("race-1", fleet_rig.image, MODEL, "1.0.0", VARIANT, fleet_rig.keys)
        fs.other = Director(tmp_path / "b", store=fs)
        fs.other.sync()
        done = a.assign_many([Assignment("race-1", MODEL, "1.0.0", VARIANT)], fleet_rig.image, fleet_rig.keys)
        assert not isinstance(done["race-1"], Exception), done
        assert fs.other is None and fs.director_versions()["race-1"] == 3  # 1: a's first, 2: the other's, 3: a's again
        md = a.committed_targets("race-1")
        assert md is not None and [t.unrecognized_fields["custom"]["version"] for t in md.signed.targets.values()] == ["1.0.0"]
    finally:
        fs.close()


def test_a_second_controller_with_the_id_of_a_running_one_is_refused(fleet_rig: Rig, tmp_path: Path) -> None:
    """Two with one id would take one ingest session from each other in turn: the second is refused, naming the id; the
    default id (host name and a hash of ROOT) differs between ROOTs and is the same for one ROOT."""
    from fleet.controller import Controller, ControllerIdInUse, default_controller_id

    rig, db = fleet_rig, tmp_path / "fleet.db"
    assert default_controller_id(rig.serve) == default_controller_id(rig.serve) != default_controller_id(tmp_path)
    made: list[Controller] = []
    try:
        made.append(Controller(rig.serve, rig.keys, rig.broker.host, rig.broker.port, store=db))
        with pytest.raises(ControllerIdInUse, match=default_controller_id(rig.serve)):
            Controller(rig.serve, rig.keys, rig.broker.host, rig.broker.port, store=db)
        made.append(Controller(rig.serve, rig.keys, rig.broker.host, rig.broker.port, store=db, controller_id="other"))
        assert {c["id"] for c in made[0].store.controllers()} == {default_controller_id(rig.serve), "other"}  # type: ignore[union-attr]
    finally:
        for c in made:  # never started: the id lock and the store are all they hold
            assert c.identity is not None and c.store is not None
            c.identity.release()
            c.store.close()
