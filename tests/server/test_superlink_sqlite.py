"""The SuperLink launcher: Flower's SQLite busy timeout raised on a real SuperLink DB, refused on unknown Flower."""

import subprocess
import sys

import flwr
from flwr.supercore import sql_mixin
import pytest

from fedrad.server import superlink_sqlite
from fedrad.server.coordinator import superlink_command
from fedrad.server.provision import CertsLayout, provision
from fedrad.server.superlink_sqlite import UnknownFlower, set_busy_timeout


def superlink_state(db):
    """The SuperLink's own state object on `db`, made as flower-superlink makes it (its factories)."""
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.config_loader import get_federation_manager

    return LinkStateFactory(str(db), get_federation_manager(is_simulation=False), ObjectStoreFactory(str(db))).state()


@pytest.fixture
def pragmas(monkeypatch):
    """Flower's pragma list, put back after the test (the launcher replaces a module global)."""
    monkeypatch.setattr(sql_mixin, "SQLITE_PRAGMAS", sql_mixin.SQLITE_PRAGMAS)


def test_flowers_own_superlink_waits_5_s(tmp_path, pragmas):
    state = superlink_state(tmp_path / "flower.db")
    assert state.query("PRAGMA busy_timeout") == [{"timeout": 5000}]


def test_the_launcher_sets_the_busy_timeout_and_keeps_wal_on_a_real_superlink_db(tmp_path, pragmas):
    patched = set_busy_timeout(sql_mixin, 20)
    assert dict(patched)["busy_timeout"] == "20000" and dict(patched)["journal_mode"] == "WAL"
    # every other pragma is Flower's
    assert [p for p in patched if p[0] != "busy_timeout"] == [p for p in sql_mixin.SQLITE_PRAGMAS
                                                              if p[0] != "busy_timeout"]
    state = superlink_state(tmp_path / "superlink.db")
    assert state.query("PRAGMA busy_timeout") == [{"timeout": 20000}]
    assert state.query("PRAGMA journal_mode") == [{"journal_mode": "wal"}]
    assert (tmp_path / "superlink.db").is_file()


def test_another_flower_version_is_refused_and_nothing_changes(monkeypatch, pragmas):
    monkeypatch.setattr(flwr, "__version__", "1.43.0")
    before = sql_mixin.SQLITE_PRAGMAS
    with pytest.raises(UnknownFlower, match=r"flwr 1\.43\.0.*--sqlite-busy-timeout 0"):
        set_busy_timeout(sql_mixin, 20)
    assert sql_mixin.SQLITE_PRAGMAS is before


def test_pragmas_not_as_known_are_refused(monkeypatch, pragmas):
    monkeypatch.setattr(sql_mixin, "SQLITE_PRAGMAS", (("busy_timeout", "9000"), ("journal_mode", "WAL")))
    with pytest.raises(UnknownFlower):
        set_busy_timeout(sql_mixin, 20)
    monkeypatch.setattr(sql_mixin, "SQLITE_PRAGMAS", (("busy_timeout", "5000"), ("journal_mode", "DELETE")))
    with pytest.raises(UnknownFlower):
        set_busy_timeout(sql_mixin, 20)


@pytest.mark.parametrize("seconds", [0, -1, 601])
def test_a_timeout_out_of_range_is_refused(seconds, pragmas):
    with pytest.raises(ValueError, match="busy timeout"):
        set_busy_timeout(sql_mixin, seconds)


@pytest.mark.parametrize("argv", [[], ["--busy-timeout", "20"], ["--busy-timeout", "x", "--"],
                                  ["--", "--busy-timeout", "20"]])
def test_the_launcher_says_how_to_call_it(argv):
    with pytest.raises(SystemExit):
        superlink_sqlite.main(argv)


def test_the_launcher_runs_flowers_own_entry_point():
    proc = subprocess.run([sys.executable, "-m", "fedrad.server.superlink_sqlite", "--busy-timeout", "20", "--",
                           "--version"], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert flwr.__version__ in proc.stdout + proc.stderr and "busy_timeout 20 s" in proc.stderr


def test_the_coordinator_runs_the_superlink_through_the_launcher(tmp_path):
    certs = tmp_path / "certs"
    provision(certs, sites=["a"])
    argv = superlink_command(CertsLayout(certs), tmp_path / "state")
    assert argv[:6] == [sys.executable, "-m", "fedrad.server.superlink_sqlite", "--busy-timeout", "20", "--"]
    assert "--enable-supernode-auth" in argv[6:] and "--database" in argv[6:]
    plain = superlink_command(CertsLayout(certs), tmp_path / "state", busy_timeout_s=0)
    assert plain[0].endswith("flower-superlink") and plain[1:] == argv[6:]


def test_the_expired_claim_cleanup_runs_at_most_once_per_interval_on_the_real_state(tmp_path):
    from flwr.supercore.corestate.sql_corestate import SqlCoreState

    calls = []

    class Counted(SqlCoreState):  # Flower's class stays as it is; this one counts what the throttle lets through
        def _cleanup_expired_task_tokens(self):
            calls.append(1)
            return super()._cleanup_expired_task_tokens()

    class Throttled(Counted):
        pass

    now = [100.0]
    superlink_sqlite.throttle_cleanup(Throttled, every_s=1.0, clock=lambda: now[0])
    superlink_sqlite.throttle_cleanup(Throttled, every_s=1.0)  # applied twice: still one throttle
    state = superlink_state(tmp_path / "link.db")
    state.__class__ = type("State", (type(state), Throttled), {})  # the real state, with the throttled method
    for _ in range(5):
        assert state.get_run_status({123}) == {}  # the status checks themselves all still run
    assert len(calls) == 1
    now[0] += 0.9
    state.get_run_status({123})
    assert len(calls) == 1
    now[0] += 0.2  # a second after the last cleanup
    state.get_run_status({123})
    assert len(calls) == 2


def test_the_cleanup_throttle_refuses_a_state_without_the_method():
    with pytest.raises(UnknownFlower):
        superlink_sqlite.throttle_cleanup(type("NoCleanup", (), {}))
