"""The agent's settings: ``/etc/edgefleet/agent.toml`` overlaid by ``EDGEFLEET_*`` environment variables.

Why pydantic-settings: one typed model is the documentation, the validation and
the error message — a bad value names its key. Nested keys in the environment use
``__``: ``EDGEFLEET_RUNTIME__FORCE_RUNTIME=onnx``.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from agent.errors import EdgefleetError, InvalidOptions

DEFAULT_CONFIG = Path("/etc/edgefleet/agent.toml")
CONFIG_ENV = "EDGEFLEET_CONFIG"


class RuntimeSettings(BaseModel):
    """Which runtimes the agent uses and how; every runtime name and option is checked against the runtime registry.

    Why the registry and not a list here: a runtime declares its name and its options
    in its own file, so a new runtime (or a test's toy one) is configurable at once.
    """

    model_config = ConfigDict(extra="forbid")

    force_runtime: str | None = None  # replaces the ranking policy
    # Only these runtimes are probed and used (None: every installed one); the others are never imported.
    enabled: list[str] | None = None
    force_device: str | None = None  # e.g. "CPU", "GPU.0", "NPU", "EDGETPU", "CUDA"
    # Per-runtime options, validated by each runtime's own model: {"litert": {"num_threads": 2}}.
    options: dict[str, dict[str, Any]] = {}
    latency_budget_ms: float | None = None  # a candidate slower than this after warm-up is passed over

    @field_validator("force_runtime")
    @classmethod
    def _known_runtime(cls, value: str | None) -> str | None:
        if value is not None:
            _check_runtime_name(value)
        return value

    @field_validator("enabled")
    @classmethod
    def _known_runtimes(cls, value: list[str] | None) -> list[str] | None:
        for name in value or ():
            _check_runtime_name(name)
        return value

    @field_validator("options")
    @classmethod
    def _options_fit_their_runtime(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Check each runtime's options against its own model now, not at the first model load."""
        from agent.runtimes import get_runtime

        for name, opts in value.items():
            try:
                get_runtime(name).parse_options(opts)
            except EdgefleetError as exc:
                raise ValueError(str(exc)) from None
        return value


def _check_runtime_name(name: str) -> None:
    """A runtime name as the registry spells it (lower case), or a ValueError that lists the known ones."""
    from agent.runtimes import runtime_classes

    known = runtime_classes()
    if name not in known:
        raise ValueError(f"unknown runtime {name!r}; known: {', '.join(sorted(known))}")


def parse_address(text: str, listen: bool = False) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for an IPv6 address) as a pair, or a ValueError that names it. ``listen``: an
    address to listen on, where port 0 asks for a free one."""
    host, _, port = text.strip().rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or not port.isdigit() or not (0 if listen else 1) <= int(port) <= 65535:
        raise ValueError(f"{text!r}: expected HOST:PORT")
    return host, int(port)


class BrokerSettings(BaseModel):
    """Where the broker is and how to talk to it (the agent's ``[broker]``; fleet.toml's broker section is this model).

    One broker: ``host``/``port``. A clustered broker: ``hosts`` lists its nodes' addresses (``HOST:PORT``), tried in
    order at the first connection and in turn after each drop or refusal (``agent.mqtt.FailoverClient``); ``host`` and
    ``port`` then read as its first address. In the environment the list is JSON:
    ``EDGEFLEET_BROKER__HOSTS='["10.0.0.1:1883","10.0.0.2:1883"]'``.
    """

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 1883
    hosts: list[str] = []  # a clustered broker's nodes, "HOST:PORT" each; when given, host/port are its first
    keepalive_s: Annotated[int, Field(ge=5, le=3600)] = 30
    # MQTT 5 by default (session expiry, MaximumPacketSize); 3.1.1 for brokers without it (amqtt).
    mqtt_version: Literal["5", "3.1.1"] = "5"
    username: str | None = None  # default: none; `fleet provision` makes one per device
    password_file: Path | None = None  # the password, in a file only the agent reads (not in the TOML)
    tls_ca: Path | None = None  # the fleet CA: TLS on when set
    tls_cert: Path | None = None  # client certificate and key for mutual TLS
    tls_key: Path | None = None

    @field_validator("hosts")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        for text in value:
            parse_address(text)
        return value

    @model_validator(mode="after")
    def _first_address(self) -> BrokerSettings:
        """With ``hosts``, ``host``/``port`` are its first address, so code and logs that name one address name that one."""
        if self.hosts:
            self.host, self.port = parse_address(self.hosts[0])
        return self

    def addresses(self) -> list[tuple[str, int]]:
        """Every address of the broker, in the order they are tried: ``hosts``, or ``host``/``port`` alone."""
        return [parse_address(h) for h in self.hosts] if self.hosts else [(self.host, self.port)]


class PublishPredictions(BaseModel):
    """Which answers given to HTTP clients are also published to ``dev/{id}/pred/{model}`` (the MQTT reply format).

    ``every``: one in N of the answers that pass the rule (1: each; 0: off). The rule, when given, looks at one output
    (``output``; default the model's first): ``top_classes`` — some row's top class (the argmax of its last dimension)
    is one of these; ``value_above`` / ``value_below`` — some value is above / below. Given together, all must hold.
    """

    model_config = ConfigDict(extra="forbid")

    every: Annotated[int, Field(ge=0)] = 0
    output: str | None = None
    top_classes: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=1000)] = []
    value_above: float | None = None
    value_below: float | None = None
    qos: Literal[0, 1] = 0


class ServingSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    workers: Annotated[int, Field(ge=1, le=64)] = 1  # inference threads (a runtime serializes its own calls)
    queue_size: Annotated[int, Field(ge=1, le=100_000)] = 64  # beyond it requests are answered `overloaded`
    max_payload_kb: Annotated[int, Field(ge=1, le=256 * 1024)] = 4096
    max_batch_rows: Annotated[int, Field(ge=1)] = 1024  # rows per request
    micro_batch: Annotated[int, Field(ge=1, le=1024)] = 1  # requests joined into one runtime call (1: off)
    micro_batch_wait_ms: Annotated[float, Field(ge=0, le=1000)] = 2.0  # how long to wait for more
    # A model averaging under this per call is run on the MQTT thread when the queue is empty (no thread
    # hand-offs); slower models always go through the queue so the MQTT thread never stalls. 0: never.
    inline_below_ms: Annotated[float, Field(ge=0, le=10)] = 0.5
    # Per application (the client named in the request topic, infer/{model}/{client}): requests a second and burst;
    # past it a request is answered `overloaded` at once. 0: no limit.
    client_rps: Annotated[float, Field(ge=0)] = 1000.0
    client_burst: Annotated[float, Field(ge=1)] = 200.0
    # Shadow mode: answered calls waiting for the shadow model; beyond this they are skipped (counted), never waited for.
    shadow_queue: Annotated[int, Field(ge=1, le=10_000)] = 16
    # A shadow's row agrees when the top class is the same (class scores) or every value is within atol + rtol * |active|.
    shadow_rtol: Annotated[float, Field(ge=0)] = 0.01
    shadow_atol: Annotated[float, Field(ge=0)] = 1e-3
    # The shadow's CPU budget, a fraction of one core's wall time; calls beyond it are sampled out (1.0: every call).
    shadow_budget: Annotated[float, Field(gt=0, le=1)] = 0.05
    # The budget is for spare CPU: while less than shadow_spare_cores of a core is idle machine-wide (0: not asked; in a
    # container /proc/stat is the host's), or the threads answering requests use shadow_busy_cores of one or more, the
    # shadow runs at a tenth of its budget (spare 0 and busy 1024: never throttled; a budget of 1.0 is never throttled
    # either). A spare figure above the machine's cores less a quarter is capped to that, with a warning.
    shadow_spare_cores: Annotated[float, Field(ge=0, le=1024)] = 0.5
    shadow_busy_cores: Annotated[float, Field(gt=0, le=1024)] = 0.25
    # A broker of the device's own (a mosquitto on the device or at the site) for inference alone: requests are taken
    # and answered there, over a second connection; presence, commands, updates and telemetry stay on [broker].
    # None: inference on the fleet's broker. In agent.toml: a [serving.broker] table, the same keys as [broker].
    broker: BrokerSettings | None = None
    # The Open Inference Protocol (KServe v2 / Triton) REST endpoint for local applications: "HOST:PORT" (keep it on
    # 127.0.0.1: it has no authentication; port 0: a free one) or "unix:/path/to.sock". None: off. Needs the `http` extra.
    http: Annotated[str | None, Field(max_length=256)] = None
    http_max_connections: Annotated[int, Field(ge=1, le=65_536)] = 256  # beyond it new connections are answered 503
    # A request body that has not arrived this long after its headers is answered 408 (a slow or stalled client).
    http_body_timeout_s: Annotated[float, Field(gt=0, le=600)] = 10.0
    # The same protocol over gRPC (KServe v2 inference.GRPCInferenceService, what tritonclient.grpc speaks): "HOST:PORT"
    # (Triton's is 8001; keep it on 127.0.0.1) or "unix:/path". None: off. Needs the `grpc` extra.
    grpc: Annotated[str | None, Field(max_length=256)] = None
    grpc_max_rpcs: Annotated[int, Field(ge=1, le=65_536)] = 256  # calls at once; beyond it grpc answers RESOURCE_EXHAUSTED
    # Answers given to HTTP and gRPC clients, also published on MQTT (dev/{id}/pred/{model}) for the fleet's subscribers.
    publish_predictions: PublishPredictions = PublishPredictions()

    @field_validator("http", "grpc")
    @classmethod
    def _http_address(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("unix:"):
            if "/" in value or any(c.isspace() for c in value):
                raise ValueError(f"{value!r}: expected HOST:PORT or unix:/path (no scheme)")
            parse_address(value, listen=True)
        elif value is not None and len(value) <= len("unix:"):
            raise ValueError("unix: needs a socket path")
        return value


class TelemetrySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    interval_s: Annotated[float, Field(gt=0, le=86400)] = 10.0
    # After a model switched version (an update, a rollback), the next batch comes this soon instead of at the
    # interval's end, and the interval starts over from it: the controller (a rollout's health gate, the dashboard)
    # hears of the new version's first seconds without waiting up to a whole interval. 0: at the interval only.
    first_report_s: Annotated[float, Field(ge=0, le=86400)] = 2.0
    outbox_max_batches: Annotated[int, Field(ge=1)] = 10_000  # kept while the broker is away; the oldest go first
    outbox_max_age_s: Annotated[float, Field(gt=0)] = 7 * 86400
    # Every Nth answered call adds to the sums of what each model answered (mean, spread, top-class counts) for the
    # controller's drift gate; no answers leave. A sample, because summing every call cost up to 4% of a fast
    # model's throughput in one run of benchmarks/serving.py. 1: every call; 0: off.
    prediction_every: Annotated[int, Field(ge=0)] = 8
    # "HOST:PORT": serve the agent's own Prometheus metrics there (``pip install 'edgefleet[metrics]'``); None: off.
    prometheus: str | None = None

    @field_validator("prometheus")
    @classmethod
    def _prometheus_address(cls, value: str | None) -> str | None:
        if value is not None:
            parse_address(value)
        return value


class UpdateSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # The repositories' first trusted root.json, installed with the agent (packaging, `fleet provision`).
    image_root: Path | None = None
    director_root: Path | None = None
    image_url: str = "repo://image/"  # how the controller's repository server names the image repository
    director_url: str = "repo://director/{device_id}/"
    keep_versions: Annotated[int, Field(ge=1, le=20)] = 2  # the active version and N-1 previous ones stay on disk for rollback
    disk_reserve_mb: Annotated[int, Field(ge=0)] = 16  # an update never leaves less free than this
    auto_rollback_failures: Annotated[int, Field(ge=1)] = 5  # inference failures in a row of a new model before it is rolled back
    check_interval_s: Annotated[float, Field(gt=0)] = 3600.0  # besides every director message
    # director messages arriving faster than this are one update round (each round is a connection and two refreshes)
    min_check_interval_s: Annotated[float, Field(ge=0, le=3600)] = 2.0
    retry_s: Annotated[float, Field(gt=0)] = 5.0  # after the repository was unreachable (doubles up to check_interval_s)
    window: Annotated[int, Field(ge=1, le=64)] = 8  # chunk requests in flight at first (8 x 256 KiB: benchmarks/transfer.py)
    # The window doubles while that makes the download measurably faster, up to this (below window: window, fixed). Under
    # the repository server's per-device line (64 requests), past which requests are dropped.
    window_max: Annotated[int, Field(ge=1, le=64)] = 32
    request_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    # Bytes per chunk request, at most 256 KiB; also capped by the broker's MaximumPacketSize (MQTT 5 CONNACK).
    request_chunk_kb: Annotated[int, Field(ge=1, le=256)] = 256
    # Downloaded bytes are fsynced and the resume offset saved this often (a restart re-fetches at most this much).
    sync_kb: Annotated[int, Field(ge=1)] = 4096
    # HTTP(S) mirrors of the image repository (`fleet repo publish DEST` makes one; a CDN in front of it does too),
    # tried in order before the MQTT repository, then those the director's signed metadata names. Every byte is verified.
    mirrors: Annotated[list[Annotated[str, Field(pattern=r"^https?://[^/]+", max_length=2048)]], Field(max_length=8)] = []
    mirror_timeout_s: Annotated[float, Field(gt=0, le=600)] = 10.0  # connecting, and each read: a stalled mirror is refused after it


class AgentSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EDGEFLEET_", env_nested_delimiter="__", extra="forbid")

    device_id: str = Field(default_factory=lambda: socket.gethostname().split(".")[0])
    state_dir: Path = Path("/var/lib/edgefleet")
    hardware_root: Path = Path("/")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    broker: BrokerSettings = BrokerSettings()
    runtime: RuntimeSettings = RuntimeSettings()
    update: UpdateSettings = UpdateSettings()
    serving: ServingSettings = ServingSettings()
    telemetry: TelemetrySettings = TelemetrySettings()

    @field_validator("device_id")
    @classmethod
    def _device_id(cls, value: str) -> str:
        from agent.wire import WireError, valid_device_id

        try:
            return valid_device_id(value)
        except WireError as exc:
            raise ValueError(str(exc)) from None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = Path(os.environ.get(CONFIG_ENV, str(DEFAULT_CONFIG)))
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file=path)


def load_settings(config: str | Path | None = None, **overrides: Any) -> AgentSettings:
    """Settings from ``config`` (default: ``$EDGEFLEET_CONFIG`` or /etc/edgefleet/agent.toml), the environment and overrides.

    Every problem — unreadable TOML, an unknown key, a bad value — is an
    ``InvalidOptions`` whose message names the key and the value.
    """
    previous = os.environ.get(CONFIG_ENV)
    if config is not None:
        os.environ[CONFIG_ENV] = str(config)
    try:
        return AgentSettings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}={e.get('input')!r}: {e['msg']}" for e in exc.errors())
        raise InvalidOptions(f"settings: {problems}") from exc
    except (ValueError, OSError) as exc:  # TOML syntax errors (tomllib.TOMLDecodeError is a ValueError), unreadable file
        raise InvalidOptions(f"settings file {os.environ.get(CONFIG_ENV, DEFAULT_CONFIG)}: {exc}") from exc
    finally:
        if config is not None:
            if previous is None:
                os.environ.pop(CONFIG_ENV, None)
            else:
                os.environ[CONFIG_ENV] = previous


def write_config(path: Path, settings: dict[str, Any]) -> Path:
    """Write an agent.toml from plain values: top-level keys first, then one table per section.

    Why here: the demo, the benchmarks, ``fleet provision`` and the tests all hand agents a
    config file; one writer keeps them in the shape ``AgentSettings`` reads (checked on load).
    Values are str, int, float, bool or lists of those (JSON's spelling is TOML's for these).
    """
    import json

    def value(v: Any) -> str:
        return json.dumps(str(v) if isinstance(v, Path) else v)

    def table(name: str, values: dict[str, Any]) -> str:
        """``[name]`` with its plain keys, then a ``[name.key]`` table for each dict value (``[serving.broker]``)."""
        plain = "".join(f"{k} = {value(v)}\n" for k, v in values.items() if v is not None and not isinstance(v, dict))
        return f"[{name}]\n{plain}" + "".join(table(f"{name}.{k}", v) for k, v in values.items() if isinstance(v, dict))

    top = [f"{k} = {value(v)}" for k, v in settings.items() if not isinstance(v, dict) and v is not None]
    tables = [table(k, v) for k, v in settings.items() if isinstance(v, dict)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(top) + "\n" + "".join(tables))
    return path
