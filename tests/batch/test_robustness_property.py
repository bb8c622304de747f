"""Property test (issue 9): random parquet and JSONL inputs through the real pipeline (tiny model).

Whatever the cells hold (random unicode with surrogates and control characters, nulls, empty and huge
cells, random column types, random ids), the job exits cleanly, the output ids equal the input ids
exactly, and every row is a result or an error row with a documented code. Few examples: each one is a
real job on real Ray + vLLM.
"""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.helpers import job_dict  # noqa: E402
from turbo_batch.batch.run import run_job  # noqa: E402
from turbo_batch.batch.write import read_output  # noqa: E402
from turbo_batch.errors import RowError  # noqa: E402
from turbo_batch.spec import JobSpec  # noqa: E402

pytestmark = pytest.mark.slow
CODES = {str(c) for c in RowError}
TEXT = st.one_of(
    st.none(),
    st.just(""),
    st.text(st.characters(codec=None, exclude_categories=()), max_size=40),  # surrogates, controls
    st.builds(lambda n: "huge " * n, st.integers(300, 1500)),
)
OTHER = st.one_of(st.none(), st.integers(-(2**40), 2**40), st.floats(allow_nan=False), st.booleans(), TEXT)


@st.composite
def inputs(draw):
    n = draw(st.integers(1, 12))
    texts = draw(st.lists(TEXT, min_size=n, max_size=n))
    kind = draw(st.sampled_from(["int", "str", "none"]))
    if kind == "int":
        ids = draw(st.lists(st.integers(-(2**62), 2**62), min_size=n, max_size=n, unique=True))
    elif kind == "str":
        ids = draw(st.lists(st.text(max_size=8), min_size=n, max_size=n, unique=True))
    else:
        ids = None
    extra = draw(st.lists(OTHER, min_size=n, max_size=n))
    fmt = draw(st.sampled_from(["parquet", "jsonl"]))
    return fmt, texts, ids, extra


def _write(root, fmt, texts, ids, extra):
    if fmt == "jsonl":
        lines = []
        for i, t in enumerate(texts):
            obj = {"text": t, "extra": extra[i]}
            if ids is not None:
                obj["uid"] = ids[i]
            lines.append(json.dumps(obj))  # ensure_ascii: lone surrogates travel as \\udXXX escapes
        (root / "in.jsonl").write_text("\n".join(lines) + "\n")
        return root / "in.jsonl"
    enc = [None if t is None else t.encode("utf-8", "surrogatepass") for t in texts]
    cols = {"text": pa.array(enc, pa.binary()).view(pa.string())}  # surrogates as invalid UTF-8 bytes
    cols["extra"] = pa.array([None if v is None else json.dumps(v) for v in extra], pa.string())
    if ids is not None:
        cols["uid"] = pa.array(ids)
    pq.write_table(pa.table(cols), root / "in.parquet")
    return root / "in.parquet"


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(case=inputs())
def test_random_inputs_keep_every_id_exactly_once(tiny_pool, tiny_model, out_root, case):
    fmt, texts, ids, extra = case
    work = out_root / "case"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    path = _write(work, fmt, texts, ids, extra)
    if ids is not None and fmt == "parquet" and isinstance(ids[0], str):
        ids = [i.encode("utf-8", "surrogatepass").decode("utf-8", "replace") for i in ids]
    data = job_dict(
        tiny_model,
        path,
        work / "o",
        task={"type": "generate", "max_tokens": 2},
        input={"id_column": "uid"} if ids is not None else {},
        prompt={"template": "{{ text }} | {{ extra }}"},
        output={"keep_columns": ["extra"]},
    )
    run_job(JobSpec.model_validate(data), pool=tiny_pool, restart=True)
    out = read_output(work / "o").to_pylist()
    got = [r["row_id"] for r in out]
    assert len(got) == len(set(got))
    want = list(range(len(texts))) if ids is None else ids
    assert sorted(got, key=repr) == sorted(want, key=repr)
    for r in out:
        assert (r["error_code"] is None and r["text"] is not None) or r["error_code"] in CODES, r
