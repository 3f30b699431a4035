"""The device installs only what the director and the image repository agree on — attacks each refused."""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import ModelFiles
from tuf.api.metadata import Metadata

from agent.files import sha256_file
from agent.hardware import HardwareProfile, detect
from agent.update.fetch import DirectoryFetcher, MqttFetcher, download
from agent.update.verify import Installed, TrustedRepos, UpdateRejected, VerifiedUpdate, check_director, check_for_update
from converters.build import build
from fleet.dev import hardware_trees
from fleet.dev.broker import RunningBroker
from fleet.transport.repo_server import RepositoryServer
from fleet.tuf.director import AssignError, Director
from fleet.tuf.image_repo import ImageRepository
from fleet.tuf.keys import KeyStore, init_keys
from fleet.tuf.metadata import metadata_versions, sign_metadata


class Fleet:
    def __init__(self, root: Path, models: ModelFiles) -> None:
        self.root = root
        self.keys = init_keys(root / "keys")
        self.image = ImageRepository.create(root / "serve" / "image", self.keys)
        self.director = Director.create(root / "serve" / "director", self.keys)
        for version in ("1.0.0", "1.1.0"):
            build(models.path("tiny.onnx"), "tiny", version, root / f"tiny-{version}", variants=["onnx-fp32", "onnx-int8"])
            self.image.release(root / f"tiny-{version}", self.keys)

    def device(self, name: str, fetchers: tuple[object, object] | None = None) -> TrustedRepos:
        d = self.root / "devices" / name
        for sub in ("image", "director"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy(self.image.metadata / "1.root.json", d / "image" / "root.json")
        shutil.copy(self.director.directory / "1.root.json", d / "director" / "root.json")
        image_url, director_url = "repo://image/", f"repo://director/{name}/"
        image_f, director_f = fetchers or (
            DirectoryFetcher(self.root / "serve" / "image", image_url),
            DirectoryFetcher(self.root / "serve" / "director" / name, director_url),
        )
        return TrustedRepos(d / "image", d / "director", image_url, director_url, image_f, director_f, d / "downloads")  # type: ignore[arg-type]


def fetch(fleet: Fleet, upd: VerifiedUpdate, dest: Path) -> str:
    """Download the artifact the way the installer does; its sha256."""
    download(upd, DirectoryFetcher(fleet.root / "serve" / "image", "repo://image/"), dest, 0, lambda offset: None)
    return sha256_file(dest)


@pytest.fixture
def fleet(tmp_path: Path, models: ModelFiles) -> Fleet:
    return Fleet(tmp_path, models)


def profile(tmp_path: Path) -> HardwareProfile:
    return detect(hardware_trees.plain_x86(tmp_path / "hw"))


def test_agreed_update_is_downloaded_and_verified(fleet: Fleet, tmp_path: Path) -> None:
    fleet.director.assign("dev-1", fleet.image, "tiny", "1.1.0", "onnx-fp32", fleet.keys)
    upd = check_for_update(fleet.device("dev-1"), {}, profile(tmp_path))
    assert upd is not None and (upd.model, upd.version, upd.variant, upd.release_counter) == ("tiny", "1.1.0", "onnx-fp32", 2)
    assert fetch(fleet, upd, tmp_path / "a.tar") == upd.sha256
    assert check_for_update(fleet.device("dev-1"), {"tiny": Installed(2, upd.sha256)}, profile(tmp_path)) is None  # running it
    # the same release, another variant: a switch within the release, not a rollback
    fleet.director.assign("dev-1", fleet.image, "tiny", "1.1.0", "onnx-int8", fleet.keys)
    other = check_for_update(fleet.device("dev-1"), {"tiny": Installed(2, upd.sha256)}, profile(tmp_path))
    assert other is not None and other.variant == "onnx-int8" and other.sha256 != upd.sha256


def test_rollback_to_a_lower_release_counter_is_refused(fleet: Fleet, tmp_path: Path) -> None:
    fleet.director.assign("dev-1", fleet.image, "tiny", "1.0.0", "onnx-fp32", fleet.keys)
    with pytest.raises(UpdateRejected, match="lower than the installed 2"):
        check_for_update(fleet.device("dev-1"), {"tiny": Installed(2, "0" * 64)}, profile(tmp_path))
    # unless the device itself ran exactly that artifact and keeps it: a fleet rollback to a version it trusted
    old = fleet.image.release_of("tiny", "1.0.0")
    assert old is not None
    sha = old.variants[0].sha256
    plan = check_for_update(fleet.device("dev-1"), {"tiny": Installed(2, "0" * 64)}, profile(tmp_path), kept={sha})
    assert plan is not None and plan.version == "1.0.0"


def test_director_naming_a_target_the_image_repository_lacks(fleet: Fleet, tmp_path: Path) -> None:
    fleet.director.assign("dev-1", fleet.image, "tiny", "1.1.0", "onnx-fp32", fleet.keys)
    meta = fleet.director.device_metadata("dev-1")
    md = Metadata.from_file(str(meta / "1.targets.json"))
    tf = md.signed.targets.pop("tiny/1.1.0/onnx-fp32.tar")
    tf.path = "tiny/9.9.9/onnx-fp32.tar"
    md.signed.targets[tf.path] = tf
    md.signed.version += 1
    fleet.director._publish(meta.parent.name, md, fleet.keys)  # a compromised director key signs it properly
    with pytest.raises(UpdateRejected, match="which the image repository does not have"):
        check_for_update(fleet.device("dev-1"), {}, profile(tmp_path))


def test_a_shadow_target_is_verified_like_the_one_to_run(fleet: Fleet, tmp_path: Path) -> None:
    fleet.director.assign("dev-1", fleet.image, "tiny", "1.0.0", "onnx-fp32", fleet.keys, shadow=("1.1.0", "onnx-int8"))
    plan = check_director(fleet.device("dev-1"), {}, profile(tmp_path))
    assert plan.update is not None and (plan.update.version, plan.update.variant) == ("1.0.0", "onnx-fp32")
    assert plan.shadow is not None and (plan.shadow.version, plan.shadow.variant, plan.shadow.release_counter) == ("1.1.0", "onnx-int8", 2)
    assert fetch(fleet, plan.shadow, tmp_path / "s.tar") == plan.shadow.sha256
    running = check_director(fleet.device("dev-1"), {"tiny": Installed(1, plan.update.sha256)}, profile(tmp_path))
    assert running.update is None and running.shadow == plan.shadow  # named even when running: the device compares
    assert check_for_update(fleet.device("dev-1"), {"tiny": Installed(1, plan.update.sha256)}, profile(tmp_path)) is None
    fleet.director.assign("dev-1", fleet.image, "tiny", "1.0.0", "onnx-fp32", fleet.keys)  # no shadow any more
    assert check_director(fleet.device("dev-1"), {}, profile(tmp_path)).shadow is None
    with pytest.raises(AssignError, match="cannot shadow itself"):
        fleet.director.assign("dev-1", fleet.image, "tiny", "1.0.0", "onnx-fp32", fleet.keys, shadow=("1.0.0", "onnx-fp32"))
    with pytest.raises(AssignError, match="not in the image repository"):
        fleet.director.assign("dev-1", fleet.image, "tiny", "1.0.0", "onnx-fp32", fleet.keys, shadow=("7.0.0", "onnx-fp32"))


def _director_targets(fleet: Fleet, device: str, *targets: tuple[str, str, str, bool]) -> None:
    """(model, version, variant, shadow) targets signed with the director's key: what a compromised key could sign."""
    meta = fleet.director.device_metadata(device)
    md = fleet.director.committed_targets(meta.parent.name)
    assert md is not None
    md.signed.targets.clear()
    for model, version, variant, shadow in targets:
        tf = fleet.director._target(fleet.image, model, version, variant)
        if shadow:
            tf.unrecognized_fields["custom"]["shadow"] = True
        md.signed.targets[tf.path] = tf
    md.signed.version = max(metadata_versions(meta, "targets"), default=0) + 1
    fleet.director._publish(meta.parent.name, md, fleet.keys)


def test_hostile_shadow_targets_are_refused(fleet: Fleet, tmp_path: Path, models: ModelFiles) -> None:
    fleet.director.assign("dev-1", fleet.image, "tiny", "1.0.0", "onnx-fp32", fleet.keys)
    build(models.path("tiny.onnx"), "other", "1.0.0", tmp_path / "other", variants=["onnx-fp32"])
    fleet.image.release(tmp_path / "other", fleet.keys)
    cases = [
        ([("tiny", "1.1.0", "onnx-fp32", True), ("tiny", "1.1.0", "onnx-int8", True)], "names 0 targets to run"),
        (
            [("tiny", "1.0.0", "onnx-fp32", False), ("tiny", "1.1.0", "onnx-fp32", True), ("tiny", "1.1.0", "onnx-int8", True)],
            "at most one",
        ),
        ([("tiny", "1.0.0", "onnx-fp32", False), ("other", "1.0.0", "onnx-fp32", True)], "another version of tiny"),
    ]
    for targets, message in cases:
        _director_targets(fleet, "dev-1", *targets)
        with pytest.raises(UpdateRejected, match=message):
            check_director(fleet.device("dev-1"), {}, profile(tmp_path))
    # a shadow older than what the device has run: refused like a rollback
    fleet.director.assign("dev-1", fleet.image, "tiny", "1.1.0", "onnx-fp32", fleet.keys, shadow=("1.0.0", "onnx-fp32"))
    installed = check_director(fleet.device("dev-1"), {}, profile(tmp_path)).update
    assert installed is not None
    with pytest.raises(UpdateRejected, match="below the installed 2"):
        check_director(fleet.device("dev-1"), {"tiny": Installed(2, installed.sha256)}, profile(tmp_path))
    # a shadow whose bytes the image repository does not sign
    _director_targets(fleet, "dev-1", ("tiny", "1.1.0", "onnx-fp32", False), ("tiny", "1.0.0", "onnx-int8", True))
    meta = fleet.director.device_metadata("dev-1")
    md = Metadata.from_file(str(meta / f"{max(metadata_versions(meta, 'targets'))}.targets.json"))
    md.signed.targets["tiny/1.0.0/onnx-int8.tar"].hashes["sha256"] = "0" * 64
    md.signed.version += 1
    fleet.director._publish(meta.parent.name, md, fleet.keys)
    with pytest.raises(UpdateRejected, match=r"disagree on tiny/1\.0\.0/onnx-int8\.tar"):
        check_director(fleet.device("dev-1"), {}, profile(tmp_path))


def test_mix_and_match_hashes_are_refused(fleet: Fleet, tmp_path: Path) -> None:
    fleet.director.assign("dev-1", fleet.image, "tiny", "1.1.0", "onnx-fp32", fleet.keys)
    meta = fleet.director.device_metadata("dev-1")
    md = Metadata.from_file(str(meta / "1.targets.json"))
    md.signed.targets["tiny/1.1.0/onnx-fp32.tar"].hashes["sha256"] = "0" * 64
    md.signed.version += 1
    fleet.director._publish(meta.parent.name, md, fleet.keys)
    with pytest.raises(UpdateRejected, match=r"disagree on tiny/1\.1\.0/onnx-fp32\.tar"):
        check_for_update(fleet.device("dev-1"), {}, profile(tmp_path))


def test_variant_for_other_hardware_is_refused(fleet: Fleet, tmp_path: Path) -> None:
    fleet.director.assign("dev-1", fleet.image, "tiny", "1.1.0", "onnx-fp32", fleet.keys)
    targets = fleet.image.targets()
    targets.signed.targets["tiny/1.1.0/onnx-fp32.tar"].unrecognized_fields["custom"]["hints"] = ["edgetpu"]
    targets.signed.version += 1
    fleet.image._publish(targets, fleet.keys)
    with pytest.raises(UpdateRejected, match="needs edgetpu"):
        check_for_update(fleet.device("dev-1"), {}, profile(tmp_path))
    coral = detect(hardware_trees.coral_usb(tmp_path / "coral"))
    assert check_for_update(fleet.device("dev-1"), {}, coral) is not None  # the same release fits a Coral device


def test_tampered_artifact_is_refused(fleet: Fleet, tmp_path: Path) -> None:
    fleet.director.assign("dev-1", fleet.image, "tiny", "1.1.0", "onnx-fp32", fleet.keys)
    upd = check_for_update(fleet.device("dev-1"), {}, profile(tmp_path))
    assert upd is not None
    stored = next((fleet.image.targets_dir / "tiny" / "1.1.0").glob("*.onnx-fp32.tar"))
    original = stored.read_bytes()
    stored.write_bytes(original + b"endless data")  # more bytes than signed
    with pytest.raises(UpdateRejected, match="the signed length is"):
        fetch(fleet, upd, tmp_path / "b.tar")
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0xFF
    stored.write_bytes(bytes(flipped))  # same length, other bytes: an arbitrary artifact
    with pytest.raises(UpdateRejected, match="failed its signed sha256"):
        fetch(fleet, upd, tmp_path / "c.tar")


def test_frozen_director_is_refused(fleet: Fleet, tmp_path: Path) -> None:
    fleet.director.timestamp_expiry = timedelta(seconds=-60)
    fleet.director.assign("dev-1", fleet.image, "tiny", "1.1.0", "onnx-fp32", fleet.keys)
    with pytest.raises(UpdateRejected, match="ExpiredMetadataError"):
        check_for_update(fleet.device("dev-1"), {}, profile(tmp_path))


def test_director_signed_by_a_key_the_root_does_not_name(fleet: Fleet, tmp_path: Path) -> None:
    fleet.director.assign("dev-1", fleet.image, "tiny", "1.1.0", "onnx-fp32", fleet.keys)
    impostor = init_keys(tmp_path / "impostor")
    meta = fleet.director.device_metadata("dev-1")
    ts = Metadata.from_file(str(meta / "timestamp.json"))
    sign_metadata(ts, impostor.signers("director"))
    ts.to_file(str(meta / "timestamp.json"))
    with pytest.raises(UpdateRejected, match="UnsignedMetadataError"):
        check_for_update(fleet.device("dev-1"), {}, profile(tmp_path))


def test_assign_refuses_unknown_releases(fleet: Fleet) -> None:
    with pytest.raises(AssignError, match="not in the image repository"):
        fleet.director.assign("dev-1", fleet.image, "tiny", "7.0.0", "onnx-fp32", fleet.keys)
    with pytest.raises(AssignError, match="no variant 'tflite-int8'"):
        fleet.director.assign("dev-1", fleet.image, "tiny", "1.0.0", "tflite-int8", fleet.keys)
    with pytest.raises(ValueError, match="bad device id"):
        fleet.director.assign("../../etc", fleet.image, "tiny", "1.0.0", "onnx-fp32", fleet.keys)
    assert isinstance(fleet.keys, KeyStore)


def test_end_to_end_over_mqtt(fleet: Fleet, mqtt_broker: RunningBroker, tmp_path: Path) -> None:
    fleet.director.assign("dev-m", fleet.image, "tiny", "1.1.0", "onnx-fp32", fleet.keys)
    with RepositoryServer(fleet.root / "serve", mqtt_broker.host, mqtt_broker.port, client_id="repo-e2e"):
        # One server serves `serve/`; one fetcher (as the agent has) maps "repo://<path>" to it: image/... and
        # director/dev-m/... — the server answers only dev-m's own director metadata to requests in dev-m's name
        fetcher = MqttFetcher(mqtt_broker.host, mqtt_broker.port, "dev-m", "repo://", timeout=5)
        try:
            repos = fleet.device("dev-m", (fetcher, fetcher))
            upd = check_for_update(repos, {"tiny": Installed(1, "0" * 64)}, profile(tmp_path))
        finally:
            fetcher.close()
    assert upd is not None and upd.version == "1.1.0"


def test_cli_director_and_assign(fleet: Fleet, tmp_path: Path) -> None:
    import subprocess
    import sys

    cli = [sys.executable, "-m", "fleet.cli"]
    director = str(tmp_path / "director2")
    done = subprocess.run(
        [*cli, "director", "init", director, "--keys", str(fleet.keys.directory)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    common = ["--repo", str(fleet.image.directory), "--director", director, "--keys", str(fleet.keys.directory)]
    done = subprocess.run(
        [*cli, "assign", "dev-9", "tiny", "1.1.0", "--variant", "onnx-fp32", *common], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "dev-9 -> tiny/1.1.0/onnx-fp32.tar" in done.stderr, done.stderr
    done = subprocess.run(
        [*cli, "assign", "dev-9", "tiny", "3.0.0", "--variant", "onnx-fp32", *common], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1 and "error[bad_assignment]" in done.stderr and "not in the image repository" in done.stderr
    assert (Path(director) / "dev-9" / "metadata" / "timestamp.json").is_file()
    done = subprocess.run(
        [*cli, "director", "refresh", director, "--keys", str(fleet.keys.directory)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "re-signed" in done.stderr
    assert (Path(director) / "dev-9" / "metadata" / "2.targets.json").is_file()
    done = subprocess.run(
        [*cli, "repo", "refresh", str(fleet.image.directory), "--keys", str(fleet.keys.directory)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "re-signed" in done.stderr


def test_director_refresh_and_root_rotation_reach_the_device(fleet: Fleet, tmp_path: Path) -> None:
    fleet.director.timestamp_expiry = timedelta(seconds=-60)
    fleet.director.assign("dev-1", fleet.image, "tiny", "1.1.0", "onnx-fp32", fleet.keys)
    device = fleet.device("dev-1")
    with pytest.raises(UpdateRejected, match="ExpiredMetadataError"):
        check_for_update(device, {}, profile(tmp_path))
    fleet.director.timestamp_expiry = timedelta(days=1)
    fleet.director.refresh(fleet.keys)  # the controller's periodic job
    assert check_for_update(device, {}, profile(tmp_path)) is not None
    fleet.image.rotate_root(fleet.keys, new_root_keys=2, new_threshold=2, director=fleet.director)
    fleet.director.assign("dev-1", fleet.image, "tiny", "1.1.0", "onnx-fp32", fleet.keys)
    assert check_for_update(device, {"tiny": Installed(1, "0" * 64)}, profile(tmp_path)) is not None  # both repositories walked to root v2
    for repo_dir in (device.image_dir, device.director_dir):
        assert Metadata.from_file(str(repo_dir / "root.json")).signed.version == 2


def test_a_clock_before_the_build_date_is_refused(fleet: Fleet, tmp_path: Path) -> None:
    from datetime import datetime, timezone

    fleet.director.assign("dev-1", fleet.image, "tiny", "1.1.0", "onnx-fp32", fleet.keys)
    with pytest.raises(UpdateRejected, match="the clock says 1970-01-01, before this agent was built"):
        check_for_update(fleet.device("dev-1"), {}, profile(tmp_path), now=datetime(1970, 1, 1, tzinfo=timezone.utc))
    assert check_for_update(fleet.device("dev-1"), {}, profile(tmp_path)) is not None  # the real clock is fine
