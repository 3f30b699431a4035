"""``fleet``: the controller's command line, a mirror of ``fleet.api``.

Each command parses its options, calls the function of the same name with the same defaults
(``fleet rollout start`` -> ``fleet.api.rollout_start``; ``fleet build`` -> ``converters.build.build``;
``fleet demo`` and ``fleet simulate`` -> ``fleet.dev``) and prints what it returns. Why: what the command line
does, Python does the same way; ``tests/test_api.py`` holds the defaults together. Imports are made inside the
commands so that ``fleet --help`` and ``fleet build`` do not load the controller.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from agent.errors import EdgefleetError, InvalidOptions
from converters.variants import KINDS
from fleet import __version__

if TYPE_CHECKING:
    from agent.settings import BrokerSettings
    from fleet.provision import Credentials
    from fleet.settings import FleetSettings

console = Console(stderr=True)
_F = TypeVar("_F", bound=Callable[..., Any])


def _remember_config(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    ctx.meta["fleet.config"] = value  # for --store's default (see _store_option)
    return value


_CONFIG_HELP = "The controller's settings (default: ./fleet.toml when present, else built-in defaults), overlaid by EDGEFLEET_FLEET_*."
_config_option = click.option(
    "--config",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    is_eager=True,  # read before --store, whose default it holds
    callback=_remember_config,
    help=_CONFIG_HELP,
)


class _StoreType(click.ParamType):
    """A store: a SQLite file's path or a postgresql:// URL; a URL edgefleet cannot open is a usage error (exit 2)."""

    name = "PATH|URL"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Path | str:
        from fleet.store.url import BadStoreURL, store_location

        try:
            return store_location(value)
        except BadStoreURL as exc:
            self.fail(str(exc), param, ctx)


_STORE = _StoreType()


def _director_store_option(f: _F) -> _F:
    """``--store`` (default: fleet.toml's ``store``, read through ``--config``) for the commands that sign or read the
    director: with a store, the device repositories are there (several controllers); without, the director's files."""
    f = click.option(
        "--store",
        type=_STORE,
        help="The controllers' store, which holds the director's device repositories (default: fleet.toml's `store`; else files).",
    )(f)
    return _config_option(f)


def _director_store(store: Path | str | None, config: Path | None) -> Path | str | None:
    return store if store is not None else _settings(config).store


@click.group()
@click.version_option(__version__, prog_name="fleet")
def main() -> None:
    """edgefleet's fleet controller."""


def _tolerances(values: tuple[str, ...]) -> dict[str, float]:
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[key.strip()] = float(value)
        except ValueError:
            raise click.BadParameter(f"{item!r}: expected VARIANT_OR_PRECISION=ATOL, e.g. int8=0.2", param_hint="--tolerance") from None
    return out


def _batch_axes(values: tuple[str, ...]) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for item in values:
        key, sep, value = item.partition("=")
        try:
            if not sep or not key.strip():
                raise ValueError
            out[key.strip()] = None if value.strip().lower() == "none" else int(value)
        except ValueError:
            raise click.BadParameter(f"{item!r}: expected INPUT=AXIS, e.g. state=1 (or INPUT=none)", param_hint="--batch-axis") from None
    return out


@main.command("build")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--name", required=True, help="Model name (letters, digits, . _ -).")
@click.option("--version", "version", required=True, help="Model version, e.g. 1.0.0.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Bundle directory to create.")
@click.option("--samples", type=click.Path(path_type=Path), help=".npy (one input) or .npz (per input), stacked on dim 0.")
@click.option(
    "--variants",
    help="Comma-separated variant ids (default: all): " + ", ".join(KINDS),
)
@click.option("--tolerance", multiple=True, help="VARIANT_OR_PRECISION=ATOL, repeatable (e.g. int8=0.2, onnx-int8=0.05).")
@click.option(
    "--batch-axis",
    "batch_axes",
    multiple=True,
    help="INPUT=AXIS, repeatable: the dimension an input's samples stack on (state=1; none: no batch dimension). "
    "Default: inferred from the samples.",
)
@click.option("--drop-failing", is_flag=True, help="Leave out variants outside tolerance instead of failing the build.")
@click.option("--archive", is_flag=True, help="Also write OUT.tar.gz, the bundle as one file.")
@click.option("--force", is_flag=True, help="Replace an existing bundle at OUT (only once the new one is complete).")
def build_cmd(
    source: Path,
    name: str,
    version: str,
    out: Path,
    samples: Path | None,
    variants: str | None,
    tolerance: tuple[str, ...],
    batch_axes: tuple[str, ...],
    drop_failing: bool,
    archive: bool,
    force: bool,
) -> None:
    """Convert SOURCE into a bundle of verified variants, one per runtime and precision."""
    from converters.build import BuildReport, build

    def progress(variant: str, state: str, detail: str) -> None:
        colour = {"ok": "green", "skipped": "yellow", "failed": "red", "dropped": "yellow"}.get(state, "cyan")
        console.print(f"[{colour}]{variant:<14} {state}[/{colour}] {detail}")

    report: BuildReport | None = None
    try:
        report = build(
            source,
            name,
            version,
            out,
            samples=samples,
            variants=[v.strip() for v in variants.split(",") if v.strip()] if variants else None,
            tolerances=_tolerances(tolerance),
            batch_axes=_batch_axes(batch_axes),
            drop_failing=drop_failing,
            archive=archive,
            force=force,
            progress=progress,
        )
    except EdgefleetError as exc:
        failed = getattr(exc, "report", None)
        if failed is not None:
            _table(failed)
        click.echo(f"error[{exc.code}]: {exc}", err=True)
        sys.exit(1)
    _table(report)
    if report.synthetic_samples:
        console.print("[yellow]parity was checked on synthetic samples; pass --samples with real data for a meaningful check[/yellow]")
    console.print(f"bundle written to {report.out}" + (f" and {report.archive}" if report.archive else ""))


@main.command("demo")
@click.option("--keep-running", is_flag=True, help="Leave broker, controller and agents up and print how to talk to them.")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), help="Keep every file here (default: a temp dir).")
@click.option(
    "--broker",
    "broker_kind",
    type=click.Choice(["mosquitto", "amqtt"]),
    default="mosquitto",
    show_default=True,
    help="mosquitto when installed, else the embedded amqtt (MQTT 3.1.1).",
)
def demo_cmd(keep_running: bool, workdir: Path | None, broker_kind: str) -> None:
    """Broker, controller and three agents (Pi, Intel NPU, Jetson) on this machine: train, sign, roll out, predict."""
    from fleet.dev.demo import run_demo

    with _reported():
        run_demo(workdir, keep_running, console, broker_kind=broker_kind)


@main.command("demo-model")
@click.argument("kind", type=click.Choice(["linear", "logistic", "mlp"]))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--seed", type=int, default=0, show_default=True)
def demo_model_cmd(kind: str, out: Path, seed: int) -> None:
    """Train a small demo model with numpy (linear: y = 2x + 1) and write it as ONNX to OUT."""
    from converters.demo_models import write_demo_model

    write_demo_model(kind, out, seed)
    console.print(f"wrote {out}")


@contextmanager
def _reported() -> Iterator[None]:
    """Turn our typed errors into one ``error[code]: message`` line and exit status 1."""
    try:
        yield
    except EdgefleetError as exc:
        click.echo(f"error[{exc.code}]: {exc}", err=True)
        sys.exit(1)
    except ValueError as exc:  # e.g. a malformed device id (agent.wire.WireError)
        click.echo(f"error[bad_request]: {exc}", err=True)
        sys.exit(1)


@main.group("keys")
def keys_group() -> None:
    """Signing keys: root and targets (keep offline), snapshot, timestamp and director (online)."""


@keys_group.command("init")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--root-threshold", type=click.IntRange(1, 16), default=1, show_default=True)
@click.option("--root-keys", type=click.IntRange(1, 16), help="How many root keys (default: the threshold).")
def keys_init_cmd(directory: Path, root_threshold: int, root_keys: int | None) -> None:
    """Create Ed25519 keys for every role in DIRECTORY (private keys 0600; refuses to overwrite)."""
    from fleet import api

    with _reported():
        store = api.keys_init(directory, root_threshold, root_keys)
    for role, entry in store.index().items():
        console.print(f"{role:<10} threshold {entry['threshold']}  keys {', '.join(k['keyid'][:16] for k in entry['keys'])}")


@keys_group.command("rotate-root")
@click.option("--keys", "keys_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--repo", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--director",
    "director_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="The director sharing these root keys: its root rotates too.",
)
@click.option("--new-keys", type=click.IntRange(1, 16), default=1, show_default=True)
@click.option("--threshold", type=click.IntRange(1, 16), default=1, show_default=True)
@_director_store_option
def rotate_root_cmd(
    keys_dir: Path, repo: Path, director_dir: Path | None, new_keys: int, threshold: int, store: Path | str | None, config: Path | None
) -> None:
    """Replace the root keys: the new root is signed by the old keys (threshold) and the new ones."""
    from fleet import api

    with _reported():
        md = api.keys_rotate_root(keys_dir, repo, director_dir, new_keys, threshold, _director_store(store, config))
    console.print(f"root version {md.signed.version}: {new_keys} new key(s), threshold {threshold}")


@keys_group.command("rotate")
@click.argument("role", type=click.Choice(["root", "targets", "snapshot", "timestamp", "director"]))
@click.option("--keys", "keys_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--repo", type=click.Path(file_okay=False, path_type=Path), help="The image repository (root, targets, snapshot, timestamp).")
@click.option(
    "--director",
    "director_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="The director repository (director; with root, its root rotates too).",
)
@click.option("--new-keys", type=click.IntRange(1, 16), default=1, show_default=True)
@click.option("--threshold", type=click.IntRange(1, 16), default=1, show_default=True)
@_director_store_option
def keys_rotate_cmd(
    role: str,
    keys_dir: Path,
    repo: Path | None,
    director_dir: Path | None,
    new_keys: int,
    threshold: int,
    store: Path | str | None,
    config: Path | None,
) -> None:
    """Replace ROLE's keys: a new root (signed by the root keys, which must be here) names the new keys, what they
    sign is re-signed, the old private keys are deleted. Devices follow at their next check."""
    from fleet import api

    with _reported():
        r = api.keys_rotate(role, keys_dir, repo, director_dir, new_keys, threshold, _director_store(store, config))
    roots = ", ".join(f"{name} root version {v}" for name, v in (("image", r.image_root), ("director", r.director_root)) if v)
    console.print(f"{role}: {len(r.keyids)} new key(s) {', '.join(k[:16] for k in r.keyids)}, threshold {r.threshold}; {roots}")
    if role in ("root", "targets"):
        console.print(f"move the new {role} private key(s) offline: {keys_dir}/{role}-*.pem")


@main.group("repo")
def repo_group() -> None:
    """The image repository: which releases exist, signed with TUF."""


@repo_group.command("init")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--keys", "keys_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
def repo_init_cmd(directory: Path, keys_dir: Path) -> None:
    """Create an empty image repository signed with the keys in --keys."""
    from fleet import api

    with _reported():
        api.repo_init(directory, keys_dir)
    console.print(f"image repository created in {directory}")


@repo_group.command("refresh")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--keys", "keys_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
def repo_refresh_cmd(directory: Path, keys_dir: Path) -> None:
    """Re-sign snapshot and timestamp (online keys); run it more often than the timestamp expires."""
    from fleet import api

    with _reported():
        api.repo_refresh(directory, keys_dir)
    console.print(f"{directory}: snapshot and timestamp re-signed")


@repo_group.command("publish")
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
@click.option("--repo", required=True, type=click.Path(file_okay=False, path_type=Path))
def repo_publish_cmd(dest: Path, repo: Path) -> None:
    """Copy the image repository to DEST, a directory a web server or CDN serves as a mirror (timestamp last)."""
    from fleet import api

    with _reported():
        written = api.repo_publish(dest, repo)
    console.print(f"{dest}: {len(written)} file(s) written" + (f", {written[-1]} last" if written else " (up to date)"))


class _ReleaseGroup(click.Group):
    """``fleet release BUNDLE`` (as it always was: ``add``) or ``fleet release revoke MODEL VERSION``.

    Why a group that defaults to ``add``: releasing stays one word in every script and walkthrough, while a
    revocation is named for what it does. A bundle directory literally called ``revoke`` is ``./revoke``.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] != "--help":
            args = ["add", *args]
        return super().parse_args(ctx, args)


@main.group("release", cls=_ReleaseGroup)
def release_group() -> None:
    """Add a bundle to the image repository (`fleet release BUNDLE`) or revoke a release."""


@release_group.command("add")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--repo", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--keys", "keys_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
def release_cmd(bundle: Path, repo: Path, keys_dir: Path) -> None:
    """Add BUNDLE (a `fleet build` directory or .tar.gz) to the image repository as a signed target."""
    from fleet import api

    with _reported():
        r = api.release_add(bundle, repo, keys_dir)
    console.print(f"released {r.model} {r.version} (release_counter {r.release_counter}), one signed target per variant:")
    for v in r.variants:
        console.print(f"  {v.id:<14} {v.target_path} {v.length} bytes sha256 {v.sha256[:12]}…")


@release_group.command("revoke")
@click.argument("model")
@click.argument("version")
@click.option("--repo", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--keys", "keys_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--reason", default="", help="Recorded in the signed targets; devices report it with their refusal.")
@click.option("--director", "director_dir", type=click.Path(file_okay=False, path_type=Path), help="List the devices still assigned to it.")
@_director_store_option
def release_revoke_cmd(
    model: str,
    version: str,
    repo: Path,
    keys_dir: Path,
    reason: str,
    director_dir: Path | None,
    store: Path | str | None,
    config: Path | None,
) -> None:
    """Remove MODEL VERSION from the image repository's signed targets (targets key): no device installs it from now on.

    Devices running it keep serving it (and report REJECTED each round) until the director names another version:
    assign or roll out one.
    """
    from fleet import api

    with _reported():
        revocation = api.release_revoke(model, version, repo, keys_dir, reason, director_dir, _director_store(store, config))
    r, still = revocation.release, revocation.still_assigned
    console.print(f"revoked {r.model} {r.version} (release_counter {r.release_counter}): {len(r.variants)} variant(s) no longer listed")
    if still:
        console.print(f"{len(still)} device(s) still assigned to it (they keep serving it until assigned another version):")
        for device in still:
            console.print(f"  {device}")


@main.group("director")
def director_group() -> None:
    """The director repository: what each device must run."""


@director_group.command("init")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--keys", "keys_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--mirror", "mirrors", multiple=True, help="An HTTP(S) mirror of the image repository devices try first (repeatable).")
def director_init_cmd(directory: Path, keys_dir: Path, mirrors: tuple[str, ...]) -> None:
    """Create the director's root (signed by the root keys; the online director key signs the rest)."""
    from fleet import api

    with _reported():
        api.director_init(directory, keys_dir, mirrors)
    console.print(f"director created in {directory}")


@director_group.command("mirrors")
@click.argument("mirrors", nargs=-1)
@click.option("--director", "directory", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--keys", "keys_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@_director_store_option
def director_mirrors_cmd(mirrors: tuple[str, ...], directory: Path, keys_dir: Path, store: Path | str | None, config: Path | None) -> None:
    """Name MIRRORS (HTTP(S) mirrors of the image repository; none: no more) in every device's signed targets."""
    from fleet import api

    with _reported():
        named = api.director_mirrors(directory, keys_dir, mirrors, _director_store(store, config))
    console.print(f"{directory}: every device told of {len(named)} mirror(s)")


@director_group.command("refresh")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--keys", "keys_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--device", "devices", multiple=True, help="Only these devices (default: all).")
@_director_store_option
def director_refresh_cmd(directory: Path, keys_dir: Path, devices: tuple[str, ...], store: Path | str | None, config: Path | None) -> None:
    """Re-sign each device's director metadata (online key) before it expires."""
    from fleet import api

    with _reported():
        api.director_refresh(directory, keys_dir, devices, _director_store(store, config))
    console.print(f"{directory}: director metadata re-signed")


def _broker(value: str | None) -> tuple[str, int] | None:
    if not value:
        return None
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise click.BadParameter(f"{value!r}: expected HOST:PORT")
    return host, int(port)


def _broker_addresses(value: str | None) -> list[str]:
    """``HOST:PORT[,HOST:PORT...]``: one broker, or the nodes of a clustered one (tried in turn, failing over)."""
    addresses = [a.strip() for a in (value or "").split(",") if a.strip()]
    for a in addresses:
        _broker(a)
    return addresses


_broker_option = click.option(
    "--broker",
    help="HOST:PORT of the MQTT broker the devices use, or a cluster's nodes as HOST:PORT,HOST:PORT,... (replaces fleet.toml's).",
)


@contextmanager
def _settings_checked() -> Iterator[None]:
    """A wrong key in fleet.toml or the environment: the key and value on one line, exit status 2 (a usage error)."""
    try:
        yield
    except InvalidOptions as exc:
        click.echo(f"error[{exc.code}]: {exc}", err=True)
        sys.exit(2)


def _settings(config: Path | None) -> FleetSettings:
    """fleet.toml (``config``, else ./fleet.toml when present) + EDGEFLEET_FLEET_* — or the bad key and exit 2."""
    from fleet.settings import load_settings

    with _settings_checked():
        return load_settings(config)


def _broker_settings(config: Path | None, broker: str | None) -> BrokerSettings:
    """fleet.toml's ``[broker]`` (TLS, credentials, MQTT version) with ``--broker HOST:PORT[,...]`` replacing its addresses."""
    from fleet.transport.client import broker_settings

    return broker_settings(broker=_settings(config).broker, hosts=_broker_addresses(broker))


@main.group("config")
def config_group() -> None:
    """The controller's settings (fleet.toml)."""


@config_group.command("check")
@_config_option
def config_check_cmd(config: Path | None) -> None:
    """Print the effective settings (file + environment + defaults) as JSON, or the exact key and value that is wrong (exit 2)."""
    from fleet import api

    with _settings_checked():
        data = api.config_check(config)
    click.echo(json.dumps(data, indent=2))


@main.command("assign")
@click.argument("device")
@click.argument("model")
@click.argument("version")
@click.option("--variant", required=True, help="Variant id the device installs, e.g. onnx-fp32.")
@click.option("--repo", required=True, type=click.Path(file_okay=False, path_type=Path), help="Image repository.")
@click.option("--director", "director_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--keys", "keys_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@_broker_option
@_director_store_option
def assign_cmd(
    device: str,
    model: str,
    version: str,
    variant: str,
    repo: Path,
    director_dir: Path,
    keys_dir: Path,
    broker: str | None,
    store: Path | str | None,
    config: Path | None,
) -> None:
    """Point DEVICE at MODEL VERSION: signed director targets naming the image repository's variant.

    With --broker, or a fleet.toml (--config or ./fleet.toml), the device is told at once (a retained message it also
    gets when it connects later).
    """
    from fleet import api
    from fleet.settings import config_file

    with _reported():
        tell = broker is not None or config_file(config) is not None
        settings = _broker_settings(config, broker)
        store = _director_store(store, config)
        target = api.assign(device, model, version, variant, repo, director_dir, keys_dir, broker=settings if tell else None, store=store)
    console.print(f"{device} -> {target.path} ({variant}, sha256 {target.hashes['sha256'][:12]}…)")


def _default_store(ctx: click.Context, param: click.Parameter, value: Path | str | None) -> Path | str:
    """``--store``, else fleet.toml's ``store``, else ./fleet.db (``--config`` is eager: read by now)."""
    return value if value is not None else _settings(ctx.meta.get("fleet.config")).store_path()


def _store_option(f: _F) -> _F:
    """``--store``, defaulting to fleet.toml's ``store``, and ``--config`` naming that file (the command needs nothing
    else from it, so the value is not passed on)."""
    f = click.option(
        "--store",
        type=_STORE,
        default=None,
        callback=_default_store,
        help="The controller's store, a SQLite file or a postgresql:// URL (default: fleet.toml's `store`, else ./fleet.db).",
    )(f)
    return click.option(
        "--config",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        is_eager=True,
        expose_value=False,
        callback=_remember_config,
        help=_CONFIG_HELP,
    )(f)


@main.command("devices")
@_broker_option
@_config_option
@click.option("--store", type=_STORE, help="Read the registry (tags, history) instead of the broker: a SQLite file or a postgresql:// URL.")
@click.option("--tag", "tags", multiple=True, help="Only devices with this tag, KEY=VALUE (with --store).")
@click.option("--wait", type=float, default=1.0, show_default=True, help="Seconds to collect the devices' retained reports.")
@click.option("--json", "as_json", is_flag=True)
def devices_cmd(
    broker: str | None, config: Path | None, store: Path | str | None, tags: tuple[str, ...], wait: float, as_json: bool
) -> None:
    """Every device's presence and what it reports: hardware, runtimes, active models, its last update."""
    from fleet import api

    with _reported():
        if store is not None:
            rows = api.devices(store, dict(_key_values(tags)), wait)
        else:
            rows = api.devices(None, None, wait, broker=_broker_settings(config, broker))
    if as_json:
        click.echo(json.dumps([r.to_json() for r in rows], indent=2))
        return
    table = Table("device", "state", "hardware", "models", "tags", "update", title=f"{len(rows)} device(s)")
    for r in rows:
        models = ", ".join(_model_text(n, m) for n, m in r.models.items())
        tags_text = ",".join(f"{k}={v}" for k, v in (r.tags or {}).items())
        update = f"{r.update.get('state', '-')} {r.update.get('reason', '')}".strip()
        table.add_row(r.device_id, r.shown_state, str(r.hardware), models or "-", tags_text or "-", update)
    console.print(table)


def _model_text(name: str, m: dict[str, Any], device: bool = False) -> str:
    shadow = m.get("shadow") or {}
    beside = f" + shadow {shadow.get('version')}" if shadow else ""
    where = f"{m.get('runtime')}/{m.get('device')}" if device else m.get("runtime")
    return f"{name} {m.get('version')} ({m.get('variant')} on {where}){beside}"


def _key_values(items: tuple[str, ...]) -> list[tuple[str, str]]:
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE")
        out.append((key, value))
    return out


@main.command("device")
@click.argument("device_id")
@_store_option
@click.option("--json", "as_json", is_flag=True)
def device_cmd(device_id: str, store: Path | str, as_json: bool) -> None:
    """One device: what it reports, its tags, its update jobs and its recent telemetry."""
    from fleet import api

    with _reported():
        detail = api.device(device_id, store)
    if as_json:
        click.echo(json.dumps(detail.to_json(), indent=2))
        return
    d = detail.device
    console.print(f"[bold]{d.id}[/bold] {'online' if d.online else 'offline'} (session {d.session}); {d.hardware}")
    console.print(f"runtimes: {', '.join(f'{k} {v}' for k, v in d.runtimes.items()) or '-'}; tags: {d.tags or '-'}")
    for name, m in d.models.items():
        console.print(f"model {_model_text(name, m, device=True)}")
    for name, sh in detail.shadows.items():
        agreement = f"{sh['agreed'] / sh['compared']:.1%}" if sh["compared"] else "-"
        console.print(
            f"shadow {name} {sh['version']} (last 10 min): {sh['compared']} compared, {agreement} agreed, {sh['errors']} failed,"
            f" {sh['skipped']} skipped; p95 {sh['p95_ms']} ms vs {sh['active_p95_ms']} ms serving"
        )
    jobs = Table("job", "target", "state", "reason", title="update jobs")
    for j in detail.jobs:
        jobs.add_row(j.job, j.target, j.state, j.reason)
    console.print(jobs)
    tel = Table("seq", "model", "version", "requests", "errors", "p95 ms", title="recent telemetry")
    for t in detail.telemetry:
        tel.add_row(
            str(t["seq"]), t["model"], t["version"], str(t["requests"]), str(t["errors"]), f"{t['p95_ms']:.2f}" if t["p95_ms"] else "-"
        )
    console.print(tel)


@main.command("tag")
@click.argument("device_id")
@click.argument("tags", nargs=-1, required=True)
@_store_option
def tag_cmd(device_id: str, tags: tuple[str, ...], store: Path | str) -> None:
    """Set tags on a device: KEY=VALUE ... (KEY= removes one). Selectors use them: tag:site=berlin."""
    from fleet import api

    with _reported():
        d = api.tag(device_id, dict(_key_values(tags)), store)
    console.print(f"{device_id}: {d.tags}")


@main.group("rollout")
def rollout_group() -> None:
    """Wave rollouts gated on installs and on device health; the running `fleet serve --store` carries them out."""


@rollout_group.command("start")
@click.argument("model")
@click.argument("version")
@_store_option
@click.option("--repo", required=True, type=click.Path(file_okay=False, path_type=Path), help="Image repository.")
@click.option("--select", "selector", default="", help='Which devices: "hw=jetson,tag:site=berlin,runtime=openvino,device=cam-*".')
@click.option("--waves", default="1%,10%,50%,100%", show_default=True, help="Cumulative percentages, or counts ending with all.")
@click.option("--variant", help="Force one variant (default: each device's runtimes choose).")
@click.option("--max-per-minute", type=click.IntRange(0), default=0, help="Devices moved per minute at most (0: no limit).")
@click.option("--soak", "soak_s", type=float, default=300.0, show_default=True, help="Seconds each wave runs before the health gate.")
@click.option(
    "--wave-timeout", "wave_timeout_s", type=float, default=1800.0, show_default=True, help="Offline devices are waited for this long."
)
@click.option("--max-failed", default="0", show_default=True, help="Failed installs per wave before abort: a count or a share (10%).")
@click.option("--max-error-increase", type=float, default=0.05, show_default=True, help="Error rate rise (absolute) before abort.")
@click.option("--max-p95-ratio", type=float, default=2.0, show_default=True, help="p95 latency / the old version's before abort.")
@click.option(
    "--p95-floor-ms",
    type=click.FloatRange(0),
    default=1.0,
    show_default=True,
    help="A p95 less than this many ms above the old one never aborts (sub-ms timings are noise).",
)
@click.option("--min-requests", type=click.IntRange(0), default=0, help="Answers needed on the new version before judging.")
@click.option(
    "--max-class-shift",
    type=click.FloatRange(0, 1),
    help="Prediction drift: share of answers whose top class moved against the old version (total variation) before abort.",
)
@click.option(
    "--max-mean-shift", type=click.FloatRange(0), help="Prediction drift: mean output shift, in the old version's standard deviations."
)
@click.option("--shadow", is_flag=True, help="The first wave runs the new version beside the old on live inputs before switching.")
@click.option(
    "--min-agreement", type=click.FloatRange(0, 1), default=0.95, show_default=True, help="Shadow gate: share of live inputs agreeing."
)
@click.option("--max-shadow-diff", type=click.FloatRange(0), help="Shadow gate: mean absolute output difference before abort.")
@click.option(
    "--shadow-min-compared", type=click.IntRange(1), default=100, show_default=True, help="Shadow gate: live inputs compared first."
)
@click.option(
    "--max-regressed",
    default="10%",
    show_default=True,
    help="Health gate: devices of a wave that may regress (each against itself before it moved) before abort: a count or a share.",
)
@click.option(
    "--min-device-requests",
    type=click.IntRange(1),
    default=20,
    show_default=True,
    help="Health gate: calls a device needs before and after its move to be judged on its own.",
)
@click.option(
    "--baseline",
    "baseline_s",
    type=click.FloatRange(1),
    default=600.0,
    show_default=True,
    help="Health gate: seconds before its move that make a device's own baseline.",
)
@click.option(
    "--min-control",
    type=click.IntRange(3),
    default=3,
    show_default=True,
    help="Health gate: unmoved devices needed to correct for fleet-wide load (per hardware class where there are enough).",
)
def rollout_start_cmd(**options: Any) -> None:
    """Start rolling MODEL VERSION out to the selected devices, wave by wave (with --shadow, in shadow first)."""
    from fleet import api

    with _reported():
        r = api.rollout_start(**options)  # the options are named as its parameters (tests/test_api.py)
    mode = ", the first in shadow" if r.spec.shadow else ""
    console.print(f"rollout {r.id}: {r.spec.model} {r.spec.version} over {r.devices} device(s) in {len(r.spec.waves)} wave(s){mode}")


@rollout_group.command("list")
@_store_option
def rollout_list_cmd(store: Path | str) -> None:
    """Every rollout with its state."""
    from fleet import api

    table = Table("id", "model", "version", "state", "wave", "devices", "reason", title="rollouts")
    for r in api.rollout_list(store):
        table.add_row(str(r.id), r.model, r.version, r.state, f"{r.wave + 1}/{r.waves}", str(r.devices), r.reason)
    console.print(table)


@rollout_group.command("status")
@click.argument("rollout_id", type=int)
@_store_option
@click.option("--watch", is_flag=True, help="Live progress bars per wave until the rollout ends.")
@click.option("--json", "as_json", is_flag=True)
def rollout_status_cmd(rollout_id: int, store: Path | str, watch: bool, as_json: bool) -> None:
    """One rollout: per wave, how many devices are pending, assigned, active, failed, rolled back."""
    from rich.live import Live

    from fleet import api

    with _reported():
        progress = api.rollout_status(rollout_id, store)
    if as_json:
        click.echo(json.dumps(progress, indent=2, default=str))
        return
    if not watch:
        console.print(_progress_table(progress))
        return
    with Live(_progress_table(progress), console=console, refresh_per_second=4) as live:
        while progress["state"] in ("running", "paused", "aborting"):
            time.sleep(0.5)  # a refresh rate, not a wait for a condition: the store is read again each time
            progress = api.rollout_status(rollout_id, store)
            live.update(_progress_table(progress))


def _progress_table(p: dict[str, Any]) -> Table:
    spec = p["spec"]
    phase = " (shadow)" if p.get("phase") == "shadow" and p["state"] == "running" else ""
    t = Table(
        "wave",
        "size",
        "progress",
        "states",
        title=f"rollout {p['id']}: {spec['model']} {spec['version']} — {p['state']}{phase} {p['reason']}",
    )
    for i, w in enumerate(p["waves"]):
        size = sum(w.values())
        settled = sum(n for s, n in w.items() if s in ("active", "shadowing", "failed", "timeout", "rolled_back"))
        bar = "█" * int(20 * settled / size) + "░" * (20 - int(20 * settled / size))
        marker = (" ◀ shadow" if phase else " ◀") if i == p["wave"] and p["state"] == "running" else ""
        t.add_row(
            f"{i + 1}/{len(spec['waves'])}{marker}",
            str(size),
            f"{bar} {settled}/{size}",
            ", ".join(f"{s} {n}" for s, n in sorted(w.items())),
        )
    return t


def _rollout_action(name: str, doc: str) -> None:
    @rollout_group.command(name, help=doc)
    @click.argument("rollout_id", type=int)
    @_store_option
    def action(rollout_id: int, store: Path | str) -> None:
        from fleet import api

        with _reported():
            {"pause": api.rollout_pause, "resume": api.rollout_resume, "abort": api.rollout_abort}[name](rollout_id, store)
        console.print(f"rollout {rollout_id}: {name} {'requested (the controller rolls the devices back)' if name == 'abort' else 'done'}")


_rollout_action("pause", "Stop moving devices (those already moved stay).")
_rollout_action("resume", "Go on with a paused rollout.")
_rollout_action("abort", "Stop and point every device already moved back at its previous version.")


@main.command("rollback")
@click.argument("model")
@click.option("--to", "version", required=True, help="The version to go back to (devices keep it on disk).")
@_store_option
@click.option("--repo", required=True, type=click.Path(file_okay=False, path_type=Path), help="Image repository.")
@click.option("--select", "selector", default="", help="Which devices (default: every device running MODEL).")
def rollback_cmd(model: str, version: str, store: Path | str, repo: Path, selector: str) -> None:
    """Point the whole selection back at MODEL VERSION, in one wave, with no health gate."""
    from fleet import api

    with _reported():
        r = api.rollback(model, version, store, repo, selector)
    console.print(f"rollout {r.id}: {model} back to {version} on {r.devices} device(s)")


@main.command("simulate")
@click.argument("count", type=click.IntRange(1, 100_000))
@_broker_option
@_config_option
@click.option(
    "--credentials",
    type=click.Path(file_okay=False, path_type=Path),
    help="Each device logs in as itself with DIR/{id}/broker-password (what `fleet provision ID --out DIR/ID` writes).",
)
@click.option("--prefix", default="sim", show_default=True)
@click.option("--telemetry", "telemetry_s", type=float, default=10.0, show_default=True, help="Seconds between telemetry batches.")
@click.option("--running", "initial", multiple=True, help="MODEL=VERSION each device starts with.")
@click.option(
    "--behaviour",
    "behaviours",
    multiple=True,
    help="VERSION:share=0.4,reject | VERSION:count=6,latency=5,errors=0.3,client_errors=0.2 | VERSION:agree=0.6 (in shadow)"
    " | VERSION:class_shift=0.5,mean_shift=2",
)
def simulate_cmd(
    count: int,
    broker: str | None,
    config: Path | None,
    credentials: Path | None,
    prefix: str,
    telemetry_s: float,
    initial: tuple[str, ...],
    behaviours: tuple[str, ...],
) -> None:
    """COUNT simulated devices speaking the real protocol (only their inference numbers are made up).

    They connect as fleet.toml's [broker] says (TLS, MQTT version); with --credentials each as itself.
    """
    from fleet.dev.simulate import Behaviour, simulate

    settings = _broker_settings(config, broker)
    with _reported():
        try:
            parsed = [Behaviour.parse(b) for b in behaviours]
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from exc
        runner = simulate(count, settings, credentials, prefix, telemetry_s, dict(_key_values(initial)), parsed)
    console.print(f"{count} simulated devices connected to {', '.join(f'{h}:{p}' for h, p in settings.addresses())} (Ctrl-C stops)")
    _until_stopped(_stop_on_signals(), lambda: True)
    runner.stop()


@main.command("provision")
@click.argument("name", required=False)
@click.option("--broker-dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="The fleet CA, passwords, ACL.")
@click.option("--init", "init", is_flag=True, help="Create the fleet CA and the broker's certificate first.")
@click.option("--hostname", "hostnames", multiple=True, help="The broker's DNS names / IPs (with --init).")
@click.option("--role", type=click.Choice(["device", "app", "controller"]), default="device", show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Write the device's files (agent.toml, credentials) here.")
@_broker_option
@click.option("--repo", type=click.Path(file_okay=False, path_type=Path), help="Image repository: its root.json goes to the device.")
@click.option("--director", "director_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--revoke", is_flag=True, help="Remove NAME's password and ACL entry (send mosquitto SIGHUP after).")
@click.option(
    "--config",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="With --init: where the controller's fleet.toml goes (default ./fleet.toml; an existing file is never replaced).",
)
@click.option("--mtls-port", type=click.IntRange(1, 65535), help="With --init: the mutual-TLS listener's port (default: --broker's + 1).")
def provision_cmd(
    name: str | None,
    broker_dir: Path,
    init: bool,
    hostnames: tuple[str, ...],
    role: str,
    out: Path | None,
    broker: str | None,
    repo: Path | None,
    director_dir: Path | None,
    revoke: bool,
    config: Path | None,
    mtls_port: int | None,
) -> None:
    """MQTT credentials for NAME (password + client certificate from the fleet CA) and its ACL lines.

    With --init the broker directory also gets mosquitto.conf (TLS + password listener on --broker's port, 8883 by
    default; mutual TLS on the next), and the controller its credentials and a fleet.toml (--config) using them.
    With --role controller and --out, another controller's fleet.toml and credentials go to --out.
    """
    from fleet import api

    host, port = _broker(broker) or ("localhost", 8883)
    with _reported():
        try:
            done = api.provision(broker_dir, name, init, hostnames, role, out, host, port, repo, director_dir, revoke, config, mtls_port)
        except api.ConfigExists as exc:
            raise click.UsageError(str(exc)) from None
    if done.controller is not None:
        console.print(f"fleet CA and broker certificate in {broker_dir}; mosquitto config: {broker_dir / 'mosquitto.conf'}")
        console.print(f"controller {done.controller.name}: credentials and {done.fleet_toml} (broker {host}:{port}, TLS, password file)")
    if name is not None and done.revoked:
        console.print(f"{name}: password and ACL entry removed (send mosquitto SIGHUP to apply)")
    elif done.credentials is not None:
        _print_provisioned(done.credentials, broker_dir, out)


def _print_provisioned(creds: Credentials, broker_dir: Path, out: Path | None) -> None:
    console.print(
        f"{creds.role} {creds.name}: password and certificate issued; ACL: {broker_dir / 'acl'} (send mosquitto SIGHUP to reload)"
    )
    if out is not None and creds.role == "controller":
        console.print(f"controller files in {out}: fleet.toml and fleet-credentials/")
    elif out is not None:
        console.print(f"device files in {out}: copy them to /etc/edgefleet/ on {creds.name}")
    else:
        console.print(f"password: {creds.password}")


@main.command("serve")
@click.argument("root", type=click.Path(file_okay=False, path_type=Path))
@click.option("--keys", "keys_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@_broker_option
@click.option("--interval", type=float, default=60.0, show_default=True, help="Seconds between re-signing checks.")
@click.option("--store", type=_STORE, help="Registry/telemetry/rollout store (SQLite file or postgresql:// URL): ingest and run rollouts.")
@click.option("--telemetry-days", type=float, help="Telemetry retention in the store (default: fleet.toml's telemetry_retention_days, 7).")
@click.option(
    "--controller-id",
    help="This controller's stable name among several on one store (default: fleet.toml's controller_id, else host name + hash of ROOT).",
)
@click.option(
    "--http",
    "http",
    help="Serve the dashboard on [HOST]:PORT (needs a store), e.g. :8080 (127.0.0.1); any other address needs a token"
    " (default: fleet.toml's dashboard.http).",
)
@_config_option
def serve_cmd(
    root: Path,
    keys_dir: Path,
    broker: str | None,
    interval: float,
    store: Path | str | None,
    telemetry_days: float | None,
    controller_id: str | None,
    http: str | None,
    config: Path | None,
) -> None:
    """Serve ROOT/image and ROOT/director to devices over MQTT and re-sign online metadata before it expires.

    With a store (--store, or fleet.toml's `store`) it is the whole controller: it also keeps the device registry and
    telemetry, and runs rollouts. It connects as fleet.toml's [broker] says (TLS, credentials); --broker replaces the address.
    """
    from agent import logs
    from fleet import api
    from fleet.settings import DEFAULT_CONFIG, config_file

    logs.configure()
    settings = _settings(config)
    b = _broker_settings(config, broker)
    stop = _stop_on_signals()
    with _reported():
        try:
            serving = api.serve(
                root,
                keys_dir,
                b,
                interval,
                store or settings.store,
                telemetry_days if telemetry_days is not None else settings.telemetry_retention_days,
                http or settings.dashboard.http,
                settings.dashboard.token,
                config_file(config) or DEFAULT_CONFIG,
                controller_id or settings.controller_id,
            )
        except api.NeedsStore as exc:
            raise click.UsageError(str(exc)) from None
    if serving.new_token is not None:  # click.echo: one unwrapped line, shown this once
        click.echo(f"dashboard token (shown once; kept as dashboard.token in {config or DEFAULT_CONFIG}): {serving.new_token}", err=True)
    if serving.dashboard is not None:
        console.print(f"dashboard on {serving.dashboard.url}" + (" (bearer token required)" if serving.dashboard.token else ""))
    role = serving.controller.role  # several controllers on one store: one leads (rollouts, re-signing), the rest stand by
    console.print(f"serving {root} on {b.host}:{b.port}{' with TLS' if b.tls_ca else ''} as {role} (Ctrl-C stops)")
    healthy = _until_stopped(stop, serving.healthy)
    if not healthy:  # an MQTT thread died: exit non-zero so systemd restarts the controller
        console.print("[red]error[/red]: a network thread of the controller stopped; exiting so the service restarts it")
    serving.stop()
    if not healthy:
        sys.exit(1)


def _stop_on_signals() -> threading.Event:
    """An event SIGTERM and SIGINT set: the main thread waits on it rather than acting in a handler, since a signal may
    land on another thread (see agent.commands.run). Installed before a long start, so a signal then still stops."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _until_stopped(stop: threading.Event, healthy: Callable[[], bool]) -> bool:
    """Wait for ``stop`` (True) or for ``healthy()`` to turn false (False), checking five times a second."""
    while not stop.wait(0.2):
        if not healthy():
            return False
    return True


def _table(report: object) -> None:
    table = Table("variant", "size", "latency (ms)", "max error", "tolerance", "top-1", "verdict", title="fleet build")
    for v in getattr(report, "variants", []):
        p = v.parity
        worst = max(p.outputs.values(), key=lambda o: o.max_abs_error / max(o.atol, 1e-30)) if p and p.outputs else None
        table.add_row(
            v.id,
            f"{v.size / 1024:.1f} KiB" if v.size else "-",
            f"{v.latency_ms:.3f}" if v.latency_ms is not None else "-",
            f"{p.max_abs_error:.3g}" if p else "-",
            f"{worst.atol:.3g}" if worst else "-",  # the effective tolerance of the output nearest its limit
            f"{p.top1_agreement:.1%}" if p and p.top1_agreement is not None else "-",
            v.state if not v.reason else f"{v.state}: {v.reason}",
        )
    console.print(table)


if __name__ == "__main__":
    main()
