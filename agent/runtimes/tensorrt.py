"""TensorRT: NVIDIA GPUs and Jetson, with engines built on the device.

Why build on the device: a serialized engine only runs on the GPU model and
TensorRT version it was built with, so the bundle ships ONNX and the agent builds
the engine once, then caches it under a key of everything that invalidates it:
(ONNX sha256, TensorRT version, GPU name and compute capability, precision,
L4T release, optimization-profile bounds). Inference uses the TensorRT 10
tensor-address API (``set_tensor_address`` + ``execute_async_v3``) with device
memory from cuda-python; on Jetson the ``tensorrt`` bindings come from JetPack.

Placement: first on an NVIDIA GPU or Jetson. The L4T release in the engine key
comes from the hardware profile the caller passes to ``load``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from agent.errors import ModelLoadError, RuntimeUnavailable, ShapeMismatch
from agent.files import atomic_write, sha256_file
from agent.runtimes import register
from agent.runtimes.base import GPU_PRECISIONS, Band, ProbeResult, Runtime, RuntimeOptions, Tier
from agent.runtimes.tensors import TensorSpec

if TYPE_CHECKING:
    from agent.hardware import HardwareProfile

DEFAULT_CACHE_DIR = Path(os.environ.get("EDGEFLEET_TRT_CACHE", "/var/cache/edgefleet/tensorrt"))

Shape = tuple[int, ...]


class TensorRTOptions(RuntimeOptions):
    precision: Literal["fp32", "fp16", "int8"] = "fp16"  # int8 needs an ONNX with Q/DQ nodes (explicit quantization)
    cache_dir: Path = DEFAULT_CACHE_DIR
    workspace_mb: int = 1024
    opt_batch: int = 1
    max_batch: int = 8
    # Bounds for dynamic dimensions other than the batch: input name -> (min, opt, max) shapes.
    profiles: dict[str, tuple[list[int], list[int], list[int]]] = {}
    gpu_index: int = 0


@dataclass(frozen=True)
class EngineKey:
    """Everything a built engine depends on; two keys that differ never share an engine."""

    onnx_sha256: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    precision: str
    l4t_release: str | None
    profiles: tuple[tuple[str, Shape, Shape, Shape], ...] = ()

    def digest(self) -> str:
        canonical = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


class EngineCache:
    """Engines on disk as ``<digest>.engine`` plus a ``<digest>.json`` naming the key and the engine's hash.

    Writes are atomic (temp file, fsync, rename) so a power cut mid-write leaves no
    half engine; a file whose hash does not match its record is treated as absent.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _paths(self, key: EngineKey) -> tuple[Path, Path]:
        d = key.digest()
        return self.directory / f"{d}.engine", self.directory / f"{d}.json"

    def get(self, key: EngineKey) -> bytes | None:
        engine_path, meta_path = self._paths(key)
        try:
            meta = json.loads(meta_path.read_text())
            blob = engine_path.read_bytes()
        except (OSError, ValueError):
            return None
        if meta.get("key") != json.loads(json.dumps(asdict(key))) or meta.get("sha256") != hashlib.sha256(blob).hexdigest():
            return None
        return blob

    def put(self, key: EngineKey, blob: bytes) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        engine_path, meta_path = self._paths(key)
        atomic_write(engine_path, blob)
        meta = {"key": asdict(key), "sha256": hashlib.sha256(blob).hexdigest(), "size": len(blob)}
        atomic_write(meta_path, json.dumps(meta, indent=1).encode())
        return engine_path


@cache
def _trt() -> Any:
    try:
        import tensorrt
    except ImportError as exc:
        raise RuntimeUnavailable("tensorrt is not installed (extra: tensorrt; on Jetson use JetPack's python3-libnvinfer)") from exc
    return tensorrt


@cache
def _cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # type: ignore[no-redef]  # cuda-python < 12.6
        except ImportError as exc:
            raise RuntimeUnavailable("cuda-python is not installed (extra: tensorrt)") from exc
    return cudart


def _check(result: Any) -> Any:
    """cuda-python returns (error, value...) tuples; raise on error, return the value(s)."""
    err, *values = result if isinstance(result, tuple) else (result,)
    cudart = _cudart()
    if err != cudart.cudaError_t.cudaSuccess:
        _, name = cudart.cudaGetErrorName(err)
        raise RuntimeError(f"CUDA error {name.decode() if isinstance(name, bytes) else name}")
    return values[0] if len(values) == 1 else values


@register
class TensorRTRuntime(Runtime):
    name = "tensorrt"
    formats = frozenset({"onnx"})
    Options = TensorRTOptions
    default_device = "GPU.0"
    variants = ("onnx-fp32", "onnx-int8")  # the agent builds its engine from the ONNX variant
    fleet_order = 10

    @classmethod
    def tiers(cls, profile: HardwareProfile) -> list[Tier]:
        if not profile.has_cuda_gpu:
            return []
        what = f"Jetson {profile.jetson_model}" if profile.is_jetson else "NVIDIA GPU"
        reason = f"{what}: a TensorRT engine built on the device is the fastest path"
        return [Tier(Band.CUDA_GPU + 0, cls.name, "GPU.0", ("onnx",), reason, GPU_PRECISIONS)]

    @classmethod
    def probe(cls) -> ProbeResult:
        try:
            trt = _trt()
            cudart = _cudart()
            count = _check(cudart.cudaGetDeviceCount())
        except RuntimeUnavailable as exc:
            return ProbeResult(cls.name, False, reason=str(exc))
        except RuntimeError as exc:
            return ProbeResult(cls.name, False, reason=f"no usable CUDA device: {exc}")
        if not count:
            return ProbeResult(cls.name, False, trt.__version__, reason="no CUDA device")
        return ProbeResult(cls.name, True, trt.__version__, tuple(f"GPU.{i}" for i in range(count)))

    def _load(self, path: Path, fmt: str, device: str | None, options: Any, profile: HardwareProfile | None) -> None:
        trt, cudart = _trt(), _cudart()
        opts: TensorRTOptions = options
        index = int(device.split(".")[1]) if device and "." in device else opts.gpu_index
        _check(cudart.cudaSetDevice(index))
        props = _check(cudart.cudaGetDeviceProperties(index))
        gpu_name = props.name.decode(errors="replace").strip("\x00") if isinstance(props.name, bytes) else str(props.name)

        logger = trt.Logger(trt.Logger.WARNING)
        network_inputs = self._onnx_inputs(path, trt, logger)
        profiles = self._profiles(network_inputs, opts)
        key = EngineKey(
            sha256_file(path),
            trt.__version__,
            gpu_name,
            f"{props.major}.{props.minor}",
            opts.precision,
            profile.l4t_release if profile is not None else None,
            profiles,
        )
        cache_ = EngineCache(opts.cache_dir)
        blob = cache_.get(key)
        built = blob is None
        if blob is None:
            blob = self._build(path, trt, logger, profiles, opts)
            cache_.put(key, blob)
        engine = trt.Runtime(logger).deserialize_cuda_engine(blob)
        if engine is None:
            raise ModelLoadError(f"TensorRT could not deserialize the engine for {path.name}")
        self._engine = engine
        self._context = engine.create_execution_context()
        self._stream = _check(cudart.cudaStreamCreate())
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        specs = {
            n: TensorSpec(n, tuple(int(d) for d in engine.get_tensor_shape(n)), np.dtype(trt.nptype(engine.get_tensor_dtype(n))))
            for n in names
        }
        self._inputs = tuple(specs[n] for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self._outputs = tuple(specs[n] for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self._device = f"GPU.{index}"
        self._details = {"gpu": gpu_name, "engine_key": key.digest(), "engine_built": built, "precision": opts.precision}

    @staticmethod
    def _onnx_inputs(path: Path, trt: Any, logger: Any) -> list[tuple[str, Shape]]:
        builder = trt.Builder(logger)
        network, _ = TensorRTRuntime._parse(path, trt, builder, logger)
        return [(network.get_input(i).name, tuple(network.get_input(i).shape)) for i in range(network.num_inputs)]

    @staticmethod
    def _parse(path: Path, trt: Any, builder: Any, logger: Any) -> tuple[Any, Any]:
        major = int(trt.__version__.split(".")[0])
        flags = 0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(path.read_bytes()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ModelLoadError(f"TensorRT cannot parse {path.name}: {errors}")
        return network, parser

    @staticmethod
    def _profiles(inputs: list[tuple[str, Shape]], opts: TensorRTOptions) -> tuple[tuple[str, Shape, Shape, Shape], ...]:
        out = []
        for name, shape in inputs:
            if all(d >= 0 for d in shape):
                continue
            if name in opts.profiles:
                lo, mid, hi = (tuple(s) for s in opts.profiles[name])
            elif all(d >= 0 for d in shape[1:]):
                lo = (1, *shape[1:])
                mid = (opts.opt_batch, *shape[1:])
                hi = (opts.max_batch, *shape[1:])
            else:
                raise ModelLoadError(f"input {name!r} has dynamic dims beyond the batch {list(shape)}: set tensorrt options.profiles")
            out.append((name, lo, mid, hi))
        return tuple(out)

    @staticmethod
    def _build(path: Path, trt: Any, logger: Any, profiles: tuple[tuple[str, Shape, Shape, Shape], ...], opts: TensorRTOptions) -> bytes:
        builder = trt.Builder(logger)
        network, _parser = TensorRTRuntime._parse(path, trt, builder, logger)
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, opts.workspace_mb << 20)
        if opts.precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        elif opts.precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
        if profiles:
            profile = builder.create_optimization_profile()
            for name, lo, mid, hi in profiles:
                profile.set_shape(name, lo, mid, hi)
            config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise ModelLoadError(f"TensorRT failed to build an engine for {path.name} (see the TensorRT log)")
        return bytes(serialized)

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            cudart = _cudart()
            if ptr:
                _check(cudart.cudaFree(ptr))
            ptr = int(_check(cudart.cudaMalloc(nbytes)))
            self._buffers[name] = (ptr, nbytes)
            self._context.set_tensor_address(name, ptr)
        return ptr

    def _run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        cudart, ctx, stream = _cudart(), self._context, self._stream
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for spec, arr in zip(self._inputs, arrays):
            if not ctx.set_input_shape(spec.name, arr.shape):
                raise ShapeMismatch(f"shape {list(arr.shape)} is outside the engine's profile for {spec.name!r}")
            ptr = self._buffer(spec.name, arr.nbytes)
            _check(cudart.cudaMemcpyAsync(ptr, arr.ctypes.data, arr.nbytes, h2d, stream))
        results = []
        for spec in self._outputs:
            out = np.empty(tuple(ctx.get_tensor_shape(spec.name)), dtype=spec.dtype)
            self._buffer(spec.name, max(out.nbytes, 1))
            results.append(out)
        if not ctx.execute_async_v3(int(stream)):
            raise RuntimeError("execute_async_v3 failed")
        for spec, out in zip(self._outputs, results):
            _check(cudart.cudaMemcpyAsync(out.ctypes.data, self._buffers[spec.name][0], out.nbytes, d2h, stream))
        _check(cudart.cudaStreamSynchronize(stream))
        return results

    def _close(self) -> None:
        cudart = _cudart()
        for ptr, _ in self._buffers.values():
            cudart.cudaFree(ptr)
        self._buffers.clear()
        cudart.cudaStreamDestroy(self._stream)
        self._context = None
        self._engine = None
