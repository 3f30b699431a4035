"""Several controllers on one store and broker: one leads (the leader lock), the others stand by and take over."""

from __future__ import annotations

from pathlib import Path

from fleet.leader import Leadership


def _one_leads_until_it_lets_go(location: Path | str) -> None:
    first, second = Leadership(location), Leadership(location)
    try:
        assert first.try_acquire() and first.held()
        assert not second.try_acquire() and not second.held()
        assert first.try_acquire(), "taking a held lock again keeps it"
        first.release()
        assert not first.held()
        assert second.try_acquire() and second.held()
        assert not first.try_acquire()
    finally:
        first.release()
        second.release()


def test_leadership_on_postgresql_is_one_advisory_lock() -> None:
    from conftest import fresh_postgres

    with fresh_postgres() as url:
        _one_leads_until_it_lets_go(url)


def test_leadership_on_sqlite_is_a_file_lock_beside_the_database(tmp_path: Path) -> None:
    _one_leads_until_it_lets_go(tmp_path / "fleet.db")
    assert (tmp_path / "fleet.db.leader").exists()
