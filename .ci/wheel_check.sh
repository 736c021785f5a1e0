#!/usr/bin/env bash
# Install the built wheel (not editable) into a fresh virtual environment (its dependencies those
# of `make setup`'s .venv where there is one, else installed afresh) and, from a directory
# outside the checkout, run the pipeline a new user runs (issue 13):
#   prepare movielens (bundled data) -> train (1 epoch) -> tune (default space, 2 trials)
#   -> serve the tune output -> one HTTP request -> shutdown.
# Nothing here may read the checkout: the search space, the Serve app and the bundled data
# come from the installed package. Tiny settings keep it to a few minutes on 2 cores.
#
#   .ci/wheel_check.sh            # from the repository root (`.ci/run` calls it after `make test`)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PYTHON=${PYTHON:-python3}
WORK=$(mktemp -d /tmp/din-wheel.XXXXXX)
SERVER_PID=""
cleanup() {
    status=$?
    if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID"; wait "$SERVER_PID" || true
    fi
    if [[ $status -ne 0 && -f $WORK/run/serve.log ]]; then
        echo "--- din-ray serve's log:"; tail -n 40 "$WORK/run/serve.log"
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
t0=$SECONDS
stamp() { echo "[wheel-check $((SECONDS - t0))s] $*"; }

# From a copy of the files git knows (tracked, or untracked but not ignored): a build in the
# checkout would reuse its build/ directory, where a module since removed can linger.
mkdir "$WORK/src"
git ls-files -z --cached --others --exclude-standard \
    | tar -c --null --files-from=- --ignore-failed-read | tar -x -C "$WORK/src"
"$PYTHON" -m venv "$WORK/venv"
BIN=$WORK/venv/bin
DEPS_VENV=${DEPS_VENV:-$REPO/.venv}   # `make setup`'s venv, where there is one
if [[ -x $DEPS_VENV/bin/python ]]; then
    stamp "build the wheel with $DEPS_VENV's setuptools; a fresh venv on its dependencies"
    # Its setuptools builds the same files as an isolated build, without installing setuptools
    # into a new build environment first (2 s instead of 7 s here).
    "$DEPS_VENV/bin/python" -m pip wheel -q --no-deps --no-build-isolation \
        --wheel-dir "$WORK/dist" "$WORK/src"
    # The dependencies as `make setup` installed (and compiled) them: the new venv sees that
    # venv's site-packages through a path file, so pip checks the wheel's requirements against
    # them and installs only din-ray. Installing torch, Ray and the rest again, and compiling their
    # modules again in the first process importing each (the branch below), made the whole check
    # 182 s against 91 s this way (one after the other, session 9).
    # A path file adds that directory only: its own .pth files (the editable din-ray of the
    # checkout) are not run, and the import check below fails if din_ray came from elsewhere.
    purelib() { "$1" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"; }
    purelib "$DEPS_VENV/bin/python" > "$(purelib "$BIN/python")/din_ray_ci_dependencies.pth"
else
    stamp "build the wheel; a fresh venv, CPU torch 2.13 first (a bare torch can pull CUDA)"
    "$PYTHON" -m pip wheel -q --no-deps --wheel-dir "$WORK/dist" "$WORK/src"
    # --no-compile: no byte-compiling of every installed module (torch and Ray have thousands);
    # Python compiles what it imports anyway.
    "$BIN/python" -m pip install -q --no-compile torch==2.13.0
fi
WHEEL=$(ls "$WORK"/dist/din_ray-*.whl)
"$BIN/python" -m pip install -q --no-compile "$WHEEL"

mkdir "$WORK/run" && cd "$WORK/run"   # outside the checkout, with no PYTHONPATH
unset PYTHONPATH
# Installed with --no-compile, this venv has no .pyc files: let the first process that imports a
# module write its .pyc. With PYTHONDONTWRITEBYTECODE set (as on the machine this was measured
# on) every Ray process would compile Ray from source again, 4-6 s each.
unset PYTHONDONTWRITEBYTECODE
"$BIN/python" - <<'PY'
import din_ray, sys
assert din_ray.__file__.startswith(sys.prefix), f"din_ray imported from {din_ray.__file__}"
print("din_ray from", din_ray.__file__)
PY

TINY=(--epochs 1 --batch-size 512 --embedding-dim 8 --attention-hidden 16,8 --mlp-hidden 16,8
      --threads 1)
stamp "prepare movielens (bundled)"
"$BIN/din-ray" prepare movielens --output data --max-history 20
stamp "train --local"
"$BIN/din-ray" train --local --data data --output train "${TINY[@]}"
stamp "tune with the default space"
# Both trials at once (4 logical CPUs: a trial slot and one Train worker each): a trial is
# mostly Ray Train start-up, not computation (measured: 149 s for two trials run one by one).
"$BIN/din-ray" tune --data data --output tune --trials 2 --num-cpus 4 --max-concurrent 2 \
    "${TINY[@]}"
test -f tune/best.json

PORT=$("$BIN/python" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
stamp "serve the tune output on port $PORT"
"$BIN/din-ray" serve --checkpoint tune --port "$PORT" --num-cpus 2 --temp-dir "$WORK/ray-serve" \
    > serve.log 2>&1 &
SERVER_PID=$!
"$BIN/python" - "$PORT" "$SERVER_PID" <<'PY'
import json, os, sys, time, urllib.request

from din_ray.cli.demo import BUNDLED, sample_request

port, pid = sys.argv[1], int(sys.argv[2])
url = f"http://127.0.0.1:{port}"
deadline = time.monotonic() + 300
while True:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=5) as r:
            if json.loads(r.read())["status"] == "ok":
                break
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit(f"din-ray serve exited early:\n{open('serve.log').read()}")
    if time.monotonic() > deadline:
        sys.exit(f"no /healthz after 300 s:\n{open('serve.log').read()}")
    time.sleep(1)
body, _ = sample_request(BUNDLED)
req = urllib.request.Request(f"{url}/v1/ctr", data=json.dumps(body).encode(),
                             headers={"Content-Type": "application/json"})
with urllib.request.urlopen(req, timeout=60) as r:
    answer = json.loads(r.read())
scores = answer["scores"]
assert len(scores) == len(body["candidates"]) and all(0 < s < 1 for s in scores), answer
print(f"POST /v1/ctr: {len(scores)} scores from {answer['model']}")
PY
stamp "shut down"
kill -TERM "$SERVER_PID"
wait "$SERVER_PID"   # its exit status: 0 when SIGTERM stopped it the orderly way
SERVER_PID=""
grep -q "^stopping" serve.log
stamp "ok"
