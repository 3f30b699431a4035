"""The systemd unit and the .deb: verified by systemd's own analyzer and inspected with dpkg-deb."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from agent.settings import load_settings

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "edge-agent.service"


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNIT)
    return parser


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed (package systemd)")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    # verify also checks that ExecStart exists: point it at this checkout's edge-agent, the rest unchanged
    local = tmp_path / "edge-agent.service"
    local.write_text(UNIT.read_text().replace("/opt/edgefleet/venv/bin/edge-agent", str(Path(sys.executable).parent / "edge-agent")))
    done = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "edge-agent.service:" not in done.stderr, done.stderr  # no warnings about our unit
    broken = tmp_path / "broken.service"
    broken.write_text(local.read_text().replace("Type=notify", "Type=notifyy"))
    done = subprocess.run(["systemd-analyze", "verify", str(broken)], capture_output=True, text=True, timeout=60)
    assert "Failed to parse service type" in done.stderr  # the analyzer does read what we wrote


def test_unit_is_notify_watched_hardened_and_still_reaches_accelerators() -> None:
    s = unit()["Service"]
    assert s["Type"] == "notify" and s["WatchdogSec"] and s["Restart"] == "on-failure" and s["StateDirectory"] == "edgefleet"
    assert s["ProtectSystem"] == "strict" and s["NoNewPrivileges"] == "yes" and s["ProtectHome"] == "yes"
    assert set(s["SupplementaryGroups"].split()) == {"render", "video"}  # /dev/accel*, /dev/dri/*, /dev/apex_*; /dev/nvidia*
    assert "PrivateDevices" not in s and s.get("DevicePolicy", "auto") == "auto"  # device nodes stay visible
    assert "ExecReload" in s and "-HUP" in s["ExecReload"]


def test_deb_holds_the_unit_config_wheel_and_maintainer_scripts(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "packaging"))
    try:
        import build_deb
    finally:
        sys.path.pop(0)
    deb = build_deb.build_deb(tmp_path / "dist", arch="arm64", extras="litert")
    assert deb.name == "edgefleet-agent_0.1.0_arm64.deb"
    field = lambda name: subprocess.run(["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True, check=True).stdout.strip()  # noqa: E731
    assert field("Package") == "edgefleet-agent" and field("Architecture") == "arm64"
    assert "python3-venv" in field("Depends")
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
    for path in (
        "./lib/systemd/system/edge-agent.service",
        "./etc/edgefleet/agent.toml",
        "./opt/edgefleet/wheels/edgefleet-0.1.0-py3-none-any.whl",
    ):
        assert path in listing
    control = tmp_path / "control"
    subprocess.run(["dpkg-deb", "-e", str(deb), str(control)], check=True)
    assert (control / "conffiles").read_text().split() == ["/etc/edgefleet/agent.toml"]
    for script in ("postinst", "prerm", "postrm"):
        assert (control / script).stat().st_mode & 0o111
        assert subprocess.run(["sh", "-n", str(control / script)]).returncode == 0
    postinst = (control / "postinst").read_text()
    assert "adduser --system" in postinst and "python3 -m venv /opt/edgefleet/venv" in postinst and "edgefleet[litert]==0.1.0" in postinst
    assert "systemctl enable edge-agent.service" in postinst
    assert "systemctl stop edge-agent.service" in (control / "prerm").read_text()
    files = tmp_path / "files"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(files)], check=True)
    settings = load_settings(files / "etc/edgefleet/agent.toml")  # the shipped default config is valid
    assert settings.state_dir == Path("/var/lib/edgefleet")
    with zipfile.ZipFile(files / "opt/edgefleet/wheels/edgefleet-0.1.0-py3-none-any.whl") as whl:
        names = whl.namelist()
    assert "agent/daemon.py" in names and "agent/runtimes/litert.py" in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    with zipfile.ZipFile(files / "opt/edgefleet/wheels/edgefleet-0.1.0-py3-none-any.whl") as whl:
        assert "edge-agent = agent.cli:main" in whl.read(entry).decode()
