"""The controller's Python API: one function per ``fleet`` command, with the command's name and its defaults.

Why a module of its own: whatever the command line does can be done from Python the same way (sqlite-utils' shape).
``fleet/cli.py`` only parses options, calls the function named like its command and prints what comes back, so a
command's meaning (what a fleet rollback is, how the broker's and the store's views of a device become one row, how a
device's shadow is judged) lives here, once. ``tests/test_api.py`` checks that every command's defaults are its
function's.

Names: the command's words joined by ``_`` (``fleet rollout start`` → ``rollout_start``, ``fleet keys rotate-root`` →
``keys_rotate_root``, ``fleet release BUNDLE`` = ``fleet release add`` → ``release_add``). Directories and the store
are paths, as on the command line; each call opens the store it needs and closes it. ``broker`` is the whole
``BrokerSettings`` (address, TLS, credentials, MQTT version) the CLI makes of ``--broker`` and fleet.toml.

Not here: ``fleet build`` is ``converters.build.build``, ``fleet demo-model`` ``converters.demo_models.write_demo_model``;
``fleet demo`` and ``fleet simulate`` are tools for trying the product (``fleet.dev``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tuf.api.metadata import Metadata, Root, TargetFile

from agent.errors import EdgefleetError
from agent.settings import BrokerSettings
from agent.wire import valid_device_id
from fleet.controller import Controller
from fleet.controller import devices as broker_devices
from fleet.dashboard import Dashboard, serve_dashboard
from fleet.provision import BrokerAuth, Credentials, controller_bundle, device_bundle
from fleet.rollout import Gates, RolloutEngine, RolloutSpec, parse_waves
from fleet.rollout.spec import SOAK_S, WAVE_TIMEOUT_S
from fleet.settings import DEFAULT_CONFIG, DEFAULT_TELEMETRY_DAYS, load_settings
from fleet.store import Device, FleetStore, Job, StoreLocation
from fleet.store.url import redacted
from fleet.transport.announce import announce
from fleet.tuf.director import Director
from fleet.tuf.image_repo import ImageRepository, Release
from fleet.tuf.keys import KeyStore, init_keys
from fleet.tuf.lifecycle import Rotation, rotate

__all__ = [
    "BrokerUnreachable",
    "ConfigExists",
    "DeviceDetail",
    "DeviceRow",
    "NeedsStore",
    "Provisioned",
    "Revocation",
    "RolloutRow",
    "Serving",
    "StartedRollout",
    "UnknownDevice",
    "assign",
    "config_check",
    "device",
    "devices",
    "director_init",
    "director_mirrors",
    "director_refresh",
    "keys_init",
    "keys_rotate",
    "keys_rotate_root",
    "provision",
    "release_add",
    "release_revoke",
    "repo_init",
    "repo_publish",
    "repo_refresh",
    "rollback",
    "rollout_abort",
    "rollout_list",
    "rollout_pause",
    "rollout_resume",
    "rollout_start",
    "rollout_status",
    "serve",
    "tag",
]

SHADOW_WINDOW_S = 600.0  # `device` shows each shadow's health over the last ten minutes


class BrokerUnreachable(EdgefleetError):
    code = "unreachable"


class UnknownDevice(EdgefleetError):
    code = "unknown_device"


class NeedsStore(EdgefleetError):
    """The dashboard shows the store: serving it without one is a usage mistake, not a failure."""

    code = "needs_store"


class ConfigExists(EdgefleetError):
    """``provision --init`` never replaces a controller's fleet.toml (checked before anything is made)."""

    code = "config_exists"


@contextmanager
def _opened(store: StoreLocation) -> Iterator[FleetStore]:
    fs = FleetStore(store)
    try:
        yield fs
    finally:
        fs.close()


@contextmanager
def _director(directory: Path, store: StoreLocation | None = None) -> Iterator[Director]:
    """The director at ``directory``; with ``store`` (several controllers) its device repositories are the store's,
    and what the files hold newer is pushed there first (as ``fleet serve`` does when it leads)."""
    fs = FleetStore(store) if store is not None else None
    try:
        director = Director(directory, store=fs)
        director.sync()
        yield director
    finally:
        if fs is not None:
            fs.close()


@contextmanager
def _maybe_director(directory: Path | None, store: StoreLocation | None = None) -> Iterator[Director | None]:
    if directory is None:
        yield None
    else:
        with _director(directory, store) as director:
            yield director


@contextmanager
def _engine(store: StoreLocation, repo: Path | None = None) -> Iterator[RolloutEngine]:
    """An engine that takes commands: they only write the store; ``fleet serve`` (director key) moves the devices."""
    with _opened(store) as fs:
        yield RolloutEngine(fs, ImageRepository(repo or Path(".")))


# -- keys, repositories, releases ------------------------------------------------------------------


def keys_init(directory: Path, root_threshold: int = 1, root_keys: int | None = None) -> KeyStore:
    """Ed25519 keys for every role in ``directory``; ``root_keys`` defaults to the threshold."""
    return init_keys(directory, root_threshold, root_keys)


def keys_rotate_root(
    keys_dir: Path,
    repo: Path,
    director_dir: Path | None = None,
    new_keys: int = 1,
    threshold: int = 1,
    store: StoreLocation | None = None,
) -> Metadata[Root]:
    """A new root with ``new_keys`` fresh root keys, signed by the old ones and the new; the director's root too when
    given (``store``: where its device repositories are, several controllers)."""
    with _maybe_director(director_dir, store) as director:
        return ImageRepository(repo).rotate_root(KeyStore(keys_dir), new_keys, threshold, director=director)


def keys_rotate(
    role: str,
    keys_dir: Path,
    repo: Path | None = None,
    director_dir: Path | None = None,
    new_keys: int = 1,
    threshold: int = 1,
    store: StoreLocation | None = None,
) -> Rotation:
    """Replace ``role``'s keys; what they sign is re-signed and the old private keys are deleted (``store``: where the
    director's device repositories are, several controllers)."""
    image = ImageRepository(repo) if repo else None
    with _maybe_director(director_dir, store) as director:
        return rotate(role, KeyStore(keys_dir), image, director, new_keys, threshold)


def repo_init(directory: Path, keys_dir: Path) -> ImageRepository:
    return ImageRepository.create(directory, KeyStore(keys_dir))


def repo_refresh(directory: Path, keys_dir: Path) -> None:
    ImageRepository(directory).refresh(KeyStore(keys_dir))


def repo_publish(dest: Path, repo: Path) -> list[str]:
    """Copy the image repository ``repo`` to the mirror directory ``dest`` (targets, then metadata, the timestamp
    last: ``ImageRepository.publish``); the paths written, in order."""
    return ImageRepository(repo).publish(dest)


def director_init(directory: Path, keys_dir: Path, mirrors: Sequence[str] = ()) -> Director:
    """A new director; ``mirrors`` (HTTP(S) mirrors of the image repository) go into every device's signed targets."""
    director = Director.create(directory, KeyStore(keys_dir))
    if mirrors:
        director.set_mirrors(list(mirrors), KeyStore(keys_dir))
    return director


def director_mirrors(directory: Path, keys_dir: Path, mirrors: Sequence[str] = (), store: StoreLocation | None = None) -> list[str]:
    """Name ``mirrors`` (none: stop naming any) in every device's signed director targets, re-signed now; devices
    take them at their next update round. ``store``: where the device repositories are (several controllers)."""
    with _director(directory, store) as director:
        return director.set_mirrors(list(mirrors), KeyStore(keys_dir))


def director_refresh(directory: Path, keys_dir: Path, devices: Sequence[str] | None = None, store: StoreLocation | None = None) -> None:
    """Re-sign the director metadata of ``devices`` (None or empty: every device); ``store`` as ``director_mirrors``."""
    with _director(directory, store) as director:
        director.refresh(KeyStore(keys_dir), list(devices) if devices else None)


def release_add(bundle: Path, repo: Path, keys_dir: Path) -> Release:
    """``bundle`` (a ``fleet build`` directory or .tar.gz) as signed targets, one per variant."""
    return ImageRepository(repo).release(bundle, KeyStore(keys_dir))


@dataclass(frozen=True)
class Revocation:
    release: Release
    still_assigned: list[str]  # devices the director still points at it (with ``director_dir``): they keep serving it


def release_revoke(
    model: str,
    version: str,
    repo: Path,
    keys_dir: Path,
    reason: str = "",
    director_dir: Path | None = None,
    store: StoreLocation | None = None,
) -> Revocation:
    """Revoke ``model`` ``version``; with ``director_dir`` (and ``store``, several controllers) the devices the director
    still points at it."""
    r = ImageRepository(repo).revoke(model, version, KeyStore(keys_dir), reason)
    with _maybe_director(director_dir, store) as director:
        return Revocation(r, director.assigned(model, version) if director is not None else [])


# -- settings, devices ------------------------------------------------------------------------------


def config_check(config: Path | None = None) -> dict[str, Any]:
    """The effective settings as JSON data, a dashboard token and a store URL's password masked; ``InvalidOptions``
    names the wrong key."""
    data = load_settings(config).model_dump(mode="json")
    if data["dashboard"]["token"]:
        data["dashboard"]["token"] = "********"  # set; a secret is not printed again
    if isinstance(data["store"], str):
        data["store"] = redacted(data["store"])
    return data


def assign(
    device: str,
    model: str,
    version: str,
    variant: str,
    repo: Path,
    director_dir: Path,
    keys_dir: Path,
    broker: BrokerSettings | None = None,
    store: StoreLocation | None = None,
) -> TargetFile:
    """Point ``device`` at ``model`` ``version`` (``variant``); with ``broker`` the device is told at once (retained).
    ``store``: the signed metadata goes there instead of the director's files, where every controller serves it and
    the versions go on from the store's (what the files hold newer is pushed there first, as ``fleet serve`` does)."""
    with _director(director_dir, store) as director:
        target = director.assign(device, ImageRepository(repo), model, version, variant, KeyStore(keys_dir))
        if broker is not None:
            try:
                announce(director, [device], broker=broker)
            except OSError as exc:
                raise BrokerUnreachable(
                    f"assigned, but the broker at {broker.host}:{broker.port} did not take the announcement: {exc}"
                ) from exc
    return target


@dataclass(frozen=True)
class DeviceRow:
    """One device as ``devices`` lists it, from either source. What a source does not know is None (the broker has no
    tags; the store's ``state`` is its online flag) and is left out of ``to_json``."""

    device_id: str
    online: bool
    hardware: str
    models: dict[str, Any]
    update: dict[str, Any]
    state: str | None = None  # the device's own status (ready, lost, ...): broker only
    tags: dict[str, str] | None = None  # store only

    @property
    def shown_state(self) -> str:
        return self.state or ("online" if self.online else "offline")

    def to_json(self) -> dict[str, Any]:
        keys = ("device_id", "online", "state", "hardware", "models", "tags", "update")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


def devices(
    store: StoreLocation | None = None, tags: dict[str, str] | None = None, wait: float = 1.0, broker: BrokerSettings | None = None
) -> list[DeviceRow]:
    """Every device: from the registry in ``store`` (with tags; ``tags`` filters), else from what each device last said
    on the broker (collected for ``wait`` seconds)."""
    if store is not None:
        return _registry_rows(store, tags or {})
    return _broker_rows(broker or BrokerSettings(), wait)


def _registry_rows(store: StoreLocation, tags: dict[str, str]) -> list[DeviceRow]:
    with _opened(store) as fs:
        found = [d for d in fs.devices() if all(d.tags.get(k) == v for k, v in tags.items())]
    return [DeviceRow(d.id, d.online, d.hardware, d.models, d.update, tags=d.tags) for d in found]


def _broker_rows(broker: BrokerSettings, wait: float) -> list[DeviceRow]:
    try:
        found = broker_devices(wait=wait, broker=broker)
    except OSError as exc:
        raise BrokerUnreachable(f"no broker at {broker.host}:{broker.port}: {exc}") from exc
    return [
        DeviceRow(
            rep.device_id,
            rep.status.get("state") == "ready",
            rep.reported.get("hardware", "?"),
            rep.reported.get("models", {}),
            rep.reported.get("update", {}),
            state=rep.status.get("state", "?"),
        )
        for rep in found
    ]


@dataclass(frozen=True)
class DeviceDetail:
    """One device from the store: itself, its last ten update jobs and telemetry batches, and each shadow it runs with
    its health over the last ten minutes (``ShadowHealth`` fields plus ``version``)."""

    device: Device
    jobs: list[Job]
    telemetry: list[dict[str, Any]]
    shadows: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        jobs = [j.to_json() for j in self.jobs]
        return {**self.device.to_json(), "jobs": jobs, "telemetry": self.telemetry, "shadows": self.shadows}


def device(device_id: str, store: StoreLocation) -> DeviceDetail:
    with _opened(store) as fs:
        d = fs.device(device_id)
        if d is None:
            raise UnknownDevice(f"{device_id} is not in {fs.name}")
        since = time.time() - SHADOW_WINDOW_S
        shadows = {
            name: {"version": version, **asdict(fs.shadow_health(name, version, since, [device_id]))}
            for name, version in ((n, str((m.get("shadow") or {}).get("version", ""))) for n, m in d.models.items())
            if version
        }
        return DeviceDetail(d, fs.jobs(device_id)[-10:], fs.recent_telemetry(device_id, 10), shadows)


def tag(device_id: str, tags: dict[str, str], store: StoreLocation) -> Device:
    """Set ``tags`` on a device (an empty value removes the tag); selectors use them (``tag:site=berlin``)."""
    valid_device_id(device_id)
    with _opened(store) as fs:
        return fs.tag(device_id, tags)


# -- rollouts ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StartedRollout:
    id: int
    spec: RolloutSpec
    devices: int  # how many devices the selector chose


def rollout_start(
    model: str,
    version: str,
    store: StoreLocation,
    repo: Path,
    selector: str = "",
    waves: str = "1%,10%,50%,100%",
    variant: str | None = None,
    max_per_minute: int = 0,
    soak_s: float = SOAK_S,
    wave_timeout_s: float = WAVE_TIMEOUT_S,
    max_failed: str = "0",
    max_error_increase: float = 0.05,
    max_p95_ratio: float = 2.0,
    p95_floor_ms: float = 1.0,
    min_requests: int = 0,
    max_class_shift: float | None = None,
    max_mean_shift: float | None = None,
    shadow: bool = False,
    min_agreement: float = 0.95,
    max_shadow_diff: float | None = None,
    shadow_min_compared: int = 100,
    max_regressed: str = "10%",
    min_device_requests: int = 20,
    baseline_s: float = 600.0,
    min_control: int = 3,
) -> StartedRollout:
    """Start rolling ``model`` ``version`` out to the devices ``selector`` picks, wave by wave; the running
    ``fleet serve --store`` carries it out.

    ``waves``: cumulative percentages or counts ending with ``all``. Each wave runs ``soak_s`` seconds (default five
    minutes) before the health gate judges it; devices offline are waited for ``wave_timeout_s`` (default 30 minutes).
    The gate parameters are ``fleet.rollout.Gates``' (``max_error_increase`` is its ``max_error_rate_increase``), with its
    defaults; ``shadow``: the first wave runs the new version beside the old before switching.
    """
    gates = Gates(
        max_failed,
        max_error_increase,
        max_p95_ratio,
        p95_floor_ms,
        min_requests,
        max_class_shift,
        max_mean_shift,
        min_agreement,
        max_shadow_diff,
        shadow_min_compared,
        max_regressed,
        min_device_requests,
        baseline_s,
        min_control,
    )
    spec = RolloutSpec(model, version, selector, parse_waves(waves), variant, max_per_minute, soak_s, wave_timeout_s, gates, shadow)
    return _start(spec, store, repo)


def rollback(model: str, version: str, store: StoreLocation, repo: Path, selector: str = "") -> StartedRollout:
    """Point the selection (default: every device running ``model``) back at ``version``: a rollout in one wave, with
    no soak and no health gate (the point is to leave the version being judged, whatever its numbers)."""
    no_gate = Gates(max_failed="100%", max_error_rate_increase=1.0, max_p95_ratio=1e9)
    return _start(RolloutSpec(model, version, selector or f"model={model}", ["100%"], soak_s=0, gates=no_gate), store, repo)


def _start(spec: RolloutSpec, store: StoreLocation, repo: Path) -> StartedRollout:
    with _engine(store, repo) as engine:
        rid = engine.start(spec)
        return StartedRollout(rid, spec, len(engine.store.rollout_devices(rid)))


@dataclass(frozen=True)
class RolloutRow:
    id: int
    model: str
    version: str
    state: str
    wave: int  # 0-based index of the current wave
    waves: int
    devices: int
    reason: str


def rollout_list(store: StoreLocation) -> list[RolloutRow]:
    with _opened(store) as fs:
        return [
            RolloutRow(
                r.id,
                r.spec["model"],
                r.spec["version"],
                r.state,
                r.wave,
                len(r.spec["waves"]),
                len(fs.rollout_devices(r.id)),
                r.reason,
            )
            for r in fs.rollouts()
        ]


def rollout_status(rollout_id: int, store: StoreLocation) -> dict[str, Any]:
    """The rollout with, per wave, how many devices are in each state (``RolloutEngine.progress``)."""
    with _engine(store) as engine:
        return engine.progress(rollout_id)


def rollout_pause(rollout_id: int, store: StoreLocation) -> None:
    """Stop moving devices (those already moved stay)."""
    with _engine(store) as engine:
        engine.pause(rollout_id)


def rollout_resume(rollout_id: int, store: StoreLocation) -> None:
    """Go on with a paused rollout."""
    with _engine(store) as engine:
        engine.resume(rollout_id)


def rollout_abort(rollout_id: int, store: StoreLocation) -> None:
    """Ask the controller to stop and point every device already moved back at its previous version."""
    with _engine(store) as engine:
        engine.request_abort(rollout_id)


# -- provisioning, serving ------------------------------------------------------------------------


@dataclass
class Provisioned:
    """What ``provision`` made: with ``init`` the controller's credentials and fleet.toml; for ``name`` its credentials
    (None when revoked) and where its files went."""

    controller: Credentials | None = None
    fleet_toml: Path | None = None
    credentials: Credentials | None = None
    revoked: bool = False
    out: Path | None = None


def provision(
    broker_dir: Path,
    name: str | None = None,
    init: bool = False,
    hostnames: Sequence[str] = (),
    role: str = "device",
    out: Path | None = None,
    host: str = "localhost",
    port: int = 8883,
    repo: Path | None = None,
    director_dir: Path | None = None,
    revoke: bool = False,
    config: Path | None = None,
    mtls_port: int | None = None,
) -> Provisioned:
    """MQTT credentials for ``name`` (password + client certificate from the fleet CA) and its ACL entry, written for
    the device (or, role controller, another controller) to ``out``; ``revoke`` removes them instead.

    ``init`` first makes the fleet CA, the broker's certificate for ``hostnames`` (default localhost, 127.0.0.1), its
    mosquitto.conf (TLS + password on ``port``, mutual TLS on ``mtls_port``, default the next) and the controller's
    credentials with a fleet.toml at ``config`` (default ./fleet.toml, never replaced: ``ConfigExists``).
    ``host``/``port`` are the broker's address as the configs written name it.
    """
    auth, done = BrokerAuth(broker_dir), Provisioned()
    if init:
        done.fleet_toml = config or Path("fleet.toml")
        if done.fleet_toml.exists():  # before anything is made: a half-initialised broker directory helps nobody
            raise ConfigExists(f"{done.fleet_toml} already exists; move it away or name another with --config")
        done.controller = auth.init(list(hostnames) or ["localhost", "127.0.0.1"])
        (broker_dir / "mosquitto.conf").write_text(auth.mosquitto_config(port, mtls_port or port + 1))
        controller_bundle(done.controller, done.fleet_toml, host, port)
    if name is None:
        return done
    if revoke:
        auth.revoke(name)
        done.revoked = True
        return done
    done.credentials, done.out = auth.add(name, role), out
    if out is not None and role == "controller":
        controller_bundle(done.credentials, out / "fleet.toml", host, port)
    elif out is not None:
        image_root = repo / "metadata" / "1.root.json" if repo else None
        director_root = director_dir / "1.root.json" if director_dir else None
        device_bundle(done.credentials, out, host, port, image_root, director_root)
    return done


@dataclass
class Serving:
    """A started controller and, when asked for, its dashboard; ``new_token`` is a dashboard token made now (show it once)."""

    controller: Controller
    dashboard: Dashboard | None = None
    new_token: str | None = None

    def healthy(self) -> bool:
        return self.controller.healthy()

    def stop(self) -> None:
        if self.dashboard is not None:
            self.dashboard.stop()
        self.controller.stop()


def serve(
    root: Path,
    keys_dir: Path,
    broker: BrokerSettings | None = None,
    interval: float = 60.0,
    store: StoreLocation | None = None,
    telemetry_days: float | None = None,
    http: str | None = None,
    token: str | None = None,
    token_file: Path = DEFAULT_CONFIG,
    controller_id: str | None = None,
) -> Serving:
    """Serve ``root``/image and ``root``/director over MQTT, re-signing online metadata (checked every ``interval``
    seconds); with ``store`` (a SQLite file or a ``postgresql://`` URL) also ingest, telemetry (kept ``telemetry_days``,
    None: 7) and rollouts; with ``http`` the dashboard on ``[HOST]:PORT`` (needs ``store``: ``NeedsStore``), protected
    by ``token`` (off loopback a new one is made and kept in ``token_file``, a fleet.toml, as ``dashboard.token``).
    ``controller_id``: this controller's stable name among several on one store (None: host name and a hash of ``root``).
    Returns once everything runs; ``Serving.stop()`` ends it."""
    if http and store is None:
        raise NeedsStore("--http needs --store (the dashboard shows the store)")
    b = broker or BrokerSettings()
    keep_s = (telemetry_days if telemetry_days is not None else DEFAULT_TELEMETRY_DAYS) * 86400
    try:
        controller = Controller(
            root, KeyStore(keys_dir), interval_s=interval, store=store, telemetry_keep_s=keep_s, broker=b, controller_id=controller_id
        )
        controller.start()
    except OSError as exc:
        raise BrokerUnreachable(f"no broker at {b.host}:{b.port}: {exc}") from exc
    serving = Serving(controller)
    if http and controller.store is not None:
        try:
            serving.dashboard, serving.new_token = serve_dashboard(controller.store, http, token, token_file, controller)
        except BaseException:
            controller.stop()
            raise
    return serving
