"""Update extraction by our own rules (agent.update.safe_tar) and the golden .npz size check, on real tar and zip files.

Why these tests: the agent extracts signed tars without ``tarfile``'s ``filter``
argument (Debian 12's Python 3.11.2 has none), so every rule the ``data`` filter
gave us is ours to prove — and proven again under ``/usr/bin/python3`` itself.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.bundle import GoldenSamplesTooLarge, load_bundle, verify_variant
from agent.errors import ArchiveTooLarge, UnsafeArchive, UnsafeMemberPath, UnsafeMemberType
from agent.update import safe_tar

REPO = Path(__file__).resolve().parents[1]
DEBIAN_PYTHON = Path("/usr/bin/python3")

Member = tuple[tarfile.TarInfo, bytes]


def member(name: str, data: bytes = b"", type: bytes = tarfile.REGTYPE, mode: int = 0o644, **attrs: object) -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.size = type, mode, len(data)
    for k, v in attrs.items():
        setattr(info, k, v)
    return info, data


def write_tar(path: Path, members: list[Member], fmt: int = tarfile.PAX_FORMAT) -> Path:
    with tarfile.open(path, mode="w", format=fmt) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root``: file bytes, or None for a directory."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


@pytest.fixture
def place(tmp_path: Path) -> tuple[Path, Path]:
    """``staging`` (the destination) and ``outside`` beside it, where no refused archive may write."""
    staging, outside = tmp_path / "staging", tmp_path / "outside"
    staging.mkdir()
    outside.mkdir()
    return staging, outside


# -- what a good archive gives -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_a_bundle_tree_extracts_identically_with_plain_modes(tmp_path: Path, place: tuple[Path, Path], fmt: int) -> None:
    src = tmp_path / "src"
    (src / "sub" / "deeper").mkdir(parents=True)
    files = {
        "bundle.json": json.dumps({"name": "demo"}).encode(),
        "model.onnx": os.urandom(300_000),
        "golden_onnx-fp32.npz": os.urandom(5000),
        "sub/deeper/weights.bin": bytes(70_000),
        "empty": b"",
    }
    for name, data in files.items():
        (src / name).write_bytes(data)
    (src / "model.onnx").chmod(0o4755)  # setuid + exec in the archive: neither may come out
    (src / "sub").chmod(0o777)
    archive = tmp_path / "a.tar"
    with tarfile.open(archive, "w", format=fmt) as tar:
        tar.add(src, arcname=".")
    staging, outside = place

    umask = os.umask(0o077)  # a service's UMask must not decide the modes either
    try:
        written = safe_tar.extract_path(archive, staging, bound=archive.stat().st_size)
    finally:
        os.umask(umask)

    assert tree(staging) == tree(src)
    assert sorted(written) == sorted(files)
    for p in staging.rglob("*"):
        assert p.stat().st_mode & 0o7777 == (0o755 if p.is_dir() else 0o644), p
    assert list(outside.iterdir()) == []


def test_a_real_release_artifact_extracts_and_loads(tmp_path: Path) -> None:
    """The archive `fleet release` signs, from a bundle `fleet build` made: extracted within its own length."""
    from converters import builders
    from converters.build import build
    from fleet.tuf.image_repo import _variant_archive

    source = builders.write_onnx_mlp(builders.random_mlp([4, 8, 3], seed=5), tmp_path / "m.onnx")
    out = build(source, "m", "1.0.0", tmp_path / "bundle", variants=["onnx-fp32"]).out
    bundle = load_bundle(out)
    variant = bundle.variants[0]
    archive = tmp_path / "artifact.tar"
    archive.write_bytes(_variant_archive(out, variant))
    staging = tmp_path / "staging"
    staging.mkdir()

    safe_tar.extract_path(archive, staging, bound=archive.stat().st_size)  # the installer's bound: the signed length

    assert load_bundle(staging) == bundle
    verify_variant(variant, staging)
    assert bundle.golden_samples(staging, variant)


# -- what is refused ---------------------------------------------------------------------------------------------


def refusals(outside: Path) -> list[tuple[str, list[Member], type[UnsafeArchive]]]:
    evil = str(outside / "evil")
    return [
        ("absolute path", [member(evil, b"x")], UnsafeMemberPath),
        ("'..' at the start", [member("../outside/evil", b"x")], UnsafeMemberPath),
        ("'..' in the middle", [member("sub/../../outside/evil", b"x")], UnsafeMemberPath),
        ("'..' as a directory", [member("..", type=tarfile.DIRTYPE, mode=0o755)], UnsafeMemberPath),
        ("backslash", [member("..\\outside\\evil", b"x")], UnsafeMemberPath),
        ("NUL in a pax path", [member("ok", b"x", pax_headers={"path": "ok\x00evil"})], UnsafeMemberPath),
        ("symlink out", [member("link", type=tarfile.SYMTYPE, linkname=str(outside))], UnsafeMemberType),
        ("symlink in", [member("link", type=tarfile.SYMTYPE, linkname="bundle.json")], UnsafeMemberType),
        (
            "symlink then write through it",
            [member("d", type=tarfile.SYMTYPE, linkname=str(outside)), member("d/evil", b"x")],
            UnsafeMemberType,
        ),
        ("hard link", [member("bundle.json", b"{}"), member("hard", type=tarfile.LNKTYPE, linkname="../outside/evil")], UnsafeMemberType),
        ("char device", [member("null", type=tarfile.CHRTYPE, devmajor=1, devminor=3)], UnsafeMemberType),
        ("block device", [member("sda", type=tarfile.BLKTYPE, devmajor=8, devminor=0)], UnsafeMemberType),
        ("fifo", [member("pipe", type=tarfile.FIFOTYPE)], UnsafeMemberType),
        ("unknown type", [member("odd", b"x", type=b"Z")], UnsafeMemberType),
        (
            "pax sparse (0.1)",
            [member("big", b"y" * 10, pax_headers={"GNU.sparse.size": "1000000000", "GNU.sparse.map": "999999990,10"})],
            UnsafeMemberType,
        ),
        ("the same name twice", [member("bundle.json", b"{}"), member("bundle.json", b"{evil}")], UnsafeMemberPath),
        ("a file, then a member under it", [member("a", b"x"), member("a/b", b"y")], UnsafeMemberPath),
        ("a file, then a directory of its name", [member("a", b"x"), member("a", type=tarfile.DIRTYPE)], UnsafeMemberPath),
        ("one file past the bound", [member("zeros.bin", bytes(64_000))], ArchiveTooLarge),
        ("many files past the bound", [member(f"f{i}", bytes(1000)) for i in range(20)], ArchiveTooLarge),
    ]


def test_each_refusal_is_named_and_writes_nothing(tmp_path: Path, place: tuple[Path, Path]) -> None:
    staging, outside = place
    cases = refusals(outside)
    for label, members, error in cases:
        archive = write_tar(tmp_path / "bad.tar", members)
        with pytest.raises(error) as caught:
            safe_tar.extract_path(archive, staging, bound=10_000)
        assert isinstance(caught.value, UnsafeArchive) and caught.value.code == "bad_bundle", label
        assert tree(staging) == {}, label
        assert tree(outside) == {}, label
        assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tar", "outside", "staging"], label


def test_a_gnu_sparse_member_is_refused(tmp_path: Path, place: tuple[Path, Path]) -> None:
    staging, outside = place
    archive = write_tar(tmp_path / "s.tar", [member("sparse", b"x" * 10, type=tarfile.GNUTYPE_SPARSE)], fmt=tarfile.GNU_FORMAT)
    with pytest.raises(UnsafeMemberType, match="sparse"):
        safe_tar.extract_path(archive, staging, bound=10_000)
    assert tree(staging) == tree(outside) == {}


def test_too_many_members(tmp_path: Path, place: tuple[Path, Path]) -> None:
    staging, _ = place
    archive = write_tar(tmp_path / "m.tar", [member(f"f{i}", b"") for i in range(6)])
    with pytest.raises(ArchiveTooLarge, match="more than 5 members"):
        safe_tar.extract_path(archive, staging, bound=10_000, max_members=5)
    assert tree(staging) == {}


def test_bytes_are_counted_as_written(tmp_path: Path, place: tuple[Path, Path]) -> None:
    """A header that lied after the check (size changed between the passes) is still stopped by the byte count."""
    staging, _ = place
    archive = write_tar(tmp_path / "z.tar", [member("zeros.bin", bytes(64_000))])
    with tarfile.open(archive, "r:") as tar:
        info = tar.getmembers()[0]
        info.size = 10
        plan = safe_tar._plan(tar, 1000, 100)
        info.size = 64_000
        root = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
        try:
            with pytest.raises(ArchiveTooLarge, match="written"):
                safe_tar._write(tar, root, plan, 1000)
        finally:
            os.close(root)
    assert (staging / "zeros.bin").stat().st_size <= 1000


@pytest.mark.parametrize("planted", ["dir-link", "file-link"])
def test_links_already_in_the_destination_are_never_followed(tmp_path: Path, place: tuple[Path, Path], planted: str) -> None:
    staging, outside = place
    if planted == "dir-link":
        (staging / "sub").symlink_to(outside, target_is_directory=True)
        members = [member("sub/evil", b"x")]
    else:
        (staging / "bundle.json").symlink_to(outside / "evil")
        members = [member("bundle.json", b"x")]
    archive = write_tar(tmp_path / "t.tar", members)
    with pytest.raises(UnsafeMemberPath):
        safe_tar.extract_path(archive, staging, bound=10_000)
    assert tree(outside) == {}


def test_not_a_tar_is_a_tar_error(tmp_path: Path, place: tuple[Path, Path]) -> None:
    bad = tmp_path / "x.tar"
    bad.write_bytes(b"this is not a tar" * 100)
    with pytest.raises(tarfile.TarError):
        safe_tar.extract_path(bad, place[0], bound=10_000)


# -- golden .npz bombs -------------------------------------------------------------------------------------------


def _bundle_with_golden(tmp_path: Path) -> tuple[Path, Callable[[], object]]:
    from converters import builders
    from converters.build import build

    source = builders.write_onnx_mlp(builders.random_mlp([4, 3], seed=7), tmp_path / "g.onnx")
    out = build(source, "g", "1.0.0", tmp_path / "gb", variants=["onnx-fp32"]).out
    bundle = load_bundle(out)
    variant = bundle.variants[0]
    return out / variant.golden, lambda: bundle.golden_samples(out, variant)


def test_a_golden_npz_bomb_is_refused_before_loading(tmp_path: Path) -> None:
    golden, load = _bundle_with_golden(tmp_path)
    assert load()  # the real golden file loads
    x_name = next(k for k in np.load(golden).files if k.startswith("in:"))
    bomb: dict[str, Any] = {x_name: np.zeros(80 * 1024 * 1024, np.float32)}  # 320 MiB of zeros, a few hundred KiB compressed
    np.savez_compressed(golden.with_suffix(""), **bomb)
    assert golden.stat().st_size < 2 * 1024 * 1024
    with pytest.raises(GoldenSamplesTooLarge, match="uncompressed"):
        load()


def test_a_golden_npy_header_claiming_more_than_its_member_is_refused(tmp_path: Path) -> None:
    golden, load = _bundle_with_golden(tmp_path)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (10**10,)})
    with zipfile.ZipFile(golden, "w") as z:
        z.writestr("in:x.npy", header.getvalue() + bytes(64))
    with pytest.raises(GoldenSamplesTooLarge, match="claims"):
        load()


# -- the stock Python of Debian 12 / Raspberry Pi OS ----------------------------------------------------------------

DEBIAN_SCRIPT = r"""
import io, json, sys, tarfile, tempfile
from pathlib import Path
from agent.update import safe_tar
from agent.errors import UnsafeArchive

d = Path(tempfile.mkdtemp())
good, bad = d / "good.tar", d / "bad.tar"
with tarfile.open(good, "w") as t:
    for name, data in (("bundle.json", b"{}"), ("sub/model.onnx", b"\x01" * 5000)):
        i = tarfile.TarInfo(name); i.size = len(data); t.addfile(i, io.BytesIO(data))
with tarfile.open(bad, "w") as t:
    i = tarfile.TarInfo("../escape"); i.size = 1; t.addfile(i, io.BytesIO(b"x"))
(d / "ok").mkdir(); (d / "no").mkdir()
written = safe_tar.extract_path(good, d / "ok", bound=good.stat().st_size)
try:
    safe_tar.extract_path(bad, d / "no", bound=bad.stat().st_size)
    refused = None
except UnsafeArchive as exc:
    refused = type(exc).__name__
print(json.dumps({
    "version": list(sys.version_info[:3]),
    "has_data_filter": hasattr(tarfile, "data_filter"),
    "written": written,
    "model": (d / "ok" / "sub" / "model.onnx").read_bytes() == b"\x01" * 5000,
    "refused": refused,
    "escaped": (d / "escape").exists(),
    "modules": sorted(m for m in sys.modules if m.split(".")[0] in ("numpy", "pydantic")),
}))
"""


@pytest.mark.skipif(not DEBIAN_PYTHON.exists(), reason="/usr/bin/python3 (Debian's own Python) is not on this machine")
def test_extraction_under_debians_own_python() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("VIRTUAL_ENV", None)
    proc = subprocess.run([str(DEBIAN_PYTHON), "-c", DEBIAN_SCRIPT], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    print(f"/usr/bin/python3 {result['version']}, tarfile.data_filter present: {result['has_data_filter']}", file=sys.stderr)
    assert result["written"] == ["bundle.json", "sub/model.onnx"] and result["model"]
    assert result["refused"] == "UnsafeMemberPath" and not result["escaped"]
    assert result["modules"] == []  # the standard library and agent.errors only


def test_a_member_nested_deeper_than_the_bound_is_refused(tmp_path: Path, place: tuple[Path, Path]) -> None:
    """10 KB, 1,200 directories deep: extracting it made the cleanup's shutil.rmtree raise RecursionError."""
    staging, outside = place
    archive = write_tar(tmp_path / "deep.tar", [member("/".join(["d"] * 1200) + "/f", b"x")])
    with pytest.raises(UnsafeMemberPath, match="deep"):
        safe_tar.extract_path(archive, staging, bound=10**6)
    assert tree(staging) == {} and tree(outside) == {}
