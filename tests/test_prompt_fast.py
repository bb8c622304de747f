"""The render stage's cheaper paths give what the general ones give (prompt.py, batch/render.py).

`encode_many` (one Rust call per block, no offsets) against `tokenizer.encode` row by row, on the tiny
model's tokenizer and SmolLM2's real 49,152-token one; the `{{ column }}` user template and the
system prompt rendered once against Jinja rendering every row; a tokenizer that fails on one text.
"""

from __future__ import annotations

import pyarrow as pa
import pytest

import turbo_batch.prompt as prompt_mod
from turbo_batch.batch.render import render_block
from turbo_batch.errors import RowError
from turbo_batch.prompt import PromptBuilder, PromptConfig, RowProblem, load_tokenizer
from turbo_batch.sandbox import MAX_OUTPUT_CHARS

CLASSIFY = {"type": "classify", "labels": ["positive", "negative"]}
TEXTS = [
    "great film",
    "  leading and trailing spaces  ",
    "line one\nline two\n\n",
    "<start_of_turn>user\nnot a turn, just text<end_of_turn>",  # special tokens' strings inside a row
    "<|im_start|>system\nalso text<|im_end|>",
    "émigré naïve café — ünïcödé, 日本語のテキスト, emoji 🎬🍿",
    "x" * 5000,
    "tabs\tand\u00a0no-break spaces",
]


def _config(template=None, system=None, chat=True, task=CLASSIFY):
    return PromptConfig(task=task, text_columns=("text",), template=template, system=system, chat=chat)


@pytest.fixture(scope="module", params=["tiny", "smollm2"])
def tok(request, tiny_model):
    if request.param == "tiny":
        return load_tokenizer(str(tiny_model))
    from turbo_batch.testing.assets import smollm2_dir

    return load_tokenizer(str(smollm2_dir()))


@pytest.mark.parametrize("chat", [True, False])
def test_encode_many_gives_what_encode_gives(tok, chat):
    b = PromptBuilder(_config(chat=chat), tok)
    texts = [b.render_text({"text": t}) for t in TEXTS] + TEXTS
    many = b.encode_many(texts)
    assert many == [b.encode(t) for t in texts]
    assert all(isinstance(ids, list) and ids for ids in many)
    assert b.encode_many([]) == []


class _Core:
    """A fast tokenizer's Rust core whose batch call fails (as on one odd text)."""

    encode_special_tokens = False

    def encode_batch_fast(self, texts, add_special_tokens=True):
        raise RuntimeError("batch failed")


class _Tok:
    """The tiny tokenizer, except that encoding the text 'boom' raises."""

    def __init__(self, tok):
        self._real, self._tokenizer, self.split_special_tokens = tok, _Core(), False

    def encode(self, text, add_special_tokens=True):
        if "boom" in text:
            raise ValueError("cannot encode boom")
        return self._real.encode(text, add_special_tokens=add_special_tokens)


def test_a_tokenizer_json_with_truncation_still_gives_what_encode_gives(tiny_model):
    """A tokenizer.json may carry truncation (or padding), which transformers' encode turns off on every
    call: the batch path must not truncate where `encode` does not."""
    tok = load_tokenizer(str(tiny_model))
    b = PromptBuilder(_config(chat=False), tok)
    long = "x " * 400
    full = b.encode(long)
    assert len(full) > 64
    tok._tokenizer.enable_truncation(max_length=64)
    try:
        assert b.encode_many([long, "short"]) == [full, b.encode("short")]
    finally:
        tok._tokenizer.no_truncation()


def test_a_text_the_tokenizer_fails_on_gets_its_error_and_the_others_their_ids(tiny_model):
    real = load_tokenizer(str(tiny_model))
    b = PromptBuilder(_config(chat=False), _Tok(real))
    out = b.encode_many(["fine", "boom", "also fine"])
    assert out[0] == real.encode("fine") and out[2] == real.encode("also fine")
    assert isinstance(out[1], ValueError) and "boom" in str(out[1])


def test_column_template_and_fixed_system_render_what_jinja_renders(tok, monkeypatch):
    """`{{ text }}` is the column's value and the default system prompt (labels only) renders once per
    builder; a template that Jinja must render (`{{ text ~ '' }}`) and a row that shadows `labels`
    take the general path. Same texts either way."""
    fast = PromptBuilder(_config(), tok)
    slow = PromptBuilder(_config(template="{{ text ~ '' }}"), tok)
    calls = []
    real = prompt_mod.render_limited
    monkeypatch.setattr(prompt_mod, "render_limited", lambda *a, **k: calls.append(1) or real(*a, **k))
    for t in TEXTS:
        assert fast.render_text({"text": t}) == slow.render_text({"text": t})
    assert len(calls) == 2 + len(TEXTS)  # each renders its system once; slow renders every user text
    shadow = fast.render_text({"text": "a row", "labels": ["spam", "ham"]})
    assert "spam, ham" in shadow and "positive, negative" not in shadow
    assert len(calls) == 3 + len(TEXTS)  # the shadowing row's system, rendered for it
    assert "positive, negative" in fast.render_text({"text": "the next row"})


def test_the_size_limit_holds_on_the_column_template(tok):
    big = {"text": "y" * (MAX_OUTPUT_CHARS + 1)}
    for template in (None, "{{ text ~ '' }}"):
        with pytest.raises(RowProblem) as e:
            PromptBuilder(_config(template=template), tok).render_parts(big)
        assert e.value.code == RowError.TEMPLATE_ERROR and "over the limit" in e.value.message


def test_render_block_keeps_rows_in_place_around_errors(tiny_model):
    """Rows rendered, tokenized in one call and put back in order, with the bad rows' errors where
    they were; ids equal those of `build` row by row."""
    tok_path = str(tiny_model)
    cfg = _config()
    texts = ["good one", None, "good two", "   ", "good three"]
    block = pa.table({"row_id": pa.array(range(5), pa.int64()), "text": texts})
    out = render_block(block, cfg=cfg, tokenizer_path=tok_path, trust_remote_code=False, passthrough=[])
    b = PromptBuilder(cfg, load_tokenizer(tok_path))
    assert out.column("row_id").to_pylist() == [0, 1, 2, 3, 4]
    assert out.column("error_code").to_pylist() == [None, "EMPTY_INPUT", None, "EMPTY_INPUT", None]
    ids, labels = out.column("prompt_ids").to_pylist(), out.column("label_ids").to_pylist()
    for i in (0, 2, 4):
        assert (ids[i], labels[i]) == b.build({"text": texts[i]})
        assert out.column("prompt_tokens")[i].as_py() == len(ids[i])
    assert ids[1] is None and ids[3] is None
