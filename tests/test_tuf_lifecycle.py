"""The TUF lifecycle: key rotation for every role, release revocation, atomic director commits, pruning.

Real keys, real signatures, the real python-tuf client; the agent tests run the real ``Agent`` against mosquitto
and the repository server. Crashes are real ``kill -9``s of a ``fleet`` process at a chosen ``os.replace``.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ModelFiles
from tuf.api.metadata import Metadata
from update_rig import MODEL, VARIANT, Rig, Subscriber, wait_for

from agent.daemon import Agent
from agent.hardware import HardwareProfile, detect
from agent.update.fetch import DirectoryFetcher
from agent.update.verify import Installed, TrustedRepos, UpdateRejected, VerifiedUpdate, check_for_update
from agent.wire import WireError, device_topic
from converters.build import build
from fleet.dev import hardware_trees
from fleet.tuf.director import AssignError, Assignment, Director
from fleet.tuf.image_repo import ImageRepository, ReleaseError, ReleaseRevoked
from fleet.tuf.keys import KeyError_, KeyStore, UntrustedSigningKey, init_keys
from fleet.tuf.lifecycle import rotate
from fleet.tuf.metadata import RotationError, metadata_versions

CLI = [sys.executable, "-m", "fleet.cli"]


# -- a small fleet checked by the real python-tuf client (no broker) -------------------------------------------


class Fleet:
    def __init__(self, root: Path, models: ModelFiles) -> None:
        self.root = root
        self.keys = init_keys(root / "keys")
        self.image = ImageRepository.create(root / "serve" / "image", self.keys)
        self.director = Director.create(root / "serve" / "director", self.keys)
        for version in ("1.0.0", "1.1.0", "1.2.0"):
            self.image.release(self.bundle(models, version), self.keys)

    def bundle(self, models: ModelFiles, version: str) -> Path:
        out = self.root / f"tiny-{version}"
        if not out.exists():
            build(models.path("tiny.onnx"), "tiny", version, out, variants=["onnx-fp32"])
        return out

    def device(self, name: str) -> TrustedRepos:
        """A device that was shipped the first roots and has kept its trusted metadata since (as a real one does)."""
        d = self.root / "devices" / name
        for sub in ("image", "director"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        if not (d / "image" / "root.json").exists():
            shutil.copy(self.image.metadata / "1.root.json", d / "image" / "root.json")
            shutil.copy(self.director.directory / "1.root.json", d / "director" / "root.json")
        image_url, director_url = "repo://image/", f"repo://director/{name}/"
        return TrustedRepos(
            d / "image",
            d / "director",
            image_url,
            director_url,
            DirectoryFetcher(self.root / "serve" / "image", image_url),
            DirectoryFetcher(self.root / "serve" / "director" / name, director_url),
            d / "downloads",
        )

    def check(self, device: str, installed: dict[str, Installed] | None = None) -> VerifiedUpdate | None:
        return check_for_update(self.device(device), installed or {}, profile(self.root))


def profile(root: Path) -> HardwareProfile:
    return detect(hardware_trees.plain_x86(root / "hw"))


@pytest.fixture
def fleet(tmp_path: Path, models: ModelFiles) -> Fleet:
    return Fleet(tmp_path, models)


def _retired_copy(keys: KeyStore, dest: Path) -> KeyStore:
    """A copy of the key store as it is now: after a rotation, its keys of the rotated role are the retired ones."""
    shutil.copytree(keys.directory, dest)
    return KeyStore(dest)


def _forger(current: KeyStore, retired: KeyStore, role: str, dest: Path) -> KeyStore:
    """Today's keys, except ``role`` signs with its retired key: what a thief of the old key can sign."""
    shutil.copytree(current.directory, dest)
    for pem in retired.directory.glob(f"{role}-*.pem"):
        shutil.copy(pem, dest / pem.name)
    forged = KeyStore(dest)
    forged.set_role(role, retired.signers(role), retired.threshold(role))
    return forged


def test_every_role_rotates_and_a_device_follows(fleet: Fleet, tmp_path: Path) -> None:
    fleet.director.assign("dev-1", fleet.image, "tiny", "1.0.0", "onnx-fp32", fleet.keys)
    assert fleet.check("dev-1") is not None  # the device trusts roots v1 and today's keys
    versions = iter(["1.1.0", "1.2.0", "1.1.0", "1.2.0", "1.1.0"])
    for role in ("director", "snapshot", "timestamp", "targets", "root"):
        old_ids = {k.keyid for k in fleet.keys.public_keys(role)}
        r = rotate(role, fleet.keys, fleet.image, fleet.director)
        assert set(r.keyids).isdisjoint(old_ids) and len(r.keyids) == 1
        assert not any((fleet.keys.directory / f"{role}-{k[:16]}.pem").exists() for k in old_ids)  # retired: private keys gone
        named = fleet.director.root() if role == "director" else fleet.image.root()
        assert set(named.signed.roles["targets" if role == "director" else role].keyids) == set(r.keyids)
        version = next(versions)
        fleet.director.assign("dev-1", fleet.image, "tiny", version, "onnx-fp32", fleet.keys)
        upd = fleet.check("dev-1")
        assert upd is not None and upd.version == version, role
    device = fleet.device("dev-1")
    assert Metadata.from_file(str(device.image_dir / "root.json")).signed.version == 5  # snapshot, timestamp, targets, root
    assert Metadata.from_file(str(device.director_dir / "root.json")).signed.version == 3  # director, root
    # a device shipped with the first roots (v1) walks the whole chain too
    fleet.director.assign("dev-fresh", fleet.image, "tiny", "1.2.0", "onnx-fp32", fleet.keys)
    fresh = fleet.check("dev-fresh")
    assert fresh is not None and fresh.version == "1.2.0"


@pytest.mark.parametrize("role", ["director", "snapshot", "timestamp", "targets"])
def test_metadata_signed_with_a_retired_key_is_refused(fleet: Fleet, tmp_path: Path, role: str) -> None:
    fleet.director.assign("dev-1", fleet.image, "tiny", "1.0.0", "onnx-fp32", fleet.keys)
    assert fleet.check("dev-1") is not None
    before = _retired_copy(fleet.keys, tmp_path / "before")
    rotate(role, fleet.keys, fleet.image, fleet.director)
    assert fleet.check("dev-1") is not None  # rotated: the device follows
    forged = _forger(fleet.keys, before, role, tmp_path / "forged")
    _plant_forged(forged, role, fleet.director, fleet.image, ("dev-1", "tiny", "1.1.0", "onnx-fp32"), tmp_path / "thief")
    with pytest.raises(UpdateRejected, match="UnsignedMetadataError"):
        fleet.check("dev-1")
    # today's keys sign again: the device moves on
    fleet.image._publish(fleet.image.targets(), fleet.keys)
    fleet.director.assign("dev-1", fleet.image, "tiny", "1.2.0", "onnx-fp32", fleet.keys)
    upd = fleet.check("dev-1")
    assert upd is not None and upd.version == "1.2.0"


def _plant_forged(keys: KeyStore, role: str, director: Director, image: ImageRepository, assignment: tuple[str, ...], thief: Path) -> None:
    """What a thief of ``role``'s retired key does: our own signing refuses that key (nothing changes), so it signs
    on a copy of both repositories from which the rotation's root is gone and puts what it signed where devices
    fetch. ``assignment``: (device, model, version, variant) the director signs."""
    device = assignment[0]
    served = director.device_metadata(device) if role == "director" else image.metadata
    committed = (served / "timestamp.json").read_bytes()
    with pytest.raises(UntrustedSigningKey, match=f"other {role} keys"):
        _sign_with(keys, role, director, image, assignment)
    assert (served / "timestamp.json").read_bytes() == committed
    shutil.copytree(director.directory, thief / "director")
    shutil.copytree(image.directory, thief / "image")
    roots = thief / "director" if role == "director" else thief / "image" / "metadata"
    (roots / f"{metadata_versions(roots, 'root')[-1]}.root.json").unlink()
    _sign_with(keys, role, Director(thief / "director"), ImageRepository(thief / "image"), assignment)
    signed = roots / device / "metadata" if role == "director" else roots
    for f in signed.glob("*.json"):
        if not f.name.endswith(".root.json"):
            shutil.copy(f, served / f.name)


def _sign_with(keys: KeyStore, role: str, director: Director, image: ImageRepository, assignment: tuple[str, ...]) -> None:
    """Sign what ``role`` signs with ``keys``: the director an assignment, the image its targets or snapshot and timestamp."""
    if role == "director":
        director.assign(assignment[0], image, *assignment[1:4], keys)
    elif role == "targets":
        image._publish(image.targets(), keys)
    else:
        image.refresh(keys)


def test_rotating_a_stolen_director_key_recovers_a_fast_forwarded_device(fleet: Fleet, tmp_path: Path) -> None:
    """A thief of the director key serves a device metadata with huge versions (through a broker it controls): the
    device then refuses every honest version as a rollback — until the key is rotated, when python-tuf drops the
    local metadata the new root no longer trusts and takes the honest versions again."""
    fleet.director.assign("dev-1", fleet.image, "tiny", "1.0.0", "onnx-fp32", fleet.keys)
    assert fleet.check("dev-1") is not None
    thief_dir = tmp_path / "thief"
    shutil.copytree(fleet.director.device_metadata("dev-1"), thief_dir / "dev-1" / "metadata")
    shutil.copy(fleet.director.directory / "1.root.json", thief_dir)  # the director's root, as a thief copies it
    (thief_dir / "dev-1" / "metadata" / "999.targets.json").touch()  # its versions go above 999
    (thief_dir / "dev-1" / "metadata" / "999.snapshot.json").touch()
    ts = Metadata.from_file(str(thief_dir / "dev-1" / "metadata" / "timestamp.json"))
    ts.signed.version = 999
    ts.to_file(str(thief_dir / "dev-1" / "metadata" / "timestamp.json"))  # only read for its version, re-signed below
    thief = Director(thief_dir)
    md = thief.committed_targets("dev-1")
    assert md is not None
    thief._publish("dev-1", md, fleet.keys)  # signed with the (stolen) director key
    honest = fleet.device("dev-1")
    via_thief = TrustedRepos(
        honest.image_dir,
        honest.director_dir,
        honest.image_url,
        honest.director_url,
        honest.image_fetcher,
        DirectoryFetcher(thief_dir / "dev-1", honest.director_url),
        honest.downloads,
    )
    assert check_for_update(via_thief, {}, profile(fleet.root)) is not None  # the device took versions 1000
    assert Metadata.from_file(str(honest.director_dir / "targets.json")).signed.version == 1000
    assert Metadata.from_file(str(honest.director_dir / "timestamp.json")).signed.version == 1000
    fleet.director.assign("dev-1", fleet.image, "tiny", "1.1.0", "onnx-fp32", fleet.keys)
    with pytest.raises(UpdateRejected, match="BadVersionNumberError"):
        fleet.check("dev-1")  # honest versions look like a rollback now
    rotate("director", fleet.keys, director=fleet.director)
    upd = fleet.check("dev-1")
    assert upd is not None and upd.version == "1.1.0"
    assert Metadata.from_file(str(honest.director_dir / "targets.json")).signed.version < 1000


def test_rotation_refusals_change_nothing(fleet: Fleet) -> None:
    def state() -> tuple[str, list[str], list[str], list[str]]:
        return (
            (fleet.keys.directory / "keys.json").read_text(),
            sorted(p.name for p in fleet.keys.directory.glob("*.pem")),
            sorted(p.name for p in fleet.image.metadata.iterdir()),
            sorted(p.name for p in fleet.director.directory.glob("*.root.json")),
        )

    before = state()
    with pytest.raises(RotationError, match="threshold 2 needs at least that many new keys"):
        rotate("snapshot", fleet.keys, fleet.image, new_keys=1, threshold=2)
    with pytest.raises(RotationError, match="needs the director repository"):
        rotate("director", fleet.keys, fleet.image)
    with pytest.raises(RotationError, match="needs the image repository"):
        rotate("timestamp", fleet.keys, director=fleet.director)
    with pytest.raises(RotationError, match="unknown role"):
        rotate("mirror", fleet.keys, fleet.image)
    with pytest.raises(RotationError, match="a director shares the root keys"):  # it could never be re-signed after
        rotate("root", fleet.keys, fleet.image)
    assert state() == before
    offline = fleet.root / "offline"
    offline.mkdir()
    for pem in fleet.keys.directory.glob("root-*.pem"):  # the root keys kept offline, as they should be
        shutil.move(pem, offline / pem.name)
    before = state()
    for role in ("director", "timestamp"):
        with pytest.raises(KeyError_, match="no private root key"):
            rotate(role, fleet.keys, fleet.image, fleet.director)
    assert state() == before


def test_rotation_with_a_threshold_of_new_keys(fleet: Fleet) -> None:
    fleet.director.assign("dev-1", fleet.image, "tiny", "1.0.0", "onnx-fp32", fleet.keys)
    r = rotate("director", fleet.keys, director=fleet.director, new_keys=2, threshold=2)
    assert len(r.keyids) == 2 and fleet.keys.threshold("director") == 2
    fleet.director.assign("dev-1", fleet.image, "tiny", "1.1.0", "onnx-fp32", fleet.keys)
    upd = fleet.check("dev-1")
    assert upd is not None and upd.version == "1.1.0"
    # one of the two keys is not enough
    meta = fleet.director.device_metadata("dev-1")
    ts = Metadata.from_file(str(meta / "timestamp.json"))
    del ts.signatures[next(iter(ts.signatures))]
    ts.signed.version += 1
    ts.to_file(str(meta / "timestamp.json"))
    with pytest.raises(UpdateRejected, match="UnsignedMetadataError"):
        fleet.check("dev-1")


# -- revocation ----------------------------------------------------------------------------------------------


def test_a_revoked_release_is_unlisted_and_refused_everywhere(fleet: Fleet, models: ModelFiles, tmp_path: Path) -> None:
    fleet.director.assign("dev-1", fleet.image, "tiny", "1.2.0", "onnx-fp32", fleet.keys)
    running = fleet.check("dev-1")
    assert running is not None
    revoked = fleet.image.revoke("tiny", "1.2.0", fleet.keys, reason="wrong calibration")
    assert revoked.release_counter == 3 and fleet.image.release_of("tiny", "1.2.0") is None
    assert [r["version"] for r in fleet.image.revoked()] == ["1.2.0"]
    assert not (fleet.image.targets_dir / "tiny" / "1.2.0").exists()  # nobody can fetch the bytes any more
    assert fleet.director.assigned("tiny", "1.2.0") == ["dev-1"]
    # the device runs it: it keeps running it (nothing to install) but each check is refused, naming the revocation
    with pytest.raises(UpdateRejected, match=r"does not have; the image repository revoked tiny 1\.2\.0 .*: wrong calibration"):
        fleet.check("dev-1", {"tiny": Installed(3, running.sha256)})
    fleet.director.refresh(fleet.keys)  # the routine re-signing keeps the stale assignment: still refused
    with pytest.raises(UpdateRejected, match=r"revoked tiny 1\.2\.0"):
        fleet.check("dev-1", {"tiny": Installed(3, running.sha256)})
    # a device that never had it: refused likewise, so a stale (or forged) director assignment installs nothing
    fleet.director.assign("dev-2", fleet.image, "tiny", "1.1.0", "onnx-fp32", fleet.keys)
    _forge_assignment(fleet, "dev-2", running)
    with pytest.raises(UpdateRejected, match=r"revoked tiny 1\.2\.0"):
        fleet.check("dev-2")
    # the controller refuses it with one clear error
    with pytest.raises(ReleaseRevoked, match=r"tiny 1\.2\.0 was revoked at .*: wrong calibration; release a new version"):
        fleet.director.assign("dev-1", fleet.image, "tiny", "1.2.0", "onnx-fp32", fleet.keys)
    with pytest.raises(ReleaseRevoked):
        fleet.image.release(fleet.bundle(models, "1.2.0"), fleet.keys)
    with pytest.raises(ReleaseRevoked):
        fleet.image.revoke("tiny", "1.2.0", fleet.keys)
    with pytest.raises(ReleaseError, match="not in the image repository"):
        fleet.image.revoke("tiny", "9.9.9", fleet.keys)
    # the next release gets a counter above the revoked one: devices that ran it accept it
    nxt = fleet.image.release(fleet.bundle(models, "1.3.0"), fleet.keys)
    assert nxt.release_counter == 4
    fleet.director.assign("dev-1", fleet.image, "tiny", "1.3.0", "onnx-fp32", fleet.keys)
    upd = fleet.check("dev-1", {"tiny": Installed(3, running.sha256)})
    assert upd is not None and upd.version == "1.3.0"
    # the record survives later publications (a rotation re-signs the same targets)
    rotate("targets", fleet.keys, fleet.image)
    assert [r["version"] for r in fleet.image.revoked()] == ["1.2.0"]


def _forge_assignment(fleet: Fleet, device: str, target: VerifiedUpdate) -> None:
    """The director (its key, or an old assignment) names the revoked release for a device that never ran it."""
    meta = fleet.director.device_metadata(device)
    md = fleet.director.committed_targets(meta.parent.name)
    assert md is not None
    tf = next(iter(md.signed.targets.values()))
    md.signed.targets = {target.target_path: tf}
    tf.path, tf.length, tf.hashes = target.target_path, target.length, {"sha256": target.sha256}
    tf.unrecognized_fields["custom"].update(version=target.version, release_counter=target.release_counter)
    fleet.director._publish(meta.parent.name, md, fleet.keys)


def test_cli_rotate_revoke_and_refusals(fleet: Fleet, tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120)

    keys, repo, director = str(fleet.keys.directory), str(fleet.image.directory), str(fleet.director.directory)
    fleet.director.assign("dev-1", fleet.image, "tiny", "1.1.0", "onnx-fp32", fleet.keys)
    for role, where in (("director", ["--director", director]), ("timestamp", ["--repo", repo]), ("targets", ["--repo", repo])):
        done = run("keys", "rotate", role, "--keys", keys, *where)
        assert done.returncode == 0 and f"{role}: 1 new key(s)" in done.stderr and "root version" in done.stderr, done.stderr
    assert "move the new targets private key(s) offline" in done.stderr
    done = run("keys", "rotate", "snapshot", "--keys", keys)
    assert done.returncode == 1 and "error[bad_rotation]" in done.stderr and "--repo" in done.stderr
    done = run("keys", "rotate", "mirror", "--keys", keys)
    assert done.returncode == 2 and "Invalid value" in done.stderr
    fleet.director.assign("dev-1", fleet.image, "tiny", "1.2.0", "onnx-fp32", fleet.keys)
    upd = fleet.check("dev-1")
    assert upd is not None and upd.version == "1.2.0"

    done = run("release", "revoke", "tiny", "1.2.0", "--repo", repo, "--keys", keys, "--reason", "bad", "--director", director)
    assert done.returncode == 0 and "revoked tiny 1.2.0 (release_counter 3)" in done.stderr, done.stderr
    assert "1 device(s) still assigned to it" in done.stderr and "dev-1" in done.stderr
    done = run("assign", "dev-1", "tiny", "1.2.0", "--variant", "onnx-fp32", "--repo", repo, "--director", director, "--keys", keys)
    assert done.returncode == 1 and "error[revoked]: tiny 1.2.0 was revoked" in done.stderr, done.stderr
    done = run("rollout", "start", "tiny", "1.2.0", "--repo", repo, "--store", str(tmp_path / "fleet.db"))
    assert done.returncode == 1 and "error[revoked]" in done.stderr, done.stderr
    done = run("release", "revoke", "tiny", "7.0.0", "--repo", repo, "--keys", keys)
    assert done.returncode == 1 and "error[bad_release]" in done.stderr
    done = run("release", "--help")
    assert done.returncode == 0 and "revoke" in done.stdout and "add" in done.stdout


# -- crashes: an assignment or a release is committed whole or not at all -------------------------------------

_KILL_AT_REPLACE = """
import os, signal, sys
n, calls, real = int(sys.argv[1]), [0], os.replace
def replace(src, dst, **kw):
    calls[0] += 1
    if calls[0] == n and os.path.basename(str(dst)).endswith(".json"):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst, **kw)
os.replace = replace
sys.argv = ["fleet", *sys.argv[2:]]
from fleet.cli import main
main()
"""


def _killed(at: int, *args: str) -> subprocess.CompletedProcess[str]:
    """``fleet ARGS`` killed with SIGKILL at its ``at``-th ``os.replace`` (just before that rename)."""
    return subprocess.run([sys.executable, "-c", _KILL_AT_REPLACE, str(at), *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("at", [1, 2, 3])
def test_an_assign_killed_midway_is_never_published(fleet: Fleet, at: int) -> None:
    fleet.director.assign("dev-1", fleet.image, "tiny", "1.0.0", "onnx-fp32", fleet.keys)
    meta = fleet.director.device_metadata("dev-1")
    common = ["--repo", str(fleet.image.directory), "--director", str(fleet.director.directory), "--keys", str(fleet.keys.directory)]
    done = _killed(at, "assign", "dev-1", "tiny", "1.1.0", "--variant", "onnx-fp32", *common)
    assert done.returncode == -signal.SIGKILL, done.stderr
    leftovers = list(meta.glob(".*.tmp"))
    assert leftovers  # a real crash: the staged files stay behind
    upd = fleet.check("dev-1")
    assert upd is not None and upd.version == "1.0.0"  # the device is told the old assignment
    fleet.director.refresh(fleet.keys)  # the controller's routine re-signing publishes the committed one only
    upd = fleet.check("dev-1")
    assert upd is not None and upd.version == "1.0.0"
    assert not list(meta.glob(".*.tmp"))  # and the publication cleaned up after the crash
    assert len(metadata_versions(meta, "targets")) <= fleet.director.keep_versions
    fleet.director.assign("dev-1", fleet.image, "tiny", "1.1.0", "onnx-fp32", fleet.keys)  # done again, it goes through
    upd = fleet.check("dev-1")
    assert upd is not None and upd.version == "1.1.0"


def test_an_exception_between_the_renames_leaves_the_old_assignment(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same in-process: a failing rename (a full disk, EIO) on the second of the three."""
    import os

    fleet.director.assign("dev-1", fleet.image, "tiny", "1.0.0", "onnx-fp32", fleet.keys)
    real, calls = os.replace, []

    def replace(src: Any, dst: Any) -> None:
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="No space left"):
        fleet.director.assign("dev-1", fleet.image, "tiny", "1.1.0", "onnx-fp32", fleet.keys)
    monkeypatch.undo()
    assert [Path(c).name for c in calls] == ["2.targets.json", "2.snapshot.json"]
    fleet.director.refresh(fleet.keys)
    upd = fleet.check("dev-1")
    assert upd is not None and upd.version == "1.0.0"


def test_a_batch_assign_verifies_as_one_by_one_and_a_bad_device_fails_alone(fleet: Fleet) -> None:
    """``assign_many``: new and existing devices, one with a bad id and one on a version never released, in one batch;
    each good device's metadata verifies through the agent's python-tuf client exactly as after ``assign``."""
    fleet.director.assign("old-1", fleet.image, "tiny", "1.0.0", "onnx-fp32", fleet.keys)
    batch = [
        Assignment("old-1", "tiny", "1.1.0", "onnx-fp32"),
        Assignment("new-1", "tiny", "1.2.0", "onnx-fp32"),
        Assignment("bad/../id", "tiny", "1.1.0", "onnx-fp32"),
        Assignment("new-2", "tiny", "9.9.9", "onnx-fp32"),
        Assignment("new-3", "tiny", "1.1.0", "onnx-fp32", shadow=("1.2.0", "onnx-fp32")),
    ]
    results = fleet.director.assign_many(batch, fleet.image, fleet.keys)
    assert isinstance(results["bad/../id"], WireError) and isinstance(results["new-2"], AssignError)
    assert not (fleet.director.directory / "new-2" / "metadata" / "timestamp.json").exists()
    for device, version in (("old-1", "1.1.0"), ("new-1", "1.2.0"), ("new-3", "1.1.0")):
        upd = fleet.check(device)
        assert upd is not None and upd.version == version, device
    one = fleet.director.committed_targets("new-3")
    assert one is not None and [t.unrecognized_fields["custom"].get("shadow", False) for t in one.signed.targets.values()] == [False, True]
    fleet.director.assign("new-1", fleet.image, "tiny", "1.1.0", "onnx-fp32", fleet.keys)  # one by one goes on from there
    upd = fleet.check("new-1")
    assert upd is not None and upd.version == "1.1.0"


def test_a_batch_renames_each_timestamp_only_after_what_it_names_is_durable(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    """The crash-safety order of ``commit_batch``, observed on the real calls: every file written, one filesystem sync;
    the numbered files renamed, a sync; the timestamps renamed (each device's last), a sync before returning."""
    import os

    from fleet.tuf import metadata

    fleet.director.assign("dev-0", fleet.image, "tiny", "1.0.0", "onnx-fp32", fleet.keys)
    events: list[str] = []
    real_replace, real_sync = os.replace, metadata._syncfs
    assert real_sync is not None  # Linux: one syncfs per step

    def replace(src: Any, dst: Any) -> None:
        events.append(Path(dst).name)
        real_replace(src, dst)

    def sync(fd: int) -> int:
        events.append("sync")
        return real_sync(fd)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(metadata, "_syncfs", sync)
    devices = ["dev-0", "dev-1", "dev-2"]
    results = fleet.director.assign_many([Assignment(d, "tiny", "1.1.0", "onnx-fp32") for d in devices], fleet.image, fleet.keys)
    monkeypatch.undo()
    assert not any(isinstance(r, Exception) for r in results.values())
    syncs = [i for i, e in enumerate(events) if e == "sync"]
    stamps = [i for i, e in enumerate(events) if e == "timestamp.json"]
    numbered = [i for i, e in enumerate(events) if e not in ("sync", "timestamp.json")]
    assert len(syncs) == 3 and syncs[0] == 0 and syncs[-1] == len(events) - 1
    assert len(stamps) == 3 and max(numbered) < syncs[1] < min(stamps)
    assert {e for e in events if e.endswith(".root.json")} == {"1.root.json"}  # the new devices got the root chain
    for d in devices:
        upd = fleet.check(d)
        assert upd is not None and upd.version == "1.1.0"


_KILL_BATCH_AT_REPLACE = """
import os, signal, sys
from pathlib import Path
n, calls, real = int(sys.argv[1]), [0], os.replace
def replace(src, dst, **kw):
    calls[0] += 1
    if calls[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst, **kw)
os.replace = replace
from fleet.tuf.director import Assignment, Director
from fleet.tuf.image_repo import ImageRepository
from fleet.tuf.keys import KeyStore
root = Path(sys.argv[2])
batch = [Assignment(f"dev-{i}", "tiny", "1.1.0", "onnx-fp32") for i in range(3)]
Director(root / "serve" / "director").assign_many(batch, ImageRepository(root / "serve" / "image"), KeyStore(root / "keys"))
"""


@pytest.mark.parametrize("at", [1, 6, 7, 8, 9])  # 1-6: the numbered files of three devices; 7-9: their timestamps
def test_a_batch_assign_killed_midway_leaves_each_device_old_or_new(fleet: Fleet, at: int) -> None:
    for i in range(3):
        fleet.director.assign(f"dev-{i}", fleet.image, "tiny", "1.0.0", "onnx-fp32", fleet.keys)
    cmd = [sys.executable, "-c", _KILL_BATCH_AT_REPLACE, str(at), str(fleet.root)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    committed = max(0, at - 7)  # the timestamps renamed before the kill
    for i in range(3):
        upd = fleet.check(f"dev-{i}")
        assert upd is not None and upd.version == ("1.1.0" if i < committed else "1.0.0"), (at, i)
    fleet.director.refresh(fleet.keys)  # the routine re-signing publishes the committed ones and cleans up
    assert not list(fleet.director.directory.glob("*/metadata/.*.tmp"))
    for i in range(3):
        upd = fleet.check(f"dev-{i}")
        assert upd is not None and upd.version == ("1.1.0" if i < committed else "1.0.0"), (at, i)


@pytest.mark.parametrize("at", [3, 4, 5])  # 1, 2: the variant's tar and chunk list; 3-5: targets, snapshot, timestamp
def test_a_release_killed_midway_is_never_published(fleet: Fleet, models: ModelFiles, at: int) -> None:
    bundle = fleet.bundle(models, "2.0.0")
    done = _killed(at, "release", str(bundle), "--repo", str(fleet.image.directory), "--keys", str(fleet.keys.directory))
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert fleet.image.release_of("tiny", "2.0.0") is None
    fleet.image.refresh(fleet.keys)
    assert fleet.image.release_of("tiny", "2.0.0") is None
    with pytest.raises(AssignError, match="not in the image repository"):
        fleet.director.assign("dev-1", fleet.image, "tiny", "2.0.0", "onnx-fp32", fleet.keys)
    assert fleet.image.release(bundle, fleet.keys).release_counter == 4  # done again, it goes through


# -- pruning ---------------------------------------------------------------------------------------------------


def test_old_versions_are_pruned_and_roots_never(fleet: Fleet) -> None:
    meta = fleet.director.device_metadata("dev-1")
    for i in range(8):
        fleet.director.assign("dev-1", fleet.image, "tiny", ("1.0.0", "1.1.0")[i % 2], "onnx-fp32", fleet.keys)
        if i == 3:
            fleet.image.rotate_root(fleet.keys, director=fleet.director)
            rotate("director", fleet.keys, director=fleet.director)
    assert metadata_versions(meta, "targets") == [7, 8, 9]  # 8 assignments + the rotation's re-signing
    assert metadata_versions(meta, "snapshot") == [7, 8, 9]
    assert metadata_versions(meta, "root") == [1, 2, 3]  # the whole chain, for devices shipped with root v1
    for _ in range(5):
        fleet.image.refresh(fleet.keys)
    assert len(metadata_versions(fleet.image.metadata, "snapshot")) == 3
    assert len(metadata_versions(fleet.image.metadata, "targets")) == 3  # create + 3 releases: 4 versions, 3 kept
    assert metadata_versions(fleet.image.metadata, "root") == [1, 2]
    upd = fleet.check("dev-1")  # a device shipped with roots v1 still walks both chains
    assert upd is not None and upd.version == "1.1.0"
    keep_one = Director(fleet.director.directory, keep_versions=1)
    keep_one.refresh(fleet.keys, ["dev-1"])
    assert metadata_versions(meta, "targets") == [10] and metadata_versions(meta, "snapshot") == [10]
    assert fleet.check("dev-1") is not None
    with pytest.raises(ValueError, match="keep_versions"):
        ImageRepository(fleet.image.directory, keep_versions=0)


# -- with the real agent -----------------------------------------------------------------------------------------


class Jobs(Subscriber):
    made = 0

    def __init__(self, rig: Rig, device: str) -> None:
        Jobs.made += 1  # a client id of its own: a second watcher of one device must not take the first one's session
        super().__init__(rig.broker, [device_topic(device, "jobs", "#")], f"lifecycle-watch-{device}-{Jobs.made}")

    def rejected(self) -> list[str]:
        return [m.get("reason", "") for m in self.json() if m.get("state") == "REJECTED"]


class Agents:
    """Real agents (the daemon class, in this process) and their job watchers; whatever runs at the end is stopped."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.running: list[tuple[Agent, Jobs]] = []

    def start(self, device: str) -> tuple[Agent, Jobs]:
        jobs = Jobs(self.rig, device)
        agent = Agent(self.rig.settings(device, min_check_interval_s=0.1)).start()
        assert agent.wait_connected()
        self.running.append((agent, jobs))
        return agent, jobs

    def stop(self, agent: Agent) -> None:
        for pair in [p for p in self.running if p[0] is agent]:
            self.running.remove(pair)
            pair[0].stop()
            pair[1].close()


@pytest.fixture
def agents(rig: Rig) -> Iterator[Agents]:
    a = Agents(rig)
    yield a
    for agent, _ in list(a.running):
        a.stop(agent)


def serving(agent: Agent, version: str | None) -> bool:
    m = agent.host.get(MODEL)
    return (m.version if m is not None else None) == version


def _refused(agent: Agent, jobs: Jobs, what: str) -> str:
    """Ask the agent to check now; the reason of the refusal it then reports."""
    seen = len(jobs.rejected())
    agent.check_now()
    return str(wait_for(lambda: jobs.rejected()[seen:] and jobs.rejected()[-1], 30, what))


def test_a_running_agent_follows_every_rotation_and_refuses_retired_keys(rig: Rig, agents: Agents, tmp_path: Path) -> None:
    agent, jobs = agents.start("dev-rot")
    rig.assign("dev-rot", "1.0.0")
    wait_for(lambda: serving(agent, "1.0.0"), what="1.0.0 serving")
    for role, version in (("director", "1.1.0"), ("snapshot", "1.2.0"), ("timestamp", "1.3.0"), ("targets", "1.4.0"), ("root", "1.5.0")):
        before = _retired_copy(rig.keys, tmp_path / f"before-{role}")
        rotate(role, rig.keys, rig.image, rig.director)
        rig.release(version)
        rig.assign("dev-rot", version)
        wait_for(lambda v=version: serving(agent, v), what=f"{version} serving after the {role} rotation")  # type: ignore[misc]
        if role == "root":
            continue
        forged = _forger(rig.keys, before, role, tmp_path / f"forged-{role}")
        _plant_forged(forged, role, rig.director, rig.image, ("dev-rot", MODEL, "1.0.0", VARIANT), tmp_path / f"thief-{role}")
        reason = _refused(agent, jobs, f"the refusal of the retired {role} key")
        assert "UnsignedMetadataError" in reason, reason
        assert serving(agent, version)  # still serving what it had
        rig.image._publish(rig.image.targets(), rig.keys)  # today's keys sign again
        rig.assign("dev-rot", version)
    trust = agent.settings.state_dir / "trust"
    assert Metadata.from_file(str(trust / "image" / "root.json")).signed.version == rig.image.root().signed.version
    assert Metadata.from_file(str(trust / "director" / "root.json")).signed.version == rig.director.root().signed.version


def test_a_revoked_release_keeps_serving_where_it_runs_and_installs_nowhere(rig: Rig, agents: Agents) -> None:
    rig.release("3.0.0")
    agent, jobs = agents.start("dev-rev")
    rig.assign("dev-rev", "3.0.0")
    wait_for(lambda: serving(agent, "3.0.0"), what="3.0.0 serving")
    rig.director.assign("dev-late", rig.image, MODEL, "3.0.0", VARIANT, rig.keys)  # assigned, not yet installed
    revoked = rig.image.revoke(MODEL, "3.0.0", rig.keys, reason="drifts on night images")
    assert rig.director.assigned(MODEL, "3.0.0") == ["dev-late", "dev-rev"]
    # where it runs: it keeps serving, and says why each round is refused
    reason = _refused(agent, jobs, "the refusal of the revoked release")
    assert f"revoked {MODEL} 3.0.0" in reason and "drifts on night images" in reason, reason
    assert serving(agent, "3.0.0") and agent.host.infer(MODEL, {"x": _x()})["y"].shape == (1, 10)
    # a restart too: the active version is loaded from the device's own store
    agents.stop(agent)
    agent, jobs = agents.start("dev-rev")
    wait_for(lambda: serving(agent, "3.0.0"), what="3.0.0 serving after a restart")
    assert f"revoked {MODEL} 3.0.0" in wait_for(lambda: jobs.rejected() and jobs.rejected()[-1], 30, "the refusal after a restart")
    # where it does not run yet: nothing is downloaded, nothing installed
    late, late_jobs = agents.start("dev-late")
    reason = wait_for(lambda: late_jobs.rejected() and late_jobs.rejected()[-1], 30, "dev-late's refusal")
    assert f"revoked {MODEL} 3.0.0" in reason
    assert serving(late, None) and not [m for m in late_jobs.json() if m.get("state") == "DOWNLOADING"]
    # the controller refuses it; the next release moves both
    with pytest.raises(ReleaseRevoked):
        rig.assign("dev-rev", "3.0.0")
    rig.release("3.1.0")
    nxt = rig.image.release_of(MODEL, "3.1.0")
    assert nxt is not None and nxt.release_counter == revoked.release_counter + 1
    rig.assign("dev-rev", "3.1.0")
    rig.assign("dev-late", "3.1.0")
    wait_for(lambda: serving(agent, "3.1.0") and serving(late, "3.1.0"), what="3.1.0 serving on both")


def _x() -> Any:
    import numpy as np

    return np.zeros((1, 64), dtype=np.float32)


def test_revocation_record_is_signed(fleet: Fleet) -> None:
    """The record lives in the signed targets: editing it breaks the signature devices check."""
    fleet.image.revoke("tiny", "1.0.0", fleet.keys)
    path = fleet.image.metadata / f"{fleet.image.targets().signed.version}.targets.json"
    data = json.loads(path.read_text())
    data["signed"]["x-edgefleet-revoked"] = []
    path.write_text(json.dumps(data))
    fleet.director.assign("dev-1", fleet.image, "tiny", "1.1.0", "onnx-fp32", fleet.keys)
    with pytest.raises(UpdateRejected, match="metadata refused: UnsignedMetadataError"):
        fleet.check("dev-1")
