"""The Simulation Engine on an existing Ray cluster (`fedrad simulate --ray-address`): past one machine.

The slow test starts a real one-node cluster with `ray start --head` (its own port and temp
folder, so nothing else on the machine is touched), runs a tiny simulation against its
address in a child process, and asks the cluster's GCS afterwards whether that process was
one of its drivers and whether its ClientApp actors ran there. The cluster is stopped by the
PIDs of the processes it started (never `ray stop`, which ends every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fedrad.lab.simulate import backend_config


def test_without_an_address_ray_starts_its_own_instance_with_the_cpus_given():
    cfg = backend_config(num_cpus=3, cpus_per_site=1.0)
    assert cfg["init_args"]["num_cpus"] == 3 and cfg["init_args"]["num_gpus"] == 0
    assert "address" not in cfg["init_args"]
    assert cfg["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.0}


def test_with_an_address_ray_connects_and_is_not_given_cpus():
    """Ray refuses num_cpus/num_gpus when it connects to a cluster: the cluster's size decides."""
    cfg = backend_config(num_cpus=3, cpus_per_site=2.0, ray_address="10.0.0.5:6379")
    assert cfg["init_args"]["address"] == "10.0.0.5:6379"
    assert "num_cpus" not in cfg["init_args"] and "num_gpus" not in cfg["init_args"]
    assert cfg["client_resources"]["num_cpus"] == 2.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop_tree(proc: subprocess.Popen) -> None:
    """SIGTERM the `ray start --block` process and everything under it, then SIGKILL what is left."""
    import psutil

    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in tree:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(tree, timeout=20)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


CLUSTER_QUERY = """
import json, sys, ray
from ray._private import state
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
jobs = [{"pid": j["DriverPid"], "id": j["JobID"]} for j in state.jobs()]
actors = [{"class": a["ActorClassName"], "job": a["JobID"]} for a in state.actors().values()]
print("CLUSTER " + json.dumps({"jobs": jobs, "actors": actors, "nodes": len(state.nodes())}))
"""


@pytest.mark.slow
def test_a_simulation_runs_on_the_ray_cluster_it_is_given(tmp_path):
    from fedrad.lab.synth import SiteSpec, generate
    from tests.helpers import small_site_policy

    data = tmp_path / "data"
    generate(data, sites=[SiteSpec(name=f"h{i}", n_patients=20, prevalence=0.5, spacing_mm=s, noise_hu=10, kernel=k,
                                   hu_offset=o, manufacturer="GE")
                          for i, (s, k, o) in enumerate([(0.7, "smooth", 0), (0.9, "sharp", 30)])],
             seed=2, image_size=96)
    small_site_policy(data)
    ray_bin = Path(sys.executable).parent / "ray"
    assert ray_bin.is_file(), f"the ray CLI is not beside {sys.executable}"
    port = _free_port()
    address = f"127.0.0.1:{port}"
    temp_dir = tempfile.mkdtemp(prefix="fr-ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    head_log = tmp_path / "ray-head.log"
    with open(head_log, "wb") as log:
        head = subprocess.Popen([str(ray_bin), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                                 "--port", str(port), "--ray-client-server-port", str(_free_port()),
                                 "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats",
                                 "--temp-dir", temp_dir],
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in head_log.read_text(errors="replace"):
            assert head.poll() is None, f"ray start exited ({head.returncode}):\n{head_log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"the Ray head did not start in 120 s:\n{head_log.read_text()[-3000:]}"
            time.sleep(0.5)
        sim = subprocess.Popen([sys.executable, "-m", "fedrad.cli", "simulate", "--data", str(data),
                                "--out", str(tmp_path / "out"), "--rounds", "1", "--ray-address", address,
                                "--run-config", "local-epochs=1 batch-size=8 fov-mm=32.0"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            output, _ = sim.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            sim.kill()
            raise
        assert sim.returncode == 0, output[-3000:]
        report = json.loads((tmp_path / "out" / "report.json").read_text())
        assert report["rounds"] == 1 and {s["name"] for s in report["sites"]} == {"h0", "h1"}
        assert all(s["rounds_trained"] == 1 for s in report["sites"])
        # Ask the cluster itself: the simulation's process was one of its drivers, its ClientApp actors ran there
        query = subprocess.run([sys.executable, "-c", CLUSTER_QUERY, address], env=env, capture_output=True, check=False,
                               text=True, timeout=120)
        line = next((ln for ln in query.stdout.splitlines() if ln.startswith("CLUSTER ")), None)
        assert line is not None, query.stderr[-3000:]
        cluster = json.loads(line[len("CLUSTER "):])
        sim_jobs = [j["id"] for j in cluster["jobs"] if j["pid"] == sim.pid]
        assert len(sim_jobs) == 1, cluster["jobs"]
        assert any(a["class"] == "ClientAppActor" and a["job"] == sim_jobs[0] for a in cluster["actors"]), cluster
        assert cluster["nodes"] == 1
    finally:
        _stop_tree(head)
        shutil.rmtree(temp_dir, ignore_errors=True)
