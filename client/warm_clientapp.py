"""The warm ClientApp process: one long-lived process per site that runs every message of every run.

Flower 1.42 starts a fresh `flwr-clientapp` per message (its SuperExec's only local
executor is a subprocess per task; the warm executor pools it has are Kubernetes-only and
do not serve ClientApps). Each start re-imports torch and Flower (~2.2 s) and reloads the
site's images, the pretrained weights and the prefix cache. This process takes the
SuperExec's place instead (the SuperNode runs with `--isolation process`): it asks the
SuperNode's Runtime API for tasks (`AcquireTask`) and runs each one here, with Flower's
own steps in Flower's order (pull the message, context, run and FAB; install the FAB; load
the ClientApp; call it; push the reply, then the context), so whatever stays in memory
(imports, decoded pixels, the prefix cache, the loaded sites) serves the next message.

What the site's disk holds stays the truth: the ClientApp keeps its BN per round, its
caches and its egress log on disk as before, so when this process dies (killed, crashed,
recycled for memory) the site daemon starts another (`fedrad.client.site_supervisor`) and
nothing is lost but the warmth. The message it was handling fails like a lost node's.

Memory is bounded by `--max-memory-mb`: after a message that leaves the process above it,
the process exits (code 0) and the supervisor starts a fresh one.

The ClientApp's code comes with the run's FAB, as in Flower: modules imported from one
FAB's folder are dropped before a different FAB's app is loaded, so one run never calls
another's code; fedrad's own installed modules (and their in-memory caches) stay.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from fedrad.common.flower_tools import OBJECT_RETRY_S

log = logging.getLogger("fedrad.site")
EXIT_RECYCLE = 0  # exited on purpose (memory bound): the supervisor starts a fresh one at once
# The most a message's arrays may take to reach the SuperNode. A message of a run that stopped meanwhile (coordinator
# restarted) keeps its task at the SuperNode but its arrays never come (flwr 1.42 leaves both behind): Flower's own
# wait (2 h) would block this one process, and every later message, for that long; the task fails instead.
ARRAYS_WAIT_S = 60.0


class WarmClientApp:
    """Serves ClientApp tasks from one SuperNode's Runtime API, one at a time, in this process."""

    def __init__(self, runtime_api_address: str, *, poll_interval: float = 0.05, max_memory_mb: int = 0,
                 superexec_secret: bytes | None = None) -> None:
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient

        self.address = runtime_api_address
        self.poll_interval = poll_interval
        self.max_memory_mb = max_memory_mb
        interceptors = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
        if superexec_secret:
            interceptors.append(SuperExecAuthHttpInterceptor(master_secret=superexec_secret,
                                                             protected_methods=frozenset(
                                                                 {"/flwr.proto.Runtime/AcquireTask"})))
        self.client = RuntimeHttpClient.from_server_address(server_address=runtime_api_address, insecure=True,
                                                            root_certificates=None, interceptors=interceptors,
                                                            retry_invoker=make_simple_http_retry_invoker())
        self.installed: dict[str, Path] = {}  # FAB hash -> its app folder
        self.app_dir: Path | None = None  # the FAB folder whose modules are imported now
        self.tasks = 0

    def acquire(self) -> str | None:
        """A ClientApp task's token, if the SuperNode has one waiting."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
        from flwr.supercore.constant import TaskType

        res = self.client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP],
                                                         agentapp_fab_hashes=[]))
        return res.token if res.HasField("task") and res.token else None

    def serve(self) -> int:
        """Run tasks until stopped, or until the memory bound says to start afresh (returns the exit code)."""
        log.info("warm ClientApp process %d serving %s", os.getpid(), self.address)
        while True:
            token = self.acquire()
            if token is None:
                time.sleep(self.poll_interval)
                continue
            self.run_task(token)
            self.tasks += 1
            rss = resident_mb()
            if self.max_memory_mb and rss > self.max_memory_mb:
                log.info("warm ClientApp process %d: %.0f MB resident after %d messages, above max-memory-mb "
                         "%d: exiting for a fresh one", os.getpid(), rss, self.tasks, self.max_memory_mb)
                return EXIT_RECYCLE

    def _load_app(self, run, fab):  # noqa: ANN001, ANN202 - Flower's Run and Fab
        from flwr.cli.install import install_from_fab
        from flwr.clientapp.utils import get_load_client_app_fn
        from flwr.common.config import get_project_dir

        if fab.hash_str not in self.installed:
            install_from_fab(fab.content, skip_prompt=True)
            self.installed[fab.hash_str] = get_project_dir(run.fab_id, run.fab_version, fab.hash_str)
        app_dir = self.installed[fab.hash_str]
        if self.app_dir is not None and self.app_dir != app_dir:
            forget_modules_under(self.app_dir)
        self.app_dir = app_dir
        return get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)(
            run.fab_id, run.fab_version, fab.hash_str)

    def run_task(self, token: str) -> None:
        """One message, as `flwr-clientapp` runs it (flwr.supernode.runtime.run_clientapp), in this process."""
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.clientapp.client_app import LoadClientAppError
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient
        from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

        retry = make_simple_http_retry_invoker()
        client = RuntimeHttpClient.from_server_address(
            server_address=self.address, insecure=True, root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                          RuntimeTokenHttpInterceptor(token)],
            retry_invoker=retry)
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        message = reply = context = None
        status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        marks = [time.perf_counter()]
        try:
            heartbeat.start()
            message, context, run, fab = pull_task_input(client, marks)
            client_app = self._load_app(run, fab)
            marks.append(time.perf_counter())
            reply = client_app(message=message, context=context)
            marks.append(time.perf_counter())
            status, details = SubStatus.COMPLETED, ""
        except Exception as ex:  # noqa: BLE001 - Flower's own handling: an error reply, the process goes on
            code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION if isinstance(ex, LoadClientAppError) else \
                ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            reason = "An exception was raised when attempting to load `ClientApp`" \
                if isinstance(ex, LoadClientAppError) else f"{type(ex)}:<'{ex}'>"
            log.error("ClientApp raised an exception", exc_info=ex)
            details = reason
            if message is not None:
                reply = Message(Error(code=code, reason=reason), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            except Exception as ex:  # noqa: BLE001
                log.error("pushing the reply failed", exc_info=ex)
            retry.max_tries = 1  # as Flower does on exit: do not block on a gone SuperNode
            push_task_output(client=client, context=context, sub_status=status, details=details)
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()
            if len(marks) == 5:  # where a message's time goes, for the operator (and `fedrad bench --deploy`)
                start, header, arrays, loaded, handled = marks
                log.info("%s message: pull %.2f s (header %.2f s, arrays %.2f s, app %.2f s), ClientApp %.2f s, "
                         "push %.2f s", message.metadata.message_type, loaded - start, header - start,
                         arrays - header, loaded - arrays, handled - loaded, time.perf_counter() - handled)


def pull_task_input(client, marks: list[float]):  # noqa: ANN001, ANN201 - RuntimeHttpClient -> (Message, ...)
    """Flower's `pull_task_input`, but asking again for the message's objects within tens of milliseconds.

    The SuperNode offers the task as soon as the message's header arrives and fetches its
    arrays from the SuperLink after that. A process that asks at once (as this warm one
    does; a fresh `flwr-clientapp` is still importing torch) finds them missing, and
    Flower's default retry waits 1 s, then 2 s, ...: measured, 3 s of every message.
    Here the retries start at 20 ms and stay under 0.5 s; only the waits differ. `marks` gets
    the times the header and the arrays were in.
    """
    from flwr.app import Message
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest  # pylint: disable=E0611
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity

    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = res.task_id
    TaskIdentity.run_id = res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context, run, fab = context_from_proto(res.context), run_from_proto(res.run), fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    marks.append(time.perf_counter())
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message, max_tries_per_object=None, max_time=ARRAYS_WAIT_S, initial_backoff=OBJECT_RETRY_S,
        backoff_cap=0.5)
    message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower does: the id is not in the object
    marks.append(time.perf_counter())
    return message, context, run, fab


def forget_modules_under(folder: Path) -> None:
    """Drop from `sys.modules` every module whose file lies under `folder` (an earlier run's FAB)."""
    root = str(folder.resolve())
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if path and str(Path(path).resolve()).startswith(root + os.sep):
            del sys.modules[name]
    if root in sys.path:
        sys.path.remove(root)


def resident_mb() -> float:
    """This process's resident memory (MB)."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedrad.client.warm_clientapp",
                                     description="A site's warm ClientApp process (started by `fedrad site`).")
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, HOST:PORT")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone")
    parser.add_argument("--max-memory-mb", type=int, default=0, help="exit for a fresh process above this RSS (0: no bound)")
    parser.add_argument("--poll-interval", type=float, default=0.05, help="seconds between task polls (local API)")
    parser.add_argument("--superexec-auth-secret-file", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per poll of the local Runtime API
    if args.parent_pid is not None:
        from flwr.supercore.app_utils import start_parent_process_monitor

        start_parent_process_monitor(args.parent_pid)
    secret = args.superexec_auth_secret_file.read_bytes() if args.superexec_auth_secret_file else None
    import fedrad.client.app  # noqa: F401 - the expensive imports (torch, the model) before the first message

    return WarmClientApp(args.runtime_api_address, poll_interval=args.poll_interval,
                         max_memory_mb=args.max_memory_mb, superexec_secret=secret).serve()


if __name__ == "__main__":
    sys.exit(main())
