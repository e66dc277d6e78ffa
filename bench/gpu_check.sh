#!/usr/bin/env bash
# The GPU check: on a bare GPU machine (torch + CUDA, triton, nvcc, ninja; no network) build the
# CUDA kernels for sm_90, run the GPU tests and the GPU benchmark, and write logs and results
# tables to the folder given. Ends in under 8 minutes on an H100/H200 (each phase has its own
# time limit, and all of them together at most GPU_CHECK_SECONDS, default 480, so a hang in one
# still leaves the others' results).
#
#   bench/gpu_check.sh OUT_DIR
#
# OUT_DIR gets: env.txt (card, driver, versions), build.log, tests-*.log (pytest -rfE summaries),
# sweep.log (the CUDA kernels alone at several launch shapes, fp32 and bf16,
# bench/cuda_sweep.cu), host.log (the host time of a many-small step, bench/host_time.py), and
# NAME.log and NAME/latest.{md,csv,png} of each bench phase: lowp (bf16 + fp32 master AdamW,
# bf16 state), muon (Muon vs torch.optim.Muon), family (Lion, NovoGrad, FAdam), clip (the full
# AMP step), bf16 (AdamW in bf16), main (AdamW, SGD, SGDW fp32 on every shape list). Copy the
# tables into bench/GPU_RESULTS.md with the card and date.
#
# For a short re-check: GPU_CHECK_PHASES (default "special builds host reference lowp muon family
# clip bf16 main") picks phases, GPU_CHECK_SWEEP ("ILP THREADS CHUNK_LOG2 STREAMING [MIN_BLOCKS];...")
# the sweep's variants, and GPU_CHECK_BUDGET (default 3) the main bench's seconds per group.
# Carry .whl (the family's peers as wheels) and run it in one call of about 560 s (runs 2-4).
set -uo pipefail
out=${1:?usage: bench/gpu_check.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
start=$(date +%s)
deadline=$((start + ${GPU_CHECK_SECONDS:-480}))
elapsed() { echo "[gpu_check $(($(date +%s) - start))s] $*"; }
limit() {  # limit SECONDS: SECONDS, or what is left before the deadline if that is less
  local left=$((deadline - $(date +%s)))
  echo $((left < $1 ? left : $1))
}
failed=()
export PYTHONUNBUFFERED=1

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -2
  git log -1 --format='onepass %h %s' 2>/dev/null
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

# The launch-constant sweep (bench/cuda_sweep.cu: the CUDA kernels alone against a device copy),
# built in the background while the extension builds: "ILP THREADS CHUNK_LOG2 STREAMING".
# fp32 settled on "2 512 14 0" (runs 2-5; 4 is ahead in the sweep alone); each binary also times
# bf16 AdamW at 1, 2 and 4 times the chunk, which runs 4-5 found at 59-61% of copy (Triton: 90%).
# A fifth field sets ONEPASS_CUDA_MIN_BLOCKS (multi_tensor.cuh): 2 caps registers at 64 (run 5:
# bf16 66-70%, but 17% with ILP 4). Run 5's bf16 gains came with fewer threads a block (256:
# up to 72%): at 106 registers a thread one 512-thread block fills an SM, so nothing overlaps
# each block's start (its table entry, then its segment). 128 threads tests that further.
SWEEP=("2 512 14 0" "4 512 14 0" "2 128 14 0" "1 128 14 0" "2 256 14 0" "1 256 14 0")
if [ -n "${GPU_CHECK_SWEEP:-}" ]; then IFS=';' read -r -a SWEEP <<< "$GPU_CHECK_SWEEP"; fi
mkdir -p "$out/sweep"
for v in "${SWEEP[@]}"; do
  read -r ilp threads chunk streaming blocks <<< "$v"
  blocks=${blocks:-1}
  name="i${ilp}_t${threads}_c${chunk}_s${streaming}_b${blocks}"
  nvcc -O3 -std=c++20 --fmad=false -arch=sm_90 -Icsrc/include -Icsrc -DONEPASS_CUDA_ILP="$ilp" \
    -DONEPASS_CUDA_THREADS="$threads" -DONEPASS_CUDA_CHUNK_LOG2="$chunk" \
    -DONEPASS_CUDA_STREAMING="$streaming" -DONEPASS_CUDA_MIN_BLOCKS="$blocks" \
    bench/cuda_sweep.cu csrc/cuda/optimizers.cu -o "$out/sweep/$name" > "$out/sweep/$name.log" 2>&1 &
done

elapsed "build (sm_90, CUDA kernels required)"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} ONEPASS_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
if ! timeout "$(limit 300)" python3 -m pip install --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1; then
  tail -60 "$out/build.log"
  elapsed "BUILD FAILED"
  exit 1
fi
# The family bench's peers, carried as wheels (the machine has no network): pip download
# --no-deps lion-pytorch==0.2.5 pytorch-optimizer==4.1.0 -d .whl, then carry .whl.
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-deps --no-index .whl/*.whl >> "$out/build.log" 2>&1
fi
python3 -c "import onepass; from onepass._engine import cuda_kernels_built; print('cuda kernels:', cuda_kernels_built())" | tee -a "$out/env.txt"

# One pytest process per phase, so that a crashed context (an illegal address) ends only its own.
phases=" ${GPU_CHECK_PHASES:-special builds host reference lowp muon family clip bf16 main} "
tests() {  # tests NAME TIME_LIMIT PYTEST_ARGS...
  [[ "$phases" == *" $1 "* ]] || return 0
  local name=$1 seconds
  seconds=$(limit "$2")
  shift 2
  if [ "$seconds" -lt 20 ]; then failed+=("tests-$name: no time left"); return; fi
  elapsed "tests: $name (at most ${seconds}s)"
  timeout "$seconds" python3 -m pytest -q -rfE -p no:cacheprovider --timeout 150 "$@" \
    > "$out/tests-$name.log" 2>&1
  local rc=$?
  grep -E "^(FAILED|ERROR)|passed|failed|Timeout" "$out/tests-$name.log" | tail -40
  [ $rc -eq 0 ] || failed+=("tests-$name rc=$rc")
}

bench() {  # bench NAME TIME_LIMIT BENCH_ARGS...
  [[ "$phases" == *" $1 "* ]] || return 0
  local name=$1 seconds
  seconds=$(limit "$2")
  shift 2
  if [ "$seconds" -lt 20 ]; then failed+=("bench-$name: no time left"); return; fi
  elapsed "bench: $name (at most ${seconds}s)"
  # torch's for-loop steps launch a kernel per tensor and op: on many-small a step takes seconds,
  # which would leave the later phases no time (the CPU bench keeps them).
  timeout "$seconds" python3 -m bench.run --device cuda --out "$out/$name" --skip "torch forloop" \
    "$@" > "$out/$name.log" 2>&1
  local rc=$?
  sed -n '/^| /p' "$out/$name.log"
  [ $rc -eq 0 ] || { tail -30 "$out/$name.log"; failed+=("bench-$name rc=$rc"); }
}

wait  # the sweep's builds
elapsed "sweep: the CUDA kernels alone vs a device copy"
for v in "${SWEEP[@]}"; do
  read -r ilp threads chunk streaming blocks <<< "$v"
  name="i${ilp}_t${threads}_c${chunk}_s${streaming}_b${blocks:-1}"
  if [ -x "$out/sweep/$name" ]; then
    timeout 60 "$out/sweep/$name" >> "$out/sweep.log" 2>&1 || echo "$name failed" >> "$out/sweep.log"
  else
    { echo "$name did not build:"; tail -5 "$out/sweep/$name.log"; } >> "$out/sweep.log"
  fi
done
cat "$out/sweep.log"
rm -rf "$out/sweep"

# What only a GPU shows first: > 2^31 elements, found_inf, CUDA graphs, no host sync,
# torch.compile on CUDA.
tests special 150 tests/test_gpu.py tests/test_compile.py -k "not matches_reference and not agree"
# The CPU kernels' builds give the same bits: scalar, avx2 and, where this host has it, avx512
# (a CI host may lack AVX-512). 252 tests: ~25 s with pytest's start.
tests builds 90 tests/test_numerics.py -k capabilities_agree
# The host side of a many-small step, with and without the parallel table scan on CUDA launches.
if [[ "$phases" == *" host "* ]]; then
  elapsed "host: step() host time on many-small, serial vs parallel table scan"
  for scan in 0 1; do
    echo "ONEPASS_PARALLEL_SCAN_CUDA=$scan" >> "$out/host.log"
    ONEPASS_PARALLEL_SCAN_CUDA=$scan timeout "$(limit 40)" python3 -m bench.host_time \
      --device cuda --shapes many-small >> "$out/host.log" 2>&1 || failed+=("host scan=$scan")
  done
  cat "$out/host.log"
fi
# Every algorithm and option against the float64 reference, both backends, every dtype; the
# Triton tests compiled. Several processes: most of the time is Triton compiling kernels and the
# float64 reference on the CPU (2 threads per process, so that 8 do not oversubscribe the cores).
# (The CPU's sm_90 compile-only checks are left out: here the kernels compile and run for real.)
OMP_NUM_THREADS=2 tests reference 200 -n 8 tests/test_gpu.py tests/test_triton.py \
  -k "(matches_reference or agree or not test_gpu) and not sm90"
# The benches, those that have not yet given a GPU table first: each gets what its own limit and
# the deadline leave.
# Low-precision storage: bf16 params + fp32 masters vs the copy / torch fused / copy-back
# composition; fp32 params with bf16 state vs torch fused (fp32 state).
bench lowp 60 --algorithms adamw-master adamw-bf16-state --shapes gpt2-small one-big many-small \
  --budget 2 --rounds 10
# Muon against torch.optim.Muon on GPT-2 small's matrices.
bench muon 40 --algorithms muon --budget 3 --rounds 10
# The weight-decay family. Their peers (lion-pytorch, pytorch-optimizer) are pure-Python wheels the
# GPU machine lacks: carry them as wheels (see the build above) or the rows compare with torch fused.
bench family 70 --algorithms lion novograd fadam --shapes gpt2-small many-small one-big \
  --budget 2 --rounds 10
# The full AMP step: onepass.GradScaler + max_grad_norm vs unscale_ + clip_grad_norm_ + fused.
bench clip 50 --algorithms adamw-clip --shapes gpt2-small one-big many-small --budget 2
# bf16 params, grads and state (AdamW; torch fused steps bf16 too).
bench bf16 40 --dtype bfloat16 --algorithms adamw --shapes gpt2-small one-big --budget 2 \
  --rounds 10
# The main job: onepass cuda / triton vs torch.optim fused / foreach / for-loop, fp32.
bench main 150 --budget "${GPU_CHECK_BUDGET:-3}" --rounds 12
elapsed "done${failed:+: failed: ${failed[*]}}"
[ ${#failed[@]} -eq 0 ]
