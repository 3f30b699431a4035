"""The wire's decoders on hostile input: nothing a peer sends raises anything but ``WireError``, and limits hold."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import wire
from agent.wire.codec import nesting_depth

KINDS = ["status", "reported", "telemetry", "jobs/j1", "jobs/check"]

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**80), 2**80) | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=6),
    max_leaves=30,
)


def decode_on(kind: str, payload: bytes, device: str = "dev-1") -> wire.WireModel:
    return wire.decode_device_message(wire.parse_device_topic(wire.device_topic(device, *kind.split("/"))), payload)


def good_telemetry(**changes: Any) -> dict[str, Any]:
    batch: dict[str, Any] = {
        "device_id": "dev-1",
        "session": 1,
        "seq": 1,
        "ts": time.time(),
        "interval_s": 10.0,
        "dropped_total": 0,
        "models": [{"model": "m", "version": "1", "count": 5, "errors": {"internal": 1}, "p95_ms": 2.0}],
        "throughput_rps": 0.5,
        "queue_depth": 0,
        "system": {"cpu_percent": 1.0, "process_cpu_percent": 1.0, "rss_bytes": 1, "memory_percent": 1.0},
    }
    batch.update(changes)
    return batch


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(KINDS), data=JSON)
def test_any_json_on_any_device_topic_is_a_message_or_a_wire_error(kind: str, data: Any) -> None:
    try:
        payload = json.dumps(data).encode()
    except (ValueError, OverflowError):
        return
    try:
        decode_on(kind, payload)
    except wire.WireError:
        pass


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(KINDS), payload=st.binary(max_size=300))
def test_any_bytes_on_any_device_topic_are_a_message_or_a_wire_error(kind: str, payload: bytes) -> None:
    try:
        decode_on(kind, payload)
    except wire.WireError:
        pass


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=300) | JSON.map(lambda d: json.dumps(d).encode()))
def test_repository_requests_replies_and_commands_decode_or_raise_wire_error(payload: bytes) -> None:
    for decoder in (wire.RepoRequest.decode, wire.RepoReply.decode, wire.Command.decode):
        try:
            decoder(payload)
        except wire.WireError:
            pass
    rid = wire.readable_request_id(payload)
    assert rid is None or (isinstance(rid, str) and len(rid) <= 64)


@settings(max_examples=300, deadline=None)
@given(topic=st.text(max_size=80) | st.text(max_size=30).map(lambda t: "edgefleet/v1/repo/req/" + t))
def test_any_repository_request_topic_names_a_valid_device_or_raises_wire_error(topic: str) -> None:
    try:
        device = wire.parse_repo_request_topic(topic)
    except wire.WireError:
        return
    assert wire.repo_request_topic(device) == topic


@settings(max_examples=300, deadline=None)
@given(topic=st.text(max_size=80) | st.builds(lambda a, b: f"edgefleet/v1/dev/{a}/{b}", st.text(max_size=20), st.text(max_size=20)))
def test_any_topic_parses_or_raises_wire_error(topic: str) -> None:
    try:
        t = wire.parse_device_topic(topic)
    except wire.WireError:
        return
    assert wire.device_topic(t.device, t.kind, *t.rest) == topic


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("depth", [100, 4_000, 100_000])
def test_a_deeply_nested_message_is_refused_before_parsing(kind: str, depth: int) -> None:
    bomb = b"[" * depth + b"]" * depth
    with pytest.raises(wire.WireError, match=r"nests|over the"):
        decode_on(kind, bomb)
    inside = json.dumps(good_telemetry()).encode()[:-1] + b', "x": ' + bomb + b"}"
    with pytest.raises(wire.WireError):
        decode_on("telemetry", inside)


def test_brackets_inside_strings_are_not_nesting() -> None:
    text = json.dumps({"reason": "[[[[{{{{" * 1000, "escaped": 'a\\"[[['}).encode()
    assert nesting_depth(text) == 1


def test_an_oversized_message_is_refused_before_parsing() -> None:
    payload = json.dumps(good_telemetry(pad="x" * (2 * 1024 * 1024))).encode()
    with pytest.raises(wire.WireError, match="over the"):
        decode_on("telemetry", payload)


@pytest.mark.parametrize(
    ("changes", "what"),
    [
        ({"ts": 1e300}, "ts"),
        ({"seq": -1}, "seq"),
        ({"throughput_rps": float("inf")}, "throughput"),
        ({"models": [{"model": "m", "version": "1", "count": 10**15}]}, "count"),
        ({"models": [{"model": "m", "version": "1", "count": -3}]}, "count"),
        ({"models": [{"model": "m", "version": "1", "count": 1, "errors": {"internal": 10**15}}]}, "errors"),
        ({"models": [{"model": "m", "version": "1", "count": 1, "p95_ms": float("nan")}]}, "p95"),
        ({"models": [{"model": "m", "version": "1", "count": 1, "p95_ms": -1}]}, "p95"),
        ({"models": [{"model": "m", "version": "1", "count": 1, "surprise": 1}]}, "surprise"),
        ({"device_id": "someone-else"}, "names someone-else"),
        ({"models": [{"model": "m", "version": "1", "count": 1}] * 65}, "models"),
    ],
)
def test_claims_out_of_bounds_are_refused_with_the_field_named(changes: dict[str, Any], what: str) -> None:
    payload = json.dumps(good_telemetry(**changes), allow_nan=True).encode()
    with pytest.raises(wire.WireError, match=what):
        decode_on("telemetry", payload)


def test_json_infinity_and_nan_literals_are_refused() -> None:
    for literal in (b"Infinity", b"-Infinity", b"NaN"):
        payload = json.dumps(good_telemetry(throughput_rps=1.5)).encode().replace(b"1.5", literal)
        with pytest.raises(wire.WireError):
            decode_on("telemetry", payload)


def test_a_good_message_round_trips() -> None:
    batch = decode_on("telemetry", json.dumps(good_telemetry()).encode())
    assert isinstance(batch, wire.TelemetryBatch) and batch.models[0].errors == {"internal": 1}
    assert decode_on("telemetry", wire.encode(batch)) == batch
    assert wire.telemetry.server_errors({"internal": 2, "bad_request": 5, "overloaded": 1}) == 3


@settings(max_examples=200, deadline=None)
@given(
    rid=st.text(max_size=64),
    total=st.integers(0, 2**40),
    offset=st.integers(0, 2**40),
    data=st.binary(max_size=2048),
)
def test_a_reply_read_into_its_room_is_the_plain_reply_and_decodes_from_any_buffer(rid: str, total: int, offset: int, data: bytes) -> None:
    """``RepoReply.with_room`` (the repository server reads a chunk straight into it): once its room is filled it
    encodes to the very bytes of the same reply made plainly, and the reply decodes the same from bytes, a bytearray
    (a payload as ``ReadAheadClient`` gives it) or a memoryview (``payload_views``), as a copy or as a view."""
    room = wire.RepoReply.with_room(rid, total, offset, len(data))
    room.data[:] = data  # type: ignore[index]
    plain = wire.RepoReply(rid, 200, total, offset, data)
    assert room == plain and room.encode() == plain.encode()
    encoded = plain.encode()
    for payload in (encoded, bytearray(encoded), memoryview(bytearray(encoded))):
        for view in (False, True):
            got = wire.RepoReply.decode(payload, view=view)
            assert got == plain and isinstance(got.data, memoryview if view else bytes)
            assert not view or got.data.readonly  # type: ignore[union-attr]


def test_a_framed_reply_copied_with_other_fields_encodes_as_itself() -> None:
    """``dataclasses.replace`` on a reply read into its room keeps the frame object; ``encode`` sends the frame only
    while it still is that reply's header and data. Replies hash without their (possibly writable) data."""
    import dataclasses

    room = wire.RepoReply.with_room("r1", 100, 0, 4)
    room.data[:] = b"abcd"  # type: ignore[index]
    assert room.encode() is room.frame
    for changed in (dataclasses.replace(room, status=500, error="x"), dataclasses.replace(room, data=b"wxyz")):
        plain = wire.RepoReply(changed.request_id, changed.status, changed.total, changed.offset, bytes(changed.data), changed.error)
        assert changed.encode() == plain.encode()
    assert hash(room) == hash(wire.RepoReply("r1", 200, 100, 0, b"other"))
