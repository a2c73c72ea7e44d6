"""The warm site daemon's pieces that run without a federation: command lines, the poll cap, the module purge,
the supervisor's restart of a dying ClientApp process, and the coordinator's short-poll exchange."""

from __future__ import annotations

import shlex
import sys
import time
import types

import pytest
from flwr.app import RecordDict

from fedrad.client import site_supervisor, supernode_polling, warm_clientapp
from fedrad.client.daemon import site_command
from fedrad.server.rounds import send_and_receive
from tests.deploy.harness import free_port


def test_the_supervisor_runs_the_supernode_with_process_isolation_and_finds_its_runtime_api():
    argv = ["/bin/flower-supernode", "--superlink", "x:1", "--port", "9123", "--isolation", "subprocess"]
    out = site_supervisor.supernode_argv(argv, None)
    assert out[0] == "/bin/flower-supernode" and out.count("--isolation") == 1
    assert out[out.index("--isolation") + 1] == "process"
    assert site_supervisor.runtime_api_address(argv) == "127.0.0.1:9123"
    assert site_supervisor.runtime_api_address(["flower-supernode"]) == "127.0.0.1:9094"  # Flower's default
    polled = site_supervisor.supernode_argv(argv, 0.25)
    assert polled[:5] == [sys.executable, "-m", "fedrad.client.supernode_polling", "--poll-interval", "0.25"]
    assert polled[polled.index("--") + 1:] == out[1:]


def test_the_site_command_wraps_the_supernode_command_unchanged():
    supernode = ["/bin/flower-supernode", "--node-config", "site-name='a' data-dir='/d'", "--port", "9"]
    argv = site_command(supernode, max_memory_mb=2048, poll_interval=0.5)
    assert argv[argv.index("--") + 1:] == supernode
    assert argv[argv.index("--max-memory-mb") + 1] == "2048" and argv[argv.index("--poll-interval") + 1] == "0.5"
    assert shlex.split(shlex.join(argv)) == argv  # what --dry-run prints runs as is


def test_the_poll_cap_shortens_waits_of_that_module_only():
    import flwr.supernode.start_client_internal as internal

    original, pull = internal.time, internal.pull_objects
    try:
        assert supernode_polling.cap_waits(internal, 0.01)
        start = time.perf_counter()
        internal.time.sleep(3)
        assert time.perf_counter() - start < 1.0
        assert internal.time.monotonic() > 0  # the rest of `time` is still there
        assert internal.pull_objects.func is pull  # Flower's own function, with quicker retries
        assert internal.pull_objects.keywords["initial_backoff"] < 1.0
    finally:
        internal.time, internal.pull_objects = original, pull
    assert internal.time.sleep is time.sleep  # nothing else was touched


def test_modules_of_an_earlier_fab_are_forgotten(tmp_path, monkeypatch):
    app_dir = tmp_path / "apps" / "pub.app.1.0.0.abc"
    (app_dir / "oldfab").mkdir(parents=True)
    (app_dir / "oldfab" / "__init__.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(app_dir))
    import oldfab  # noqa: F401

    assert "oldfab" in sys.modules
    warm_clientapp.forget_modules_under(app_dir)
    assert "oldfab" not in sys.modules and "fedrad.client.warm_clientapp" in sys.modules
    assert str(app_dir.resolve()) not in sys.path


def test_the_supervisor_restarts_a_dying_clientapp_process_and_ends_with_the_supernode(tmp_path):
    starts = tmp_path / "starts"
    worker = [sys.executable, "-c", f"open({str(starts)!r}, 'a').write('x')"]  # exits at once, every time
    port = free_port()
    supernode = [sys.executable, "-c", "import socket, sys, time; s = socket.socket(); "
                 f"s.bind(('127.0.0.1', {port})); s.listen(); time.sleep(4); sys.exit(7)"]  # a Runtime API, then gone
    sup = site_supervisor.Supervisor(supernode, worker, f"127.0.0.1:{port}")
    site_supervisor.YOUNG_S, saved = 0.0, site_supervisor.YOUNG_S  # every exit counts as "lived long": no pause
    try:
        code = sup.run()
    finally:
        site_supervisor.YOUNG_S = saved
    assert code == 7  # the SuperNode's exit code is the daemon's
    assert len(starts.read_text()) >= 2 and sup.restarts >= 1


class FakeGrid:
    """Replies to each pushed message after `delay` seconds; counts the pulls."""

    def __init__(self, delay: float) -> None:
        self.delay, self.pushed, self.pulls = delay, {}, 0

    def push_messages(self, messages):
        ids = []
        for i, msg in enumerate(messages):
            msg.metadata.message_id = f"m{i}"
            self.pushed[f"m{i}"] = (msg, time.monotonic())
            ids.append(f"m{i}")
        return ids

    def pull_messages(self, ids):
        self.pulls += 1
        out = []
        for mid in ids:
            msg, at = self.pushed[mid]
            if time.monotonic() - at >= self.delay:
                out.append(types.SimpleNamespace(metadata=types.SimpleNamespace(reply_to_message_id=mid),
                                                 content=RecordDict(), has_error=lambda: False))
        return out


def _messages(n):
    """Stand-ins for the messages of a round: the exchange reads and sets their metadata, and packs their content."""
    return [types.SimpleNamespace(metadata=types.SimpleNamespace(dst_node_id=i + 1), content=RecordDict())
            for i in range(n)]


def test_short_poll_exchange_returns_every_reply_and_stops_at_the_timeout():
    grid = FakeGrid(delay=0.3)
    replies = send_and_receive(grid, _messages(3), timeout=10.0, poll=0.05)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"]
    assert grid.pulls >= 2  # asked again after the first, empty pull (not one 3 s sleep)
    late = FakeGrid(delay=60.0)
    assert send_and_receive(late, _messages(2), timeout=0.3, poll=0.05) == []


@pytest.mark.parametrize("bad", [["--poll-interval", "5", "--", "x"], ["x"]])
def test_the_poll_launcher_refuses_bad_arguments(bad):
    with pytest.raises(SystemExit):
        supernode_polling.main(bad)


class _Stop(Exception):
    pass


def _serving(max_memory_mb, tokens, monkeypatch, rss):
    """A warm process whose Runtime API hands out `tokens` tasks (then stops it) and whose RSS reads from `rss`."""
    app = object.__new__(warm_clientapp.WarmClientApp)  # no Runtime API connection: only the serve loop runs
    app.address, app.poll_interval, app.max_memory_mb, app.tasks = "test", 0.0, max_memory_mb, 0
    queue = list(tokens)

    def acquire():
        if not queue:
            raise _Stop
        return queue.pop(0)

    app.acquire, app.run_task = acquire, lambda token: None
    monkeypatch.setattr(warm_clientapp, "resident_mb", lambda: rss.pop(0))
    return app


def test_the_memory_bound_ends_the_warm_process_after_the_message_that_crosses_it(monkeypatch):
    app = _serving(100, ["t1", None, "t2", "t3", "t4"], monkeypatch, rss=[50.0, 99.0, 150.0, 10.0])
    assert app.serve() == warm_clientapp.EXIT_RECYCLE  # the supervisor starts a fresh one
    assert app.tasks == 3  # t4 was left for the fresh process


def test_without_a_memory_bound_the_warm_process_keeps_serving(monkeypatch):
    app = _serving(0, ["t1", "t2", "t3"], monkeypatch, rss=[10_000.0] * 3)
    with pytest.raises(_Stop):
        app.serve()
    assert app.tasks == 3
