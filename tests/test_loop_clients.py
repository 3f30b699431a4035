"""The simulator's transport (``fleet.dev.loop_clients``) against a real mosquitto: what arrives, what an
acknowledgement means, and how each way a connection ends reaches its waiters and the broker's will."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from fleet.dev.broker import RunningBroker, free_port, start_broker
from fleet.dev.loop_clients import ClientGroup, ConnectionLost, LoopClient, Will


def _run(body: Callable[[ClientGroup], Awaitable[Any]], timeout_s: float = 30.0) -> Any:
    async def main() -> Any:
        async with ClientGroup(timeout_s=timeout_s) as group:
            return await asyncio.wait_for(body(group), 60)

    return asyncio.run(main())


async def _connected(
    group: ClientGroup, broker: RunningBroker, name: str, inbox: list[tuple[str, bytes]] | None = None, **kw: Any
) -> LoopClient:
    client = group.client(name, lambda t, p: inbox.append((t, p)) if inbox is not None else None, **kw)
    await client.connect(broker.host, broker.port)
    return client


async def _until(check: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)  # polling a condition on this loop, which the clients share


def test_messages_arrive_whole_and_in_order_past_the_socket_buffer(mqtt_broker: RunningBroker) -> None:
    """A burst of small messages and one of 4 MB (more than a socket buffer takes at once: the rest is written when
    the socket is writable) arrive intact and in order; each publish's acknowledgement comes back."""
    big = os.urandom(4 * 2**20)

    async def body(group: ClientGroup) -> list[tuple[str, bytes]]:
        inbox: list[tuple[str, bytes]] = []
        sub = await _connected(group, mqtt_broker, "lc-sub", inbox)
        assert [getattr(g, "is_failure", True) for g in await sub.subscribe([("lc/burst/#", 1)])] == [False]
        pub = await _connected(group, mqtt_broker, "lc-pub")
        mids = [pub.publish(f"lc/burst/{i}", str(i).encode(), qos=1) for i in range(300)]
        await pub.publish_acknowledged("lc/burst/big", big)
        for mid in mids:
            await pub.acknowledged(mid)
        await _until(lambda: len(inbox) == 301, "301 messages")
        await pub.disconnect()
        await sub.disconnect()
        return inbox

    inbox = _run(body)
    assert [p for _, p in inbox[:300]] == [str(i).encode() for i in range(300)]
    assert inbox[300] == ("lc/burst/big", big)


def test_a_clean_disconnect_leaves_no_will_and_a_dropped_connection_does(tmp_path: Path) -> None:
    """The broker frozen (SIGSTOP) with a publish unacknowledged: housekeeping past the group's timeout gives the
    connection up (a waiter on it gets ``ConnectionLost``, a publish after it too) and closes the socket without a
    DISCONNECT, so once the broker runs again it publishes that client's will; a client that disconnected cleanly
    leaves none."""
    broker = start_broker(tmp_path / "broker")
    try:

        async def body(group: ClientGroup) -> list[tuple[str, bytes]]:
            wills: list[tuple[str, bytes]] = []
            watcher = await _connected(group, broker, "lc-watch", wills)
            await watcher.subscribe([("lc/will/#", 1)])
            clean = await _connected(group, broker, "lc-clean", will=Will("lc/will/clean", b"lost"))
            dropped = await _connected(group, broker, "lc-dropped", will=Will("lc/will/dropped", b"lost"))
            await clean.disconnect()
            os.kill(broker.pid, signal.SIGSTOP)
            try:
                waiting = asyncio.ensure_future(dropped.acknowledged(dropped.publish("lc/x", b"x", qos=1)))
                await asyncio.sleep(0.2)  # the publish is out and its acknowledgement cannot come: the broker is stopped
                assert not waiting.done()
                dropped.housekeeping(time.monotonic())  # within the timeout: nothing happens
                assert not dropped.lost.is_set()
                dropped.housekeeping(time.monotonic() + group.timeout_s + 1)
                await _until(dropped.lost.is_set, "the connection given up")
                with pytest.raises(ConnectionLost):
                    await waiting
                with pytest.raises(ConnectionLost):
                    dropped.publish("lc/x", b"x", qos=1)
            finally:
                os.kill(broker.pid, signal.SIGCONT)
            await _until(lambda: bool(wills), "the dropped client's will")
            await asyncio.sleep(0.5)  # a later will from the clean client would arrive within this: there must be none
            await watcher.disconnect()
            return wills

        assert _run(body, timeout_s=2.0) == [("lc/will/dropped", b"lost")]
    finally:
        broker.stop()


def test_a_killed_broker_ends_the_connection_and_every_wait_on_it(tmp_path: Path) -> None:
    """A publish waits for its acknowledgement (the broker is stopped, so none comes), then the broker is killed: the
    waiter fails with ``ConnectionLost`` at once (not at a timeout), and so does any publish after."""
    broker = start_broker(tmp_path / "broker")

    async def body(group: ClientGroup) -> None:
        client = await _connected(group, broker, "lc-killed")
        os.kill(broker.pid, signal.SIGSTOP)
        waiting = asyncio.ensure_future(client.publish_acknowledged("lc/k", b"before"))
        await asyncio.sleep(0.2)  # out, and unacknowledged: the broker is stopped
        assert not waiting.done()
        broker.process.kill()  # kill -9 (a stopped process dies too)
        broker.process.wait(10)
        with pytest.raises(ConnectionLost):
            await asyncio.wait_for(waiting, 10)  # well inside the group's 30 s timeout: the drop itself ended it
        assert client.lost.is_set() and client not in group.clients  # housekeeping no longer looks at it
        with pytest.raises(ConnectionLost):
            await client.publish_acknowledged("lc/k", b"after")
        await client.disconnect()  # harmless after the loss

    try:
        _run(body)
    finally:
        broker.stop()


def test_several_waiters_on_one_publish_and_one_cancelled(tmp_path: Path) -> None:
    """Three tasks wait for the same message id and one is cancelled: the other two still get the acknowledgement
    (neither a waiter replaced by a later one, nor a cancellation passed on to the others)."""
    broker = start_broker(tmp_path / "broker")

    async def body(group: ClientGroup) -> None:
        client = await _connected(group, broker, "lc-thrice")
        os.kill(broker.pid, signal.SIGSTOP)
        try:
            mid = client.publish("lc/t", b"x", qos=1)
            cancelled, *others = [asyncio.ensure_future(client.acknowledged(mid)) for _ in range(3)]
            await asyncio.sleep(0.2)  # all three waiting on an acknowledgement the stopped broker cannot send
            cancelled.cancel()
        finally:
            os.kill(broker.pid, signal.SIGCONT)
        await asyncio.wait_for(asyncio.gather(*others), 10)
        assert cancelled.cancelled()
        await client.disconnect()

    try:
        _run(body)
    finally:
        broker.stop()


def test_a_disconnect_stuck_behind_unwritten_bytes_gives_the_socket_up(tmp_path: Path) -> None:
    """The broker stopped reading (SIGSTOP) with 16 MB still queued to it: the DISCONNECT cannot be written, so
    ``disconnect`` closes the socket instead of leaving it open and unread; once the broker runs again it publishes
    the will (no DISCONNECT reached it)."""
    broker = start_broker(tmp_path / "broker")

    async def body(group: ClientGroup) -> list[tuple[str, bytes]]:
        wills: list[tuple[str, bytes]] = []
        watcher = await _connected(group, broker, "lc-watch2", wills)
        await watcher.subscribe([("lc/stuck/#", 1)])
        client = await _connected(group, broker, "lc-stuck", will=Will("lc/stuck/will", b"lost"))
        os.kill(broker.pid, signal.SIGSTOP)
        try:
            client.publish("lc/stuck/big", os.urandom(16 * 2**20), qos=0)
            assert client.paho.want_write()  # the socket took only part of it
            await client.disconnect()
            sock = client.paho.socket()
            assert client.lost.is_set() and (sock is None or sock.fileno() == -1)
        finally:
            os.kill(broker.pid, signal.SIGCONT)
        await _until(lambda: bool(wills), "the will of the client that could not say goodbye")
        await watcher.disconnect()
        return wills

    try:
        assert _run(body) == [("lc/stuck/will", b"lost")]
    finally:
        broker.stop()


def test_an_address_that_refuses_is_connection_lost() -> None:
    async def body(group: ClientGroup) -> None:
        with pytest.raises(ConnectionLost):
            await group.client("lc-nowhere", lambda t, p: None).connect("127.0.0.1", free_port())

    _run(body)


def test_a_server_that_closes_at_once_is_connection_lost() -> None:
    """Not MQTT at all: it accepts and closes. Whichever step notices (the CONNECT's write, or the read of a CONNACK
    that never comes), the device sees ``ConnectionLost`` and nothing else."""
    import socket
    import threading

    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    stop = threading.Event()

    def accept_and_close() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
            conn.close()

    thread = threading.Thread(target=accept_and_close, daemon=True)
    thread.start()

    async def body(group: ClientGroup) -> None:
        for i in range(20):
            client = group.client(f"lc-reset-{i}", lambda t, p: None)
            with pytest.raises(ConnectionLost):
                await client.connect("127.0.0.1", port)
            assert client.lost.is_set() and client not in group.clients

    try:
        _run(body)
    finally:
        stop.set()
        thread.join(5)
        server.close()
