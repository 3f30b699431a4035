"""The CPU a chosen set of threads uses, all told: what the shadow yields to (``agent.serve.shadow.SpareCpu``).

Why threads and not the process: the process's CPU includes the shadow's own runtime threads and the agent's other
work, which are not serving. Each thread that takes requests in or answers them registers itself once
(``count_this_thread``); its own CPU clock (``pthread_getcpuclockid``: Linux and the other Unixes) is read from then on.

Kernel thread ids come back for new threads (``pid_max`` is 32768 on many embedded systems): a thread takes its last
share into the total and its entry out as it ends (an object in a ``threading.local`` of its own, which CPython drops
in that thread as it finishes), so a later thread that gets the same id is never read through the ended one's entry.
Where threads have no CPU clocks (macOS, Windows) nothing is counted and ``seconds`` is always 0.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from dataclasses import dataclass

__all__ = ["ThreadCpu"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Counted:
    clock: int  # the thread's CPU clock id
    last: float  # its clock when last read


class ThreadCpu:
    def __init__(self) -> None:
        self._lock = threading.Lock()  # the registering threads, their ends and the reader
        # By kernel thread id. Read without the lock by a caller asking whether its thread is counted (one dict
        # lookup, on every request); changed under it.
        self.counted: dict[int, _Counted] = {}
        self._local = threading.local()
        self._total = 0.0
        self.unavailable = False  # no per-thread CPU clocks on this platform

    def count_this_thread(self) -> None:
        """Count the calling thread's CPU from now on, until it ends."""
        clock = _cpu_clock(threading.get_ident())
        if clock is None:
            self.unavailable = True
            return
        tid = threading.get_native_id()
        counted = _Counted(clock, time.clock_gettime(clock))
        with self._lock:
            before = self.counted.get(tid)
            if before is not None:  # registered again: what it used so far stays counted
                self._take(before)
            self.counted[tid] = counted
        self._local.at_end = _AtThreadEnd(weakref.ref(self), tid, counted)

    def seconds(self) -> float:
        """CPU seconds the counted threads used since each was registered, ended threads included."""
        if self.unavailable:
            return 0.0
        with self._lock:
            for tid, counted in list(self.counted.items()):
                if not self._take(counted):  # ended without its end being seen (not a thread of ``threading``)
                    del self.counted[tid]
            return self._total

    def _ended(self, tid: int, counted: _Counted) -> None:
        """Called in the thread that ends, while its clock still reads: its last share in, its entry out."""
        with self._lock:
            if self.counted.get(tid) is counted:
                del self.counted[tid]
                self._take(counted)

    def _take(self, counted: _Counted) -> bool:
        """Add what ``counted``'s thread used since the last read (under the lock); False when its clock is gone."""
        try:
            now = time.clock_gettime(counted.clock)
        except OSError:
            return False
        self._total += max(0.0, now - counted.last)
        counted.last = now
        return True


class _AtThreadEnd:
    """Kept only in the counted thread's ``threading.local``: dropped when that thread finishes."""

    __slots__ = ("counted", "owner", "tid")

    def __init__(self, owner: weakref.ref[ThreadCpu], tid: int, counted: _Counted) -> None:
        self.owner, self.tid, self.counted = owner, tid, counted

    def __del__(self) -> None:
        owner = self.owner()
        if owner is None:
            return
        try:
            owner._ended(self.tid, self.counted)
        except Exception:  # a finaliser must not raise; at worst this thread's last share is not counted
            log.debug("thread_cpu: end of thread %s not counted", self.tid, exc_info=True)


def _cpu_clock(ident: int) -> int | None:
    """The CPU clock of the thread ``ident`` (None where the platform has none: not Linux or another Unix)."""
    get = getattr(time, "pthread_getcpuclockid", None)
    try:
        return int(get(ident)) if get is not None else None
    except OSError:
        return None
