"""Keys and the signed image repository, checked by the real python-tuf client (tuf.ngclient.Updater)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import tarfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import ModelFiles
from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Metadata
from tuf.ngclient import Updater
from tuf.ngclient.fetcher import FetcherInterface

from agent.chunks import ChunkManifest
from converters.build import build
from fleet.tuf.image_repo import Expiry, ImageRepository, ReleaseError
from fleet.tuf.keys import KeyError_, KeyStore, init_keys
from fleet.tuf.metadata import RotationError, sign_metadata

BASE = "https://image.invalid/"


class DirectoryFetcher(FetcherInterface):
    """Serves a repository directory as if it were remote: a missing file is a 404, as the MQTT fetcher will do."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _fetch(self, url: str) -> Iterator[bytes]:
        path = self.root / url.removeprefix(BASE)
        if not path.is_file():
            raise tuf_errors.DownloadHTTPError(f"not found: {url}", 404)
        return iter([path.read_bytes()])


def client(repo: ImageRepository, device_dir: Path) -> Updater:
    """A device that trusts the repository's first root (shipped with the agent), as a real device would."""
    (device_dir / "metadata").mkdir(parents=True, exist_ok=True)
    (device_dir / "targets").mkdir(exist_ok=True)
    trusted = device_dir / "metadata" / "root.json"
    if not trusted.exists():
        shutil.copy(repo.metadata / "1.root.json", trusted)
    return Updater(
        str(device_dir / "metadata"),
        BASE + "metadata/",
        str(device_dir / "targets"),
        BASE + "targets/",
        fetcher=DirectoryFetcher(repo.directory),
        bootstrap=None,
    )


@pytest.fixture(scope="module")
def bundles(models: ModelFiles, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("releases")
    out = {}
    for version in ("1.0.0", "1.1.0"):
        build(models.path("tiny.onnx"), "tiny", version, root / f"tiny-{version}", variants=["onnx-fp32"], archive=True)
        out[version] = root / f"tiny-{version}"
    return out


@pytest.fixture
def repo(tmp_path: Path) -> tuple[ImageRepository, KeyStore]:
    keys = init_keys(tmp_path / "keys")
    return ImageRepository.create(tmp_path / "repo", keys), keys


def test_keys_init(tmp_path: Path) -> None:
    keys = init_keys(tmp_path / "k", root_threshold=2, root_keys=3)
    assert keys.threshold("root") == 2 and len(keys.public_keys("root")) == 3
    for role in ("targets", "snapshot", "timestamp", "director"):
        assert len(keys.signers(role)) == 1
    pems = list((tmp_path / "k").glob("*.pem"))
    assert len(pems) == 7
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in pems)
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o700
    with pytest.raises(KeyError_, match="refusing to overwrite"):
        init_keys(tmp_path / "k")
    with pytest.raises(KeyError_, match="needs at least that many root keys"):
        init_keys(tmp_path / "k2", root_threshold=3, root_keys=2)


def test_release_reaches_a_device_verified(repo: tuple[ImageRepository, KeyStore], bundles: dict[str, Path], tmp_path: Path) -> None:
    image, keys = repo
    r1 = image.release(bundles["1.0.0"], keys)
    r2 = image.release(bundles["1.1.0"].parent / "tiny-1.1.0.tar.gz", keys)  # the archive form works too
    assert (r1.release_counter, r2.release_counter) == (1, 2)
    updater = client(image, tmp_path / "device")
    updater.refresh()
    v2 = r2.variant("onnx-fp32")
    assert v2 is not None and v2.target_path == "tiny/1.1.0/onnx-fp32.tar"
    info = updater.get_targetinfo(v2.target_path)
    assert info is not None and info.length == v2.length and info.hashes["sha256"] == v2.sha256
    custom = info.unrecognized_fields["custom"]
    assert custom["model"] == "tiny" and custom["release_counter"] == 2
    assert (custom["variant"], custom["format"], custom["precision"]) == ("onnx-fp32", "onnx", "fp32")
    path = updater.download_target(info)
    assert Path(path).stat().st_size == v2.length
    with tarfile.open(path) as tar:  # the variant's archive: the manifest, its model and its golden samples only
        assert sorted(tar.getnames()) == ["bundle.json", "golden_onnx-fp32.npz", "model.onnx"]
    chunks_info = updater.get_targetinfo(v2.target_path + ".chunks")
    assert chunks_info is not None
    chunks = ChunkManifest.decode(Path(updater.download_target(chunks_info)).read_bytes())
    assert chunks.length == v2.length and len(chunks.sha256) == 1
    with pytest.raises(ReleaseError, match="already released"):
        image.release(bundles["1.1.0"], keys)


def test_tampered_target_is_refused(repo: tuple[ImageRepository, KeyStore], bundles: dict[str, Path], tmp_path: Path) -> None:
    image, keys = repo
    r = image.release(bundles["1.0.0"], keys).variants[0]
    stored = next((image.targets_dir / "tiny" / "1.0.0").glob(f"{r.sha256}.*"))
    data = bytearray(stored.read_bytes())
    data[100] ^= 0xFF
    stored.write_bytes(bytes(data))
    updater = client(image, tmp_path / "device")
    updater.refresh()
    info = updater.get_targetinfo(r.target_path)
    assert info is not None
    with pytest.raises(tuf_errors.LengthOrHashMismatchError):
        updater.download_target(info)


def test_root_rotation_is_accepted_when_done_right(
    repo: tuple[ImageRepository, KeyStore], bundles: dict[str, Path], tmp_path: Path
) -> None:
    image, keys = repo
    device = tmp_path / "device"
    client(image, device).refresh()
    image.rotate_root(keys, new_root_keys=2, new_threshold=2)
    image.release(bundles["1.0.0"], keys)
    updater = client(image, device)
    updater.refresh()
    trusted = Metadata.from_file(str(device / "metadata" / "root.json"))
    assert trusted.signed.version == 2 and trusted.signed.roles["root"].threshold == 2
    assert updater.get_targetinfo("tiny/1.0.0/onnx-fp32.tar") is not None


@pytest.mark.parametrize("signed_by", ["old only", "new only"])
def test_root_rotation_signed_by_one_side_is_refused(repo: tuple[ImageRepository, KeyStore], tmp_path: Path, signed_by: str) -> None:
    image, keys = repo
    old_keyids = {k.keyid for k in keys.public_keys("root")}
    image.rotate_root(keys)
    path = image.metadata / "2.root.json"
    md = Metadata.from_file(str(path))
    keep = (lambda kid: kid in old_keyids) if signed_by == "old only" else (lambda kid: kid not in old_keyids)
    for keyid in list(md.signatures):
        if not keep(keyid):
            del md.signatures[keyid]
    md.to_file(str(path))
    with pytest.raises(tuf_errors.UnsignedMetadataError):
        client(image, tmp_path / "device").refresh()


def test_root_threshold_is_enforced(tmp_path: Path) -> None:
    keys = init_keys(tmp_path / "keys", root_threshold=2, root_keys=2)
    image = ImageRepository.create(tmp_path / "repo", keys)
    image.rotate_root(keys, new_root_keys=2, new_threshold=2)
    path = image.metadata / "2.root.json"
    md = Metadata.from_file(str(path))
    del md.signatures[next(iter(md.signatures))]  # one old root signature short of the threshold
    md.to_file(str(path))
    with pytest.raises(tuf_errors.UnsignedMetadataError):
        client(image, tmp_path / "device").refresh()


def test_expired_timestamp_means_a_frozen_repository(tmp_path: Path) -> None:
    keys = init_keys(tmp_path / "keys")
    image = ImageRepository.create(tmp_path / "repo", keys, Expiry(timestamp=timedelta(seconds=-60)))
    with pytest.raises(tuf_errors.ExpiredMetadataError):
        client(image, tmp_path / "device").refresh()
    ImageRepository(tmp_path / "repo").refresh(keys)  # the online keys re-sign: devices move again
    client(image, tmp_path / "device").refresh()


def test_metadata_signed_by_a_key_the_root_does_not_name(repo: tuple[ImageRepository, KeyStore], tmp_path: Path) -> None:
    image, _ = repo
    impostor = init_keys(tmp_path / "impostor")
    md = image.timestamp()
    sign_metadata(md, impostor.signers("timestamp"))
    md.to_file(str(image.metadata / "timestamp.json"))
    with pytest.raises(tuf_errors.UnsignedMetadataError):
        client(image, tmp_path / "device").refresh()


def test_bad_bundles_leave_the_repository_unchanged(
    repo: tuple[ImageRepository, KeyStore], bundles: dict[str, Path], tmp_path: Path
) -> None:
    image, keys = repo
    before = sorted(p.name for p in image.metadata.iterdir())
    broken = tmp_path / "broken"
    shutil.copytree(bundles["1.0.0"], broken)
    (broken / "model.onnx").write_bytes(b"not the model")
    (tmp_path / "junk.tar.gz").write_bytes(os.urandom(500))
    manifest = json.loads((bundles["1.0.0"] / "bundle.json").read_text())
    manifest["surprise"] = True
    odd = tmp_path / "odd"
    shutil.copytree(bundles["1.0.0"], odd)
    (odd / "bundle.json").write_text(json.dumps(manifest))
    for bad, message in (
        (broken, "13 bytes, the bundle says"),
        (tmp_path / "junk.tar.gz", "not a valid bundle"),
        (odd, "surprise"),
        (tmp_path / "missing", "not a valid bundle"),
    ):
        with pytest.raises(ReleaseError, match=message):
            image.release(bad, keys)
    assert sorted(p.name for p in image.metadata.iterdir()) == before
    assert image.releases() == []


def test_offline_keys_moved_away(repo: tuple[ImageRepository, KeyStore], bundles: dict[str, Path]) -> None:
    image, keys = repo
    for pem in keys.directory.glob("targets-*.pem"):
        pem.unlink()
    with pytest.raises(KeyError_, match="no private targets key"):
        image.release(bundles["1.0.0"], keys)


def test_cli_keys_repo_release(bundles: dict[str, Path], tmp_path: Path) -> None:
    import subprocess
    import sys

    fleet = [sys.executable, "-m", "fleet.cli"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*fleet, *args], capture_output=True, text=True, timeout=120)

    keys, repo_dir = str(tmp_path / "keys"), str(tmp_path / "repo")
    assert run("keys", "init", keys, "--root-threshold", "2").returncode == 0
    done = run("keys", "init", keys)
    assert done.returncode == 1 and "error[bad_keys]" in done.stderr and "refusing to overwrite" in done.stderr
    assert run("repo", "init", repo_dir, "--keys", keys).returncode == 0
    done = run("release", str(bundles["1.0.0"]), "--repo", repo_dir, "--keys", keys)
    assert done.returncode == 0 and "release_counter 1" in done.stderr, done.stderr
    done = run("release", str(tmp_path / "nothing"), "--repo", repo_dir, "--keys", keys)
    assert done.returncode == 1 and "error[bad_release]" in done.stderr
    done = run("keys", "rotate-root", "--keys", keys, "--repo", repo_dir)
    assert done.returncode == 0 and "root version 2" in done.stderr
    image = ImageRepository(repo_dir)
    client(image, tmp_path / "device").refresh()
    assert [r.version for r in image.releases()] == ["1.0.0"]


def test_expired_snapshot_until_the_online_keys_refresh(tmp_path: Path) -> None:
    keys = init_keys(tmp_path / "keys")
    image = ImageRepository.create(tmp_path / "repo", keys, Expiry(snapshot=timedelta(seconds=-60)))
    with pytest.raises(tuf_errors.ExpiredMetadataError):
        client(image, tmp_path / "device").refresh()
    ImageRepository(tmp_path / "repo").refresh(keys)
    client(image, tmp_path / "device").refresh()


def test_rotation_without_enough_old_root_keys_changes_nothing(tmp_path: Path) -> None:
    keys = init_keys(tmp_path / "keys", root_threshold=2, root_keys=2)
    image = ImageRepository.create(tmp_path / "repo", keys)
    next(keys.directory.glob("root-*.pem")).unlink()  # one root key kept offline
    index_before = (keys.directory / "keys.json").read_text()
    pems_before = sorted(p.name for p in keys.directory.glob("*.pem"))
    with pytest.raises(RotationError, match="bring back enough old root keys"):
        image.rotate_root(keys)
    assert (keys.directory / "keys.json").read_text() == index_before
    assert sorted(p.name for p in keys.directory.glob("*.pem")) == pems_before
    assert not (image.metadata / "2.root.json").exists()
