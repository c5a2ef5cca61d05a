#!/usr/bin/env bash
# Every check of issue 17 that needs a GPU, in one go on a CUDA machine (aim: < 8 minutes).
#   1. the CUDA test items, `pytest -m cuda`: the rule table on CUDA (float64), autocast, the BackPACK
#      comparisons (first order, GGN family) in float32, the quickstart example
#      -> OUT/pytest_cuda.txt (counts on its last line)
#   2. the bench's cells of issue 17's targets, --device cuda (fxcurv with its default
#      backend="auto", BackPACK, autograd): seed CNN and 3C3D at batch 128 with their own
#      quantities, docs/benchmark.md's GPU section updated -> OUT/bench_cuda.{md,json};
#      then All-CNN-C (C = 100), the GPT-2-small block and the tanh MLP with 100 classes
#      -> OUT/bench_cuda_large.{md,json}
#   3. the chunked exact GGN's peak on All-CNN-C, C = 100, N = 128, column_chunk "auto" vs
#      None -> OUT/chunk_peak.txt
# Each stage runs under its own time limit (STAGE1_S, STAGE2_S, STAGE3_S, STAGE4_S seconds);
# one that runs out keeps what it wrote (the bench's JSON is written after every cell).
# Usage: .ci/gpu_check.sh [OUT]   (PYTHON: the interpreter, default python)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${1:-gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

$PY - <<'PYEOF' 2>&1 | tee "$OUT/machine.txt" || exit 2
import torch
assert torch.cuda.is_available(), "no CUDA device"
print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name())
PYEOF

echo "== 1. pytest -m cuda"
timeout "${STAGE1_S:-200}" $PY -m pytest -q -m cuda -p no:cacheprovider -rs \
    tests/test_rules.py tests/test_backpack.py tests/test_ggn_backpack.py \
    tests/test_examples.py tests/test_safety.py > "$OUT/pytest_cuda.txt" 2>&1
echo "exit $?" >> "$OUT/pytest_cuda.txt"
tail -n 4 "$OUT/pytest_cuda.txt"

echo "== 2. bench: seed CNN and 3C3D, batch 128"
timeout "${STAGE2_S:-150}" $PY -m fxcurv.bench --device cuda --workloads seed_cnn,3c3d \
    --batch-size 128 --repeats 10 --budget 1 --no-memory --json "$OUT/bench_cuda.json" \
    --update-doc docs/benchmark.md > "$OUT/bench_cuda.md" 2>&1
echo "exit $?" >> "$OUT/bench_cuda.md"
tail -n 12 "$OUT/bench_cuda.md"

echo "== 3. bench: All-CNN-C (C=100), GPT-2-small block, tanh MLP with 100 classes"
timeout "${STAGE3_S:-90}" $PY -m fxcurv.bench --device cuda \
    --workloads all_cnn_c,gpt2_block,mlp_tanh_c100 --repeats 5 --budget 1 --no-memory \
    --json "$OUT/bench_cuda_large.json" > "$OUT/bench_cuda_large.md" 2>&1
echo "exit $?" >> "$OUT/bench_cuda_large.md"
tail -n 12 "$OUT/bench_cuda_large.md"

echo "== 4. chunked exact GGN peak, All-CNN-C, C=100, N=128"
timeout "${STAGE4_S:-60}" $PY - > "$OUT/chunk_peak.txt" 2>&1 <<'PYEOF'
import time
import torch
import fxcurv
from fxcurv.bench.workloads import prepare

torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
setup = prepare("all_cnn_c", "cuda", 128, 1)
for chunk in ("auto", None):
    step = fxcurv.compile(setup.model, setup.loss_fn, ["diag_ggn_exact"], column_chunk=chunk)
    step(setup.x, setup.y)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    step(setup.x, setup.y)
    torch.cuda.synchronize()
    took = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
    print(f"column_chunk={chunk!r}: peak {peak:.2f} GiB above the inputs, {took * 1e3:.0f} ms")
    del step
    torch.cuda.empty_cache()
PYEOF
echo "exit $?" >> "$OUT/chunk_peak.txt"
cat "$OUT/chunk_peak.txt"
