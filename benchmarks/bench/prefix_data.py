"""bench_prefix.py's rows and job: N documents x Q questions of random words, sized in the model's
tokens and written in shuffled order, and the turbo-batch job that classifies them yes/no."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from bench import common as bb

SYSTEM = "Answer the question about the document with yes or no."
TEMPLATE = "Document:\n{{ doc }}\n\nQuestion: {{ question }}"
LABELS = ["yes", "no"]


def prefix_tables(p: dict[str, Any], tokenizer: Any, seed: int = 0):
    """(shuffled rows, warm-up rows): docs × questions of random words sized in this tokenizer's tokens."""
    import pyarrow as pa

    vocab = bb.words(seed)
    r = random.Random(seed + 1)
    sample = " ".join(r.choice(vocab) for _ in range(400))
    per_word = len(tokenizer.encode(sample, add_special_tokens=False)) / 400

    def text(tokens: int) -> str:
        return " ".join(r.choice(vocab) for _ in range(max(1, round(tokens / per_word))))

    questions = [text(p["question_tokens"]) + "?" for _ in range(p["questions"])]

    def rows(first_doc: int, n_docs: int) -> list[dict[str, Any]]:
        out = []
        for d in range(first_doc, first_doc + n_docs):
            doc = text(p["doc_tokens"]) + "."
            out += [
                {"id": d * len(questions) + q, "doc_id": d, "doc": doc, "question": questions[q]}
                for q in range(len(questions))
            ]
        return out

    main = rows(0, p["docs"])
    random.Random(seed + 2).shuffle(main)
    return pa.Table.from_pylist(main), pa.Table.from_pylist(rows(p["docs"], p["warmup_docs"]))


def job_dict(p: dict[str, Any], model: Path, inp: Path, out: Path) -> dict[str, Any]:
    return {
        "name": "bench-prefix",
        "input": {"path": str(inp), "text_columns": ["doc", "question"], "id_column": "id"},
        "task": {"type": "classify", "labels": LABELS},
        "prompt": {"system": SYSTEM, "template": TEMPLATE},  # order: auto (the default)
        "model": {"path": str(model), "preset": p["model_preset"], "engine": dict(p["engine"])},
        "output": {"dir": str(out), "part_rows": p["part_rows"]},
        "cluster": {"address": "local"},
    }
