#!/usr/bin/env bash
# Thread scaling and the suite against PyTorch on a many-core machine, in one go.
#
#   scripts/bench_many_cores.sh OUTDIR [THREADS] [PYTHON]
#
# THREADS defaults to every core; PYTHON to python3. Writes to OUTDIR:
#   env.txt      the processor, core count and library versions;
#   warm.txt     the cold compile: every suite network's kernels compiled at once, one process each;
#   sweep.txt    the seed network's training step at batch 256 on 1, 2, 4, ... THREADS threads,
#                and beside PyTorch at THREADS threads (sweep.json: every raw number);
#   suite.txt    the suite against PyTorch at THREADS threads (suite.json).
# Each step has a time limit, so a slow machine still returns what it measured (the .txt files hold
# every run's figures as they come; WARM_LIMIT, SWEEP_LIMIT and SUITE_LIMIT, in seconds, override the limits).
# SUITE_ONLY=name,name,... limits the suite to those networks.
set -u
out=${1:?usage: scripts/bench_many_cores.sh OUTDIR [THREADS] [PYTHON]}
py=${3:-python3}
threads=${2:-$($py -c 'import os; print(len(os.sched_getaffinity(0)))')}
cd "$(dirname "$0")/.." || exit 1
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

{ date -u; uname -a; nproc; lscpu 2>/dev/null | head -25
  $py -c 'import numba, numpy, llvmlite.binding as b; print("numba", numba.__version__, "numpy", numpy.__version__, "cpu", b.get_host_cpu_name())'
  $py -c 'import torch; print("torch", torch.__version__, torch.backends.cpu.get_cpu_capability())'
} >"$out/env.txt" 2>&1

# The cold compile, all networks at once (kernels shared between networks are compiled more than
# once, in parallel); the timed runs below then load every kernel from Numba's cache.
configs="configs/mnist.yaml configs/mnist_bn.yaml configs/resnet20_cifar10.yaml configs/mobilenet_cifar10.yaml $(ls configs/bench/*.yaml)"
SECONDS=0
for c in $configs; do
    FASTCNN_COMPILE_HELPERS=0 timeout ${WARM_LIMIT:-150} $py -m fastcnn bench "$c" --batch-size 4 --repeats 1 --threads 1 \
        >"$out/warm_$(basename "$c" .yaml).log" 2>&1 &
done
wait
echo "cold compile, $(echo "$configs" | wc -w) networks in parallel: ${SECONDS} s" >"$out/warm.txt"
tail -n 3 "$out"/warm_*.log >>"$out/warm.txt"
rm -f "$out"/warm_*.log

sweep=1
t=2
while [ "$t" -lt "$threads" ]; do sweep="$sweep,$t"; t=$((t * 2)); done
sweep="$sweep,$threads"
timeout ${SWEEP_LIMIT:-120} $py scripts/bench_vs_torch.py --config configs/mnist.yaml --batch-sizes 256 --threads "$threads" \
    --rounds 2 --threads-sweep --sweep-threads "$sweep" --sweep-batch 256 --json "$out/sweep.json" \
    >"$out/sweep.txt" 2>&1

timeout ${SUITE_LIMIT:-300} $py scripts/bench_vs_torch.py --suite ${SUITE_ONLY:+--only "$SUITE_ONLY"} --threads "$threads" --rounds 1 --no-layers \
    --json "$out/suite.json" >"$out/suite.txt" 2>&1
echo "done: $(date -u)" >>"$out/env.txt"
