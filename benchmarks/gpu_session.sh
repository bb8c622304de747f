#!/usr/bin/env bash
# What turbo-batch runs on a lent H100/H200 (no registry there: vLLM 0.26 + Ray come from the .gpu
# bundles, see ../shared/gpu/README.md). Call after `bash .gpu/install.sh`, from the repo root:
#   bash benchmarks/gpu_session.sh checks   # GPU test of the pipeline + NVFP4 (Turbo recipe) load via Marlin
#   bash benchmarks/gpu_session.sh bench    # raw vLLM vs turbo-batch vs ray.data.llm, side by side
#   bash benchmarks/gpu_session.sh serve    # online latency with a batch job on the same Serve engine
# Results land in $OUT (the device tool brings them back) and are copied into benchmarks/results/ here.
set -uo pipefail
export PYTHONPATH=/root/site:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
case "${1:-}" in
  checks)
    timeout 240 python -m pytest -q -p no:cacheprovider -s tests/test_gpu.py 2>&1 | tail -25 | tee "$OUT/test_gpu.log"
    timeout 300 python benchmarks/gpu_nvfp4_load.py --workdir /root/nvfp4 --json "$OUT/nvfp4_load_gpu.json" \
      > "$OUT/nvfp4_load_gpu.log" 2>&1
    echo "nvfp4 load rc=$?"; tail -30 "$OUT/nvfp4_load_gpu.log"
    ;;
  bench)
    timeout 540 python benchmarks/bench_batch.py --preset gpu-gemma4 --workdir /root/bb --model-dir /root/bb-model \
      --results-dir "$OUT" 2>&1 | tail -40 | tee "$OUT/bench.log"
    ;;
  serve)  # online latency idle vs with a --via-serve batch job, gate values of jobs/serve_turbo.yaml
    export TURBO_BATCH_CACHE=$PWD/benchmarks/_gpu_cache   # the Rotten Tomatoes parquet, carried
    timeout 480 python benchmarks/serve_priority.py --model gpu-random --preset auto --num-cpus 8 \
      --batch-rows 2500 --idle-requests 60 --arrival-s 0.05 --engine '{"max_model_len": 2048}' \
      --gate '{"batch_rows_while_online": 8, "batch_rows_max": 64}' \
      --out "$OUT/serve_priority_gpu.md" --json "$OUT/serve_priority_gpu.json" > "$OUT/serve.log" 2>&1
    echo "serve_priority rc=$?"; tail -40 "$OUT/serve.log"
    ;;
  *) echo "usage: $0 checks|bench|serve" >&2; exit 2 ;;
esac
