"""Prompt rendering: sandboxed Jinja over row columns, the model's chat template, token ids.

Templates come from job/serve files only, never from HTTP requests, and render in Jinja's
ImmutableSandboxedEnvironment with StrictUndefined (no attribute escapes, no silent blanks).
This module also finds, for classification, the first token of each label as it would follow the
prompt, so one forward pass can score every label. It does not talk to an engine.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateSyntaxError, meta

from turbo_batch.errors import RowError
from turbo_batch.hf_tokenizer import load_tokenizer  # noqa: F401  (the loader jobs and serve use)
from turbo_batch.sandbox import RENDER_SECONDS, LimitedSandbox, check_output_size, render_limited

# Limits (time per row, rendered size, range(), repetition) live in sandbox.py; every one of them,
# and any other exception raised while a template renders, ends as that row's TEMPLATE_ERROR.
_ENV = LimitedSandbox(autoescape=False, keep_trailing_newline=True)
BUILTINS = ("labels", "label_descriptions", "schema")


def check_template(source: str) -> None:
    """Raise ValueError with the line number if `source` is not a valid Jinja template."""
    try:
        _ENV.parse(source)
    except TemplateSyntaxError as e:
        raise ValueError(f"template syntax error at line {e.lineno}: {e.message}") from None


def template_variables(source: str) -> set[str]:
    return set(meta.find_undeclared_variables(_ENV.parse(source)))


@functools.lru_cache(maxsize=64)
def _compile(source: str):
    return _ENV.from_string(source)


class RowProblem(Exception):
    """A row that cannot be turned into a prompt; carries the stable error code."""

    def __init__(self, code: RowError, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def default_system(task: Mapping[str, Any]) -> str | None:
    if task["type"] == "classify":
        return (
            "Classify the text into exactly one of these labels: {{ labels | join(', ') }}."
            "{% if label_descriptions %}\n{% for k, v in label_descriptions.items() %}- {{ k }}: {{ v }}\n"
            "{% endfor %}{% endif %}\nAnswer with the label only."
        )
    if task["type"] == "extract":
        return "Extract the requested information as JSON that matches this JSON schema:\n{{ schema }}\nAnswer with JSON only."
    return None


@dataclass(frozen=True)
class PromptConfig:
    """The parts of a job that decide a prompt (plain data, so it ships to Ray workers cheaply)."""

    task: dict[str, Any]
    text_columns: tuple[str, ...]
    template: str | None = None
    system: str | None = None
    chat: bool = True

    @classmethod
    def from_job(cls, job: Any) -> PromptConfig:
        return cls(
            task=job.task.model_dump(mode="json"),
            text_columns=tuple(job.input.text_columns),
            template=job.prompt.template,
            system=job.prompt.system,
            chat=job.prompt.chat,
        )

    @property
    def user_template(self) -> str:
        return self.template if self.template is not None else "{{ " + self.text_columns[0] + " }}"

    @property
    def system_template(self) -> str | None:
        return self.system if self.system is not None else default_system(self.task)


def clean_text(column: str, value: Any) -> str:
    """A text column's value as str, or RowProblem(EMPTY_INPUT / INVALID_UTF8)."""
    if value is None:
        raise RowProblem(RowError.EMPTY_INPUT, f"text column {column!r} is null")
    if isinstance(value, bytes | bytearray | memoryview):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise RowProblem(
                RowError.INVALID_UTF8, f"text column {column!r} is not valid UTF-8: {e}"
            ) from None
    if not isinstance(value, str):
        value = str(value)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # lone surrogates from a lenient decoder
        raise RowProblem(RowError.INVALID_UTF8, f"text column {column!r} is not valid UTF-8: {e}") from None
    if not value.strip():
        raise RowProblem(RowError.EMPTY_INPUT, f"text column {column!r} is empty")
    return value


class PromptBuilder:
    """Renders rows into token ids for one job and one tokenizer (a HF tokenizer object)."""

    def __init__(self, config: PromptConfig, tokenizer: Any):
        self.config = config
        self.tokenizer = tokenizer
        task = config.task
        self.labels: list[str] = list(task.get("labels") or [])
        self._context = {
            "labels": self.labels,
            "label_descriptions": dict(task.get("label_descriptions") or {}),
            "schema": json.dumps(task["json_schema"]) if task["type"] == "extract" else "",
        }
        self._user = _compile(config.user_template)
        sys_src = config.system_template
        self._system = _compile(sys_src) if sys_src else None
        self._label_cache: dict[str, list[int] | None] = {}
        # Shortcuts that give the same text with less work per row (render_parts):
        # a user template that is one text column, `{{ text }}`, is that column's cleaned value;
        m = re.fullmatch(r"\{\{-?\s*(\w+)\s*-?\}\}", config.user_template)
        self._user_column = m.group(1) if m and m.group(1) in config.text_columns else None
        # a system template that reads only the job's builtins (labels, ...) renders once, unless a row
        # has a column of one of those names (a row's columns shadow the builtins).
        self._system_vars = template_variables(sys_src) if sys_src else set()
        self._system_text: str | None = None

    # -- rendering -------------------------------------------------------------------------------
    def render_text(self, row: Mapping[str, Any]) -> str:
        """The full prompt text for a row (chat template applied if the job asks for it)."""
        return self.apply_chat(*self.render_parts(row))

    def render_parts(self, row: Mapping[str, Any], seconds: float = RENDER_SECONDS) -> tuple[str, str | None]:
        """The user and system text of a row (templates only, no tokenizer), under the sandbox's limits."""
        context = dict(self._context)
        for key, value in row.items():
            if value is not None:  # a null column is a missing variable: StrictUndefined raises
                context[key] = value
        for col in self.config.text_columns:
            context[col] = clean_text(col, row.get(col))
        which = "prompt.template"
        try:
            if self._user_column is not None:  # what `{{ col }}` renders, limits included
                user = context[self._user_column]
                check_output_size(len(user))
            else:
                user = render_limited(self._user, context, seconds=seconds)
            which = "prompt.system"
            system = self._render_system(context, row, seconds)
        except RecursionError:
            raise RowProblem(RowError.TEMPLATE_ERROR, f"{which}: recursion too deep") from None
        except Exception as e:  # the template's own failure (a TemplateError, 1/0, a limit, ...)
            raise RowProblem(RowError.TEMPLATE_ERROR, f"{which}: {type(e).__name__}: {e}") from None
        return user, system

    def _render_system(self, context: dict[str, Any], row: Mapping[str, Any], seconds: float) -> str | None:
        if self._system is None:
            return None
        if self._system_vars <= self._context.keys() and not self._system_vars & row.keys():
            if self._system_text is None:  # the same text for every row: rendered once
                self._system_text = render_limited(self._system, dict(self._context), seconds=seconds)
            return self._system_text
        return render_limited(self._system, context, seconds=seconds)

    def apply_chat(self, user: str, system: str | None) -> str:
        if not self.config.chat:
            return plain_text(user, system)
        return apply_chat_template(self.tokenizer, user, system)

    def message_text(self, row: Mapping[str, Any]) -> str:
        """The row's system and user text, joined as `chat: false` joins them, without the chat template
        (so without the tokenizer): what the order stage keys on. A chat template writes the same text
        before, between and after every row's messages, so two rows' prompts share a prefix where
        these texts do, give or take the template's fixed pieces."""
        return plain_text(*self.render_parts(row))

    def encode(self, text: str) -> list[int]:
        # The chat template already wrote the BOS token where the model wants one.
        return list(self.tokenizer.encode(text, add_special_tokens=not self.config.chat))

    def encode_many(self, texts: Sequence[str]) -> list[list[int] | Exception]:
        """Token ids of each text, as `encode` gives them, in one call to a fast tokenizer's Rust core
        (no offsets, no per-row wrapper: benchmarks/results/render_cpu.md); a text the tokenizer fails on gets its
        exception in its place, and the others their ids."""
        core = getattr(self.tokenizer, "_tokenizer", None)
        batch = getattr(core, "encode_batch_fast", None) or getattr(core, "encode_batch", None)
        # The wrapper sets the core's encode_special_tokens from split_special_tokens, and turns off a
        # truncation or padding that tokenizer.json may carry, on every call: same ids only without them.
        same = (
            batch is not None
            and bool(getattr(self.tokenizer, "split_special_tokens", False))
            == bool(getattr(core, "encode_special_tokens", False))
            and getattr(core, "truncation", None) is None
            and getattr(core, "padding", None) is None
        )
        if same and texts:
            try:
                return [e.ids for e in batch(list(texts), add_special_tokens=not self.config.chat)]
            except Exception:  # find the text that fails, row by row
                pass
        out: list[list[int] | Exception] = []
        for text in texts:
            try:
                out.append(self.encode(text))
            except Exception as e:
                out.append(e)
        return out

    # -- classification --------------------------------------------------------------------------
    def label_token_ids(self, prompt_text: str) -> list[int] | None:
        """First token of each label as it would follow `prompt_text`; None if two labels share it."""
        suffix = prompt_text[-48:]
        if suffix not in self._label_cache:
            self._label_cache[suffix] = first_label_tokens(
                self.tokenizer, suffix, self.labels, self.config.chat
            )
        return self._label_cache[suffix]

    def build(self, row: Mapping[str, Any]) -> tuple[list[int], list[int] | None]:
        """Token ids of the row's prompt and, for classify, the label first tokens (or None)."""
        text = self.render_text(row)
        ids = self.encode(text)
        labels = self.label_token_ids(text) if self.config.task["type"] == "classify" else None
        return ids, labels


def plain_text(user: str, system: str | None) -> str:
    """A prompt without a chat template: the system text, a blank line, the user text."""
    return f"{system}\n\n{user}" if system else user


NO_TEMPLATE_HINT = "use /v1/completions"  # what an OpenAI-style caller can do instead


def chat_text(tokenizer: Any, messages: list[dict[str, Any]], hint: str = NO_TEMPLATE_HINT) -> str:
    """The chat template's text for OpenAI-style messages, generation prompt added — one rendering for
    jobs, the serve endpoint and OpenAI batch files. Some templates (Gemma) refuse a system turn: it
    is then folded into the first user turn. Raises ValueError that names the problem; `hint` says
    what to do instead when the model has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"this model has no chat template; {hint}")
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception:
        if messages[0]["role"] != "system" or len(messages) < 2 or messages[1]["role"] != "user":
            raise ValueError("messages: the model's chat template refused these messages") from None
    system, user = messages[0]["content"], messages[1]["content"]
    folded = [{"role": "user", "content": f"{system}\n\n{user}"}, *messages[2:]]
    try:
        return tokenizer.apply_chat_template(folded, add_generation_prompt=True, tokenize=False)
    except Exception as e:
        raise ValueError(f"messages: the model's chat template refused them ({e})") from None


def apply_chat_template(tokenizer: Any, user: str, system: str | None) -> str:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}
    ]
    return chat_text(tokenizer, messages, hint="set prompt.chat: false")  # a job's way out


def first_label_tokens(tokenizer: Any, suffix: str, labels: Sequence[str], chat: bool) -> list[int] | None:
    """Token id each label starts with when written right after `suffix` (None on a collision).

    Plain-text prompts that end in a non-space character get the label after a space ("Answer: fresh"),
    as a model would write it; chat prompts end with the generation prompt and take the label as is.
    """
    lead = " " if (not chat and suffix and not suffix[-1].isspace()) else ""
    base = tokenizer.encode(suffix, add_special_tokens=False)
    firsts = []
    for label in labels:
        full = tokenizer.encode(suffix + lead + label, add_special_tokens=False)
        k = 0
        while k < min(len(base), len(full)) and base[k] == full[k]:
            k += 1
        if k < len(base) or k >= len(full):  # the label merged with the prompt's last token
            full = tokenizer.encode(lead + label, add_special_tokens=False)
            firsts.append(full[0])
        else:
            firsts.append(full[k])
    return firsts if len(set(firsts)) == len(firsts) else None
