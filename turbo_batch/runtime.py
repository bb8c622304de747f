"""Connecting to Ray, in one place, for `run`, `serve` and tests; and the environment of engine processes.

Owns: `connect_ray()` (a private local Ray, or joining a running cluster with Ray 2.60's token auth
picked up from ~/.ray/auth_token), `ENGINE_ENV` (environment variables every engine actor or replica
gets). Must not touch: jobs, engines, Serve apps — callers decide what runs once connected.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from turbo_batch.errors import JobError

# Engines run vLLM in their own process: no tokenizer thread pools fighting the engine for cores, and
# no FlashInfer sampler (not present everywhere; vLLM would import it for sampling).
ENGINE_ENV = {"TOKENIZERS_PARALLELISM": "false", "VLLM_USE_FLASHINFER_SAMPLER": "0"}

# A private local Ray keeps at most this many IDLE worker processes (Ray's own default: one per CPU).
# Ray Data's read, key and sort tasks fan out to one worker per CPU before the engines are ready; left
# idle, each of those processes still burns ~0.4% of a core (its core worker's threads), which on the
# 32-core H200 host was the largest non-engine cost in the timed window (bench_widehost.py measures it).
# Busy workers are not limited; an idle one beyond this is ended after 1 s. RAY_num_workers_soft_limit
# in the environment overrides it.
IDLE_WORKERS = 4


def connect_ray(address: str, *, num_cpus: int | None = None) -> bool:
    """Start a private local Ray (`address="local"`) or join a running cluster (`auto`, host:port,
    ray://…). Returns True if this call connected (the caller then shuts Ray down), False if this
    process was already connected."""
    import ray

    if ray.is_initialized():
        return False
    logging.getLogger("ray").setLevel(logging.WARNING)
    kw: dict[str, Any] = {
        "logging_level": logging.WARNING,
        "log_to_driver": bool(os.environ.get("TURBO_BATCH_VERBOSE")),
    }
    if address == "local":  # always a private Ray, even when `ray start` runs on this machine
        if "RAY_num_workers_soft_limit" not in os.environ:
            kw["_system_config"] = {"num_workers_soft_limit": IDLE_WORKERS}
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **kw)
        return True
    if "RAY_AUTH_MODE" not in os.environ:  # Ray 2.60 sends ~/.ray/auth_token to an explicit address
        from ray._private.authentication import authentication_token_setup as auth  # only if told so

        auth.maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    try:
        ray.init(address=address, **kw)
    except ConnectionError as e:
        raise JobError(f"cannot connect to the Ray cluster at {address!r}: {e}") from None
    return True
