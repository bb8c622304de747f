"""The online endpoint: `turbo-batch serve serve.yaml` deploys a Ray Serve app on the batch engine class.

    Api      (FastAPI ingress, num_cpus=0)  auth, limits, chat template → token ids, SSE, /metrics
      │ handle calls, priority 0
    Engine   (one replica per GPU, else a fraction of a CPU)  turbo_batch.engine.Engine (vLLM AsyncLLM)
      ▲ handle.run_rows(..., priority=job.cluster.priority)   batch jobs with cluster.engine_source=serve

The engine runs vLLM with scheduling_policy="priority" (lower value first), so online requests (priority
0) go ahead of waiting batch rows (priority 10 by default), and the engine replica holds batch rows back
while online requests are in it, so the batch backfills idle capacity. Overload ends in a 429 (too many
requests in flight at the ingress) or a 503 (an engine's online queue, or Serve's queue to the engines,
is full), never in an unbounded queue. This module holds the serve file model (`ServeSpec`), building,
deploying and removing the app, and the `serve` command. The engine deployment is in serve_engine.py,
the routes in serve_api.py, errors/schemas/auth in serve_http.py, the batch side in serve_client.py.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from pydantic import Field, model_validator

from turbo_batch.errors import EngineStartError, JobError, SpecError, print_error
from turbo_batch.spec import ClassifyTask, ModelSpec, PromptSpec, _read_yaml, _Strict, parse

log = logging.getLogger("turbo_batch.serve")

ENGINE_DEPLOYMENT = "Engine"  # ServePool finds the engines of app `job.cluster.serve_app` by this name
INGRESS_DEPLOYMENT = "Api"
GATE_FIELDS = {"batch_rows_while_online", "batch_rows_max", "batch_resume_after_s"}
ENGINE_ENV = {"TOKENIZERS_PARALLELISM": "false", "VLLM_USE_FLASHINFER_SAMPLER": "0"}

# ------------------------------------------------------------------------------------------- serve file


class ClassifierSpec(_Strict):
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


class HttpSpec(_Strict):
    host: str = Field(default="127.0.0.1", description="listen address of Serve's HTTP proxy")
    port: int = Field(default=8000, ge=1, le=65535)
    ingress_replicas: int = Field(default=1, ge=1)


class ClusterSpec(_Strict):
    address: str = Field(default="local", description="local (start Ray here), auto, or a Ray address")
    num_cpus: int | None = Field(default=None, ge=1, description="CPUs of a local Ray (default: all)")
    engine_cpus: float = Field(default=1.0, ge=0.0, description="CPUs per engine replica")


class AuthSpec(_Strict):
    api_key_env: str | None = Field(
        default=None, description="environment variable holding the API key; unset: no key required"
    )


class LimitsSpec(_Strict):
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


class ServeSpec(_Strict):
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
        return self

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model.path.rstrip("/")).name or self.model.path

    @property
    def max_labels(self) -> int:
        return max((len(c.labels) for c in self.classifiers.values()), default=0)


def load_serve(path: str | Path, overrides: dict[str, Any] | None = None) -> ServeSpec:
    """Load and validate a serve file (raises SpecError naming every bad field)."""
    os.environ.setdefault("TURBO_BATCH_CACHE", str(Path.home() / ".cache" / "turbo-batch"))
    data = _read_yaml(path)
    if isinstance(data, dict):
        model = data.get("model")
        if isinstance(model, dict):
            for key in ("path", "tokenizer"):
                if isinstance(model.get(key), str):
                    model[key] = os.path.expanduser(os.path.expandvars(model[key]))
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


# --------------------------------------------------------------------------------------------- the app


def build_app(spec: ServeSpec, *, key: str | None, gpus: int | None = None) -> Any:
    """The Serve application (Api ingress bound to the Engine deployment) for `spec`."""
    import ray
    from ray import serve

    from turbo_batch.serve_api import Api
    from turbo_batch.serve_engine import EngineReplica

    if gpus is None:
        gpus = int(ray.cluster_resources().get("GPU", 0))
    replicas = spec.engines if spec.engines != "auto" else max(gpus, 1)
    lim = spec.limits
    engine = serve.deployment(
        EngineReplica,
        name=ENGINE_DEPLOYMENT,
        num_replicas=replicas,
        ray_actor_options={
            "num_cpus": spec.cluster.engine_cpus,
            "num_gpus": 1 if gpus else 0,
            "runtime_env": {"env_vars": ENGINE_ENV},
        },
        # online requests + batch calls (each carries batch_rows rows) per replica
        max_ongoing_requests=lim.max_online_per_engine + 64,
        max_queued_requests=lim.engine_max_queued,
        user_config=lim.model_dump(include=GATE_FIELDS),
        max_constructor_retry_count=2,
        health_check_period_s=10,
        health_check_timeout_s=60,
        graceful_shutdown_timeout_s=30,
    )
    api = serve.deployment(
        serve.ingress()(Api),
        name=INGRESS_DEPLOYMENT,
        num_replicas=spec.http.ingress_replicas,
        ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}},
        # Room well past max_concurrent so our own 429 (OpenAI body, instant) answers a burst; Serve's
        # queue in the proxy stays bounded, and its own (plain-text) rejection is a 429 too.
        max_ongoing_requests=4 * lim.max_concurrent + 256,
        max_queued_requests=4 * lim.max_concurrent + 256,
        backpressure_config={"status_code": 429, "retry_after_s": 1},
    )
    model = spec.model.model_dump(mode="json")
    config = {
        "model_name": spec.model_name,
        "model": model,
        "limits": lim.model_dump(exclude=GATE_FIELDS),  # the gate goes by user_config: no ingress restart
        "classifiers": {
            name: {"task": c.task().model_dump(mode="json"), "prompt": c.prompt.model_dump(mode="json")}
            for name, c in spec.classifiers.items()
        },
        "api_key": key,
    }
    return api.bind(engine.bind(model, spec.max_labels, lim.max_online_per_engine), config)


def url_of(spec: ServeSpec) -> str:
    host = spec.http.host
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{spec.http.port}/v1"


def deploy(spec: ServeSpec, *, key: str | None) -> str:
    """Deploy the app on the connected Ray cluster and wait until it is running; returns the base URL."""
    from ray import serve

    serve.start(http_options={"host": spec.http.host, "port": spec.http.port})
    try:
        serve.run(build_app(spec, key=key), name=spec.name, route_prefix="/")
    except Exception as e:
        raise EngineStartError(_deploy_error(spec, e)) from None
    return url_of(spec)


def _deploy_error(spec: ServeSpec, e: Exception) -> str:
    from ray import serve

    text = str(e)
    try:  # the replica's own error is in the deployment's status message
        state = serve.status().applications[spec.name]
        text += "\n" + "\n".join(d.message for d in state.deployments.values() if d.message)
    except Exception:
        pass
    for line in text.splitlines():
        if "cannot start vLLM engine" in line:
            return line.strip().split("EngineStartError: ")[-1]
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return f"Serve app {spec.name!r} failed to deploy: {first}"


def undeploy(spec: ServeSpec, *, shutdown: bool) -> None:
    from ray import serve

    try:
        serve.delete(spec.name)
        if shutdown or not serve.status().applications:
            serve.shutdown()
    except Exception as e:  # already gone (Ray stopped first)
        log.warning("serve shutdown: %s", e)


def start_ray(spec: ServeSpec) -> bool:
    """Connect to (or start) Ray; True if this call connected (False: the process already was)."""
    import ray

    if ray.is_initialized():
        return False
    kw: dict[str, Any] = {
        "logging_level": logging.WARNING,
        "log_to_driver": bool(os.environ.get("TURBO_BATCH_VERBOSE")),
    }
    if spec.cluster.address == "local":
        ray.init(address="local", num_cpus=spec.cluster.num_cpus, include_dashboard=False, **kw)
    else:
        if "RAY_AUTH_MODE" not in os.environ:  # Ray 2.60 sends ~/.ray/auth_token to an explicit address
            from ray._private.authentication import authentication_token_setup as auth  # only if told so

            auth.maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
        ray.init(address=spec.cluster.address, **kw)
    return True


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve_command(
    serve_file: Path,
    host: Annotated[str | None, typer.Option(help="listen address (overrides http.host)")] = None,
    port: Annotated[int | None, typer.Option(help="listen port (overrides http.port)")] = None,
    address: Annotated[str | None, typer.Option(help="Ray address: local, auto or host:port")] = None,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (Ray Serve) until Ctrl-C."""
    import sys

    overrides = {
        k: v for k, v in (("http.host", host), ("http.port", port), ("cluster.address", address)) if v
    }
    started = False
    try:
        spec = load_serve(serve_file, overrides)
        key = api_key(spec)
        path = spec.model.path
        if path.startswith(("/", "./", "../", "~")) and not Path(path).expanduser().is_dir():
            raise SpecError(str(serve_file), [f"model.path: {path} does not exist"])
        if key is None and not _is_loopback(spec.http.host):
            print(
                f"warning: serving on {spec.http.host} without an API key (set auth.api_key_env)",
                file=sys.stderr,
            )
        print(f"starting Ray and {spec.engines} engine(s) for {path} ...", file=sys.stderr)
        try:
            started = start_ray(spec)
        except ConnectionError as e:
            raise JobError(f"cannot connect to the Ray cluster at {spec.cluster.address!r}: {e}") from None
        t0 = time.monotonic()
        url = deploy(spec, key=key)
        print(
            f"serving {spec.model_name} at {url} (app {spec.name!r}, ready in {time.monotonic() - t0:.0f} s)"
        )
        import ray

        gcs = ray.get_runtime_context().gcs_address
        print(
            f"batch jobs can share these engines: RAY_ADDRESS={gcs} turbo-batch run job.yaml --via-serve"
            + (f" --set cluster.serve_app={spec.name}" if spec.name != "turbo-batch" else ""),
            file=sys.stderr,
        )
        print("Ctrl-C to stop", file=sys.stderr, flush=True)
        for sig in (signal.SIGINT, signal.SIGTERM):  # also when started with SIGINT ignored (nohup, &)
            signal.signal(sig, _interrupt)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("shutting down ...", file=sys.stderr)
    except JobError as e:
        print_error(e, "serve file")
        raise typer.Exit(e.exit_code) from None
    finally:
        if started:  # a local cluster: stop Serve with it; a joined one: remove only this app
            undeploy(spec, shutdown=spec.cluster.address == "local")
            import ray

            ray.shutdown()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
