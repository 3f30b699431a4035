"""Broker credentials for devices: a fleet CA, per-device passwords and client certificates, mosquitto ACLs.

Transport security is an extra layer (DESIGN.md): even a device that leaks its
credentials cannot install anything unsigned. What it buys: a device connects only
with its own credentials, reads only its own inference inputs and commands, and
publishes only under its own ``edgefleet/v1/dev/{id}/`` tree (plus repository
requests) — it cannot impersonate another device's status or answers.

Layout of the broker directory ``fleet provision --broker-dir B``::

    B/ca.pem, B/ca.key            the fleet CA (ECDSA P-256: every TLS stack on a Pi or Jetson takes it)
    B/server.pem, B/server.key    the broker's certificate
    B/certs/{name}.pem|key        client certificates (CN = the MQTT user name)
    B/passwords                   mosquitto password file (PBKDF2-SHA512, mosquitto's $7$ format)
    B/acl                         mosquitto ACL, regenerated from B/principals.json
    B/mosquitto.conf              listeners: TLS + password (8883), mutual TLS (8884)
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.errors import EdgefleetError
from agent.files import atomic_write
from agent.settings import write_config
from agent.wire import ROOT, valid_device_id
from fleet.settings import write_fleet_config

__all__ = ["BrokerAuth", "Credentials", "ProvisionError", "controller_bundle", "device_bundle", "mosquitto_password_hash"]

CONTROLLER = "edgefleet-controller"
MESSAGE_SIZE_LIMIT = 2 * 1024 * 1024  # bytes: a 1 MiB telemetry batch or 256 KiB chunk fits, a 30 MB report does not


class ProvisionError(EdgefleetError):
    code = "bad_provision"


def mosquitto_password_hash(password: str, salt: bytes | None = None, iterations: int = 101) -> str:
    """mosquitto 2's ``$7$`` entry: PBKDF2-HMAC-SHA512 (what ``mosquitto_passwd`` writes)."""
    salt = salt or os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


@dataclass(frozen=True)
class Credentials:
    name: str
    role: str  # device | app | controller
    password: str
    cert: Path
    key: Path
    ca: Path


def _write_private(path: Path, data: bytes) -> None:
    atomic_write(path, data)
    path.chmod(0o600)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


class BrokerAuth:
    """The broker side of fleet security; every change rewrites the password and ACL files atomically."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    @property
    def ca_pem(self) -> Path:
        return self.directory / "ca.pem"

    def init(self, hostnames: list[str], days: int = 3650) -> Credentials:
        """The fleet CA, the broker's certificate for ``hostnames``, and the controller's credentials (returned: its
        password exists only here; ``controller_bundle`` keeps it for ``fleet serve``)."""
        if self.ca_pem.exists():
            raise ProvisionError(f"{self.directory} already holds a fleet CA")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o700)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgefleet fleet CA")])
        now = dt.datetime.now(dt.timezone.utc)
        ca = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .sign(key, hashes.SHA256())
        )
        _write_private(self.directory / "ca.key", _key_pem(key))
        atomic_write(self.ca_pem, ca.public_bytes(serialization.Encoding.PEM))
        self._issue("server", hostnames, server=True)
        self._save({})
        return self.add(CONTROLLER, "controller")

    def _ca(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        try:
            cert = x509.load_pem_x509_certificate(self.ca_pem.read_bytes())
            key = serialization.load_pem_private_key((self.directory / "ca.key").read_bytes(), None)
        except (OSError, ValueError) as exc:
            raise ProvisionError(f"{self.directory}: no usable fleet CA ({exc}); run `fleet provision --init` first") from exc
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return cert, key

    def _issue(self, name: str, hostnames: list[str] | None = None, server: bool = False, days: int = 825) -> tuple[Path, Path]:
        ca, ca_key = self._ca()
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
            )
        )
        if server:
            import ipaddress

            alt: list[x509.GeneralName] = []
            for h in hostnames or ["localhost"]:
                try:
                    alt.append(x509.IPAddress(ipaddress.ip_address(h)))
                except ValueError:
                    alt.append(x509.DNSName(h))
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        certs = self.directory / ("." if server else "certs")
        certs.mkdir(exist_ok=True)
        cert_path, key_path = certs / f"{name}.pem", certs / f"{name}.key"
        _write_private(key_path, _key_pem(key))
        atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        return cert_path, key_path

    def _principals(self) -> dict[str, dict[str, str]]:
        path = self.directory / "principals.json"
        if not path.exists():
            raise ProvisionError(f"{self.directory}: not initialised; run `fleet provision --init` first")
        data: dict[str, dict[str, str]] = json.loads(path.read_text())
        return data

    def _save(self, principals: dict[str, dict[str, str]]) -> None:
        _write_private(self.directory / "principals.json", json.dumps(principals, indent=1, sort_keys=True).encode())
        lines = [f"{name}:{p['hash']}" for name, p in sorted(principals.items())]
        _write_private(self.directory / "passwords", ("\n".join(lines) + "\n").encode())
        _write_private(self.directory / "acl", acl(principals).encode())

    def add(self, name: str, role: str = "device") -> Credentials:
        """New (or replaced) credentials for ``name``: a password and a client certificate; the ACL follows."""
        if role == "device":
            valid_device_id(name)
        elif role not in ("app", "controller") or not name.replace("-", "").replace("_", "").isalnum():
            raise ProvisionError(f"bad principal {role} {name!r}")
        principals = self._principals()
        password = secrets.token_urlsafe(24)
        cert, key = self._issue(name)  # CN = the user name: on the mutual-TLS listener the identity is the user
        principals[name] = {"role": role, "hash": mosquitto_password_hash(password)}
        self._save(principals)
        return Credentials(name, role, password, cert, key, self.ca_pem)

    def revoke(self, name: str) -> None:
        """Remove the password and ACL entry (the broker rereads them on SIGHUP). Certificates need the CRL (not built)."""
        principals = self._principals()
        if principals.pop(name, None) is None:
            raise ProvisionError(f"{name} is not provisioned")
        self._save(principals)

    def global_config(self) -> list[str]:
        d = self.directory
        return [
            "allow_anonymous false",
            f"password_file {d / 'passwords'}",
            f"acl_file {d / 'acl'}",
            # no peer may push more than this in one message (a 30 MB retained `reported` took the controller from 13 %
            # to 88 % CPU); the largest legitimate one is a 1 MiB telemetry batch, a chunk is 256 KiB
            f"max_packet_size {MESSAGE_SIZE_LIMIT}",
            "max_inflight_messages 64",  # per client: a flooding device waits for its acknowledgements
        ]

    def listener_config(self, mutual_tls: bool = False) -> list[str]:
        """TLS options for the listener line above them; ``mutual_tls``: a client certificate is the identity."""
        d = self.directory
        lines = [f"cafile {d / 'ca.pem'}", f"certfile {d / 'server.pem'}", f"keyfile {d / 'server.key'}", "tls_version tlsv1.2"]
        return lines + (["require_certificate true", "use_identity_as_username true"] if mutual_tls else [])

    def mosquitto_config(self, tls_port: int = 8883, mtls_port: int = 8884, host: str = "0.0.0.0") -> str:
        """A whole mosquitto.conf: TLS + password on ``tls_port``, mutual TLS on ``mtls_port``."""
        lines = [
            *self.global_config(),
            "set_tcp_nodelay true",
            "max_queued_messages 10000",
            f"listener {tls_port} {host}",
            *self.listener_config(),
            f"listener {mtls_port} {host}",
            *self.listener_config(mutual_tls=True),
        ]
        return "\n".join(lines) + "\n"


def acl(principals: dict[str, dict[str, str]]) -> str:
    """mosquitto ACL: devices confined to their own tree plus repository requests; apps may ask any device."""
    out = ["# generated by `fleet provision`; edits are overwritten"]
    for name, p in sorted(principals.items()):
        role = p["role"]
        out.append(f"\nuser {name}")
        if role == "controller":
            out.append(f"topic readwrite {ROOT}/#")
        elif role == "device":
            out += [f"topic readwrite {ROOT}/dev/{name}/#", f"topic write {ROOT}/repo/req/{name}"]  # its own requests only
        else:  # app: send inference requests to any device and read the answers addressed to it
            # inference requests only under its own name: the device's per-client rate limit keys on it
            out += [f"topic write {ROOT}/dev/+/infer/+/{name}", f"topic read {ROOT}/dev/+/pred/+/{name}"]
    return "\n".join(out) + "\n"


def device_bundle(
    creds: Credentials,
    out: Path,
    broker_host: str,
    broker_port: int,
    image_root: Path | None = None,
    director_root: Path | None = None,
) -> Path:
    """What goes onto the device: credentials, the fleet CA, the trusted roots and an agent.toml using them."""
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    out.chmod(0o700)
    _write_private(out / "broker-password", creds.password.encode())
    shutil.copy(creds.cert, out / "device.pem")
    _write_private(out / "device.key", creds.key.read_bytes())
    shutil.copy(creds.ca, out / "fleet-ca.pem")
    update: dict[str, Any] = {}
    for name, root in (("image_root", image_root), ("director_root", director_root)):
        if root is not None:
            shutil.copy(root, out / f"{name.split('_')[0]}-root.json")
            update[name] = f"/etc/edgefleet/{name.split('_')[0]}-root.json"
    etc = "/etc/edgefleet"
    broker = {
        "host": broker_host,
        "port": broker_port,
        "username": creds.name,
        "password_file": f"{etc}/broker-password",
        "tls_ca": f"{etc}/fleet-ca.pem",
        "tls_cert": f"{etc}/device.pem",
        "tls_key": f"{etc}/device.key",
    }
    write_config(out / "agent.toml", {"device_id": creds.name, "broker": broker, "update": update})
    return out


def controller_bundle(creds: Credentials, config: Path, broker_host: str, broker_port: int) -> Path:
    """The controller's side of the secured broker: its credentials beside ``config`` and a fleet.toml using them.

    Layout: ``config`` (fleet.toml, 0600) and ``{config's folder}/fleet-credentials/`` (0700) with
    ``broker-password`` (0600), ``fleet-ca.pem``, ``controller.pem`` and ``controller.key`` (0600) — copies, so the
    controller needs nothing from the broker directory (which holds the CA's private key). Paths in the TOML are
    absolute: every ``fleet`` command finds them from any working directory. Refuses to replace an existing file.
    """
    import shutil

    if config.exists():
        raise ProvisionError(f"{config} already exists; move it away or choose another --config")
    folder = (config.parent / "fleet-credentials").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    _write_private(folder / "broker-password", creds.password.encode())
    shutil.copy(creds.ca, folder / "fleet-ca.pem")
    shutil.copy(creds.cert, folder / "controller.pem")
    _write_private(folder / "controller.key", creds.key.read_bytes())
    broker = {
        "host": broker_host,
        "port": broker_port,
        "username": creds.name,
        "password_file": folder / "broker-password",
        "tls_ca": folder / "fleet-ca.pem",
        "tls_cert": folder / "controller.pem",
        "tls_key": folder / "controller.key",
    }
    return write_fleet_config(config, broker)
