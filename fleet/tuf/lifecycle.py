"""Key rotation for every role, one entry point: what ``fleet keys rotate ROLE`` runs.

Which repository a role lives in decides what is rewritten: ``root`` (both repositories share the root keys),
``targets``, ``snapshot`` and ``timestamp`` (the image repository's root names them) and ``director`` (the
director's root names it for all three of its roles). Every rotation publishes a new root signed by the current
root keys, so those must be online for it; devices follow through the root chain ``tuf.ngclient`` walks.
"""

from __future__ import annotations

from dataclasses import dataclass

from fleet.tuf.director import Director
from fleet.tuf.image_repo import IMAGE_ROLES, ImageRepository
from fleet.tuf.keys import ROLES, KeyStore
from fleet.tuf.metadata import RotationError

__all__ = ["Rotation", "rotate"]


@dataclass(frozen=True)
class Rotation:
    """What a rotation did: the role, the new key ids, and the root version each repository now has."""

    role: str
    keyids: tuple[str, ...]
    threshold: int
    image_root: int | None  # None: the image repository's root did not change
    director_root: int | None


def rotate(
    role: str,
    keys: KeyStore,
    image: ImageRepository | None = None,
    director: Director | None = None,
    new_keys: int = 1,
    threshold: int = 1,
) -> Rotation:
    """Replace ``role``'s keys by ``new_keys`` fresh ones (``threshold`` of them must sign), re-sign what they sign,
    retire the old ones.

    ``root`` needs ``image`` and takes ``director`` too (leave it out only when no director shares the root keys:
    a director left on the old root could never rotate again); ``targets``/``snapshot``/``timestamp`` need
    ``image``; ``director`` needs ``director``.
    """
    if role not in ROLES:
        raise RotationError(f"unknown role {role!r}: one of {', '.join(ROLES)}")
    if role == "director":
        if director is None:
            raise RotationError("rotating the director key needs the director repository (--director)")
        md = director.rotate_key(keys, new_keys, threshold)
        return Rotation(role, _keyids(keys, role), threshold, None, md.signed.version)
    if image is None:
        raise RotationError(f"rotating the {role} keys needs the image repository (--repo)")
    if role == "root":
        beside = image.directory.parent / "director"
        if director is None and beside.is_dir() and any(beside.iterdir()):
            raise RotationError(
                f"a director shares the root keys ({beside}): rotate root with --director too, or it could never be re-signed"
            )
        md = image.rotate_root(keys, new_keys, threshold, director=director)
        return Rotation(role, _keyids(keys, role), threshold, md.signed.version, director.root().signed.version if director else None)
    assert role in IMAGE_ROLES
    md = image.rotate_key(keys, role, new_keys, threshold)
    return Rotation(role, _keyids(keys, role), threshold, md.signed.version, None)


def _keyids(keys: KeyStore, role: str) -> tuple[str, ...]:
    return tuple(k.keyid for k in keys.public_keys(role))
