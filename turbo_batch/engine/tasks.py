"""Per-task sampling parameters and output parsing (classify / generate / extract).

classify scores every label in one forward pass where the labels' first tokens differ: max_tokens=1,
allowed_token_ids = those first tokens, logprobs over them (the engine runs with
logprobs_mode="processed_logprobs", so the returned logprobs are over the allowed set); the label is
the argmax and the probabilities the softmax over the allowed tokens. Where first tokens collide it
falls back to guided choice. This module builds vLLM objects but starts no engine.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from turbo_batch.errors import RowError


class TaskRunner:
    """Builds SamplingParams for a row and parses the engine's RequestOutput into result fields."""

    def __init__(self, task: Mapping[str, Any], sampling: Mapping[str, Any], tokenizer: Any = None):
        self.task = dict(task)
        self.sampling = dict(sampling)
        self.kind = self.task["type"]
        self.labels: list[str] = list(self.task.get("labels") or [])
        self.method = self.task.get("method", "auto")
        # Guided choice needs room for the longest label (seen: a too-small budget cut "positive"), written
        # with or without a leading space, plus one token to finish.
        self.guided_max_tokens = 16
        if tokenizer is not None and self.labels:
            self.guided_max_tokens = 2 + max(
                len(tokenizer.encode(prefix + lab, add_special_tokens=False))
                for lab in self.labels
                for prefix in ("", " ")
            )

    # -- sampling -----------------------------------------------------------------------------------
    def _base(self) -> dict[str, Any]:
        s = self.sampling
        kw: dict[str, Any] = {"temperature": s.get("temperature", 0.0), "top_p": s.get("top_p", 1.0)}
        if s.get("top_k"):
            kw["top_k"] = s["top_k"]
        if s.get("seed") is not None:
            kw["seed"] = s["seed"]
        kw.update(s.get("extra") or {})
        return kw

    def sampling_params(self, label_ids: Sequence[int] | None = None, max_tokens: int | None = None):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        final = RequestOutputKind.FINAL_ONLY
        if self.kind == "classify":
            if label_ids and self.method != "guided":
                return SamplingParams(
                    max_tokens=1,
                    temperature=0.0,
                    logprobs=len(label_ids),
                    allowed_token_ids=list(label_ids),
                    detokenize=False,
                    output_kind=final,
                )
            return SamplingParams(
                max_tokens=self.guided_max_tokens,
                temperature=0.0,
                structured_outputs=StructuredOutputsParams(choice=self.labels),
                output_kind=final,
            )
        kw = self._base()
        if self.kind == "generate":
            return SamplingParams(
                max_tokens=max_tokens or self.task["max_tokens"],
                stop=self.task.get("stop") or None,
                output_kind=final,
                **kw,
            )
        return SamplingParams(
            max_tokens=max_tokens or self.task["max_tokens"],
            structured_outputs=StructuredOutputsParams(json=self.task["json_schema"]),
            output_kind=final,
            **kw,
        )

    def output_budget(self, label_ids: Sequence[int] | None) -> int:
        """Tokens the row may generate: prompt + this must fit max_model_len."""
        if self.kind == "classify":
            return 1 if (label_ids and self.method != "guided") else self.guided_max_tokens
        return int(self.task["max_tokens"])

    # -- parsing ------------------------------------------------------------------------------------
    def parse(self, output: Any, label_ids: Sequence[int] | None) -> dict[str, Any]:
        """RequestOutput → result fields + token counts (+ error fields for schema failures)."""
        comp = output.outputs[0]
        res: dict[str, Any] = {
            "prompt_tokens": len(output.prompt_token_ids or []),
            "output_tokens": len(comp.token_ids or []),
            "finish_reason": comp.finish_reason,
        }
        if self.kind == "classify":
            if label_ids and self.method != "guided":
                step = comp.logprobs[0] if comp.logprobs else {}
                res["probs"] = label_probabilities(self.labels, label_ids, step)
                res["label"] = max(res["probs"], key=res["probs"].__getitem__)
            else:
                label = match_label(comp.text, self.labels)
                if label is None:
                    return {
                        **res,
                        "text": comp.text,
                        "error_code": RowError.LABEL_NOT_PARSED,
                        "error_message": f"guided output {comp.text!r} is not one of the labels",
                    }
                res["label"] = label
                res["probs"] = {lab: float(lab == label) for lab in self.labels}
            return res
        text = comp.text
        if self.kind == "generate":
            res["text"] = text
            return res
        return {**res, **parse_json_output(text, self.task["json_schema"], comp.finish_reason)}


def label_probabilities(
    labels: Sequence[str], label_ids: Sequence[int], step: Mapping[int, Any]
) -> dict[str, float]:
    """Softmax over the labels' first-token logprobs (a missing token counts as -inf)."""
    lps = []
    for tid in label_ids:
        lp = step.get(tid)
        value = getattr(lp, "logprob", lp)
        lps.append(float(value) if value is not None and math.isfinite(float(value)) else -math.inf)
    top = max(lps)
    if top == -math.inf:
        return {lab: 1.0 / len(labels) for lab in labels}
    exps = [math.exp(v - top) for v in lps]
    total = sum(exps)
    return {lab: e / total for lab, e in zip(labels, exps, strict=True)}


def match_label(text: str, labels: Sequence[str]) -> str | None:
    if text in labels:  # guided choice writes the label exactly, with its own spaces (" yes", "no ")
        return text
    t = text.strip()
    if t in labels:
        return t
    for lab in sorted(labels, key=len, reverse=True):
        if t.lower().startswith(lab.lower()):
            return lab
    return None


def parse_json_output(text: str, schema: Mapping[str, Any], finish_reason: str | None) -> dict[str, Any]:
    import jsonschema

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        why = " (output hit max_tokens)" if finish_reason == "length" else ""
        return {
            "error_code": RowError.INVALID_JSON,
            "error_message": f"output is not JSON{why}: {e}",
            "text": text,
        }
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as e:
        return {"error_code": RowError.SCHEMA_MISMATCH, "error_message": f"schema: {e.message}", "text": text}
    return {"json": json.dumps(value, ensure_ascii=False, separators=(",", ":"))}
