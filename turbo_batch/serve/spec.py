"""The serve file: `ServeSpec` (pydantic, frozen, unknown keys refused) and how it is loaded.

Owns: the serve file's model (model, http, cluster, auth, limits, the online-first gate, named
classifiers), `load_serve()`, `api_key()` and the deployment names that batch jobs look up
(`ENGINE_DEPLOYMENT`). Must not touch: Ray, Serve, vLLM (nothing here imports them), HTTP handling.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from turbo_batch.errors import SpecError
from turbo_batch.paths import cache_dir, expand
from turbo_batch.spec import ClassifyTask, ModelSpec, PromptSpec, Strict, parse, read_yaml

ENGINE_DEPLOYMENT = "Engine"  # ServePool finds the engines of app `job.cluster.serve_app` by this name
INGRESS_DEPLOYMENT = "Api"
GATE_FIELDS = {"batch_rows_while_online", "batch_rows_max", "batch_resume_after_s"}


class ClassifierSpec(Strict):
    """A named classifier for /v1/classify: the request's text is the template variable `text`."""

    labels: list[str] = Field(min_length=2)
    label_descriptions: dict[str, str] = Field(default_factory=dict)
    method: Literal["auto", "logprobs", "guided"] = "auto"
    prompt: PromptSpec = PromptSpec()

    @model_validator(mode="after")
    def _check(self) -> ClassifierSpec:
        from pydantic import ValidationError

        from turbo_batch.prompt import BUILTINS, template_variables

        try:
            self.task()
        except ValidationError as e:
            raise ValueError(e.errors()[0]["msg"].removeprefix("Value error, ")) from None
        for src in (self.prompt.template, self.prompt.system):
            extra = sorted(template_variables(src) - {"text", *BUILTINS}) if src else []
            if extra:
                raise ValueError(f"prompt uses {extra}; a classifier's template may use only `text`")
        return self

    def task(self) -> ClassifyTask:
        return ClassifyTask(
            type="classify",
            labels=self.labels,
            label_descriptions=self.label_descriptions,
            method=self.method,
        )


class HttpSpec(Strict):
    host: str = Field(default="127.0.0.1", description="listen address (the replicas' or Serve's proxy's)")
    port: int = Field(default=8000, ge=1, le=65535)
    ingress_replicas: int = Field(default=1, ge=1, description="Api replicas (layouts split, split-direct)")
    layout: Literal["direct", "colocated", "split", "split-direct"] = Field(
        default="direct",
        description="direct: each Engine replica serves HTTP itself on http.port (+1, +2, ... for more "
        "replicas on one host), like `vllm serve`, with no Serve proxy in the token path; colocated: each "
        "Engine replica is the ingress behind Serve's HTTP proxy; split: an Api ingress deployment behind "
        "Serve's proxy calls the Engine deployment by handle; split-direct: the Api replicas serve HTTP "
        "themselves, all on http.port (SO_REUSEPORT), and call the Engine deployment by handle",
    )


class ClusterSpec(Strict):
    address: str = Field(default="local", description="local (start Ray here), auto, or a Ray address")
    num_cpus: int | None = Field(default=None, ge=1, description="CPUs of a local Ray (default: all)")
    engine_cpus: float = Field(default=1.0, ge=0.0, description="CPUs per engine replica")


class AuthSpec(Strict):
    api_key_env: str | None = Field(
        default=None, description="environment variable holding the API key; unset: no key required"
    )


class LimitsSpec(Strict):
    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    max_messages: int = Field(default=64, ge=1)
    max_tokens: int = Field(default=1024, ge=1, description="largest max_tokens a request may ask for")
    default_max_tokens: int = Field(default=256, ge=1)
    max_inputs: int = Field(default=64, ge=1, description="texts per /v1/classify request")
    max_concurrent: int = Field(default=128, ge=1, description="online requests in flight per ingress → 429")
    max_online_per_engine: int = Field(
        default=256, ge=1, description="online requests queued or running in one engine → 503"
    )
    engine_max_queued: int = Field(default=64, ge=1, description="Serve's queue to the engines → 503")
    # The online-first gate of each engine replica (serve_engine.EngineReplica), for batch rows sent
    # through this app (priority > 0). Updated in place on a redeploy (Serve user_config).
    batch_rows_while_online: int | None = Field(
        default=0,
        ge=0,
        description="batch rows let into an engine while online requests are in it (0: none, so batch "
        "work only fills idle time; >= 1 guarantees progress under constant online load); null: no cap",
    )
    batch_rows_max: int | None = Field(
        default=None, ge=1, description="batch rows in an engine at any time; null: the batch job decides"
    )
    batch_resume_after_s: float = Field(
        default=0.5, ge=0.0, description="quiet time after the last online request before batch rows resume"
    )


class ServeSpec(Strict):
    name: str = Field(default="turbo-batch", description="Serve app name (a job's cluster.serve_app)")
    model: ModelSpec
    served_model_name: str | None = Field(default=None, description="default: the model dir's name")
    engines: int | Literal["auto"] = Field(default="auto", description="auto = one per GPU (one on CPU)")
    http: HttpSpec = HttpSpec()
    cluster: ClusterSpec = ClusterSpec()
    auth: AuthSpec = AuthSpec()
    limits: LimitsSpec = LimitsSpec()
    classifiers: dict[str, ClassifierSpec] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _cross(self) -> ServeSpec:
        if self.limits.default_max_tokens > self.limits.max_tokens:
            raise ValueError("limits.default_max_tokens must not exceed limits.max_tokens")
        if not self.http.layout.startswith("split") and self.http.ingress_replicas != 1:
            raise ValueError(
                f"http.ingress_replicas: with layout {self.http.layout} each engine replica is an ingress"
            )
        return self

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model.path.rstrip("/")).name or self.model.path

    @property
    def max_labels(self) -> int:
        return max((len(c.labels) for c in self.classifiers.values()), default=0)


def load_serve(path: str | Path, overrides: dict[str, Any] | None = None) -> ServeSpec:
    """Load and validate a serve file (raises SpecError naming every bad field)."""
    os.environ.setdefault("TURBO_BATCH_CACHE", str(cache_dir()))
    data = read_yaml(path)
    if isinstance(data, dict):
        model = data.get("model")
        if isinstance(model, dict):
            for key in ("path", "tokenizer"):
                if isinstance(model.get(key), str):
                    model[key] = expand(model[key])
        for dotted, value in (overrides or {}).items():
            section, _, key = dotted.partition(".")
            data.setdefault(section, {})[key] = value
    return parse(ServeSpec, data, str(path))


def api_key(spec: ServeSpec) -> str | None:
    env = spec.auth.api_key_env
    if env is None:
        return None
    key = os.environ.get(env, "")
    if not key:
        raise SpecError("serve", [f"auth.api_key_env: environment variable {env} is not set or empty"])
    return key
