"""The Open Inference Protocol's gRPC messages (KServe v2 ``inference.GRPCInferenceService``), built at import.

Why no generated ``_pb2`` module: protoc's output checks the protobuf runtime's version against the compiler's, and a
device's protobuf is whatever its runtimes pinned (LiteRT, ONNX Runtime); a descriptor built from the table below runs
on any protobuf from 4.21 on. The table is the protocol's own field numbering (KServe's ``grpc_predict_v2.proto``,
which Triton's ``grpc_service.proto`` extends: ``InferParameter`` here also has Triton's ``double_param`` and
``uint64_param``), so an unmodified ``tritonclient.grpc`` talks to it. Only the six RPCs the agent serves are
described; the rest (streaming, repository, shared memory) are answered UNIMPLEMENTED by grpc itself.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

__all__ = ["PACKAGE", "SERVICE", "messages"]

PACKAGE = "inference"
SERVICE = f"{PACKAGE}.GRPCInferenceService"

_F = descriptor_pb2.FieldDescriptorProto
_SCALARS = {
    "bool": _F.TYPE_BOOL,
    "string": _F.TYPE_STRING,
    "bytes": _F.TYPE_BYTES,
    "int32": _F.TYPE_INT32,
    "int64": _F.TYPE_INT64,
    "uint32": _F.TYPE_UINT32,
    "uint64": _F.TYPE_UINT64,
    "float": _F.TYPE_FLOAT,
    "double": _F.TYPE_DOUBLE,
}

# message -> fields (number, name, type, "repeated" | "" | "oneof:NAME" | "map"); a map's type is its value message.
_PARAMETERS = (None, "parameters", "InferParameter", "map")
_TENSOR_METADATA = {"name": (1, "string", ""), "datatype": (2, "string", ""), "shape": (3, "int64", "repeated")}
_SCHEMA: dict[str, list[tuple[int, str, str, str]]] = {
    "ServerLiveRequest": [],
    "ServerLiveResponse": [(1, "live", "bool", "")],
    "ServerReadyRequest": [],
    "ServerReadyResponse": [(1, "ready", "bool", "")],
    "ModelReadyRequest": [(1, "name", "string", ""), (2, "version", "string", "")],
    "ModelReadyResponse": [(1, "ready", "bool", "")],
    "ServerMetadataRequest": [],
    "ServerMetadataResponse": [(1, "name", "string", ""), (2, "version", "string", ""), (3, "extensions", "string", "repeated")],
    "ModelMetadataRequest": [(1, "name", "string", ""), (2, "version", "string", "")],
    "ModelMetadataResponse": [
        (1, "name", "string", ""),
        (2, "versions", "string", "repeated"),
        (3, "platform", "string", ""),
        (4, "inputs", "ModelMetadataResponse.TensorMetadata", "repeated"),
        (5, "outputs", "ModelMetadataResponse.TensorMetadata", "repeated"),
    ],
    "ModelMetadataResponse.TensorMetadata": [(n, name, t, label) for name, (n, t, label) in _TENSOR_METADATA.items()],
    "InferParameter": [
        (1, "bool_param", "bool", "oneof:parameter_choice"),
        (2, "int64_param", "int64", "oneof:parameter_choice"),
        (3, "string_param", "string", "oneof:parameter_choice"),
        (4, "double_param", "double", "oneof:parameter_choice"),
        (5, "uint64_param", "uint64", "oneof:parameter_choice"),
    ],
    "InferTensorContents": [
        (1, "bool_contents", "bool", "repeated"),
        (2, "int_contents", "int32", "repeated"),
        (3, "int64_contents", "int64", "repeated"),
        (4, "uint_contents", "uint32", "repeated"),
        (5, "uint64_contents", "uint64", "repeated"),
        (6, "fp32_contents", "float", "repeated"),
        (7, "fp64_contents", "double", "repeated"),
        (8, "bytes_contents", "bytes", "repeated"),
    ],
    "ModelInferRequest": [
        (1, "model_name", "string", ""),
        (2, "model_version", "string", ""),
        (3, "id", "string", ""),
        (4, "parameters", "InferParameter", "map"),
        (5, "inputs", "ModelInferRequest.InferInputTensor", "repeated"),
        (6, "outputs", "ModelInferRequest.InferRequestedOutputTensor", "repeated"),
        (7, "raw_input_contents", "bytes", "repeated"),
    ],
    "ModelInferRequest.InferInputTensor": [
        (1, "name", "string", ""),
        (2, "datatype", "string", ""),
        (3, "shape", "int64", "repeated"),
        (4, "parameters", "InferParameter", "map"),
        (5, "contents", "InferTensorContents", ""),
    ],
    "ModelInferRequest.InferRequestedOutputTensor": [(1, "name", "string", ""), (2, "parameters", "InferParameter", "map")],
    "ModelInferResponse": [
        (1, "model_name", "string", ""),
        (2, "model_version", "string", ""),
        (3, "id", "string", ""),
        (4, "parameters", "InferParameter", "map"),
        (5, "outputs", "ModelInferResponse.InferOutputTensor", "repeated"),
        (6, "raw_output_contents", "bytes", "repeated"),
    ],
    "ModelInferResponse.InferOutputTensor": [
        (1, "name", "string", ""),
        (2, "datatype", "string", ""),
        (3, "shape", "int64", "repeated"),
        (4, "parameters", "InferParameter", "map"),
        (5, "contents", "InferTensorContents", ""),
    ],
}


def _file() -> descriptor_pb2.FileDescriptorProto:
    """The schema as a FileDescriptorProto: nested messages under their parents, maps as protobuf spells them."""
    fdp = descriptor_pb2.FileDescriptorProto(name="edgefleet/oip/grpc_predict_v2.proto", package=PACKAGE, syntax="proto3")
    made: dict[str, descriptor_pb2.DescriptorProto] = {}
    for path in sorted(_SCHEMA, key=lambda p: p.count(".")):  # parents before the messages nested in them
        parent, _, leaf = path.rpartition(".")
        made[path] = (made[parent].nested_type if parent else fdp.message_type).add(name=leaf)
    for path, fields in _SCHEMA.items():
        message = made[path]
        for number, name, kind, label in fields:
            _add_field(message, path, number, name, kind, label)
    return fdp


def _add_field(message: descriptor_pb2.DescriptorProto, path: str, number: int, name: str, kind: str, label: str) -> None:
    field = message.field.add(name=name, number=number, json_name=_camel(name))
    field.label = _F.LABEL_REPEATED if label in ("repeated", "map") else _F.LABEL_OPTIONAL
    if label == "map":  # map<string, kind>: a nested entry message with key 1 and value 2
        entry = message.nested_type.add(name=_camel(name, upper=True) + "Entry")
        entry.options.map_entry = True
        entry.field.add(name="key", number=1, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL, json_name="key")
        value = entry.field.add(name="value", number=2, type=_F.TYPE_MESSAGE, label=_F.LABEL_OPTIONAL, json_name="value")
        value.type_name = f".{PACKAGE}.{kind}"
        field.type, field.type_name = _F.TYPE_MESSAGE, f".{PACKAGE}.{path}.{entry.name}"
        return
    if kind in _SCALARS:
        field.type = _SCALARS[kind]
    else:
        field.type, field.type_name = _F.TYPE_MESSAGE, f".{PACKAGE}.{kind}"
    if label.startswith("oneof:"):
        oneof = label.split(":", 1)[1]
        names = [o.name for o in message.oneof_decl]
        if oneof not in names:
            message.oneof_decl.add(name=oneof)
            names.append(oneof)
        field.oneof_index = names.index(oneof)


def _camel(name: str, upper: bool = False) -> str:
    head, *rest = name.split("_")
    text = head + "".join(p.title() for p in rest)
    return text[:1].upper() + text[1:] if upper else text


def _build() -> dict[str, Any]:
    fdp = _file()
    pool = descriptor_pool.DescriptorPool()  # a pool of our own: never clashes with another copy of the same package
    pool.Add(fdp)
    # protobuf >= 4.22 makes classes with GetMessageClass; 4.21 only through a MessageFactory (deprecated since)
    make = getattr(message_factory, "GetMessageClass", None) or message_factory.MessageFactory(pool).GetPrototype
    return {m.name: make(pool.FindMessageTypeByName(f"{PACKAGE}.{m.name}")) for m in fdp.message_type}


messages: dict[str, Any] = _build()
"""Message classes by name (``messages["ModelInferRequest"]``; nested ones are its attributes, as in generated code)."""
