"""Prompt rendering on the tiny model's real tokenizer: sandbox, row problems, label first tokens."""

from __future__ import annotations

import pytest

from turbo_batch.errors import RowError
from turbo_batch.prompt import (
    PromptBuilder,
    PromptConfig,
    RowProblem,
    clean_text,
    first_label_tokens,
    load_tokenizer,
)

CLASSIFY = {"type": "classify", "labels": ["positive", "negative"]}


@pytest.fixture(scope="module")
def tok(tiny_model):
    return load_tokenizer(str(tiny_model))


def _builder(tok, template=None, chat=True, task=CLASSIFY, system=None):
    return PromptBuilder(
        PromptConfig(task=task, text_columns=("text",), template=template, system=system, chat=chat), tok
    )


def test_chat_prompt_lists_labels_and_ends_with_generation_prompt(tok):
    text = _builder(tok).render_text({"text": "great film"})
    assert "positive, negative" in text and "great film" in text
    assert text.endswith("<start_of_turn>model\n")
    ids, labels = _builder(tok).build({"text": "great film"})
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert labels is not None and len(set(labels)) == 2


def test_label_tokens_follow_the_prompt(tok):
    # Chat prompts: the label starts right after "model\n"; plain prompts ending in ':' get a space.
    chat = first_label_tokens(tok, "<start_of_turn>model\n", ["positive", "negative"], chat=True)
    plain = first_label_tokens(tok, "Answer:", ["positive", "negative"], chat=False)
    assert chat == [
        tok.encode("positive", add_special_tokens=False)[0],
        tok.encode("negative", add_special_tokens=False)[0],
    ]
    assert plain == [
        tok.encode(" positive", add_special_tokens=False)[0],
        tok.encode(" negative", add_special_tokens=False)[0],
    ]


def test_colliding_first_tokens_mean_guided(tok):
    assert first_label_tokens(tok, "x:", ["pos", "posh"], chat=False) is None


@pytest.mark.parametrize(
    ("row", "code"),
    [
        ({"text": None}, RowError.EMPTY_INPUT),
        ({"text": "   "}, RowError.EMPTY_INPUT),
        ({"text": b"\xff\xfe broken"}, RowError.INVALID_UTF8),
        ({"text": "ok \udcff"}, RowError.INVALID_UTF8),
    ],
)
def test_bad_text(tok, row, code):
    with pytest.raises(RowProblem) as exc:
        _builder(tok).build(row)
    assert exc.value.code == code


def test_missing_and_null_template_variables(tok):
    b = _builder(tok, template="{{ text }} by {{ author }}")
    with pytest.raises(RowProblem) as exc:
        b.build({"text": "hi"})
    assert exc.value.code == RowError.TEMPLATE_ERROR and "author" in exc.value.message
    with pytest.raises(RowProblem):
        b.build({"text": "hi", "author": None})
    assert "by Ann" in b.render_text({"text": "hi", "author": "Ann"})


def test_sandbox_blocks_attribute_escapes(tok):
    b = _builder(tok, template="{{ text.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(RowProblem) as exc:
        b.build({"text": "x"})
    assert exc.value.code == RowError.TEMPLATE_ERROR
    b2 = _builder(tok, template="{% for c in text.__class__.__subclasses__() %}{{ c }}{% endfor %}")
    with pytest.raises(RowProblem):
        b2.build({"text": "x"})


def test_plain_prompt_and_bytes_text(tok):
    b = _builder(
        tok, template="Review: {{ text }}\nAnswer:", chat=False, task={"type": "generate", "max_tokens": 4}
    )
    text = b.render_text({"text": "caf\xe9".encode()})
    assert text == "Review: café\nAnswer:"
    ids, labels = b.build({"text": "fine"})
    assert labels is None and ids[0] == tok.bos_token_id


def test_clean_text_accepts_numbers():
    assert clean_text("t", 42) == "42"


class _NoSystemTemplate:
    """A tokenizer whose chat template refuses a system turn, as Gemma's does."""

    chat_template = "{{ messages }}"

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        if any(m["role"] == "system" for m in messages):
            raise ValueError("System role not supported")
        return "|".join(f"{m['role']}:{m['content']}" for m in messages) + "|model:"


def test_chat_text_folds_a_refused_system_turn_and_names_what_it_cannot_render():
    from turbo_batch.prompt import apply_chat_template, chat_text

    tok = _NoSystemTemplate()
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U"},
        {"role": "assistant", "content": "A"},
    ]
    assert chat_text(tok, msgs) == "user:S\n\nU|assistant:A|model:"
    assert apply_chat_template(tok, "U", "S") == "user:S\n\nU|model:"  # jobs render the same way
    with pytest.raises(ValueError, match="refused these messages"):
        chat_text(tok, [{"role": "system", "content": "S"}])  # nothing to fold it into
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template; use /v1/completions"):
        chat_text(tok, msgs[1:])
    with pytest.raises(ValueError, match=r"no chat template; set prompt\.chat: false"):
        apply_chat_template(tok, "U", None)  # a job says how to do without one
