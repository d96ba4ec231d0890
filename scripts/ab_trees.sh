#!/usr/bin/env bash
# Two versions of fastcnn side by side: the training step and the inference of each config, for the
# tree BASE (e.g. `git archive d6e1cc2 | tar -x -C /tmp/base`) and this checkout, alternated.
#
#   scripts/ab_trees.sh BASE THREADS ROUNDS CONFIG...
#
# Each run is its own process (scripts/ab_step.py: the config's optimizer at its batch size, and the
# evaluation forward at batch 256, each timed for 3 s after 2 warm-up steps) and prints one JSON line
# with "tree" (BASE, or "." for this checkout), "train_img_s" and "eval_img_s". First every kernel of
# both trees is compiled, all at once (each tree keeps its own Numba cache beside its sources).
# PYTHON (default python3; a relative path is taken from the current directory) is the interpreter,
# with numpy and numba installed.
set -u
base=${1:?usage: scripts/ab_trees.sh BASE THREADS ROUNDS CONFIG...}
threads=$2; rounds=$3; shift 3
here=$(cd "$(dirname "$0")/.." && pwd)
base=$(cd "$base" && pwd)
py=${PYTHON:-python3}
# The runs start in /tmp: a relative interpreter path (e.g. PYTHON=.venv/bin/python) is made absolute.
case $py in /*) ;; */*) d=$(cd "$(dirname "$py")" 2>/dev/null && pwd) && py=$d/$(basename "$py") ;; esac
command -v "$py" >/dev/null || { echo "scripts/ab_trees.sh: PYTHON=${PYTHON:-python3}: no such interpreter" >&2; exit 2; }
export NUMBA_NUM_THREADS=$threads FASTCNN_COMPILE_HELPERS=0 PYTHONUNBUFFERED=1
run() {  # run TREE CONFIG: one timed process, from a neutral directory
    (cd /tmp && PYTHONPATH=$1 TREE=$1 timeout "${AB_LIMIT:-300}" "$py" "$here/scripts/ab_step.py" "$2")
}
SECONDS=0
for tree in "$base" "$here"; do for c in "$@"; do run "$tree" "$here/$c" >/dev/null 2>&1 & done; done
wait
echo "compiled: $SECONDS s"
for r in $(seq "$rounds"); do for c in "$@"; do for tree in "$base" "$here"; do
    run "$tree" "$here/$c"
done; done; done
