#!/usr/bin/env bash
# fedrad local demo: the whole secure deployment on this one machine.
#
#   provision (CA, coordinator certificate, 3 site bundles) -> coordinator (SuperLink, TLS +
#   node authentication) -> register the 3 site keys -> 3 site daemons (SuperNodes) on synthetic
#   hospitals -> a 2-round run -> the report.
#
# Usage: deploy/local-demo.sh [DEMO_DIR]      (default: a new folder under /tmp)
#   PYTHON=...  interpreter with fedrad's dependencies (default: .venv/bin/python; run `make venv` first)
#   ROUNDS=2  PATIENTS=40 (per site)  PORT=<free port>
# Exits 0 when the run's report exists. On exit it stops exactly the processes it started, by PID.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || { echo "no Python at $PY: run \`make venv\` first or set PYTHON=" >&2; exit 2; }
DEMO="${1:-$(mktemp -d /tmp/fedrad-demo.XXXXXX)}"
ROUNDS="${ROUNDS:-2}"
PATIENTS="${PATIENTS:-40}"
SITES=(site-a site-b site-c)
mkdir -p "$DEMO/logs"
DEMO="$(cd "$DEMO" && pwd)"

cd "$ROOT"   # `python -m` puts the working directory first on sys.path: run this checkout's fedrad
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 NO_COLOR=1 COLUMNS=160
export FLWR_HOME="$DEMO/cli-home"   # the operator's flwr CLI config (the `fedrad` connection)
fedrad() { "$PY" -m fedrad.cli "$@"; }
say() { printf '\n== %s\n' "$*"; }

PIDS=()   # coordinator first, then the sites; stopped in reverse order (sites first)
cleanup() {
  local rc=$?
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    kill "${PIDS[i]}" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$pid" 2>/dev/null || true
  done
  [ "$rc" -eq 0 ] || echo "demo failed (exit $rc); logs in $DEMO/logs" >&2
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

PORT="${PORT:-$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
ADDRESS="127.0.0.1:$PORT"

say "1/6 synthetic hospitals (${#SITES[@]} sites, $PATIENTS patients each) -> $DEMO/data"
"$PY" - "$DEMO/data" "$PATIENTS" <<'EOF'
import dataclasses, sys
from pathlib import Path
from fedrad.lab.synth import default_sites, generate
specs = [dataclasses.replace(s, n_patients=int(sys.argv[2])) for s in default_sites()[:3]]
generate(Path(sys.argv[1]), sites=specs, seed=0)
EOF

say "2/6 provision: CA, coordinator certificate, one bundle per site -> $DEMO/certs"
fedrad provision --certs "$DEMO/certs" --port "$PORT" $(printf -- '--site %s ' "${SITES[@]}")

say "3/6 coordinator on $ADDRESS (log: $DEMO/logs/coordinator.log)"
# Daemons are started directly (not through the shell function) so that $! is the PID of the
# process that becomes flower-superlink / flower-supernode (fedrad execs into them).
"$PY" -m fedrad.cli coordinator --certs "$DEMO/certs" --state "$DEMO/coordinator" --port "$PORT" \
  >"$DEMO/logs/coordinator.log" 2>&1 &
PIDS+=($!)
"$PY" - "$PORT" "${PIDS[0]}" <<'EOF'
import os, socket, sys, time
port, pid = int(sys.argv[1]), int(sys.argv[2])
for _ in range(240):
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) == 0:
            sys.exit(0)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("the coordinator exited; see its log")
    time.sleep(0.5)
sys.exit("the coordinator did not start listening in 120 s")
EOF

say "4/6 register the site keys"
fedrad register --certs "$DEMO/certs" --superlink "$ADDRESS"

say "5/6 site daemons (logs: $DEMO/logs/<site>.log)"
for site in "${SITES[@]}"; do
  "$PY" -m fedrad.cli site --bundle "$DEMO/certs/sites/$site" --data "$DEMO/data/$site" --work "$DEMO/work/$site" \
    --superlink "$ADDRESS" --port "$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')" \
    --threads 1 --poll-interval 0.25 >"$DEMO/logs/$site.log" 2>&1 &
  PIDS+=($!)
done
FLWR="$(dirname "$PY")/flwr"
"$PY" - "$FLWR" "${#SITES[@]}" <<'EOF'
import json, subprocess, sys, time
flwr, want = sys.argv[1], int(sys.argv[2])
for _ in range(120):
    out = subprocess.run([flwr, "supernode", "list", "fedrad", "--format", "json"], capture_output=True, text=True).stdout
    try:
        online = sum(n["status"] == "online" for n in json.loads(out[out.find("{"):])["nodes"])
    except (ValueError, KeyError):
        online = 0
    if online >= want:
        print(f"{online} sites online")
        sys.exit(0)
    time.sleep(1)
sys.exit(f"only {online} of {want} sites came online in 120 s; see the site logs")
EOF

say "6/6 a $ROUNDS-round run (report: $DEMO/run/report.md)"
START=$(date +%s)
fedrad submit --certs "$DEMO/certs" --superlink "$ADDRESS" --out "$DEMO/run" --rounds "$ROUNDS"
"$PY" - "$DEMO/run" "$ROUNDS" "${PIDS[@]}" <<'EOF'
import os, sys, time
from pathlib import Path
out, rounds, pids = Path(sys.argv[1]), int(sys.argv[2]), [int(p) for p in sys.argv[3:]]
seen = 0
while not (out / "report.json").is_file():
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            sys.exit(f"process {pid} exited during the run; see the logs")
    ckpt = out / "state" / "checkpoint.npz"
    if ckpt.is_file():
        from fedrad.server.checkpoint import load_checkpoint
        done = load_checkpoint(ckpt).round
        if done > seen:
            seen = done
            print(f"  round {done}/{rounds} finished and checkpointed", flush=True)
    time.sleep(2)
print(f"  all {rounds} rounds finished; report written")
EOF
echo "run took $(( $(date +%s) - START )) s"
cat "$DEMO/run/report.md"
echo
echo "Demo folder: $DEMO (certs/, coordinator/superlink.db, run/report.md, run/state/checkpoint.npz, work/<site>/, logs/)"
