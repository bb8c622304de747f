"""The online endpoint: `turbo-batch serve serve.yaml` deploys a Ray Serve app on the batch engine class.

http.layout split:
    Api      (FastAPI ingress, num_cpus=0)  auth, limits, chat template → token ids, SSE, /metrics
      │ handle calls, priority 0; tokens come back on one channel per (Api, Engine) replica pair (channel.py)
    Engine   (one replica per GPU, else a fraction of a CPU)  turbo_batch.engine.Engine (vLLM AsyncLLM)
      ▲ handle.run_rows(..., priority=job.cluster.priority)   batch jobs with cluster.engine_source=serve
http.layout split-direct: the same two deployments, the Api replicas serving HTTP themselves on http.port
(shared by SO_REUSEPORT, direct.py) instead of behind Serve's proxy: one Ray hop per token, not two.
http.layout colocated: one deployment, Engine = the same routes + the engine in one process per GPU
(colocated.py); no handle hop for tokens, batch jobs still call run_rows on it by handle.

The engine runs vLLM with scheduling_policy="priority" (lower value first), so online requests (priority
0) go ahead of waiting batch rows (priority 10 by default), and the engine replica holds batch rows back
while online requests are in it, so the batch backfills idle capacity. Overload ends in a 429 (too many
requests in flight at the ingress) or a 503 (an engine's online queue, or Serve's queue to the engines,
is full), never in an unbounded queue.

Owns: building the app and its Serve options (`build_app`), deploying and removing it, and the `serve`
command. Must not touch: the serve file's model (spec.py), the engine replica (replica.py), routes
(ingress.py), errors/schemas/auth (http.py); the batch side's pool over this app is batch/pool.py.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from turbo_batch.errors import EngineStartError, JobError, SpecError, print_error
from turbo_batch.paths import check_local_model
from turbo_batch.runtime import ENGINE_ENV, connect_ray
from turbo_batch.serve.spec import (
    ENGINE_DEPLOYMENT,
    GATE_FIELDS,
    INGRESS_DEPLOYMENT,
    ServeSpec,
    api_key,
    load_serve,
)

log = logging.getLogger("turbo_batch.serve")
# Environment of every replica (engine and ingress). TURBO_BATCH_TRACE (a file) turns on the ingress's
# per-stage timing trace; TB_SERVE_REPLICA_ENV (JSON) adds variables, for experiments.
REPLICA_ENV: dict[str, str] = {k: v for k in ("TURBO_BATCH_TRACE",) if (v := os.environ.get(k))} | json.loads(
    os.environ.get("TB_SERVE_REPLICA_ENV") or "{}"
)


def api_config(spec: ServeSpec, *, key: str | None) -> dict[str, Any]:
    """What the routes (ingress.Api) are built from: model, limits, classifiers, key."""
    return {
        "model_name": spec.model_name,
        "model": spec.model.model_dump(mode="json"),
        "limits": spec.limits.model_dump(exclude=GATE_FIELDS),  # the gate goes by user_config
        "classifiers": {
            name: {"task": c.task().model_dump(mode="json"), "prompt": c.prompt.model_dump(mode="json")}
            for name, c in spec.classifiers.items()
        },
        "api_key": key,
    }


def build_app(spec: ServeSpec, *, key: str | None, gpus: int | None = None) -> Any:
    """The Serve application (Api ingress bound to the Engine deployment) for `spec`."""
    import ray
    from ray import serve

    from turbo_batch.serve.ingress import Api
    from turbo_batch.serve.replica import EngineReplica

    if gpus is None:
        gpus = int(ray.cluster_resources().get("GPU", 0))
    replicas = spec.engines if spec.engines != "auto" else max(gpus, 1)
    lim = spec.limits
    config = api_config(spec, key=key)
    model = config["model"]
    env = {**ENGINE_ENV, **REPLICA_ENV}
    engine_opts: dict[str, Any] = {
        "name": ENGINE_DEPLOYMENT,
        "num_replicas": replicas,
        "ray_actor_options": {
            "num_cpus": spec.cluster.engine_cpus,
            "num_gpus": 1 if gpus else 0,
            "runtime_env": {"env_vars": env},
        },
        # online requests + batch calls (each carries batch_rows rows) per replica
        "max_ongoing_requests": lim.max_online_per_engine + 64,
        "max_queued_requests": lim.engine_max_queued,
        "user_config": lim.model_dump(include=GATE_FIELDS),
        "max_constructor_retry_count": 2,
        "health_check_period_s": 10,
        "health_check_timeout_s": 60,
        "graceful_shutdown_timeout_s": 30,
    }
    if spec.http.layout == "direct":  # each engine replica serves HTTP itself (direct.py)
        config["direct"] = {"host": spec.http.host, "port": spec.http.port}
    if spec.http.layout in ("colocated", "direct"):  # the engine replicas are the ingress: no hop for tokens
        from turbo_batch.serve.colocated import EngineApi

        engine_opts["max_ongoing_requests"] += 4 * lim.max_concurrent  # HTTP requests count here too
        engine_opts["max_queued_requests"] = max(lim.engine_max_queued, 4 * lim.max_concurrent + 256)
        dep = serve.deployment(serve.ingress()(EngineApi), **engine_opts)
        return dep.bind(model, spec.max_labels, lim.max_online_per_engine, config)
    ingress_cls: type = Api
    # the Api replicas' token channels (channel.py): calls that name an engine replica go to that replica
    engine_opts["request_router_config"] = {"request_router_class": "turbo_batch.serve.channel:ReplicaRouter"}
    if spec.http.layout == "split-direct":  # the Api replicas listen on http.port themselves (direct.py)
        from turbo_batch.serve.direct import DirectApi

        config["direct"] = {"host": spec.http.host, "port": spec.http.port}
        ingress_cls = DirectApi
    engine = serve.deployment(EngineReplica, **engine_opts)
    api = serve.deployment(
        serve.ingress()(ingress_cls),
        name=INGRESS_DEPLOYMENT,
        num_replicas=spec.http.ingress_replicas,
        ray_actor_options={
            "num_cpus": 0,
            "runtime_env": {"env_vars": {"TOKENIZERS_PARALLELISM": "false", **REPLICA_ENV}},
        },
        # Room well past max_concurrent so our own 429 (OpenAI body, instant) answers a burst; Serve's
        # queue in the proxy stays bounded, and its own (plain-text) rejection is a 429 too.
        max_ongoing_requests=4 * lim.max_concurrent + 256,
        max_queued_requests=4 * lim.max_concurrent + 256,
        backpressure_config={"status_code": 429, "retry_after_s": 1},
    )
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

    if spec.http.layout in ("direct", "split-direct"):  # replicas listen on http.port: no Serve proxy
        serve.start(http_options={"location": "NoServer"})
    else:
        serve.start(http_options={"host": spec.http.host, "port": spec.http.port})
    try:
        serve.run(build_app(spec, key=key), name=spec.name, route_prefix="/")
    except Exception as e:
        raise EngineStartError(_deploy_error(spec, e)) from None
    if spec.http.layout == "direct":
        urls = replica_urls(spec)
        return urls[0] if urls else url_of(spec)
    return url_of(spec)


def replica_urls(spec: ServeSpec, tries: int = 16) -> list[str]:
    """Layout direct: the URL each engine replica serves on (http.port, or the next free one)."""
    from ray import serve

    handle = serve.get_deployment_handle(ENGINE_DEPLOYMENT, app_name=spec.name)
    urls: set[str] = set()
    for _ in range(tries):  # calls are spread over the replicas; a few per replica find them all
        url = handle.info.remote().result(timeout_s=30).get("http_url")
        if url:
            urls.add(url)
    return sorted(urls, key=lambda u: int(u.rsplit(":", 1)[1].split("/")[0]))


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
    overrides = {
        k: v for k, v in (("http.host", host), ("http.port", port), ("cluster.address", address)) if v
    }
    started = False
    try:
        spec = load_serve(serve_file, overrides)
        key = api_key(spec)
        path = spec.model.path
        missing = check_local_model(path)
        if missing:
            raise SpecError(str(serve_file), [f"model.path: {missing}"])
        if key is None and not _is_loopback(spec.http.host):
            print(
                f"warning: serving on {spec.http.host} without an API key (set auth.api_key_env)",
                file=sys.stderr,
            )
        print(f"starting Ray and {spec.engines} engine(s) for {path} ...", file=sys.stderr)
        started = connect_ray(spec.cluster.address, num_cpus=spec.cluster.num_cpus)
        # after ray.init (its own fatal-signal handler would otherwise take SIGTERM) and before the
        # deploy, so a SIGTERM while the engines start also undeploys and stops Ray cleanly
        for sig in (signal.SIGINT, signal.SIGTERM):  # also when started with SIGINT ignored (nohup, &)
            signal.signal(sig, _interrupt)
        t0 = time.monotonic()
        url = deploy(spec, key=key)
        print(
            f"serving {spec.model_name} at {url} (app {spec.name!r}, ready in {time.monotonic() - t0:.0f} s)",
            flush=True,
        )
        others = replica_urls(spec)[1:] if spec.http.layout == "direct" else []
        if others:
            print(f"more engine replicas on this host: {', '.join(others)}", file=sys.stderr)
        import ray

        gcs = ray.get_runtime_context().gcs_address
        print(
            f"batch jobs can share these engines: RAY_ADDRESS={gcs} turbo-batch run job.yaml --via-serve"
            + (f" --set cluster.serve_app={spec.name}" if spec.name != "turbo-batch" else ""),
            file=sys.stderr,
        )
        print("Ctrl-C to stop", file=sys.stderr, flush=True)
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
