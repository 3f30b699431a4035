"""Shadow mode on the device: a second version beside the active one, fed its live inputs, answering nobody.

Real mosquitto, real signed director metadata, real ONNX models (one that agrees with
the serving version, one trained differently that does not), the real daemon class.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import ModelFiles
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from update_rig import MODEL, VARIANT, Rig, Subscriber, fails_beyond_batch_one, wait_for

from agent.client import EdgeClient
from agent.daemon import Agent
from agent.runtimes import get_runtime
from agent.serve.host import ModelHost, ServingModel
from agent.serve.predictions import PredictionStats
from agent.serve.serving import Serving
from agent.serve.shadow import CpuBudget, ShadowRunner, SpareCpu, compare_outputs
from agent.serve.thread_cpu import ThreadCpu
from agent.settings import load_settings
from agent.wire import device_topic
from agent.wire.inference import encode_request
from converters import builders
from converters.build import build
from fleet.controller import devices
from fleet.transport.announce import announce

OTHER = "1.2.0"  # trained differently: same shapes, other answers
FAILING = "1.3.0"  # right on one row, an error on any batch


@pytest.fixture(scope="module")
def shadow_rig(rig: Rig, tmp_path_factory: pytest.TempPathFactory) -> Rig:
    other = builders.random_mlp([64, 128, 128, 10], seed=9)
    source = tmp_path_factory.mktemp("other") / "other.onnx"
    builders.write_onnx_mlp(other, source)
    out = rig.root / "bundles" / f"{MODEL}-{OTHER}"
    build(source, MODEL, OTHER, out, variants=[VARIANT])
    rig.image.release(out, rig.keys)
    rig.release(FAILING, fails_beyond_batch_one)
    return rig


class Device:
    """A real agent with fast telemetry, and everything it publishes."""

    def __init__(self, rig: Rig, device: str) -> None:
        self.rig, self.id = rig, device
        self.config = rig.write_config(device)
        self.watch = Subscriber(rig.broker, [device_topic(device, "#")], f"watch-{device}")
        self.agent = self.start()

    def start(self) -> Agent:
        # every call compared (budget 1.0): these tests check what a comparison finds; the budget has its own tests
        overrides = {"telemetry": {"interval_s": 0.3, "prediction_every": 1}, "serving": {"shadow_budget": 1.0}}
        agent = Agent(load_settings(self.config, **overrides)).start()
        assert agent.wait_connected()
        return agent

    def assign(self, version: str, shadow: str | None = None, variant: str = VARIANT) -> None:
        self.rig.director.assign(
            self.id, self.rig.image, MODEL, version, variant, self.rig.keys, shadow=(shadow, variant) if shadow else None
        )
        announce(self.rig.director, [self.id], self.rig.broker.host, self.rig.broker.port)

    def job_states(self, version: str) -> list[str]:
        target = f"{MODEL}/{version}/{VARIANT}.tar"
        return [
            json.loads(p)["state"]
            for t, p in self.watch.messages
            if t.startswith(device_topic(self.id, "jobs") + "/") and json.loads(p).get("target_path") == target
        ]

    def telemetry(self) -> list[dict[str, Any]]:
        return self.watch.json(device_topic(self.id, "telemetry"))

    def shadow_windows(self) -> list[dict[str, Any]]:
        return [m["shadow"] for m in self.windows() if "shadow" in m]

    def windows(self) -> list[dict[str, Any]]:
        """This device's telemetry windows of the model, oldest first (one per version served in a batch)."""
        return [m for b in self.telemetry() for m in b.get("models", []) if m["model"] == MODEL]

    def replies(self) -> list[dict[str, Any]]:
        prefix = device_topic(self.id, "pred") + "/"
        return [json.loads(p) for t, p in self.watch.messages if t.startswith(prefix)]

    def reported(self) -> dict[str, Any]:
        found = [d for d in devices(self.rig.broker.host, self.rig.broker.port, 0.5) if d.device_id == self.id]
        return found[0].reported if found else {}

    def stop(self) -> None:
        self.agent.stop()

    def close(self) -> None:
        self.watch.close()


@pytest.fixture
def device(shadow_rig: Rig) -> Iterator[Any]:
    made: list[Device] = []

    def make(name: str) -> Device:
        d = Device(shadow_rig, name)
        made.append(d)
        return d

    yield make
    for d in made:
        d.stop()
        d.close()


def inputs(rows: int, seed: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).uniform(-1, 1, (rows, 64)).astype(np.float32)}


def send(d: Device, n: int, rows: int = 2) -> list[str]:
    """n requests through a real MQTT client, one at a time; the version each answer came from."""
    with EdgeClient(d.rig.broker.host, d.rig.broker.port) as client:
        return [client.infer(d.id, MODEL, inputs(rows, i)).version for i in range(n)]


def shadow_totals(d: Device) -> dict[str, float]:
    windows = d.shadow_windows()
    return {k: sum(w[k] for w in windows) for k in ("compared", "agreed", "abs_diff_sum", "values", "errors", "skipped", "mismatched")}


def test_a_shadow_runs_on_live_inputs_answers_nobody_and_is_promoted_without_reloading(device: Any) -> None:
    d = device("sh-promote")
    d.assign("1.0.0")
    wait_for(lambda: (m := d.agent.host.get(MODEL)) is not None and m.version == "1.0.0", what="1.0.0 serving")
    d.assign("1.0.0", shadow="1.1.0")
    wait_for(lambda: "SHADOW" in d.job_states("1.1.0"), what="the shadow job done")
    assert d.job_states("1.1.0") == ["IDLE", "DOWNLOADING", "VERIFYING", "STAGED", "HEALTH_CHECK", "SHADOW"]
    assert d.agent.host.get(MODEL).version == "1.0.0"  # type: ignore[union-attr]
    shadow = d.agent.host.shadow(MODEL)
    assert shadow is not None and shadow.version == "1.1.0"
    wait_for(lambda: d.reported().get("models", {}).get(MODEL, {}).get("shadow", {}).get("version") == "1.1.0", what="reported")

    versions = send(d, 40, rows=2)
    assert versions == ["1.0.0"] * 40
    spare = d.agent.shadow._spare  # the daemon's wiring: the settings' limits, and serving's threads as the agent's
    assert (spare.idle_limit, spare.busy_limit) == (0.5, 0.25) and spare._serving() > 0  # (MQTT thread took them in)
    wait_for(lambda: shadow_totals(d)["compared"] + shadow_totals(d)["skipped"] == 80, 20, "every call compared or skipped")
    totals = shadow_totals(d)
    assert len(d.replies()) == 40  # one answer per request: the shadow published nothing
    assert totals["compared"] > 0 and totals["agreed"] == totals["compared"]  # same weights: the same top class every time
    assert totals["abs_diff_sum"] == 0.0 and totals["errors"] == 0 and totals["mismatched"] == 0
    last = d.shadow_windows()[-1]
    assert last["version"] == "1.1.0" and last["kind"] == "top1" and last["p95_ms"] > 0 and last["active_p95_ms"] > 0
    predictions = [m["predictions"] for m in d.windows() if "predictions" in m]
    assert sum(p["rows"] for p in predictions) == 80 and sum(p["values"] for p in predictions) == 800
    assert all(len(p["classes"]) == 10 and sum(p["classes"]) == p["rows"] for p in predictions)

    # The director now names 1.1.0 to run: no download, and the loaded shadow itself is swapped in.
    runtime = shadow.runtime
    d.assign("1.1.0")
    wait_for(lambda: d.job_states("1.1.0").count("ACTIVE") == 1, what="1.1.0 active")
    assert d.job_states("1.1.0")[6:] == ["IDLE", "STAGED", "HEALTH_CHECK", "ACTIVE"]
    serving = d.agent.host.get(MODEL)
    assert serving is not None and serving.version == "1.1.0" and serving.runtime is runtime and d.agent.host.shadow(MODEL) is None
    assert {m.version: m.status for m in d.agent.store.installed()} == {"1.1.0": "active", "1.0.0": "kept"}
    assert send(d, 3) == ["1.1.0"] * 3
    wait_for(lambda: "shadow" not in d.reported().get("models", {}).get(MODEL, {"shadow": 1}), what="reported without a shadow")


def test_a_disagreeing_shadow_is_measured_survives_a_restart_and_is_dropped(device: Any, shadow_rig: Rig) -> None:
    d = device("sh-other")
    d.assign("1.0.0")
    wait_for(lambda: (m := d.agent.host.get(MODEL)) is not None and m.version == "1.0.0", what="1.0.0 serving")
    d.assign("1.0.0", shadow=OTHER)
    wait_for(lambda: "SHADOW" in d.job_states(OTHER), what="the shadow job done")
    assert send(d, 30, rows=4) == ["1.0.0"] * 30
    wait_for(lambda: shadow_totals(d)["compared"] + shadow_totals(d)["skipped"] == 120, 20, "every call compared or skipped")
    totals = shadow_totals(d)
    assert totals["compared"] >= 40 and totals["agreed"] < 0.8 * totals["compared"]  # another model: other answers
    assert totals["abs_diff_sum"] / totals["values"] > 1e-3

    # A restart brings the shadow back from the store, without a new job.
    d.stop()
    jobs_before = len(d.job_states(OTHER))
    d.agent = d.start()
    shadow = d.agent.host.shadow(MODEL)
    assert shadow is not None and shadow.version == OTHER and d.agent.host.get(MODEL).version == "1.0.0"  # type: ignore[union-attr]
    path = Path(d.agent.store.shadows()[MODEL].path)
    assert path.is_dir()

    # The director stops naming it: dropped from memory, the store and the disk.
    d.assign("1.0.0")
    wait_for(lambda: not path.exists(), what="the shadow dropped")
    assert d.agent.host.shadow(MODEL) is None and d.agent.store.shadows() == {} and len(d.job_states(OTHER)) == jobs_before
    assert d.agent.host.get(MODEL).version == "1.0.0"  # type: ignore[union-attr]
    wait_for(lambda: "shadow" not in d.reported().get("models", {}).get(MODEL, {"shadow": 1}), what="reported without a shadow")


def test_a_failing_shadow_is_counted_and_costs_the_serving_version_nothing(device: Any) -> None:
    d = device("sh-fail")
    d.assign("1.0.0")
    wait_for(lambda: (m := d.agent.host.get(MODEL)) is not None and m.version == "1.0.0", what="1.0.0 serving")
    d.assign("1.0.0", shadow=FAILING)
    wait_for(lambda: "SHADOW" in d.job_states(FAILING), what="the shadow passed its one-row health check")
    assert send(d, 20, rows=3) == ["1.0.0"] * 20  # every request answered by the serving version
    wait_for(lambda: shadow_totals(d)["errors"] + shadow_totals(d)["skipped"] / 3 == 20, 20, "every shadow call failed or skipped")
    assert shadow_totals(d)["compared"] == 0 and shadow_totals(d)["errors"] > 0
    assert len(d.replies()) == 20 and not any("error" in r for r in d.replies())
    active = d.agent.host.get(MODEL)
    assert active is not None and active.version == "1.0.0" and active.failures == 0  # no rollback, no failures counted


# -- the parts on their own, with real runtimes -----------------------------------------------------


def loaded(models: ModelFiles, name: str, version: str) -> ServingModel:
    rt = get_runtime("onnx")()
    rt.load(models.path(name))
    return ServingModel(name, version, "onnx-fp32", version, rt)


def test_a_shadow_that_falls_behind_is_skipped_never_waited_for(models: ModelFiles) -> None:
    host = ModelHost()
    runner = ShadowRunner(host, queue_size=2, budget=1.0)  # not started: nothing drains the queue
    host.on_served = runner.offer
    host.swap(loaded(models, "mlp.onnx", "1"))
    host.set_shadow(loaded(models, "mlp.onnx", "2"))
    for i in range(6):
        host.infer("mlp.onnx", inputs(1, i))  # returns at once although the shadow never runs
    window = runner.take()["mlp.onnx"]
    assert window["skipped"] == 4 and window["compared"] == 0
    runner.start()
    wait_for(runner.idle, 10, "the two queued comparisons")
    runner.stop()
    host.close()


def test_the_shadow_keeps_to_its_cpu_budget_and_reports_the_share_it_compared(models: ModelFiles) -> None:
    """Calls arriving faster than the budget allows are sampled out (counted in rows), the rest compared."""
    host = ModelHost()
    runner = ShadowRunner(host, queue_size=64, budget=0.05).start()
    host.on_served = runner.offer
    host.swap(loaded(models, "mlp.onnx", "1"))
    host.set_shadow(loaded(models, "mlp.onnx", "2"))
    t0 = time.perf_counter()
    for i in range(2000):  # 2,000 comparisons cost well over the 50 ms burst and 5 % of the time they take
        host.infer("mlp.onnx", inputs(2, i))
    wait_for(runner.idle, 10, "the admitted comparisons")
    elapsed = time.perf_counter() - t0
    window = runner.take()["mlp.onnx"]
    assert window["compared"] + window["skipped"] == 4000  # every row accounted for
    assert 0 < window["compared"] < 4000
    budget = runner._budget
    assert budget.spent_s > 0 and budget.cost_s > 0
    # Every admitted call was charged its estimate when admitted and settled to its measured cost when run, so
    # all it spent is within the burst, the credit earned meanwhile, and what the calls cost beyond their
    # estimates. (Charging only after a call had run let a burst of arrivals all be admitted against one credit.)
    assert budget.pending == 0
    # (+ what a reservation above the burst overdrew: none here, where a call costs a millisecond or less)
    assert budget.spent_s <= 0.05 * elapsed + 0.05 + budget.overrun_s + max(0.0, budget.largest_s - 0.05)
    runner.stop()
    host.close()


def test_budget_credit_follows_the_clock_and_the_measured_cost() -> None:
    now = [0.0]
    budget = CpuBudget(0.5, burst_s=1.0, clock=lambda: now[0])  # in units whose sums are exact
    first = budget.admit()
    assert first == 0.0  # a full burst to start with, and no estimate yet
    assert budget.admit() is None  # until one call is measured, one at a time
    budget.spend(0.25, first)
    reserved = [budget.admit() for _ in range(4)]
    assert reserved == [0.25, 0.25, 0.25, None]  # 0.75 of credit left: three calls reserved, queued, not yet run
    budget.cancel(0.25)  # one of them was never run: its reservation goes back
    assert budget.admit() == 0.25
    for _ in range(2):
        budget.spend(0.5, 0.25)  # two cost twice their reservation: the credit owes it
    assert budget.admit() is None and budget.overrun_s == 0.25 + 0.5 and budget.pending == 1
    now[0] += 1.0  # earns 0.5, which pays the debt and no more
    assert budget.admit() is None
    now[0] += 2.0
    assert budget.admit() is not None
    assert 0.25 < budget.cost_s < 0.5  # the estimate moved towards what the calls cost
    assert CpuBudget(1.0, clock=lambda: now[0]).admit() == 0.0  # 1.0: every call


def test_a_call_dearer_than_the_whole_burst_is_still_compared_now_and_then() -> None:
    """A cold first call (or a stall) measured above the burst must not stop the shadow for good: it is admitted
    whenever the credit is full again, so the candidate keeps being compared at its budget's pace."""
    now = [0.0]
    budget = CpuBudget(0.05, burst_s=0.05, clock=lambda: now[0])
    first = budget.admit()
    assert first == 0.0
    budget.spend(0.08, first)  # 80 ms: dearer than the 50 ms burst
    admitted = 0
    for _ in range(1000):  # a call every second for 1,000 s: 50 s of credit earned
        now[0] += 1.0
        reserved = budget.admit()
        if reserved is not None:
            admitted += 1
            budget.spend(0.08, reserved)
    assert 500 <= admitted <= 625  # about one in 1.6 s: 0.08 s a call at 5 % of the time; never none


def test_a_busy_serving_path_throttles_the_shadow_to_a_trickle_and_a_quiet_one_lifts_it(models: ModelFiles) -> None:
    """Real serving path, real threads and CPU clocks: while requests are answered back to back on this thread, the shadow
    thread sees serving use most of a core and runs at a tenth of its budget; once serving stops, its whole budget is back.
    The machine-wide idle condition is off here (``idle_cores=0``): a loaded test machine must not decide it."""
    host = ModelHost()
    serving = Serving("dev-1", host, lambda topic, payload, qos: None, inline_below_ms=1e6)  # every request on this thread
    spare = SpareCpu(idle_cores=0.0, busy_cores=0.25, interval_s=0.05, serving=serving.cpu_s)
    runner = ShadowRunner(host, queue_size=64, budget=0.05, spare=spare).start()
    host.on_served = runner.offer
    host.swap(loaded(models, "mlp.onnx", "1"))
    host.set_shadow(loaded(models, "mlp.onnx", "2"))
    payload = encode_request("r", inputs(2, 0), binary=True)
    seen_busy, submitted = False, 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 1.5:  # busy: every request answered on this thread, back to back
        serving.submit("mlp.onnx", payload)
        submitted += 1
        if time.perf_counter() - t0 > 1.0 and not seen_busy:  # still serving: the shadow thread cannot have seen it stop
            budget = runner._budget
            seen_busy = not spare.spare and budget.fraction == pytest.approx(0.005) and budget.burst_s == pytest.approx(0.005)
    elapsed = time.perf_counter() - t0
    assert serving.inline_served == submitted and sum(serving.stats.errors.values()) == 0  # served, none refused
    assert seen_busy, f"throttled while serving (serving used {spare.serving_cores:.2f} of a core)"
    wait_for(runner.idle, 10, "the admitted comparisons")
    budget = runner._budget
    # Before the first two samples (0.05 s apart) the shadow had its whole 50 ms burst; after them a tenth of the rate
    # and burst. Unthrottled it could have spent 0.05 + 0.05 * elapsed (0.125 s).
    assert budget.spent_s <= 0.05 + 0.005 + 0.005 * elapsed + budget.overrun_s + max(0.0, budget.largest_s - 0.005)
    window = runner.take()["mlp.onnx"]
    assert window["compared"] > 0  # a trickle, still compared
    wait_for(lambda: spare.spare, 5, "the quiet serving path seen by the shadow thread")
    assert budget.fraction == 0.05 and budget.burst_s == 0.05
    runner.stop()
    host.close()


def test_the_agents_other_work_and_the_shadows_own_are_not_serving(models: ModelFiles) -> None:
    """Serving's CPU is that of the threads that take requests in or answer them, nothing else: the agent hashing a
    download on another thread, or the shadow comparing flat out, leaves the shadow its whole budget. (Counting the
    process's CPU, the first version of this throttle slowed the shadow down for its own work and for any of the
    agent's.)"""
    host = ModelHost()
    serving = Serving("dev-1", host, lambda topic, payload, qos: None, inline_below_ms=1e6)
    spare = SpareCpu(idle_cores=0.0, busy_cores=0.25, interval_s=0.05, serving=serving.cpu_s)
    runner = ShadowRunner(host, queue_size=64, budget=0.5, spare=spare).start()  # half a core for the shadow
    host.on_served = runner.offer
    host.swap(loaded(models, "mlp.onnx", "1"))
    host.set_shadow(loaded(models, "mlp.onnx", "2"))
    big = encode_request("r", inputs(128, 0), binary=True)  # 128 rows (answered inline: under 64 KiB); comparing them is the larger work
    stop = threading.Event()

    def other_work() -> None:  # the agent hashing a download, on a thread of its own
        while not stop.is_set():
            hashlib.sha256(bytes(1 << 20)).digest()

    hashing = threading.Thread(target=other_work)
    hashing.start()
    t0 = time.perf_counter()
    try:
        while time.perf_counter() - t0 < 1.0:
            serving.submit("mlp.onnx", big)  # a request now and then
            wait_for(runner.idle, 10, "the comparison")  # (its polling is the gap between two requests)
    finally:
        stop.set()
        hashing.join()
    assert runner.take()["mlp.onnx"]["compared"] > 0
    assert spare.busy_samples == 0 and spare.spare, f"serving used {spare.serving_cores:.2f} of a core"
    runner.stop()
    host.close()


def test_serving_cpu_counts_threads_that_only_take_requests_in_and_threads_that_ended() -> None:
    """A thread that only queues requests for the workers (a slow model, or a flood refused as overloaded) is serving's
    too; what a thread used stays counted when it ends, what it used after the last read included; and an ended
    thread's entry goes with it, so a later thread that gets its kernel id back is not read as serving's."""
    serving = Serving("dev-1", ModelHost(), lambda topic, payload, qos: None, inline_below_ms=0.0, queue_size=1)
    read_once = threading.Event()

    def burn(seconds: float) -> None:
        t = time.thread_time()
        while time.thread_time() - t < seconds:
            pass

    def take_in_and_burn(burned: threading.Event, then: float) -> None:
        for _ in range(50):
            serving.submit("m", b"{}")  # queued, then refused: the queue holds one and no worker runs
        burn(0.3)
        burned.set()
        if then:
            read_once.wait(10)
            burn(then)  # after the last read, then the thread ends

    burned = threading.Event()
    first = threading.Thread(target=take_in_and_burn, args=(burned, 0.2))
    first.start()
    assert burned.wait(10)
    assert 0.25 <= serving.cpu_s() < 0.5
    read_once.set()
    first.join()
    second = threading.Thread(target=take_in_and_burn, args=(threading.Event(), 0.0))  # never read while it ran
    second.start()
    second.join()
    assert not serving._thread_cpu.counted  # both ended: their entries went with them
    assert 0.75 <= serving.cpu_s() < 1.2  # 0.3 + 0.2 + 0.3
    others = [threading.Thread(target=burn, args=(0.05,)) for _ in range(4)]  # not serving's, whatever ids they get
    for t in others:
        t.start()
        t.join()
    total = serving.cpu_s()
    assert 0.75 <= total < 1.2 and serving.cpu_s() == total
    assert serving.stats.errors["overloaded"] == 99


def test_a_thread_counted_twice_keeps_what_it_used_before() -> None:
    cpu = ThreadCpu()

    def burn_registered_twice() -> None:
        cpu.count_this_thread()
        _burn(0.2)
        cpu.count_this_thread()
        _burn(0.2)

    thread = threading.Thread(target=burn_registered_twice)
    thread.start()
    thread.join()
    assert not cpu.counted and 0.35 <= cpu.seconds() < 0.8


def _burn(seconds: float) -> None:
    t = time.thread_time()
    while time.thread_time() - t < seconds:
        pass


def test_the_shadow_is_timed_on_the_model_call_alone(models: ModelFiles) -> None:
    """The shadow gets the request as sent (JSON numbers are float64): converted to its dtype before its call is timed,
    as the active model's is, so it takes the runtime's remembered path and the gate compares like with like."""
    from agent.runtimes import get_runtime

    host = ModelHost()
    active, shadow = get_runtime("onnx")(), get_runtime("onnx")()
    active.load(models.path("mlp.onnx"))
    shadow.load(models.path("mlp.onnx"))
    host.swap(ServingModel("m", "1", "onnx-fp32", "0" * 64, active))
    host.set_shadow(ServingModel("m", "2", "onnx-fp32", "1" * 64, shadow))
    as_sent = {"x": np.random.default_rng(3).uniform(-1, 1, (1, 64))}  # float64
    for _ in range(2):
        result = host.infer_shadow("m", "2", as_sent)
        assert result is not None
    assert (1, 64) in shadow._signatures  # converted before the runtime: its fast path, as the active model's
    np.testing.assert_allclose(result[0]["y"], host.infer("m", as_sent)["y"], rtol=1e-6)


def test_spare_cpu_needs_idle_cores_and_a_quiet_serving_path() -> None:
    now, idle, serving = [0.0], [0.0], [0.0]
    spare = SpareCpu(0.5, 0.25, 0.1, idle=lambda: idle[0], serving=lambda: serving[0], clock=lambda: now[0])

    def step(seconds: float, idle_cores: float, serving_cores: float, shadow_s: float = 0.0) -> bool:
        now[0] += seconds
        idle[0] += idle_cores * seconds
        serving[0] += serving_cores * seconds
        return spare.sample(shadow_s)

    assert spare.sample() is False and spare.spare  # the first sample only sets the baseline
    assert step(0.05, 0.0, 1.0) is False and spare.spare  # within the interval: not sampled
    assert step(0.1, 0.0, 0.0) is True and not spare.spare  # 0.15 s, 0.05 s of CPU serving: a third of a core
    assert (spare.idle_cores, spare.serving_cores) == pytest.approx((0.0, 1 / 3))
    assert step(0.2, 1.5, 0.1) is True and spare.spare
    assert step(0.2, 1.5, 0.3) is True and not spare.spare  # serving busy, idle cores or not
    assert step(0.2, 1.5, 0.2) is True and spare.spare
    assert step(0.2, 0.4, 0.0, shadow_s=0.04) is False and spare.spare  # the shadow's own 0.2 cores count as idle
    assert spare.idle_cores == pytest.approx(0.6)
    spare.reset()  # no shadow for a while: the gap is not averaged in
    assert step(100.0, 0.0, 0.0) is False and spare.spare and spare.idle_cores == pytest.approx(0.6)
    assert step(0.2, 2.0, 0.0) is False and spare.idle_cores == pytest.approx(2.0)

    failing = [True]

    def flaky() -> float:
        if failing[0]:
            raise OSError("no /proc here")
        return idle[0]

    blind = SpareCpu(idle=flaky, clock=lambda: now[0])
    assert blind.sample() is False and blind.spare  # says spare, logs why once, and the shadow thread lives on
    assert blind.sample() is False
    failing[0] = False
    now[0] += 0.25
    assert blind.sample() is False  # no idle baseline yet: no average over the time it could not read
    assert math.isnan(blind.idle_cores)
    now[0] += 0.25
    idle[0] += 0.25
    assert blind.sample() is False and blind.idle_cores == pytest.approx(1.0)


def test_without_the_machines_idle_time_a_busy_serving_path_still_throttles_and_a_quiet_one_lifts_it() -> None:
    """A sandbox's unreadable /proc (or ``idle_cores`` 0) leaves serving's own CPU to decide — it must not freeze the
    last answer, busy or spare, for as long as /proc stays unreadable."""
    now, idle, serving, readable = [0.0], [0.0], [0.0], [True]

    def idle_seconds() -> float:
        if not readable[0]:
            raise OSError("no /proc here")
        return idle[0]

    spare = SpareCpu(0.5, 0.25, 0.1, idle=idle_seconds, serving=lambda: serving[0], clock=lambda: now[0])

    def step(idle_cores: float, serving_cores: float) -> bool:
        now[0] += 0.2
        idle[0] += idle_cores * 0.2
        serving[0] += serving_cores * 0.2
        return spare.sample()

    spare.sample()
    assert step(1.0, 1.0) is True and not spare.spare  # busy, /proc readable
    readable[0] = False
    assert step(0.0, 1.0) is False and not spare.spare  # still busy: serving's CPU alone says so
    assert step(0.0, 0.0) is True and spare.spare  # quiet serving lifts it though /proc stays unreadable
    assert step(0.0, 1.0) is True and not spare.spare
    assert spare.reset() is True and spare.spare  # no shadow any more: the next one starts on its whole budget
    assert spare.reset() is False
    asked_never = SpareCpu(0.0, 0.25, 0.1, idle=idle_seconds, serving=lambda: serving[0], clock=lambda: now[0])
    asked_never.sample()
    now[0] += 0.2
    serving[0] += 0.2
    assert asked_never.sample() is True and not asked_never.spare  # idle_cores 0: /proc never read, serving decides


def test_more_idle_cores_asked_than_the_machine_can_have_are_capped(caplog: pytest.LogCaptureFixture) -> None:
    now, idle = [0.0], [0.0]
    cores = float(os.cpu_count() or 1)
    spare = SpareCpu(cores * 4, 0.25, 0.1, idle=lambda: idle[0], clock=lambda: now[0])
    assert spare.idle_limit == cores - 0.25 and "shadow.spare_cores_capped" in caplog.text
    spare.sample()
    now[0] += 0.2
    idle[0] += (cores - 0.1) * 0.2  # nearly every core idle: spare (the agent itself always uses some)
    assert spare.sample() is False and spare.spare


def test_throttling_cuts_rate_and_burst_and_the_credit_saved_while_idle() -> None:
    now = [0.0]
    budget = CpuBudget(0.5, burst_s=0.5, clock=lambda: now[0])  # in units whose sums are exact
    budget.spend(0.0625, budget.admit() or 0.0)  # one call measured
    now[0] += 10.0  # idle long enough for a full burst: 8 calls
    budget.throttle(busy=True, share=0.25)
    assert (budget.fraction, budget.burst_s) == (0.125, 0.125)
    assert [budget.admit() is not None for _ in range(3)] == [True, True, False]  # not the burst saved while idle
    budget.throttle(busy=False)
    now[0] += 10.0
    assert sum(budget.admit() is not None for _ in range(100)) == 8  # the whole burst again
    every = CpuBudget(1.0)
    every.throttle(busy=True)
    assert every.fraction == 1.0  # a device that asked for every call keeps it


def test_prediction_sums_add_up_and_leave_non_finite_values_out() -> None:
    stats = PredictionStats()
    a = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]], dtype=np.float32)
    b = np.array([[np.nan, 1.0, 2.0]], dtype=np.float32)
    stats.add("m", "1", {"y": a})
    stats.add("m", "1", {"y": a})
    stats.add("m", "1", {"y": b})
    stats.add("m", "2", {"y": np.array([1.0, 2.0])})
    w = stats.take()
    one = w[("m", "1")]
    assert one["rows"] == 5 and one["values"] == 14 and one["nonfinite"] == 1
    assert math.isclose(one["sum"], 2 * float(a.sum()) + 3.0, rel_tol=1e-6)
    assert math.isclose(one["sumsq"], 2 * float((a.astype(np.float64) ** 2).sum()) + 5.0, rel_tol=1e-6)
    assert one["classes"] == [2, 2, 0]  # the NaN row is not given a class
    assert "classes" not in w[("m", "2")] and w[("m", "2")]["rows"] == 2
    assert stats.take() == {}


def test_prediction_sums_of_many_calls_equal_the_sums_written_out_call_by_call() -> None:
    """Small outputs are summed in batches (``PENDING_CALLS``): the window must be what summing each call alone gives —
    shapes changing midway, a NaN in one call of a batch (only that call's rows go without a class), a large output
    (summed at once, never kept)."""
    rng = np.random.default_rng(7)
    calls = [rng.standard_normal((1, 4)).astype(np.float32) for _ in range(150)]
    calls += [rng.standard_normal((3, 4)).astype(np.float32) for _ in range(70)]  # batches of 3 rows
    calls[100][0, 2] = np.nan
    big = rng.standard_normal((300, 4)).astype(np.float32)  # 4.8 KB: past PENDING_BYTES
    stats = PredictionStats()
    for i, out in enumerate(calls):
        stats.add("m", "1", {"y": out})
        if i == 160:
            stats.add("m", "1", {"y": big})
    everything = [*calls, big.copy()]
    big_ref = weakref.ref(big)
    del big
    assert big_ref() is None  # summed at once, not kept
    window = stats.take()[("m", "1")]
    values = np.concatenate([c.reshape(-1) for c in everything]).astype(np.float64)
    kept = values[np.isfinite(values)]
    assert window["rows"] == sum(c.shape[0] for c in everything)
    assert window["nonfinite"] == 1 and window["values"] == kept.size
    assert math.isclose(window["sum"], float(kept.sum()), rel_tol=1e-9, abs_tol=1e-9)
    assert math.isclose(window["sumsq"], float(kept @ kept), rel_tol=1e-9)
    tops = np.concatenate([c.argmax(axis=1) for c in everything if np.isfinite(c).all()])
    assert window["classes"] == np.bincount(tops, minlength=4).tolist()
    stats.add("m", "1", {"y": np.ones((1, 4), np.float32)})
    stats.add("m", "1", {"z": np.ones((1, 2), np.float32)})  # the output changed its name: the window follows it
    assert stats.take()[("m", "1")]["output"] == "z"


def test_comparison_rules() -> None:
    scores = np.array([[0.1, 0.9], [0.7, 0.3], [0.5, 0.6]], dtype=np.float32)
    flips = np.array([[0.0, 0.0], [0.0, 0.5], [0.2, 0.0]], dtype=np.float32)
    c = compare_outputs({"y": scores}, {"y": scores + flips}, 0.01, 1e-3)
    assert (c.kind, c.rows, c.agreed) == ("top1", 3, 1)  # the second row flips, the third flips
    values = np.array([[1.0], [2.0], [3.0]])
    c = compare_outputs({"y": values}, {"y": values * np.array([[1.005], [1.02], [1.0]])}, 0.01, 1e-3)
    assert (c.kind, c.agreed) == ("close", 2) and math.isclose(c.abs_diff_sum, 0.005 + 0.04)
    c = compare_outputs({"y": values}, {"y": values[:2]}, 0.01, 1e-3)
    assert c.mismatched and c.agreed == 0 and c.rows == 3
    c = compare_outputs({"y": values}, {"z": values}, 0.01, 1e-3)
    assert c.mismatched and c.agreed == 0


FLOATS = st.floats(width=32, allow_nan=True, allow_infinity=True)
SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.float32, SHAPES, elements=FLOATS), hnp.arrays(np.float32, SHAPES, elements=FLOATS))
def test_any_outputs_compare_without_error_and_agree_with_themselves(a: np.ndarray, other: np.ndarray) -> None:
    same = compare_outputs({"y": a}, {"y": a.copy()}, 0.0, 0.0)
    assert same.agreed == same.rows and not same.mismatched and same.abs_diff_sum == 0.0
    c = compare_outputs({"y": a}, {"y": other}, 0.01, 1e-3)
    assert 0 <= c.agreed <= c.rows and c.abs_diff_sum >= 0 and c.mismatched == (a.shape != other.shape)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # values past 1e154: squared to inf, then left out
@settings(max_examples=200, deadline=None)
@given(st.lists(hnp.arrays(st.sampled_from([np.float32, np.float64, np.int64, np.uint8]), SHAPES), min_size=1, max_size=5))
def test_any_outputs_add_to_finite_prediction_sums(outputs: list[np.ndarray]) -> None:
    stats = PredictionStats()
    for out in outputs:
        stats.add("m", "1", {"y": out})
    window = stats.take().get(("m", "1"))
    counted = [o for o in outputs if o.size]
    if not counted:
        assert window is None
        return
    assert window is not None and window["rows"] == sum(o.shape[0] if o.ndim else 1 for o in counted)
    assert window["values"] + window["nonfinite"] == sum(o.size for o in counted)
    assert math.isfinite(window["sum"]) and math.isfinite(window["sumsq"]) and window["sumsq"] >= 0
    assert json.loads(json.dumps(window, allow_nan=False)) == window  # plain JSON: no NaN or Infinity leaves the device
