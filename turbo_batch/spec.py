"""Job files: the pydantic model of a job, loading from YAML, and errors that name their field.

Everything here is checked before Ray or vLLM is imported (this module imports neither): unknown keys,
wrong types, allowed values, template syntax, the extract JSON schema. Checks that need the data
(do the named columns exist?) run in `batch.preflight`, still before any engine starts.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from turbo_batch.errors import SpecError
from turbo_batch.paths import cache_dir, expand
from turbo_batch.specfile import format_errors, parse, read_yaml  # noqa: F401 (re-exported)

# GPU types: keys of model.engine_by_gpu, the names of engine/profiles.py's profiles (which checks that
# they agree), the Ray resources and node labels of the cluster files.
GPU_TYPES: tuple[str, ...] = ("rtx-5090", "rtx-pro-6000", "b200", "h200", "h100")
# vLLM engine arguments that change only speed or memory, never a row's result (resume fingerprints)
SPEED_ENGINE_KEYS = frozenset(
    {
        "max_num_seqs",
        "max_num_batched_tokens",
        "gpu_memory_utilization",
        "enable_prefix_caching",
        "enforce_eager",
        "swap_space",
        "scheduling_policy",
        "kv_cache_memory_bytes",
    }
)
MAX_CONTEXT = 10_000_000  # tokens: above every model's context (preflight checks the model's own)


class Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class InputSpec(Strict):
    path: str | list[str] = Field(
        description="parquet/JSONL files, directories or globs, or a save_to_disk dir"
    )
    format: Literal["auto", "parquet", "jsonl", "hf", "openai_batch"] = Field(
        default="auto",
        description="openai_batch: OpenAI Batch API input JSONL (custom_id is the row id; needs task generate)",
    )
    text_columns: list[str] = Field(default=["text"], min_length=1)
    id_column: str | None = None
    limit: int | None = Field(default=None, gt=0, le=2**63 - 1)
    split: str | None = Field(default=None, description="split of a saved DatasetDict")

    @model_validator(mode="before")
    @classmethod
    def _openai_ids(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("format") == "openai_batch" and data.get("id_column") is None:
            data = {**data, "id_column": "custom_id"}  # custom_id is the row id (unique: preflight checks)
        return data

    @property
    def paths(self) -> list[str]:
        return [self.path] if isinstance(self.path, str) else list(self.path)


class ClassifyTask(Strict):
    type: Literal["classify"]
    labels: list[str] = Field(min_length=2, max_length=10_000)
    label_descriptions: dict[str, str] = Field(default_factory=dict)
    gold_column: str | None = Field(default=None, description="column of gold labels: the summary evaluates")
    gold_map: dict[str, str] = Field(
        default_factory=dict, description="gold column value -> label, if they differ"
    )
    method: Literal["auto", "logprobs", "guided"] = Field(
        default="auto", description="auto: one forward pass where labels' first tokens differ, else guided"
    )

    @field_validator("labels")
    @classmethod
    def _labels_ok(cls, labels: list[str]) -> list[str]:
        if any(not label.strip() for label in labels):
            raise ValueError("labels must be non-empty strings")
        if len(set(labels)) != len(labels):
            raise ValueError(f"labels must be unique, got {labels}")
        return labels

    @model_validator(mode="after")
    def _descriptions_ok(self) -> ClassifyTask:
        unknown = sorted(set(self.label_descriptions) - set(self.labels))
        if unknown:
            raise ValueError(
                f"label_descriptions has keys that are not labels: {unknown}; labels: {self.labels}"
            )
        return self


class GenerateTask(Strict):
    type: Literal["generate"]
    max_tokens: int = Field(default=128, ge=1, le=MAX_CONTEXT)
    stop: list[str] = Field(default_factory=list)


class ExtractTask(Strict):
    type: Literal["extract"]
    json_schema: dict[str, Any] = Field(alias="schema")
    max_tokens: int = Field(default=512, ge=1, le=MAX_CONTEXT)

    @field_validator("json_schema")
    @classmethod
    def _schema_ok(cls, schema: dict[str, Any]) -> dict[str, Any]:
        import jsonschema

        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.SchemaError as e:
            raise ValueError(f"not a valid JSON schema: {e.message}") from None
        return schema


TaskSpec = Annotated[Union[ClassifyTask, GenerateTask, ExtractTask], Field(discriminator="type")]  # noqa: UP007


class PromptSpec(Strict):
    template: str | None = Field(
        default=None, description="Jinja over row columns; default: the first text column"
    )
    system: str | None = None
    chat: bool = Field(default=True, description="apply the model's chat template")
    order: Literal["auto", "prefix", "none"] = Field(
        default="auto",
        description="auto/prefix: rows that share a rendered prompt prefix run together (KV cache reuse); "
        "none: input order",
    )
    group_by: str | None = Field(
        default=None, description="order rows by this column's value instead of the rendered prefix"
    )

    @field_validator("group_by")
    @classmethod
    def _group_by_needs_order(cls, column: str | None, info: ValidationInfo) -> str | None:
        if column is not None and info.data.get("order") == "none":
            raise ValueError("orders rows, so it needs prompt.order auto or prefix, not none")
        return column

    @field_validator("template", "system")
    @classmethod
    def _compiles(cls, source: str | None) -> str | None:
        if source is not None:
            from turbo_batch.prompt import check_template

            check_template(source)
        return source


class ModelSpec(Strict):
    path: str = Field(description="local checkpoint dir or hub id")
    preset: Literal["auto", "cpu", "turbo", "classification", "generation", "latency", "batch"] = "auto"
    engine: dict[str, Any] = Field(
        default_factory=dict,
        description="vLLM engine arguments for every engine; keys left out are computed per GPU",
    )
    engine_by_gpu: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="vLLM engine arguments per GPU type (rtx-5090, rtx-pro-6000, b200, h200, h100, cpu), "
        "applied after `engine`",
    )
    tokenizer: str | None = None
    trust_remote_code: bool = False

    @field_validator("engine")
    @classmethod
    def _no_remote_code_backdoor(cls, engine: dict[str, Any]) -> dict[str, Any]:
        if "trust_remote_code" in engine:
            raise ValueError(
                "trust_remote_code: set model.trust_remote_code (the one switch for remote code)"
            )
        return engine

    @field_validator("engine_by_gpu")
    @classmethod
    def _gpu_types_ok(cls, by_gpu: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        known = (*GPU_TYPES, "cpu")
        unknown = sorted(set(by_gpu) - set(known))
        if unknown:
            raise ValueError(f"unknown GPU type(s) {unknown}; known: {', '.join(known)}")
        if any("trust_remote_code" in e for e in by_gpu.values()):
            raise ValueError(
                "trust_remote_code: set model.trust_remote_code (the one switch for remote code)"
            )
        return by_gpu


class SamplingSpec(Strict):
    temperature: float = Field(default=0.0, ge=0.0, le=100.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=1, le=10_000_000)
    seed: int | None = Field(default=0, ge=-(2**63), le=2**63 - 1, description="within int64")
    extra: dict[str, Any] = Field(default_factory=dict, description="more vLLM SamplingParams fields")


class OutputSpec(Strict):
    dir: str
    keep_columns: list[str] = Field(default_factory=list)
    part_rows: int = Field(default=1000, ge=1, le=10_000_000, description="rows per committed parquet part")
    format: Literal["parquet", "openai_batch", "both"] = Field(
        default="parquet",
        description="openai_batch/both: also openai_batch_output.jsonl, derived from the committed parts at "
        "job end (the parts stay: they are the exactly-once commit log)",
    )


class ClusterSpec(Strict):
    address: str = Field(default="local", description="local, auto, or a Ray address (host:port, ray://...)")
    engines: Annotated[int, Field(ge=1, le=4096)] | Literal["auto"] = Field(
        default="auto", description="auto = one per GPU (one on a CPU box)"
    )
    engine_source: Literal["own", "serve"] = Field(
        default="own",
        description="own: start engines for this job; serve: use a running turbo-batch serve app",
    )
    serve_app: str = "turbo-batch"
    priority: int = Field(
        default=10, ge=0, le=2**31 - 1, description="vLLM priority of batch rows when engine_source=serve"
    )
    num_cpus: int | None = Field(
        default=None, ge=1, le=1_000_000, description="CPUs of a local Ray (default: all)"
    )
    engine_cpus: float = Field(default=1.0, ge=0.0, le=4096)
    engine_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Ray custom resources each engine actor needs (places engines on labelled nodes)",
    )
    render_cpus: float = Field(default=0.5, gt=0.0, le=4096)
    batch_rows: int = Field(default=32, ge=1, le=100_000, description="rows per call to an engine")
    rows_in_flight: int | None = Field(
        default=None, ge=1, le=10_000_000, description="per engine; default 2 x max_num_seqs"
    )
    max_attempts: int = Field(
        default=3, ge=1, le=100, description="tries of a row before it becomes ENGINE_ERROR"
    )
    reuse_engines: bool = Field(
        default=False, description="keep engines alive between jobs (detached actors)"
    )


# Rough on-demand rental prices (USD per GPU-hour, late 2026) for the cost lines of the summary and
# report; `cpu` is per engine on a CPU box. Set your own in the job file: report.gpu_hour_usd.
DEFAULT_GPU_HOUR_USD: dict[str, float] = {
    "rtx-5090": 0.70,
    "rtx-pro-6000": 1.80,
    "b200": 5.50,
    "h100": 2.50,
    "h200": 3.50,
    "cpu": 0.05,
}


class ReportSpec(Strict):
    gpu_hour_usd: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_GPU_HOUR_USD),
        description="USD per GPU-hour by GPU type (rtx-5090, rtx-pro-6000, b200, h100, h200, cpu); "
        "entries given here replace the defaults of the same type",
    )

    @field_validator("gpu_hour_usd")
    @classmethod
    def _prices_ok(cls, prices: dict[str, float]) -> dict[str, float]:
        bad = sorted(k for k, v in prices.items() if v < 0)
        if bad:
            raise ValueError(f"prices must be >= 0: {bad}")
        return {**DEFAULT_GPU_HOUR_USD, **{k.lower(): float(v) for k, v in prices.items()}}


class JobSpec(Strict):
    name: str | None = None
    input: InputSpec
    task: TaskSpec
    prompt: PromptSpec = PromptSpec()
    model: ModelSpec
    sampling: SamplingSpec = SamplingSpec()
    output: OutputSpec
    cluster: ClusterSpec = ClusterSpec()
    report: ReportSpec = ReportSpec()

    @model_validator(mode="after")
    def _cross(self) -> JobSpec:
        if self.input.format == "openai_batch" and self.task.type != "generate":
            raise ValueError("input.format openai_batch: the task must be generate (each line is a request)")
        if self.input.format == "openai_batch" and self.input.id_column not in (None, "custom_id"):
            raise ValueError("input.id_column: openai_batch input uses custom_id as the row id")
        if self.output.format != "parquet" and self.input.format != "openai_batch":
            raise ValueError(f"output.format {self.output.format}: needs input.format openai_batch")
        if self.cluster.engine_source == "serve" and self.cluster.reuse_engines:
            raise ValueError("cluster.reuse_engines applies to own engines, not engine_source=serve")
        return self

    def fingerprint(self) -> str:
        """Hash of the fields that change what the output means; resume refuses a different one."""
        perf_keys = SPEED_ENGINE_KEYS | {"max_model_len"}  # the resolved max_model_len counts (identity.py)
        meaning = {
            "input": self.input.model_dump(mode="json"),
            "task": self.task.model_dump(mode="json", by_alias=True),
            # the row order changes no row's output: a job resumes across a change of prompt.order
            "prompt": self.prompt.model_dump(mode="json", exclude={"order", "group_by"}),
            "model": {
                "path": self.model.path,
                "tokenizer": self.model.tokenizer,
                "engine": {k: v for k, v in sorted(self.model.engine.items()) if k not in perf_keys},
            },
            # only when set, so fingerprints of jobs without it stay as they were
            **(
                {
                    "engine_by_gpu": {
                        gpu: {k: v for k, v in sorted(e.items()) if k not in perf_keys}
                        for gpu, e in sorted(self.model.engine_by_gpu.items())
                    }
                }
                if self.model.engine_by_gpu
                else {}
            ),
            "sampling": self.sampling.model_dump(mode="json"),
            "keep_columns": list(self.output.keep_columns),
        }
        blob = json.dumps(meaning, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- loading


def expand_paths(data: Any) -> Any:
    """Expand ~ and ${VAR} in the path fields of a raw job mapping (in place; returns it)."""
    if not isinstance(data, dict):
        return data
    for section, key in (("input", "path"), ("model", "path"), ("model", "tokenizer"), ("output", "dir")):
        node = data.get(section)
        if isinstance(node, dict) and key in node:
            node[key] = expand(node[key])
    return data


def load_job(path: str | Path, sets: Sequence[str] = ()) -> JobSpec:
    """Load and validate a job file, with `--set key.path=value` overrides (YAML values) applied;
    raises SpecError listing every problem with its field path (output paths outside the root too)."""
    os.environ.setdefault("TURBO_BATCH_CACHE", str(cache_dir()))  # jobs may name ${TURBO_BATCH_CACHE}
    data = expand_paths(apply_sets(read_yaml(path), sets))
    job = parse(JobSpec, data, str(path))
    resolve_output_dir(job)  # refuses output paths that escape the output root
    return job


def apply_sets(data: Any, sets: Sequence[str]) -> Any:
    """Apply `key.path=value` overrides (the value parsed as YAML) to a raw job mapping."""
    for item in sets:
        key, eq, raw = item.partition("=")
        if not eq or not key:
            raise SpecError("--set", [f"{item}: expected key.path=value"])
        node = data if isinstance(data, dict) else {}
        parts = key.split(".")
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise SpecError("--set", [f"{item}: {p} is not a section"])
            node = nxt
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def output_root() -> Path:
    """Outputs must resolve under this root (env TURBO_BATCH_OUTPUT_ROOT, default: the working dir)."""
    return Path(os.environ.get("TURBO_BATCH_OUTPUT_ROOT", os.getcwd())).resolve()


def resolve_output_dir(spec: JobSpec) -> Path:
    """The job's output dir, refusing paths that escape the output root (`..`, absolute elsewhere)."""
    root = output_root()
    raw = Path(os.path.expanduser(spec.output.dir))
    target = (raw if raw.is_absolute() else root / raw).resolve()
    if target != root and root not in target.parents:
        raise SpecError(
            "job",
            [
                f"output.dir: {spec.output.dir!r} resolves to {target}, outside the output root {root} "
                "(set TURBO_BATCH_OUTPUT_ROOT to allow it)"
            ],
        )
    return target
