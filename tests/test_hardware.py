"""Hardware detection on fake trees of devices this machine is not, and on this machine."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.hardware import detect
from fleet.dev import hardware_trees


def test_raspberry_pi_5(tmp_path: Path) -> None:
    p = detect(hardware_trees.raspberry_pi_5(tmp_path))
    assert p.arch == "aarch64" and p.is_arm
    assert p.raspberry_pi_model == "5"
    assert p.board == "Raspberry Pi 5 Model B Rev 1.0"
    assert p.cpu.arm_dotprod and "asimd" in p.cpu.flags
    assert p.cpu.cores == 4
    assert p.memory_bytes == 8 * 1024**3
    assert not (p.is_jetson or p.intel_npu or p.intel_gpu or p.nvidia_gpu or p.coral)
    assert p.warnings == []


def test_jetson_orin_r36(tmp_path: Path) -> None:
    p = detect(hardware_trees.jetson_orin(tmp_path))
    assert p.is_jetson and p.jetson_model == "AGX Orin Developer Kit"
    assert p.l4t_release == "36.3.0"
    assert p.has_cuda_gpu and not p.nvidia_gpu  # integrated GPU: no /dev/nvidia0
    assert p.arch == "aarch64" and p.raspberry_pi_model is None


def test_intel_core_ultra_with_npu(tmp_path: Path) -> None:
    p = detect(hardware_trees.intel_core_ultra(tmp_path))
    assert p.intel_npu and p.intel_gpu
    assert p.other_accelerators == []
    assert p.arch == "x86_64" and p.cpu.avx2 and "avx_vnni" in p.cpu.flags
    assert p.cpu.model == "Intel(R) Core(TM) Ultra 7 155H"


def test_amd_xdna_is_not_an_intel_npu(tmp_path: Path) -> None:
    p = detect(hardware_trees.amd_xdna(tmp_path))
    assert (tmp_path / "dev/accel/accel0").exists()
    assert not p.intel_npu
    assert p.other_accelerators == ["amdxdna"]
    assert not p.intel_gpu  # render node of vendor 0x1002
    assert p.cpu.avx512_vnni


def test_coral_usb_both_ids(tmp_path: Path) -> None:
    programmed = detect(hardware_trees.coral_usb(tmp_path / "a", programmed=True))
    fresh = detect(hardware_trees.coral_usb(tmp_path / "b", programmed=False))
    assert programmed.coral == ["usb:18d1:9302"]
    assert fresh.coral == ["usb:1a6e:089a"]
    assert programmed.raspberry_pi_model == "4"


def test_coral_pcie(tmp_path: Path) -> None:
    assert detect(hardware_trees.coral_pcie(tmp_path)).coral == ["pcie:/dev/apex_0"]


def test_plain_x86(tmp_path: Path) -> None:
    p = detect(hardware_trees.plain_x86(tmp_path))
    assert p.arch == "x86_64" and p.is_x86
    assert p.cpu.avx2 and not p.cpu.avx512_vnni and not p.cpu.amx
    assert not (p.intel_npu or p.intel_gpu or p.nvidia_gpu or p.coral or p.is_jetson)
    assert p.memory_bytes == 16 * 1024**3


def test_nvidia_discrete_gpu(tmp_path: Path) -> None:
    p = detect(hardware_trees.nvidia_x86(tmp_path))
    assert p.nvidia_gpu and p.nvidia_gpu_name == "NVIDIA L4" and p.has_cuda_gpu


def test_this_machine() -> None:
    p = detect("/")
    assert p.arch == platform.machine()
    assert p.cpu.cores == os.cpu_count()
    assert p.memory_bytes > 0
    meminfo = Path("/proc/meminfo").read_text().split()
    assert p.memory_bytes == int(meminfo[meminfo.index("MemTotal:") + 1]) * 1024
    json.loads(p.model_dump_json())  # reportable as is


def test_empty_root_says_little_and_does_not_raise(tmp_path: Path) -> None:
    p = detect(tmp_path)
    assert p.arch == "unknown" and p.cpu.cores == 0 and p.memory_bytes == 0 and p.warnings == []


def test_unreadable_and_wrong_kind_entries_are_warnings(tmp_path: Path) -> None:
    hardware_trees.plain_x86(tmp_path)
    (tmp_path / "proc/device-tree/model").mkdir(parents=True)  # a directory where a file belongs
    hardware_trees.write(tmp_path, "/etc/nv_tegra_release", "garbage with no release line")
    p = detect(tmp_path)
    assert any("device-tree/model" in w for w in p.warnings)
    assert any("nv_tegra_release" in w for w in p.warnings)
    assert p.arch == "x86_64"


def test_dangling_accel_link(tmp_path: Path) -> None:
    (tmp_path / "sys/class/accel/accel0").mkdir(parents=True)
    os.symlink("/nonexistent/device", tmp_path / "sys/class/accel/accel0/device")
    p = detect(tmp_path)
    assert not p.intel_npu and any("accel0" in w for w in p.warnings)


def test_huge_file_is_read_bounded(tmp_path: Path) -> None:
    hardware_trees.write(tmp_path, "/proc/cpuinfo", "processor\t: 0\n" * 1_000_000)  # 14 MB
    p = detect(tmp_path)
    assert 0 < p.cpu.cores < 1_000_000


FILES = [
    "/proc/cpuinfo",
    "/proc/meminfo",
    "/proc/device-tree/model",
    "/etc/nv_tegra_release",
    "/sys/class/drm/renderD128/device/vendor",
    "/sys/bus/usb/devices/1-1/idVendor",
    "/sys/bus/usb/devices/1-1/idProduct",
    "/proc/driver/nvidia/gpus/0/information",
]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(contents=st.lists(st.binary(max_size=400) | st.text(max_size=400), min_size=len(FILES), max_size=len(FILES)))
def test_garbage_root_never_raises(tmp_path_factory: object, contents: list[bytes | str]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        hardware_trees.write(root, "/dev/dri/renderD128", "")
        for rel, content in zip(FILES, contents):
            hardware_trees.write(root, rel, content)
        p = detect(root)
        json.loads(p.model_dump_json())


def test_cli_hardware_on_fake_root(tmp_path: Path) -> None:
    hardware_trees.jetson_orin(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "agent.cli", "hardware", "--root", str(tmp_path), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    report = json.loads(out.stdout)
    assert report["profile"]["jetson_model"] == "AGX Orin Developer Kit"
    assert report["profile"]["l4t_release"] == "36.3.0"
    excluded = {e["what"]: e["why"] for e in report["excluded"]}
    assert "tensorrt:GPU.0" in excluded and "not installed" in excluded["tensorrt:GPU.0"]
    assert report["ranking"][0]["runtime"] == "litert"  # ARM: LiteRT first once TensorRT is out
