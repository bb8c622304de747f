"""Error codes and exceptions shared by every stage.

Row-level problems never stop a job: they become output rows with a stable `error_code` (one of
`RowError` below) and a human `error_message`. Job-level problems (a bad job file, a missing model,
an engine that cannot start, an unwritable output dir) raise `JobError`, which the CLI prints as one
clear line and turns into a non-zero exit code.
"""

from __future__ import annotations

from enum import StrEnum


class RowError(StrEnum):
    """Stable codes written to the `error_code` column. Never rename one: users filter on them."""

    EMPTY_INPUT = "EMPTY_INPUT"  # a text column is null or empty/whitespace
    INVALID_UTF8 = "INVALID_UTF8"  # a text column holds bytes that are not valid UTF-8
    BAD_INPUT_LINE = "BAD_INPUT_LINE"  # a JSONL line that is not a JSON object
    TEMPLATE_ERROR = "TEMPLATE_ERROR"  # missing variable or other error while rendering the prompt
    PROMPT_TOO_LONG = "PROMPT_TOO_LONG"  # prompt + output budget exceeds every engine's max_model_len
    LABEL_NOT_PARSED = "LABEL_NOT_PARSED"  # classify (guided): output that is not one of the labels
    INVALID_JSON = "INVALID_JSON"  # extract: the model's output is not JSON
    SCHEMA_MISMATCH = "SCHEMA_MISMATCH"  # extract: JSON that fails the job's JSON schema
    ENGINE_ERROR = "ENGINE_ERROR"  # the engine rejected or kept failing on this row
    INVALID_REQUEST = "INVALID_REQUEST"  # openai_batch: a line the serve endpoint would refuse (400)
    INTERNAL_ERROR = "INTERNAL_ERROR"  # a bug in turbo-batch; the message carries the exception


class JobError(Exception):
    """A problem with the job as a whole; the CLI prints it as one line and exits non-zero."""

    exit_code = 1


class SpecError(JobError):
    """The job/serve file is invalid. `problems` holds one 'field.path: message' line per error."""

    exit_code = 2

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem(s)\n" + "\n".join(f"  {p}" for p in problems))


class OutputError(JobError):
    """The output directory cannot be written (read-only, full disk, refused resume)."""

    exit_code = 3


class EngineStartError(JobError):
    """A vLLM engine could not start (missing model, not enough memory, unsupported GPU)."""

    exit_code = 4


def print_error(e: JobError, kind: str = "job file") -> None:
    """The CLI's report of a JobError on stderr: every problem of an invalid file, else one line."""
    import sys

    if isinstance(e, SpecError):
        print(f"invalid {kind} {e.source}:", file=sys.stderr)
        for p in e.problems:
            print(f"  {p}", file=sys.stderr)
    else:
        print(f"error: {e}", file=sys.stderr)
