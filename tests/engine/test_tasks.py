"""engine/tasks.py on its own: label probabilities, label matching, JSON parsing, output budgets, parse().

No engine starts here: RequestOutputs are small stand-ins with the fields `TaskRunner.parse` reads.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from turbo_batch.engine.tasks import TaskRunner, label_probabilities, match_label, parse_json_output
from turbo_batch.errors import RowError

CLASSIFY = {"type": "classify", "labels": ["positive", "negative", "neutral"]}
SCHEMA = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}


def lp(value: float) -> SimpleNamespace:
    return SimpleNamespace(logprob=value)  # vLLM's Logprob has .logprob


def output(text="", token_ids=(1,), finish_reason="stop", logprobs=None, prompt=(5, 6, 7)):
    comp = SimpleNamespace(
        text=text, token_ids=list(token_ids), finish_reason=finish_reason, logprobs=logprobs
    )
    return SimpleNamespace(prompt_token_ids=list(prompt), outputs=[comp])


class CharTokenizer:
    """One token per character: label budgets become easy to count."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]


# -- label_probabilities ------------------------------------------------------------------------------


def test_label_probabilities_is_the_softmax_over_the_label_tokens():
    probs = label_probabilities(
        ["a", "b", "c"], [10, 20, 30], {10: lp(math.log(0.5)), 20: lp(math.log(0.25)), 30: lp(math.log(0.25))}
    )
    assert list(probs) == ["a", "b", "c"]
    assert probs == pytest.approx({"a": 0.5, "b": 0.25, "c": 0.25}, abs=1e-12)


def test_label_probabilities_renormalises_unnormalised_logprobs_and_accepts_plain_floats():
    probs = label_probabilities(["x", "y"], [3, 4], {3: -1.0, 4: -2.0})
    assert probs["x"] == pytest.approx(1 / (1 + math.exp(-1)), abs=1e-12)  # 0.7310585786
    assert probs["y"] == pytest.approx(math.exp(-1) / (1 + math.exp(-1)), abs=1e-12)


def test_label_probabilities_missing_or_nan_token_counts_as_minus_infinity():
    probs = label_probabilities(["a", "b", "c"], [1, 2, 3], {1: lp(-0.1), 3: lp(float("nan"))})
    assert probs == {"a": 1.0, "b": 0.0, "c": 0.0}


def test_label_probabilities_with_no_label_token_returned_is_uniform():
    assert label_probabilities(["a", "b", "c", "d"], [1, 2, 3, 4], {}) == {
        "a": 0.25,
        "b": 0.25,
        "c": 0.25,
        "d": 0.25,
    }


# -- match_label --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("negative", "negative"),
        ("  negative\n", "negative"),  # surrounding whitespace
        ("Negative.", "negative"),  # case and trailing punctuation: prefix match, case-insensitive
        ("NEUTRAL", "neutral"),
        ("positively", "positive"),  # a prefix match: the label starts the text
        ("neg", None),  # a cut label is not a label
        ("the answer is positive", None),  # the label must start the output
        ("", None),
    ],
)
def test_match_label(text, expected):
    assert match_label(text, CLASSIFY["labels"]) == expected


def test_match_label_keeps_a_labels_own_spaces():
    # guided choice outputs the label exactly; stripping it first turned a right answer into
    # LABEL_NOT_PARSED for labels with a leading or trailing space
    assert match_label(" yes", [" yes", " no"]) == " yes"
    assert match_label("no ", ["yes ", "no "]) == "no "


def test_match_label_prefers_the_longest_label():
    assert match_label("positive!", ["pos", "positive"]) == "positive"
    assert match_label("pos!", ["pos", "positive"]) == "pos"


# -- parse_json_output --------------------------------------------------------------------------------


def test_json_that_fits_the_schema_is_kept_compact_and_unescaped():
    assert parse_json_output('{ "age" : 31, "name": "Zoë" }', SCHEMA, "stop") == {
        "json": '{"age":31,"name":"Zoë"}'
    }


def test_output_that_is_not_json_is_invalid_json():
    r = parse_json_output("Ann is 31", SCHEMA, "stop")
    assert r["error_code"] == RowError.INVALID_JSON and r["text"] == "Ann is 31"
    assert r["error_message"].startswith("output is not JSON: ")
    assert "max_tokens" not in r["error_message"]


def test_json_cut_by_max_tokens_says_so():
    r = parse_json_output('{"age": 3', SCHEMA, "length")
    assert r["error_code"] == RowError.INVALID_JSON
    assert r["error_message"].startswith("output is not JSON (output hit max_tokens): ")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"age": "31"}', "schema: '31' is not of type 'integer'"),
        ("{}", "schema: 'age' is a required property"),
        ("[31]", "schema: [31] is not of type 'object'"),
    ],
)
def test_json_that_breaks_the_schema_is_schema_mismatch(text, message):
    r = parse_json_output(text, SCHEMA, "stop")
    assert r == {"error_code": RowError.SCHEMA_MISMATCH, "error_message": message, "text": text}


# -- output_budget --------------------------------------------------------------------------------------


def test_output_budget_per_task_and_method():
    tok = CharTokenizer()
    one_pass = TaskRunner(CLASSIFY, {}, tok)
    assert one_pass.output_budget([11, 12, 13]) == 1  # one forward pass, one token
    # guided: the longest label, written with or without a leading space (" positive", " negative",
    # " neutral" are 9 characters), plus 2
    assert one_pass.guided_max_tokens == 2 + 9
    assert one_pass.output_budget(None) == 11  # first tokens collide: guided choice
    guided = TaskRunner({**CLASSIFY, "method": "guided"}, {}, tok)
    assert guided.output_budget([11, 12, 13]) == 11
    assert TaskRunner(CLASSIFY, {}).output_budget(None) == 16  # no tokenizer: a safe default
    assert TaskRunner({"type": "generate", "max_tokens": 7}, {}).output_budget(None) == 7
    assert (
        TaskRunner({"type": "extract", "max_tokens": 40, "json_schema": SCHEMA}, {}).output_budget(None) == 40
    )


# -- parse --------------------------------------------------------------------------------------------


def test_parse_one_pass_classification():
    step = {11: lp(math.log(0.2)), 12: lp(math.log(0.7)), 13: lp(math.log(0.1))}
    r = TaskRunner(CLASSIFY, {}).parse(
        output(token_ids=[12], logprobs=[step], finish_reason="length"), [11, 12, 13]
    )
    assert r["label"] == "negative"
    assert r["probs"] == pytest.approx({"positive": 0.2, "negative": 0.7, "neutral": 0.1}, abs=1e-12)
    assert (r["prompt_tokens"], r["output_tokens"], r["finish_reason"]) == (3, 1, "length")
    assert "error_code" not in r


def test_parse_guided_label_is_one_hot():
    r = TaskRunner(CLASSIFY, {}).parse(output("neutral", token_ids=[1, 2]), None)
    assert r["label"] == "neutral" and r["probs"] == {"positive": 0.0, "negative": 0.0, "neutral": 1.0}
    assert r["output_tokens"] == 2 and "error_code" not in r


def test_parse_guided_output_that_is_no_label_is_label_not_parsed():
    r = TaskRunner({**CLASSIFY, "method": "guided"}, {}).parse(
        output("neut", finish_reason="length"), [1, 2, 3]
    )
    assert r["error_code"] == RowError.LABEL_NOT_PARSED and r["text"] == "neut"
    assert r["error_message"] == "guided output 'neut' is not one of the labels"
    assert "label" not in r and r["finish_reason"] == "length"


def test_parse_generate_and_extract():
    gen = TaskRunner({"type": "generate", "max_tokens": 4}, {}).parse(output("hello", token_ids=[1, 2]), None)
    assert gen == {"prompt_tokens": 3, "output_tokens": 2, "finish_reason": "stop", "text": "hello"}
    ext = TaskRunner({"type": "extract", "max_tokens": 9, "json_schema": SCHEMA}, {})
    assert ext.parse(output('{"age": 4}'), None)["json"] == '{"age":4}'
    assert ext.parse(output('{"age": 4.5}'), None)["error_code"] == RowError.SCHEMA_MISMATCH
    assert ext.parse(output("{", finish_reason="length"), None)["error_code"] == RowError.INVALID_JSON


def test_sampling_params_one_pass_vs_guided():
    pytest.importorskip("vllm")
    runner = TaskRunner(CLASSIFY, {"temperature": 0.9}, CharTokenizer())
    p = runner.sampling_params([11, 12, 13])
    assert (p.max_tokens, p.temperature, p.logprobs, p.allowed_token_ids) == (1, 0.0, 3, [11, 12, 13])
    g = TaskRunner({**CLASSIFY, "method": "guided"}, {}, CharTokenizer()).sampling_params([11, 12, 13])
    assert g.max_tokens == 11 and g.structured_outputs.choice == CLASSIFY["labels"] and g.logprobs is None
    gen = TaskRunner({"type": "generate", "max_tokens": 5, "stop": ["\n"]}, {"temperature": 0.5, "seed": 3})
    s = gen.sampling_params(None)
    assert (s.max_tokens, s.temperature, s.seed, s.stop) == (5, 0.5, 3, ["\n"])
