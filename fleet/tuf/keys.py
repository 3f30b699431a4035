"""Signing keys for the image and director repositories: Ed25519, one file per private key, 0600.

Roles: ``root`` and ``targets`` are meant to be kept offline (copy them off the
controller after ``fleet release``), ``snapshot``, ``timestamp`` and ``director``
are the controller's online keys. ``keys.json`` beside them lists every role's
public keys and threshold, so the repository can be built from public data alone.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner, SSlibKey

from agent.errors import EdgefleetError

__all__ = ["ROLES", "ONLINE_ROLES", "KeyStore", "KeyError_", "UntrustedSigningKey", "init_keys"]

ROLES = ("root", "targets", "snapshot", "timestamp", "director")
ONLINE_ROLES = ("snapshot", "timestamp", "director")
INDEX = "keys.json"


class KeyError_(EdgefleetError):
    """Keys missing, unreadable, or not matching ``keys.json``."""

    code = "bad_keys"


class UntrustedSigningKey(KeyError_):
    """The private keys here are not the ones the repository's newest root names for a role: a rotation made on
    another host (its keys directory holds the new ones). Signing with these would publish metadata that every
    device refuses, so nothing is signed until the new keys are copied here."""

    code = "untrusted_signing_key"


@dataclass
class KeyStore:
    """A directory of private keys plus the public index."""

    directory: Path

    def index(self) -> dict[str, dict[str, Any]]:
        try:
            return json.loads((self.directory / INDEX).read_text())  # type: ignore[no-any-return]
        except (OSError, ValueError) as exc:
            raise KeyError_(f"cannot read {self.directory / INDEX}: {exc}") from exc

    def public_keys(self, role: str) -> list[SSlibKey]:
        entry = self.index().get(role)
        if not isinstance(entry, dict):
            raise KeyError_(f"no {role} keys in {self.directory}")
        return [SSlibKey.from_dict(k["keyid"], dict(k["key"])) for k in entry["keys"]]

    def threshold(self, role: str) -> int:
        entry = self.index()[role]
        return int(entry["threshold"])

    def signers(self, role: str) -> list[CryptoSigner]:
        """Every private key of ``role`` that is present (offline keys may have been moved away)."""
        out = []
        for key in self.public_keys(role):
            path = self.directory / f"{role}-{key.keyid[:16]}.pem"
            if not path.exists():
                continue
            try:
                private = load_pem_private_key(path.read_bytes(), password=None)
            except (OSError, ValueError) as exc:
                raise KeyError_(f"cannot load {path.name}: {exc}") from exc
            out.append(CryptoSigner(private, key))  # type: ignore[arg-type]
        if not out:
            raise KeyError_(f"no private {role} key in {self.directory} (offline keys must be brought back to sign)")
        return out

    def add(self, role: str, count: int, threshold: int) -> list[CryptoSigner]:
        """Generate ``count`` new keys for ``role`` and make them (with ``threshold``) the role's entry."""
        signers = self.generate(role, count)
        self.set_role(role, signers, threshold)
        return signers

    def generate(self, role: str, count: int) -> list[CryptoSigner]:
        """New private keys on disk, not yet listed in ``keys.json`` (see ``set_role``)."""
        signers = [CryptoSigner.generate_ed25519() for _ in range(count)]
        for s in signers:
            _write_private(self.directory / f"{role}-{s.public_key.keyid[:16]}.pem", s.private_bytes)
        return signers

    def set_role(self, role: str, signers: list[CryptoSigner], threshold: int) -> None:
        index = self.index() if (self.directory / INDEX).exists() else {}
        index[role] = {"threshold": threshold, "keys": [{"keyid": s.public_key.keyid, "key": s.public_key.to_dict()} for s in signers]}
        tmp = self.directory / f".{INDEX}.tmp"
        tmp.write_text(json.dumps(index, indent=2))
        os.replace(tmp, self.directory / INDEX)

    def forget(self, role: str, signers: list[CryptoSigner]) -> None:
        """Delete the private key files of retired keys."""
        self.retire(role, [s.public_key.keyid for s in signers])

    def retire(self, role: str, keyids: Iterable[str]) -> list[str]:
        """Delete the private key files of ``keyids`` (those present): the key ids whose file was deleted.

        Why by key id and not by signer: a rotation must retire a key whose private half is offline, lost or
        stolen, and never needs to load it for that.
        """
        gone = []
        for keyid in keyids:
            path = self.directory / f"{role}-{keyid[:16]}.pem"
            if path.exists():
                path.unlink()
                gone.append(keyid)
        return gone


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def init_keys(directory: str | Path, root_threshold: int = 1, root_keys: int | None = None) -> KeyStore:
    """New keys for every role in an empty (or new) directory; refuses to overwrite existing keys."""
    directory = Path(directory)
    count = root_keys if root_keys is not None else root_threshold
    if root_threshold < 1 or count < root_threshold:
        raise KeyError_(f"root threshold {root_threshold} needs at least that many root keys (got {count})")
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    if (directory / INDEX).exists() or any(directory.glob("*.pem")):
        raise KeyError_(f"{directory} already holds keys; refusing to overwrite them")
    store = KeyStore(directory)
    store.add("root", count, root_threshold)
    for role in ROLES[1:]:
        store.add(role, 1, 1)
    return store
