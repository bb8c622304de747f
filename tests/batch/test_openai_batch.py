"""OpenAI Batch files: each line gets the serve endpoint's checks; the real pipeline (tiny model) turns
an input file into an output file the `openai` package's own types parse, with exactly the input's ids."""

from __future__ import annotations

import json

import pytest

from tests.helpers import job_dict
from turbo_batch.batch import openai_batch
from turbo_batch.errors import JobError
from turbo_batch.spec import JobSpec


def _line(cid, url="/v1/chat/completions", body=None, **extra):
    body = (
        body
        if body is not None
        else {"model": "tiny", "messages": [{"role": "user", "content": f"hi {cid}"}]}
    )
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body, **extra})


BAD = {  # custom_id → (line, the check that refuses it)
    "bad-url": (_line("bad-url", url="/v1/embeddings"), "url"),
    "bad-method": (_line("bad-method", method="GET"), "method"),
    "no-messages": (_line("no-messages", body={"model": "m", "messages": []}), "messages"),
    "template": (_line("template", body={"model": "m", "messages": [{"role": "user", "content": "x"}],
                                          "chat_template": "{{ evil }}"}), "templates come from"),
    "too-many-tokens": (_line("too-many-tokens", body={"model": "m", "max_tokens": 10**6,
                                                      "messages": [{"role": "user", "content": "x"}]}), "exceeds the limit"),
    "tools": (_line("tools", body={"model": "m", "tools": [{"type": "function"}],
                                   "messages": [{"role": "user", "content": "x"}]}), "not supported"),
    "empty-prompt": (_line("empty-prompt", url="/v1/completions", body={"model": "m", "prompt": ""}), "empty"),
}  # fmt: skip


def test_each_line_gets_the_serve_endpoints_checks():
    limits = openai_batch._limits()
    for cid, (line, why) in BAD.items():
        row = openai_batch.parse_line(line.encode(), 1, limits)
        assert row["custom_id"] == cid and row["_input_error"].startswith("INVALID_REQUEST:"), cid
        assert why in row["_input_error"], (cid, row["_input_error"])
    junk = openai_batch.parse_line(b"{not json", 7, limits)
    assert junk["custom_id"] == "_line7" and junk["_input_error"].startswith("BAD_INPUT_LINE:")
    ok = openai_batch.parse_line(_line("a").encode(), 1, limits)
    assert ok["_input_error"] is None and json.loads(ok["openai_body"])["messages"][0]["content"] == "hi a"


def test_a_lines_sampling_fields_become_its_own_overrides():
    limits = openai_batch._limits()
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 7, "stop": "END",
            "temperature": 0.5, "seed": 3, "ignore_eos": True, "presence_penalty": 0.1}  # fmt: skip
    row = openai_batch.parse_line(_line("s", body=body).encode(), 1, limits)
    assert json.loads(row["openai_body"])["sampling"] == {
        "max_tokens": 7,
        "stop": ["END"],
        "temperature": 0.5,
        "seed": 3,
        "extra": {"ignore_eos": True, "presence_penalty": 0.1},
    }
    plain = openai_batch.parse_line(_line("p").encode(), 1, limits)
    assert json.loads(plain["openai_body"])["sampling"] == {}  # unset fields: the job's settings apply
    for refused in ({"stream": True}, {"logprobs": True}):
        r = openai_batch.parse_line(_line("r", body={**body, **refused}).encode(), 1, limits)
        assert (
            r["_input_error"].startswith("INVALID_REQUEST:") and "not supported in batch" in r["_input_error"]
        )


def test_openai_batch_needs_generate_and_uses_custom_id(tmp_path):
    job = job_dict(
        tmp_path,
        "in.jsonl",
        "o",
        task={"type": "generate", "max_tokens": 4},
        input={"format": "openai_batch"},
    )
    assert JobSpec.model_validate(job).input.id_column == "custom_id"
    with pytest.raises(ValueError, match="task must be generate"):
        JobSpec.model_validate({**job, "task": {"type": "classify", "labels": ["a", "b"]}})
    with pytest.raises(ValueError, match=r"needs input\.format openai_batch"):
        JobSpec.model_validate(job_dict(tmp_path, "in.jsonl", "o", output={"format": "both"}))


def test_duplicate_custom_ids_are_refused_before_the_job_starts(tiny_model, out_root):
    from turbo_batch.batch.plan import preflight

    (out_root / "in.jsonl").write_text(_line("a") + "\n" + _line("b") + "\n" + _line("a") + "\n")
    job = job_dict(tiny_model, out_root / "in.jsonl", "o", task={"type": "generate", "max_tokens": 4},
                   input={"format": "openai_batch"})  # fmt: skip
    with pytest.raises(JobError, match="duplicate"):
        preflight(JobSpec.model_validate(job))


@pytest.mark.slow
def test_round_trip_on_the_real_pipeline(tiny_pool, tiny_model, out_root):
    from openai.types import Completion
    from openai.types.chat import ChatCompletion

    from turbo_batch.batch.run import run_job
    from turbo_batch.batch.write import read_output

    good_chat = [f"chat-{i}" for i in range(30)]
    good_cmpl = [f"cmpl-{i}" for i in range(10)]
    lines = [_line(c) for c in good_chat]
    lines += [_line(c, url="/v1/completions", body={"model": "tiny", "prompt": f"Once upon {c}", "max_tokens": 4})
              for c in good_cmpl]  # fmt: skip
    lines += [line for line, _ in BAD.values()] + ["this is not json"]
    # a line's own max_tokens (and ignore_eos, so the random model cannot stop early) beats the job's 4
    lines.append(_line("long", body={"model": "tiny", "max_tokens": 9, "ignore_eos": True,
                                     "messages": [{"role": "user", "content": "count"}]}))  # fmt: skip
    lines.append(_line("short", body={"model": "tiny", "max_tokens": 1,
                                      "messages": [{"role": "user", "content": "one"}]}))  # fmt: skip
    lines.insert(5, _line("sys", body={"model": "tiny", "messages": [{"role": "system", "content": "be brief"},
                                                                    {"role": "user", "content": "hello"}]}))  # fmt: skip
    (out_root / "in.jsonl").write_text("\n".join(lines) + "\n")
    job = job_dict(tiny_model, out_root / "in.jsonl", "out", task={"type": "generate", "max_tokens": 4},
                   input={"format": "openai_batch"}, output={"format": "both", "part_rows": 10})  # fmt: skip
    summary = run_job(JobSpec.model_validate(job), pool=tiny_pool)
    out = out_root / "out"
    assert summary["rows_error"] == len(BAD) + 1
    result = [json.loads(x) for x in (out / openai_batch.OUTPUT_FILE).read_text().splitlines()]
    junk_id = f"_line{lines.index('this is not json') + 1}"
    want_ids = {*good_chat, *good_cmpl, "sys", "long", "short", *BAD, junk_id}
    ids = [r["custom_id"] for r in result]
    assert sorted(ids) == sorted(want_ids) and len(ids) == len(set(ids))  # each exactly once
    assert sorted(read_output(out).column("row_id").to_pylist()) == sorted(want_ids)
    by_id = {r["custom_id"]: r for r in result}
    for cid in [*good_chat, "sys"]:
        r = by_id[cid]
        assert r["error"] is None and r["response"]["status_code"] == 200 and r["id"].startswith("batch_req_")
        body = ChatCompletion.model_validate(r["response"]["body"])
        assert body.choices[0].message.role == "assistant" and isinstance(
            body.choices[0].message.content, str
        )
        assert body.usage.completion_tokens <= 4 and body.usage.prompt_tokens > 5 and body.model == "tiny"
    assert ChatCompletion.model_validate(by_id["long"]["response"]["body"]).usage.completion_tokens == 9
    assert ChatCompletion.model_validate(by_id["short"]["response"]["body"]).usage.completion_tokens == 1
    for cid in good_cmpl:
        body = Completion.model_validate(by_id[cid]["response"]["body"])
        assert body.object == "text_completion" and body.usage.completion_tokens <= 4
    for cid in [*BAD, junk_id]:
        resp = by_id[cid]["response"]
        assert resp["status_code"] == 400 and resp["body"]["error"]["code"] in (
            "INVALID_REQUEST",
            "BAD_INPUT_LINE",
        )
    # rewriting from the same parts gives the same file: ids are stable, so a rerun after a crash is exactly-once
    first = (out / openai_batch.OUTPUT_FILE).read_text()
    openai_batch.write_output(out, [str(out_root / "in.jsonl")], str(tiny_model))
    again = (out / openai_batch.OUTPUT_FILE).read_text()
    strip = [{k: v for k, v in json.loads(x).items() if k != "response"} for x in again.splitlines()]
    assert [{k: v for k, v in json.loads(x).items() if k != "response"} for x in first.splitlines()] == strip
    assert (out / "_SUCCESS").is_file() and (out / "_report.html").is_file()
