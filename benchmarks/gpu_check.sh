#!/usr/bin/env bash
# The CUDA checks, run once on a lent GPU machine (no network there): torch on cuda, llama.cpp
# built with CUDA, onnxruntime's CUDA execution provider. Greedy parity against the torch CPU
# oracle; the engine's per-token host cost at vocab 151,936 (`bench --host-overhead`, this
# machine's CPU: on a GPU the decode step is ~5 ms, so host cost matters most there); r4b-edge vs
# raw llama-cpp-python on CUDA at R-4B's true width and vocabulary, greedy and sampled
# (`bench --true-shape`, TRUE_SHAPE_LAYERS decoder layers, default 4); then
# `r4b-edge bench --device cuda`. Results go to $OUT (gpu_check.log, bench/).
#
# Needs, beside the repo: .whl/ holding the wheels the image lacks (gguf, diskcache, jsonschema and
# its needs, transformers==5.24.0 as pinned; torch is the image's) and the llama-cpp-python sdist
# (vendor/llama.cpp models/docs stripped to fit the transfer), runs/post/gguf/{F16,Q4_K_M+mmproj-F16}
# and runs/post/onnx/onnx-int8 (from `r4b-edge export`). The machine's own python3 holds torch.
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/r4b-gpu}
SITE=/tmp/r4b-site
M=$REPO/r4b_edge/assets/model
G=$REPO/runs/post/gguf
mkdir -p "$OUT/bench"
export PYTHONUNBUFFERED=1 PYTHONPATH=$SITE
cd /tmp  # import r4b_edge from the installed copy, not the source folder
stamp() { echo "=== $* $(date -u +%T)"; }
{
stamp environment
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c "import sys, torch, onnxruntime as o; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.version.cuda); print('onnxruntime', o.__version__, o.get_available_providers())"
stamp install r4b-edge
python3 -m pip install -q --no-index --no-deps --no-build-isolation --upgrade --target $SITE "$REPO"/.whl/*.whl "$REPO" || exit 1
stamp host overhead per token at vocab 151936
python3 -m r4b_edge.apps.cli bench --host-overhead --out "$OUT/bench/host"
echo "host overhead exit status $?"
stamp parity torch cuda, onnx cuda
python3 -m r4b_edge.benchmarks.card.gpu_parity --model "$M" --targets "torch:cuda,onnx:cuda=$REPO/runs/post/onnx/onnx-int8" --per-family 5 \
  --save-reference "$OUT/torch_cpu_replies.json"
stamp build llama-cpp-python with CUDA
t0=$(date +%s)
python3 -c "import llama_cpp, sys; sys.exit(0 if llama_cpp.llama_supports_gpu_offload() else 1)" 2>/dev/null && echo "(already built on this machine)" ||
CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90" CMAKE_BUILD_PARALLEL_LEVEL=16 timeout ${BUILD_TIMEOUT:-330} \
  python3 -m pip install --no-index --no-deps --no-build-isolation --target $SITE "$REPO"/.whl/llama_cpp_python-*.tar.gz \
  > "$OUT/llama_build.log" 2>&1
echo "llama-cpp-python CUDA build: rc $? in $(( $(date +%s) - t0 )) s"
tail -3 "$OUT/llama_build.log"
stamp parity llama cuda, in a process without torch
python3 -X faulthandler -m r4b_edge.benchmarks.card.gpu_parity --model "$M" --targets "llama:cuda=$G/F16,llama:cuda=$G/Q4_K_M+mmproj-F16" \
  --per-family 5 --reference "$OUT/torch_cpu_replies.json"
echo "llama parity exit status $?"
stamp true-shape decode on cuda: ours vs raw llama-cpp-python with the llama.cpp sampler chain
python3 -X faulthandler -m r4b_edge.apps.cli bench --true-shape --true-shape-layers ${TRUE_SHAPE_LAYERS:-4} --device cuda \
  --threads 4 --cache /tmp/r4b-bench-cache --out "$OUT/bench/true_shape"
echo "true-shape exit status $?"
for b in torch llama; do  # one backend per process, for the same reason
  stamp bench cuda $b
  python3 -X faulthandler -m r4b_edge.apps.cli bench --backends $b --device cuda --cache /tmp/r4b-bench-cache \
    --eval-per-family ${BENCH_EVAL:-8} --image both --max-tokens 64 --modes auto,think,no-think --n-gen 64 --n-prompt 256 \
    --repeats ${BENCH_REPEATS:-3} --warmup 1 --out "$OUT/bench/$b"
  echo "bench $b exit status $?"
done
stamp done
} 2>&1 | tee "$OUT/gpu_check.log"
