"""batch/report.py on its own: Stats.add, evaluate (a hand-computed confusion matrix), summary, render_text."""

from __future__ import annotations

import pytest

from turbo_batch.batch.report import Stats, evaluate, render_text, summary

LABELS = ["pos", "neg", "neu"]
# (gold, predicted) -> count; asymmetric on purpose so a transposed matrix would not pass.
PAIRS = {
    ("pos", "pos"): 5,
    ("pos", "neg"): 2,
    ("pos", "neu"): 1,
    ("neg", "pos"): 1,
    ("neg", "neg"): 4,
    ("neu", "pos"): 2,
    ("neu", "neu"): 1,
}


def test_evaluate_hand_computed():
    ev = evaluate(LABELS, PAIRS)
    # 16 rows, 5 + 4 + 1 = 10 correct; gold support pos 8, neg 5, neu 3; predicted pos 8, neg 6, neu 2
    assert ev["rows"] == 16 and ev["accuracy"] == 0.625
    assert (ev["majority_label"], ev["majority_rate"]) == ("pos", 0.5)
    assert ev["per_label"] == {
        "pos": {"precision": 0.625, "recall": 0.625, "f1": 0.625, "support": 8},  # 5/8, 5/8
        "neg": {"precision": 0.6667, "recall": 0.8, "f1": 0.7273, "support": 5},  # 4/6, 4/5, 8/11
        "neu": {"precision": 0.5, "recall": 0.3333, "f1": 0.4, "support": 3},  # 1/2, 1/3, 2/5
    }
    assert ev["macro_f1"] == 0.5841  # (0.625 + 0.7273 + 0.4) / 3
    # rows are gold labels, columns predicted ones
    assert ev["confusion"] == {"labels": LABELS, "matrix": [[5, 2, 1], [1, 4, 0], [2, 0, 1]]}


def test_evaluate_label_never_predicted_nor_gold_scores_zero_and_counts_in_macro_f1():
    ev = evaluate(["a", "b", "c"], {("a", "a"): 3, ("b", "a"): 1})
    assert ev["per_label"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert ev["per_label"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert ev["per_label"]["a"]["precision"] == 0.75 and ev["per_label"]["a"]["f1"] == 0.8571  # 6/7
    assert ev["macro_f1"] == 0.2857  # 0.8571 / 3
    assert evaluate(["a", "b"], {}) == {"rows": 0}


@pytest.mark.parametrize("labels", [["pos", "neg"], ["neg", "pos"]])
def test_confusion_follows_the_label_order(labels):
    ev = evaluate(labels, {("pos", "neg"): 4, ("neg", "neg"): 1})
    idx = {lab: i for i, lab in enumerate(labels)}
    assert ev["confusion"]["matrix"][idx["pos"]][idx["neg"]] == 4  # gold pos, predicted neg
    assert ev["confusion"]["matrix"][idx["neg"]][idx["pos"]] == 0


def _rows_for(pairs):
    for (gold, pred), n in pairs.items():
        for _ in range(n):
            yield {"gold": gold, "label": pred, "prompt_tokens": 10, "output_tokens": 1}


def test_stats_add_counts_tokens_errors_labels_and_pairs():
    stats = Stats(LABELS, "gold", {"1": "pos", "0": "neg"})
    for row in _rows_for(PAIRS):
        stats.add(row)
    stats.add({"gold": 1, "label": "neg", "prompt_tokens": 7, "output_tokens": 1})  # 1 -> "pos" by gold_map
    stats.add({"gold": "0", "label": "neg", "prompt_tokens": 7, "output_tokens": 1})  # "0" -> "neg"
    stats.add({"gold": "spam", "label": "pos", "prompt_tokens": 7, "output_tokens": 1})  # not a label
    stats.add({"gold": None, "label": "pos", "prompt_tokens": 7, "output_tokens": 1})  # no gold
    stats.add({"gold": "pos", "error_code": "EMPTY_INPUT", "prompt_tokens": None})
    stats.add({"gold": "pos", "error_code": "PROMPT_TOO_LONG", "prompt_tokens": 5000})
    stats.add({"gold": "pos", "error_code": "EMPTY_INPUT"})
    assert (stats.ok, stats.rows) == (20, 23)
    assert stats.errors == {"EMPTY_INPUT": 2, "PROMPT_TOO_LONG": 1}
    assert stats.prompt_tokens == 16 * 10 + 4 * 7 + 5000 and stats.output_tokens == 20
    assert stats.gold_unknown == 2
    expected = dict(PAIRS)
    expected[("pos", "neg")] += 1
    expected[("neg", "neg")] += 1
    assert dict(stats.pairs) == expected
    assert stats.label_counts == {"pos": 10, "neg": 8, "neu": 2}


def test_stats_without_gold_or_labels():
    stats = Stats()
    stats.add({"text": "hi", "prompt_tokens": 3, "output_tokens": 2})
    stats.add({"label": "x"})
    assert (stats.ok, stats.rows, dict(stats.label_counts), dict(stats.pairs)) == (2, 2, {"x": 1}, {})


def _summary(skipped=0):
    stats = Stats(["pos", "neg"], "gold")
    for gold, pred, n in (("pos", "pos", 3), ("pos", "neg", 1), ("neg", "neg", 2)):
        for _ in range(n):
            stats.add({"gold": gold, "label": pred, "prompt_tokens": 100, "output_tokens": 1})
    stats.add({"gold": "pos", "error_code": "EMPTY_INPUT"})
    stats.add({"gold": "pos", "error_code": "ENGINE_ERROR", "prompt_tokens": 50})
    return summary(
        stats, wall_s=4.0, engine_start_s=12.25, skipped=skipped, engines=[], job_name="j", output_dir="/o"
    )


def test_summary_fields():
    s = _summary(skipped=10)
    assert (s["rows_total"], s["rows_this_run"], s["rows_ok"], s["rows_error"]) == (18, 8, 6, 2)
    assert s["rows_skipped_already_committed"] == 10
    assert s["errors_by_code"] == {"EMPTY_INPUT": 1, "ENGINE_ERROR": 1}
    assert (s["rows_per_s"], s["prompt_tokens"], s["prompt_tok_per_s"], s["output_tok_per_s"]) == (
        2.0,
        650,
        162.5,
        1.5,
    )
    assert s["label_counts"] == {"pos": 3, "neg": 3}
    assert s["evaluation"]["note"] == "this run's rows only" and s["evaluation"]["gold_not_a_label"] == 0
    assert _summary()["evaluation"]["note"] == "all rows"


def test_render_text_exact():
    # 5 of 6 right; pos: P 3/3 R 3/4 F1 6/7, neg: P 2/3 R 2/2 F1 4/5; macro F1 (0.8571 + 0.8) / 2
    assert render_text(_summary(skipped=10)).splitlines() == [
        "rows: 6 ok, 2 errored, 10 already committed (skipped)",
        "wall: 4.0 s (+ 12.2 s engine start) · 2.00 rows/s · 162 prompt tok/s · 2 output tok/s",
        "errors: EMPTY_INPUT=1, ENGINE_ERROR=1",
        "accuracy: 83.3% on 6 rows (majority class 'pos': 66.7%) · macro F1 0.829",
        "           pos: precision 1.000 recall 0.750 (n=4)",
        "           neg: precision 0.667 recall 1.000 (n=2)",
        "  confusion (rows gold, cols predicted): pos neg",
        "           pos:      3      1",
        "           neg:      0      2",
    ]


def test_render_text_without_errors_or_evaluation():
    stats = Stats()
    stats.add({"text": "x", "prompt_tokens": 10, "output_tokens": 5})
    s = summary(stats, wall_s=0.0, engine_start_s=0.0, skipped=0, engines=[], job_name=None, output_dir="/o")
    assert s["rows_per_s"] is None
    assert render_text(s).splitlines() == [
        "rows: 1 ok, 0 errored",
        "wall: 0.0 s (+ 0.0 s engine start) · 0.00 rows/s · 0 prompt tok/s · 0 output tok/s",
    ]
