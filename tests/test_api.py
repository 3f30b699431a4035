"""``fleet.api``: every ``fleet`` command mirrors a Python function of its name with the same defaults, and the
functions work end to end on a real store and image repository."""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import click
import pytest
from update_rig import MODEL, VARIANT, Rig

from agent import wire
from agent.settings import BrokerSettings
from converters.build import build
from converters.demo_models import write_demo_model
from fleet import api
from fleet.cli import main
from fleet.dev.broker import free_port
from fleet.dev.demo import run_demo
from fleet.dev.simulate import simulate
from fleet.rollout import Gates, RolloutError, RolloutSpec
from fleet.store import FleetStore

# What the command line does with these before calling: prints JSON (--json), watches (--watch), reads fleet.toml
# (--config) and turns --broker HOST:PORT with it into the BrokerSettings the functions take.
CLI_ONLY = {"as_json", "watch", "config", "broker"}
ELSEWHERE: dict[str, Callable[..., Any]] = {"build": build, "demo-model": write_demo_model, "demo": run_demo, "simulate": simulate}
RENAMED = {"build": {"tolerance": "tolerances"}, "demo-model": {"out": "path"}}  # the option names a singular / the file


def commands(group: click.Group = main, path: tuple[str, ...] = ()) -> Iterator[tuple[str, click.Command]]:
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from commands(command, (*path, name))
        else:
            yield " ".join((*path, name)), command


def function_of(name: str) -> Callable[..., Any]:
    return ELSEWHERE.get(name) or getattr(api, name.replace(" ", "_").replace("-", "_"))


def unset(value: Any) -> bool:
    return value is None or value == ()  # a repeatable option's "none given" is a function's None or ()


@pytest.mark.parametrize("name,command", list(commands()), ids=[n for n, _ in commands()])
def test_every_command_has_a_function_of_its_name_with_its_defaults(name: str, command: click.Command) -> None:
    signature = inspect.signature(function_of(name)).parameters
    renamed = RENAMED.get(name, {})
    # what the command passes for each option left out (resilient parsing: no callbacks, no "missing argument")
    left_out = command.make_context(name, [], resilient_parsing=True).params
    for param in command.params:
        assert param.name is not None
        given = left_out.get(param.name)
        if param.name in CLI_ONLY and renamed.get(param.name, param.name) not in signature:
            continue
        arg = renamed.get(param.name, param.name)
        assert arg in signature, f"fleet {name}: {param.name} has no parameter in {function_of(name).__qualname__}"
        default = signature[arg].default
        if param.name == "store" and default is inspect.Parameter.empty:
            continue  # --store defaults to fleet.toml's `store` (else ./fleet.db); a function uses the store it is given
        if default is inspect.Parameter.empty:
            assert unset(given), f"fleet {name} --{param.name}: {given!r} on the command line, required in Python"
        elif unset(default):
            assert unset(given), f"fleet {name} --{param.name}: {given!r} on the command line, {default!r} in Python"
        else:
            assert given == default, f"fleet {name} --{param.name}: {given!r} on the command line, {default!r} in Python"


def test_rollout_start_documents_the_command_lines_soak_and_wave_timeout_and_the_gates_defaults() -> None:
    signature = inspect.signature(api.rollout_start).parameters
    assert signature["soak_s"].default == 300.0 and signature["wave_timeout_s"].default == 1800.0
    spec = RolloutSpec("m", "1.0.0")  # the engine's own defaults are the same, not a second set
    assert (spec.soak_s, spec.wave_timeout_s) == (300.0, 1800.0)
    for f in fields(Gates):
        arg = {"max_error_rate_increase": "max_error_increase"}.get(f.name, f.name)
        assert signature[arg].default == f.default, f.name


# -- end to end on a real store ---------------------------------------------------------------------


def reported(device: str, models: dict[str, Any], hardware: str = "x86_64") -> tuple[str, wire.WireModel, float]:
    data = {
        "device_id": device,
        "agent_version": "0.1.0",
        "hardware": hardware,
        "runtimes": {"onnx": "1.20"},
        "preferred_variants": [VARIANT],
        "models": models,
        "installed": [],
        "ts": time.time(),
    }
    topic = wire.parse_device_topic(wire.device_topic(device, "reported"))
    return device, wire.decode_device_message(topic, json.dumps(data).encode()), time.time()


def running(version: str, shadow: str | None = None) -> dict[str, Any]:
    m: dict[str, Any] = {"version": version, "variant": VARIANT, "sha256": "ab", "runtime": "onnx", "device": "CPU"}
    if shadow is not None:
        m["shadow"] = {"version": shadow, "variant": VARIANT, "sha256": "cd", "runtime": "onnx"}
    return {MODEL: m}


@pytest.fixture
def store(store_location: Path | str) -> Path | str:
    """Four devices in a SQLite file or a fresh PostgreSQL database (each test runs on both)."""
    fs = FleetStore(store_location)
    fs.ingest([reported(f"api-{i}", running("1.0.0")) for i in range(3)] + [reported("other", running("1.0.0", shadow="1.1.0"))])
    fs.close()
    return store_location


def test_devices_device_and_tag_read_and_write_the_registry(store: Path | str) -> None:
    api.tag("api-1", {"site": "berlin"}, store)
    rows = api.devices(store)
    assert [r.device_id for r in rows] == ["api-0", "api-1", "api-2", "other"]
    assert rows[1].tags == {"site": "berlin"} and rows[1].state is None and rows[1].shown_state == "offline"  # no status yet
    shown = rows[1].to_json()  # what `fleet devices --store --json` prints: no state (the broker's word), tags
    assert list(shown) == ["device_id", "online", "hardware", "models", "tags", "update"]
    assert shown["models"][MODEL]["version"] == "1.0.0" and shown["tags"] == {"site": "berlin"}
    assert [r.device_id for r in api.devices(store, {"site": "berlin"})] == ["api-1"]
    detail = api.device("other", store)
    assert detail.device.id == "other" and detail.jobs == [] and detail.telemetry == []
    assert detail.shadows[MODEL]["version"] == "1.1.0" and detail.shadows[MODEL]["compared"] == 0
    with pytest.raises(api.UnknownDevice, match="nobody is not in"):
        api.device("nobody", store)


def test_devices_without_a_store_ask_the_broker_and_say_when_it_is_not_there() -> None:
    with pytest.raises(api.BrokerUnreachable, match=r"no broker at 127\.0\.0\.1"):
        api.devices(broker=BrokerSettings(host="127.0.0.1", port=free_port()), wait=0.1)


def test_a_rollout_started_paused_resumed_and_aborted_through_the_api(rig: Rig, store: Path | str) -> None:
    started = api.rollout_start(MODEL, "1.1.0", store, rig.image.directory, selector="device=api-*")
    assert started.devices == 3 and started.spec.waves == ["1%", "10%", "50%", "100%"]
    assert (started.spec.soak_s, started.spec.wave_timeout_s) == (300.0, 1800.0)  # the command line's defaults
    [row] = api.rollout_list(store)
    assert (row.id, row.model, row.version, row.state, row.wave, row.waves, row.devices) == (started.id, MODEL, "1.1.0", "running", 0, 4, 3)
    api.rollout_pause(started.id, store)
    assert api.rollout_status(started.id, store)["state"] == "paused"
    api.rollout_resume(started.id, store)
    api.rollout_abort(started.id, store)
    assert api.rollout_status(started.id, store)["state"] == "aborting"  # `fleet serve` rolls the devices back
    with pytest.raises(RolloutError, match="already running"):
        api.rollback(MODEL, "1.0.0", store, rig.image.directory)


def test_a_rollback_is_one_wave_with_no_soak_and_no_gate_over_every_device_running_the_model(rig: Rig, store: Path | str) -> None:
    back = api.rollback(MODEL, "1.0.0", store, rig.image.directory)
    assert back.devices == 4 and back.spec.selector == f"model={MODEL}" and back.spec.waves == ["100%"]
    assert back.spec.soak_s == 0 and back.spec.gates.max_failed == "100%"
