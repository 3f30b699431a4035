"""``edge-agent``: the command line over ``agent.commands``."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from agent import __version__, commands
from agent.errors import EdgefleetError, InvalidInput, InvalidOptions
from agent.settings import load_settings

console = Console()


def _fail(exc: EdgefleetError) -> None:
    click.echo(f"error[{exc.code}]: {exc}", err=True)
    attempts = getattr(exc, "attempts", None)
    for what, why in attempts or []:
        click.echo(f"  - {what}: {why}", err=True)
    sys.exit(2 if isinstance(exc, (InvalidInput, InvalidOptions)) else 1)


@click.group()
@click.version_option(__version__, prog_name="edge-agent")
def main() -> None:
    """edgefleet's device agent."""


@main.command("hardware")
@click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("/"),
    show_default=True,
    help="Read the hardware from this tree instead of the real one.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def hardware_cmd(root: Path, as_json: bool) -> None:
    """Show the hardware profile and the runtimes ranked for it, with reasons."""
    report = commands.hardware(root)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
        return
    p = report.profile
    console.print(f"[bold]{p.summary()}[/bold]")
    console.print(f"memory {p.memory_bytes / 2**30:.1f} GiB, cores {p.cpu.cores}, flags {' '.join(p.cpu.flags) or '-'}")
    for w in p.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}")
    rt = Table("runtime", "available", "version", "devices", "note", title="runtimes")
    for name, pr in report.probes.items():
        rt.add_row(name, "yes" if pr.available else "no", pr.version or "-", ", ".join(pr.devices) or "-", pr.reason)
    console.print(rt)
    ranked = Table("#", "runtime", "device", "format", "reason", title="ranking (best first)")
    for i, c in enumerate(report.ranking.candidates, 1):
        ranked.add_row(str(i), c.runtime, c.device, c.variant.format, c.reason)
    console.print(ranked)
    for what, why in report.ranking.excluded:
        console.print(f"[dim]left out {what}: {why}[/dim]")


def _batch_axes(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, int | None]:
    """``NAME=K`` (K a dimension index) or ``NAME=none`` (no batch axis), as many as given."""
    out: dict[str, int | None] = {}
    for value in values:
        name, sep, axis = value.partition("=")
        if not sep or not name or not ((axis.isascii() and axis.isdigit()) or axis.lower() == "none"):  # "²".isdigit(), int() refuses it
            raise click.BadParameter(f"{value!r}: expected NAME=K (a dimension index) or NAME=none", ctx, param)
        out[name] = None if axis.lower() == "none" else int(axis)
    return out


@main.command("infer")
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--input",
    "input_file",
    required=True,
    type=click.Path(path_type=Path),
    help=".npy (one input), .npz (named inputs) or .json (object of name -> nested list or number, or a list).",
)
@click.option("--runtime", help="Force a runtime: litert, openvino, onnx, tensorrt.")
@click.option("--device", help="Force a device, e.g. CPU, GPU.0, NPU, EDGETPU, CUDA.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True)
@click.option("--repeat", type=click.IntRange(1, 100000), default=1, show_default=True)
@click.option(
    "--batch-axis",
    "batch_axes",
    multiple=True,
    callback=_batch_axes,
    metavar="NAME=K",
    help="The batch axis of a tensor whose shape does not tell it (e.g. state=1), or NAME=none. Repeatable.",
)
@click.option(
    "--output",
    "output_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write every output, whole, to this .npz.",
)
@click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Hardware tree (default: the settings' hardware_root, i.e. /).",
)
@click.option(
    "--config",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Settings file (default: $EDGEFLEET_CONFIG or /etc/edgefleet/agent.toml).",
)
@click.option("--json", "as_json", is_flag=True, help="Everything, every output whole.")
def infer_cmd(
    model: Path,
    input_file: Path,
    runtime: str | None,
    device: str | None,
    precision: str,
    repeat: int,
    batch_axes: dict[str, int | None],
    output_file: Path | None,
    root: Path | None,
    config: Path | None,
    as_json: bool,
) -> None:
    """Run one inference locally: a summary of each output and the latency (--json or --output for the whole tensors)."""
    try:
        settings = load_settings(config)
        result = commands.infer(
            model,
            input_file,
            runtime=runtime,
            device=device,
            precision=precision,
            root=root,
            repeat=repeat,
            settings=settings,
            batch_axes=batch_axes,
        )
        if output_file is not None:
            result.save(output_file)
    except EdgefleetError as exc:
        _fail(exc)
        return
    data: dict[str, Any] = result.to_json()
    if as_json:
        click.echo(json.dumps(data))
        return
    m = data["model"]
    console.print(f"[bold]{m['runtime']}[/bold] {m['runtime_version']} on {m['device']}")
    for name, s in result.summary().items():
        stats = "no finite values" if s["min"] is None else f"min {s['min']:.6g} max {s['max']:.6g} mean {s['mean']:.6g}"
        first = ", ".join(f"{x:.6g}" for x in s["first"]) + (", ..." if s["size"] > len(s["first"]) else "")
        click.echo(f"{name}: shape {s['shape']} {s['dtype']}  {stats}  first [{first}]")  # not rich: one line, never wrapped
    if output_file is not None:
        click.echo(f"outputs written to {output_file}")
    lat = data["latency_ms"]
    console.print(f"latency: first {lat['first']:.3f} ms, median {lat['median']:.3f} ms over {lat['runs']} run(s)")
    for item in data["passed_over"]:
        console.print(f"[dim]passed over {item['candidate']}: {item['why']}[/dim]")


_config_option = click.option(
    "--config",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Settings file (default: $EDGEFLEET_CONFIG or /etc/edgefleet/agent.toml).",
)


@main.command("run")
@_config_option
def run_cmd(config: Path | None) -> None:
    """Run the daemon: presence, signed model updates, rollback, commands. SIGTERM stops it cleanly."""
    import faulthandler
    import signal

    from agent import logs

    logs.configure()
    faulthandler.enable()  # a crash in a runtime's native code leaves a Python stack in the journal
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1` dumps every thread's stack: where is it stuck?
    try:
        settings = load_settings(config)
        logging.getLogger().setLevel(settings.log_level)
        code = commands.run(settings, config=config)
    except EdgefleetError as exc:
        _fail(exc)
        return
    sys.exit(code)


@main.group("config")
def config_group() -> None:
    """The agent's settings."""


@config_group.command("check")
@_config_option
def config_check_cmd(config: Path | None) -> None:
    """Print the effective settings (file + environment + defaults), or the exact key and value that is wrong."""
    try:
        settings = load_settings(config)
    except EdgefleetError as exc:
        _fail(exc)
        return
    click.echo(json.dumps(settings.model_dump(mode="json"), indent=2))


@main.command("status")
@_config_option
@click.option("--json", "as_json", is_flag=True)
def status_cmd(config: Path | None, as_json: bool) -> None:
    """Installed model versions and the latest update jobs (read from the agent's state; works while it runs)."""
    try:
        data = commands.status(load_settings(config))
    except EdgefleetError as exc:
        _fail(exc)
        return
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    installed = Table("model", "version", "variant", "status", title=f"{data['device_id']}: installed")
    for m in data["installed"]:
        installed.add_row(m["model"], m["version"], m["variant"], m["status"])
    console.print(installed)
    jobs = Table("job", "target", "state", "progress", "reason", title="update jobs")
    for j in data["jobs"]:
        jobs.add_row(j["id"], j["target_path"], j["state"], f"{j['offset']}/{j['length']}", j["reason"])
    console.print(jobs)


@main.command("rollback")
@click.argument("model")
@_config_option
def rollback_cmd(model: str, config: Path | None) -> None:
    """Switch MODEL back to the previous version this device keeps (asks the running agent over MQTT)."""
    try:
        reply = commands.rollback(model, load_settings(config))
    except EdgefleetError as exc:
        _fail(exc)
        return
    if not reply.get("ok"):
        err = reply.get("error", {})
        click.echo(f"error[{err.get('code', 'internal')}]: {err.get('message', reply)}", err=True)
        sys.exit(1)
    console.print(f"{model} rolled back to {reply['result']['version']}")


if __name__ == "__main__":
    main()
