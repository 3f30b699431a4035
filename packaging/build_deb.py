"""Build the agent's wheel and an architecture-specific .deb around it.

    python packaging/build_deb.py --out dist [--arch arm64] [--extras litert] [--vendor]

The .deb holds the unit (``/lib/systemd/system/edge-agent.service``), a default config
(``/etc/edgefleet/agent.toml``, a conffile), the wheel under ``/opt/edgefleet/wheels`` and
maintainer scripts: postinst creates the ``edgefleet`` system user (groups render, video),
a venv in ``/opt/edgefleet/venv`` with the wheel and the runtime extras, and enables and
starts the service; prerm stops (and on removal disables) it; postrm --purge removes the
user, the venv and the state. ``--vendor`` also puts every dependency's wheel in the
package (built on a machine of the target architecture) so postinst needs no network.
Why a venv and not python3-* packages: the runtimes (LiteRT, OpenVINO, ONNX Runtime) are
not packaged by Debian.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "edgefleet-agent"

POSTINST = """#!/bin/sh
set -e
if [ "$1" = configure ]; then
    getent group edgefleet >/dev/null || addgroup --system edgefleet
    getent passwd edgefleet >/dev/null || adduser --system --ingroup edgefleet --home /var/lib/edgefleet \\
        --no-create-home --shell /usr/sbin/nologin edgefleet
    for g in render video; do
        if getent group "$g" >/dev/null; then adduser edgefleet "$g" >/dev/null; fi
    done
    python3 -m venv /opt/edgefleet/venv
    /opt/edgefleet/venv/bin/pip install --quiet --upgrade {index} --find-links /opt/edgefleet/wheels \\
        "edgefleet[{extras}]=={version}"
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload
        systemctl enable edge-agent.service
        systemctl restart edge-agent.service || true
    fi
fi
exit 0
"""

PRERM = """#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl stop edge-agent.service || true
    if [ "$1" = remove ]; then systemctl disable edge-agent.service || true; fi
fi
exit 0
"""

POSTRM = """#!/bin/sh
set -e
if [ "$1" = purge ]; then
    rm -rf /opt/edgefleet/venv /var/lib/edgefleet /var/cache/edgefleet
    getent passwd edgefleet >/dev/null && deluser --system edgefleet >/dev/null || true
fi
if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
exit 0
"""


def _version() -> str:
    text = (ROOT / "agent" / "__init__.py").read_text()
    return text.split('__version__ = "', 1)[1].split('"', 1)[0]


def _arch() -> str:
    return subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True, check=True).stdout.strip()


def build_wheel(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(ROOT)], check=True)
    return max(out.glob("edgefleet-*.whl"), key=lambda p: p.stat().st_mtime)


def build_deb(out: Path, arch: str | None = None, extras: str = "litert", vendor: bool = False) -> Path:
    """The .deb path; raises CalledProcessError when pip or dpkg-deb fail."""
    arch = arch or _arch()
    version = _version()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp) / "root"
        wheels = stage / "opt/edgefleet/wheels"
        wheel = build_wheel(wheels)
        if vendor:
            if arch != _arch():
                raise SystemExit(f"--vendor downloads wheels for this machine ({_arch()}); build on an {arch} machine")
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "-d", str(wheels), f"{wheel}[{extras}]"], check=True)
        (stage / "lib/systemd/system").mkdir(parents=True)
        shutil.copy(ROOT / "systemd/edge-agent.service", stage / "lib/systemd/system/edge-agent.service")
        (stage / "etc/edgefleet").mkdir(parents=True)
        shutil.copy(ROOT / "packaging/agent.toml", stage / "etc/edgefleet/agent.toml")
        debian = stage / "DEBIAN"
        debian.mkdir()
        size_kb = sum(p.stat().st_size for p in stage.rglob("*") if p.is_file()) // 1024 + 1
        (debian / "control").write_text(
            f"Package: {PACKAGE}\n"
            f"Version: {version}\n"
            f"Architecture: {arch}\n"
            "Maintainer: edgefleet <maintainers@edgefleet.invalid>\n"
            f"Installed-Size: {size_kb}\n"
            "Depends: python3 (>= 3.10), python3-venv, adduser\n"
            "Section: net\n"
            "Priority: optional\n"
            "Description: edgefleet edge agent\n"
            " Runs machine-learning models on an edge device: signed model updates over MQTT,\n"
            " health-checked hot swaps with rollback, inference over MQTT and telemetry.\n"
        )
        (debian / "conffiles").write_text("/etc/edgefleet/agent.toml\n")
        index = "--no-index" if vendor else ""
        scripts = {"postinst": POSTINST.format(index=index, extras=extras, version=version), "prerm": PRERM, "postrm": POSTRM}
        for name, text in scripts.items():
            (debian / name).write_text(text)
            (debian / name).chmod(0o755)
        deb = out / f"{PACKAGE}_{version}_{arch}.deb"
        subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(stage), str(deb)], check=True, capture_output=True)
    return deb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=ROOT / "dist")
    parser.add_argument("--arch", help="Debian architecture (default: this machine's)")
    parser.add_argument("--extras", default="litert", help="runtime extras postinst installs, e.g. litert,onnx or openvino")
    parser.add_argument("--vendor", action="store_true", help="include every dependency's wheel (offline install)")
    args = parser.parse_args()
    print(build_deb(args.out, args.arch, args.extras, args.vendor))


if __name__ == "__main__":
    main()
