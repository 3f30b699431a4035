"""What this device is, read from files only.

Why files only: detection must be cheap, side-effect free and testable on fake
trees (a Jetson's ``/etc/nv_tegra_release``, an NPU's sysfs) that this machine
lacks. Every reader tolerates missing, unreadable or garbage files: the profile
then says less, and ``warnings`` says why, but detection never raises.
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["HardwareProfile", "CpuInfo", "detect"]

# Largest file we read from a root tree: sysfs and procfs files are tiny; a huge
# file under a fake or hostile root must not cost memory.
_MAX_READ = 256 * 1024

INTEL_VENDOR = "0x8086"
NVIDIA_VENDOR = "0x10de"
CORAL_USB_IDS = {("1a6e", "089a"), ("18d1", "9302")}  # before and after the Edge TPU firmware loads
INTEL_NPU_DRIVER = "intel_vpu"

_ARM_ARCH = {"8": "aarch64", "7": "armv7l", "6": "armv6l"}

# The CPU flags that change which runtime or precision is fastest; the rest is noise in a report.
INTERESTING_CPU_FLAGS = frozenset(
    {
        "avx",
        "avx2",
        "fma",
        "f16c",
        "avx512f",
        "avx512_vnni",
        "avx_vnni",
        "avx512_bf16",
        "amx_tile",
        "amx_int8",
        "amx_bf16",
        "neon",
        "asimd",
        "asimddp",
        "asimdhp",
        "fphp",
        "i8mm",
        "sve",
        "vfpv4",
    }
)


class CpuInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    model: str = ""
    cores: int = 0
    flags: tuple[str, ...] = ()  # only the flags in INTERESTING_CPU_FLAGS, sorted

    @property
    def avx2(self) -> bool:
        return "avx2" in self.flags

    @property
    def avx512_vnni(self) -> bool:
        return "avx512_vnni" in self.flags

    @property
    def amx(self) -> bool:
        return bool({"amx_tile", "amx_int8", "amx_bf16"} & set(self.flags))

    @property
    def arm_dotprod(self) -> bool:
        """ARMv8.2 dot-product instructions, which make int8 kernels fast on a Pi 5."""
        return "asimddp" in self.flags


class HardwareProfile(BaseModel):
    """The facts selection needs; serialisable so the device can report it."""

    model_config = ConfigDict(frozen=True)

    root: str = "/"
    arch: str = "unknown"
    cpu: CpuInfo = CpuInfo()
    memory_bytes: int = 0
    board: str = ""  # /proc/device-tree/model, e.g. "Raspberry Pi 5 Model B Rev 1.0"
    raspberry_pi_model: str | None = None  # "5", "4", "Zero 2 W"
    jetson_model: str | None = None  # "AGX Orin Developer Kit"
    l4t_release: str | None = None  # "36.3.0"
    intel_npu: bool = False
    other_accelerators: list[str] = Field(default_factory=list)  # accel drivers that are not an Intel NPU, e.g. amdxdna
    intel_gpu: bool = False
    nvidia_gpu: bool = False
    nvidia_gpu_name: str | None = None
    coral: list[str] = Field(default_factory=list)  # "pcie:/dev/apex_0", "usb:18d1:9302"
    warnings: list[str] = Field(default_factory=list)

    @property
    def is_arm(self) -> bool:
        return self.arch.startswith(("aarch64", "arm"))

    @property
    def is_x86(self) -> bool:
        return self.arch in {"x86_64", "amd64", "i686", "i386"}

    @property
    def is_jetson(self) -> bool:
        return self.jetson_model is not None

    @property
    def has_cuda_gpu(self) -> bool:
        return self.nvidia_gpu or self.is_jetson

    @property
    def has_coral(self) -> bool:
        return bool(self.coral)

    def summary(self) -> str:
        parts = [self.arch, self.cpu.model or "cpu?"]
        if self.raspberry_pi_model:
            parts.append(f"Raspberry Pi {self.raspberry_pi_model}")
        if self.jetson_model:
            parts.append(f"Jetson {self.jetson_model} (L4T {self.l4t_release or '?'})")
        if self.intel_npu:
            parts.append("Intel NPU")
        if self.intel_gpu:
            parts.append("Intel GPU")
        if self.nvidia_gpu:
            parts.append(f"NVIDIA GPU {self.nvidia_gpu_name or ''}".strip())
        if self.coral:
            parts.append("Coral " + ",".join(self.coral))
        return ", ".join(parts)


class _Reader:
    """Reads files below a root, remembering what could not be read."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.warnings: list[str] = []

    def path(self, absolute: str) -> Path:
        return self.root / absolute.lstrip("/")

    def text(self, absolute: str | Path) -> str | None:
        p = absolute if isinstance(absolute, Path) else self.path(absolute)
        try:
            with open(p, "rb") as f:
                raw = f.read(_MAX_READ)
        except FileNotFoundError:
            return None
        except OSError as exc:  # permission, EISDIR, I/O error: note it, detect the rest
            self.warnings.append(f"cannot read {p}: {exc.strerror or exc}")
            return None
        text = raw.decode("utf-8", errors="replace").replace("\x00", "").strip()
        if "\ufffd" in text:
            self.warnings.append(f"{p} is not valid UTF-8")
        return text

    def glob(self, absolute_dir: str, pattern: str) -> list[Path]:
        try:
            return sorted(self.path(absolute_dir).glob(pattern))
        except OSError:
            return []

    def link_name(self, p: Path) -> str | None:
        try:
            return os.path.basename(os.readlink(p))
        except OSError:
            return None


def _parse_cpuinfo(text: str) -> tuple[CpuInfo, str | None, str | None]:
    """CPU facts plus the architecture and board model cpuinfo reveals (ARM boards print ``Model``)."""
    model = ""
    flags: set[str] = set()
    processors = 0
    arch: str | None = None
    board: str | None = None
    x86_vendor = False
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip().lower(), value.strip()
        if key == "processor":
            processors += 1
        elif key == "model name" and not model:
            model = value
        elif key in {"flags", "features"} and not flags:
            flags = set(value.split())
        elif key == "cpu architecture" and arch is None:
            arch = _ARM_ARCH.get(value.split()[0] if value else "", None)
        elif key == "vendor_id":
            x86_vendor = True
        elif key == "model" and not value.isdigit():
            board = value
    if arch is None and x86_vendor:
        arch = "x86_64" if "lm" in flags or not flags else "i686"
    kept = tuple(sorted(flags & INTERESTING_CPU_FLAGS))
    return CpuInfo(model=model, cores=processors, flags=kept), arch, board


def _parse_meminfo(text: str) -> int:
    m = re.search(r"^MemTotal:\s+(\d+)\s*kB", text, re.MULTILINE)
    return int(m.group(1)) * 1024 if m else 0


def _parse_l4t(text: str) -> str | None:
    """``# R36 (release), REVISION: 3.0, ...`` -> ``36.3.0``."""
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def _parse_pi_model(board: str) -> str | None:
    m = re.search(r"Raspberry Pi (Compute Module \d+|Zero 2 W|Zero W|Zero|\d+|Model [AB]\+?)", board)
    return m.group(1) if m else None


def detect(root: str | Path = "/", arch: str | None = None) -> HardwareProfile:
    """Read the hardware profile from the tree at ``root``.

    ``arch`` defaults to what ``/proc/cpuinfo`` under the root implies, and for the
    real root (``/``) to ``platform.machine()`` when cpuinfo does not say.
    Each step below reads its own files; they run in a fixed order so ``warnings`` does too.
    """
    root_path = Path(root)
    r = _Reader(root_path)
    real_root = root_path.resolve() == Path("/")

    cpu, cpu_arch, cpu_board = _parse_cpuinfo(r.text("/proc/cpuinfo") or "")
    if arch is None:
        arch = cpu_arch or (platform.machine() if real_root else "unknown")
    memory = _parse_meminfo(r.text("/proc/meminfo") or "")
    board = r.text("/proc/device-tree/model") or cpu_board or ""
    jetson_model, l4t = _detect_jetson(r, board)
    intel_npu, other_accel = _detect_accel(r)
    intel_gpu = _detect_intel_gpu(r)
    nvidia_gpu, nvidia_name = _detect_nvidia_gpu(r)
    coral = _detect_coral(r)
    return HardwareProfile(
        root=str(root_path),
        arch=arch,
        cpu=cpu,
        memory_bytes=memory,
        board=board,
        raspberry_pi_model=_parse_pi_model(board) if "Raspberry Pi" in board else None,
        jetson_model=jetson_model,
        l4t_release=l4t,
        intel_npu=intel_npu,
        other_accelerators=other_accel,
        intel_gpu=intel_gpu,
        nvidia_gpu=nvidia_gpu,
        nvidia_gpu_name=nvidia_name,
        coral=coral,
        warnings=r.warnings,
    )


def _detect_jetson(r: _Reader, board: str) -> tuple[str | None, str | None]:
    """(Jetson model, L4T release): a Jetson names itself in the device tree; L4T ships ``nv_tegra_release``."""
    tegra = r.text("/etc/nv_tegra_release")
    jetson_model: str | None = None
    if "NVIDIA Jetson" in board or "nvidia" in (r.text("/proc/device-tree/compatible") or "").lower():
        jetson_model = board.replace("NVIDIA Jetson", "").strip() or "unknown"
    elif tegra:
        jetson_model = board or "unknown"
    l4t = _parse_l4t(tegra) if tegra else None
    if tegra and l4t is None:
        r.warnings.append("/etc/nv_tegra_release has no recognisable release line")
    return jetson_model, l4t


def _detect_accel(r: _Reader) -> tuple[bool, list[str]]:
    """(an Intel NPU is present, the drivers of other accel devices), from ``/sys/class/accel``."""
    intel_npu = False
    other_accel: list[str] = []
    for accel in r.glob("/sys/class/accel", "accel*"):
        driver = r.link_name(accel / "device" / "driver")
        if driver == INTEL_NPU_DRIVER:
            intel_npu = True
        elif driver:
            other_accel.append(driver)
        else:
            r.warnings.append(f"{accel.name}: driver unknown")
    return intel_npu, other_accel


def _detect_intel_gpu(r: _Reader) -> bool:
    """A DRM render node whose PCI vendor is Intel: what OpenVINO's GPU plugin needs."""
    intel_gpu = False
    for render in r.glob("/dev/dri", "renderD*"):
        vendor = r.text(f"/sys/class/drm/{render.name}/device/vendor")
        if vendor and vendor.lower() == INTEL_VENDOR:
            intel_gpu = True
    return intel_gpu


def _detect_nvidia_gpu(r: _Reader) -> tuple[bool, str | None]:
    """(an NVIDIA GPU is present, its model name): the device node, or the driver's procfs report."""
    nvidia_gpu = r.path("/dev/nvidia0").exists()
    for info in r.glob("/proc/driver/nvidia/gpus", "*/information"):
        m = re.search(r"^Model:\s*(.+)$", r.text(info) or "", re.MULTILINE)
        if m:
            return True, m.group(1).strip()
    return nvidia_gpu, None


def _detect_coral(r: _Reader) -> list[str]:
    """Edge TPUs: PCIe ones as ``/dev/apex_*`` nodes, USB ones by vendor and product id."""
    coral = [f"pcie:/dev/{p.name}" for p in r.glob("/dev", "apex_*")]
    for usb in r.glob("/sys/bus/usb/devices", "*"):
        vid, pid = r.text(usb / "idVendor"), r.text(usb / "idProduct")
        if vid and pid and (vid.lower(), pid.lower()) in CORAL_USB_IDS:
            coral.append(f"usb:{vid.lower()}:{pid.lower()}")
    return coral
