"""Hardware trees for machines this one is not: only the files `agent.hardware.detect` reads.

Used by the tests (every board without owning one) and by `fleet demo` (three devices with different
hardware on one machine). Nothing here is read by a real agent.
"""

from __future__ import annotations

import os
from pathlib import Path

X86_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: {model}
flags\t\t: fpu vme sse sse2 lm avx avx2 fma f16c {extra}

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: {model}
flags\t\t: fpu vme sse sse2 lm avx avx2 fma f16c {extra}
"""

ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8
CPU part\t: 0xd0b

processor\t: 1
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU architecture: 8

processor\t: 2
CPU architecture: 8

processor\t: 3
CPU architecture: 8

Revision\t: d04170
Model\t\t: {board}
"""

MEMINFO = "MemTotal:       {kb} kB\nMemFree:        1000 kB\n"


def write(root: Path, rel: str, content: str | bytes) -> Path:
    p = root / rel.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content)
    return p


def accel(root: Path, n: int, driver: str) -> None:
    dev = root / f"sys/devices/pci0000:00/0000:00:0b.{n}"
    dev.mkdir(parents=True, exist_ok=True)
    drv = root / f"sys/bus/pci/drivers/{driver}"
    drv.mkdir(parents=True, exist_ok=True)
    os.symlink(os.path.relpath(drv, dev), dev / "driver")
    cls = root / "sys/class/accel"
    cls.mkdir(parents=True, exist_ok=True)
    (cls / f"accel{n}").mkdir()
    os.symlink(os.path.relpath(dev, cls / f"accel{n}"), cls / f"accel{n}" / "device")
    write(root, f"/dev/accel/accel{n}", "")


def raspberry_pi_5(root: Path) -> Path:
    board = "Raspberry Pi 5 Model B Rev 1.0"
    write(root, "/proc/cpuinfo", ARM_CPUINFO.format(board=board))
    write(root, "/proc/meminfo", MEMINFO.format(kb=8 * 1024 * 1024))
    write(root, "/proc/device-tree/model", board.encode() + b"\x00")
    return root


def jetson_orin(root: Path) -> Path:
    board = "NVIDIA Jetson AGX Orin Developer Kit"
    write(root, "/proc/cpuinfo", ARM_CPUINFO.format(board=board))
    write(root, "/proc/meminfo", MEMINFO.format(kb=64 * 1024 * 1024))
    write(root, "/proc/device-tree/model", board.encode() + b"\x00")
    write(root, "/proc/device-tree/compatible", b"nvidia,p3737-0000+p3701-0005\x00nvidia,tegra234\x00")
    write(
        root,
        "/etc/nv_tegra_release",
        "# R36 (release), REVISION: 3.0, GCID: 36923193, BOARD: generic, EABI: aarch64, DATE: Fri Jul 19 23:24:25 UTC 2024\n",
    )
    write(root, "/dev/nvhost-ctrl-gpu", "")
    return root


def intel_core_ultra(root: Path) -> Path:
    write(root, "/proc/cpuinfo", X86_CPUINFO.format(model="Intel(R) Core(TM) Ultra 7 155H", extra="avx_vnni"))
    write(root, "/proc/meminfo", MEMINFO.format(kb=32 * 1024 * 1024))
    accel(root, 0, "intel_vpu")
    write(root, "/dev/dri/renderD128", "")
    write(root, "/sys/class/drm/renderD128/device/vendor", "0x8086\n")
    return root


def amd_xdna(root: Path) -> Path:
    write(root, "/proc/cpuinfo", X86_CPUINFO.format(model="AMD Ryzen AI 9 HX 370", extra="avx512f avx512_vnni"))
    write(root, "/proc/meminfo", MEMINFO.format(kb=32 * 1024 * 1024))
    accel(root, 0, "amdxdna")
    write(root, "/dev/dri/renderD128", "")
    write(root, "/sys/class/drm/renderD128/device/vendor", "0x1002\n")
    return root


def coral_usb(root: Path, programmed: bool = True) -> Path:
    write(root, "/proc/cpuinfo", ARM_CPUINFO.format(board="Raspberry Pi 4 Model B Rev 1.4"))
    write(root, "/proc/device-tree/model", b"Raspberry Pi 4 Model B Rev 1.4\x00")
    vid, pid = ("18d1", "9302") if programmed else ("1a6e", "089a")
    write(root, "/sys/bus/usb/devices/1-1.2/idVendor", vid + "\n")
    write(root, "/sys/bus/usb/devices/1-1.2/idProduct", pid + "\n")
    write(root, "/sys/bus/usb/devices/1-1.1/idVendor", "046d\n")  # a keyboard
    write(root, "/sys/bus/usb/devices/1-1.1/idProduct", "c31c\n")
    return root


def coral_pcie(root: Path) -> Path:
    plain_x86(root)
    write(root, "/dev/apex_0", "")
    return root


def plain_x86(root: Path) -> Path:
    write(root, "/proc/cpuinfo", X86_CPUINFO.format(model="Intel(R) Xeon(R) CPU E5-2680 v4", extra=""))
    write(root, "/proc/meminfo", MEMINFO.format(kb=16 * 1024 * 1024))
    return root


def nvidia_x86(root: Path) -> Path:
    plain_x86(root)
    write(root, "/dev/nvidia0", "")
    write(root, "/proc/driver/nvidia/gpus/0000:01:00.0/information", "Model: \t\t NVIDIA L4\nIRQ:   \t\t 42\n")
    return root
