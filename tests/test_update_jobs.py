"""The update job's state table, its persisted rows (an older agent's database still loads), and round planning."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.chunks import ChunkManifest
from agent.store import AgentStore
from agent.update.jobs import FINAL, TRANSITIONS, IllegalTransition, Job, State, check_transition
from agent.update.round import DropShadow, Install, UpToDate, plan
from agent.update.store import InstalledModel
from agent.update.verify import DirectorPlan, VerifiedUpdate


def update(model: str = "mlp", version: str = "1.0.0", sha256: str = "a" * 64) -> VerifiedUpdate:
    data = b"x" * 1000
    return VerifiedUpdate(f"{model}-{version}.tar", model, version, "fp32", 1, len(data), sha256, "repo://x", ChunkManifest.of(data, 256))


def installed(model: str, sha256: str, status: str) -> InstalledModel:
    return InstalledModel(sha256, model, "0.9.0", "fp32", 1, f"{model}.tar", "/nowhere", status)


def test_a_job_cannot_go_active_from_downloading() -> None:
    with pytest.raises(IllegalTransition, match="DOWNLOADING cannot go to ACTIVE"):
        check_transition(State.DOWNLOADING, State.ACTIVE)


@given(st.sampled_from(list(State)), st.sampled_from(list(State)))
def test_check_transition_allows_exactly_the_table(current: State, to: State) -> None:
    if to in TRANSITIONS[current]:
        check_transition(current, to)
    else:
        with pytest.raises(IllegalTransition):
            check_transition(current, to)


def test_the_table_serves_only_through_a_health_check_and_every_unfinished_state_can_fail() -> None:
    assert set(TRANSITIONS) == set(State)
    for state, following in TRANSITIONS.items():
        if State.ACTIVE in following or State.SHADOW in following:
            assert state == State.HEALTH_CHECK
        if state not in FINAL:
            assert {State.FAILED, State.REJECTED} <= following
    assert {s for s in FINAL if TRANSITIONS[s]} == {State.ACTIVE}  # only an active job moves on: rolled back
    reached, todo = {State.IDLE}, [State.IDLE]
    while todo:
        for nxt in TRANSITIONS[todo.pop()] - reached:
            reached.add(nxt)
            todo.append(nxt)
    assert reached == set(State)


@given(st.lists(st.sampled_from(list(State)), max_size=30))
def test_any_walk_the_table_allows_reaches_active_only_right_after_health_check(walk: list[State]) -> None:
    previous = State.IDLE
    for to in walk:
        if to not in TRANSITIONS[previous]:
            continue
        check_transition(previous, to)
        if to == State.ACTIVE:
            assert previous == State.HEALTH_CHECK
        previous = to


def test_a_job_round_trips_through_the_store(tmp_path: Path) -> None:
    store = AgentStore(tmp_path / "agent.db")
    job = Job("j1", update(), created=1.0, shadow=True, state=State.STAGED, offset=768, reason="why", attempts=1)
    store.save_job(job)
    [back] = store.jobs()
    assert back == job and back.update.chunks == job.update.chunks and back.state is State.STAGED
    assert store.unfinished_job() == job and store.jobs_in(State.STAGED, "a" * 64) == [job]
    report = back.report()
    assert report["state"] == "STAGED" and report["status"] == "IN_PROGRESS" and report["shadow"] == 1
    assert "chunks" not in report and "url" not in report
    store.close()


def test_an_older_agents_database_still_loads(tmp_path: Path) -> None:
    """A store written before ``shadow`` existed, its states bare strings: it loads, and gains the column."""
    db = tmp_path / "agent.db"
    with sqlite3.connect(db) as conn:
        conn.execute(
            "CREATE TABLE jobs (id TEXT PRIMARY KEY, target_path TEXT, model TEXT, version TEXT, variant TEXT, release_counter INTEGER,"
            " length INTEGER, sha256 TEXT, url TEXT, chunks TEXT, state TEXT, offset INTEGER, reason TEXT, attempts INTEGER,"
            " created FLOAT, updated FLOAT)"
        )
        u = update()
        row = ("old", u.target_path, u.model, u.version, u.variant, 1, u.length, u.sha256, u.url, u.chunks.encode().decode())
        conn.execute("INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'ACTIVE', 1000, '', 0, 5.0, 6.0)", row)
    store = AgentStore(db)
    [job] = store.jobs()
    assert (job.id, job.state, job.shadow, job.update) == ("old", State.ACTIVE, False, u)
    assert store.unfinished_job() is None
    store.close()
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT state, shadow FROM jobs").fetchall() == [("ACTIVE", 0)]


def test_planning_names_the_update_then_the_shadows_to_drop_then_the_shadow_to_run() -> None:
    new, candidate = update(version="2.0.0", sha256="b" * 64), update("det", "3.0.0", "c" * 64)
    shadows = {"mlp": installed("mlp", "d" * 64, "shadow"), "det": installed("det", "e" * 64, "shadow")}
    assert plan(DirectorPlan(new, candidate), shadows) == [
        Install(new),
        DropShadow("mlp", "the director no longer names it"),
        Install(candidate, shadow=True),
    ]


def test_planning_leaves_a_running_shadow_alone_and_says_up_to_date() -> None:
    candidate = update("det", "3.0.0", "c" * 64)
    assert plan(DirectorPlan(None, candidate), {"det": installed("det", "c" * 64, "shadow")}) == [UpToDate()]
    assert plan(DirectorPlan(None), {}) == [UpToDate()]
