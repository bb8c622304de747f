"""The engine: one vLLM AsyncLLM on one accelerator, shared by batch jobs and the Serve app.

`Engine` is a plain class (no Ray Data, no Serve imports). Batch jobs run it as a Ray actor
(`engine_actor_options`), the online endpoint deploys the same class with Ray Serve. It resolves its
own node's device profile, keeps hundreds of requests in flight (async), scores classification in
one forward pass, and turns per-row failures into error rows. If vLLM's engine core dies the
process exits when it runs inside a Ray actor, so Ray restarts it and the caller redoes its rows.
Starting never raises: a failed start is reported by `info()["error"]` as one clear line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from turbo_batch.engine.load import LoadMeter
from turbo_batch.engine.profiles import describe, detect_device, model_context_len, resolve
from turbo_batch.engine.tasks import TaskRunner
from turbo_batch.errors import RowError
from turbo_batch.paths import is_local_path

log = logging.getLogger("turbo_batch.engine")


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".strip()


class Engine:
    """A vLLM AsyncLLM plus the task logic; safe to call concurrently from many coroutines."""

    def __init__(
        self,
        model: Mapping[str, Any],
        *,
        max_labels: int = 0,
        exit_on_dead: bool | None = None,
        gpu_type: str | None = None,
    ):
        self.model = dict(model)
        self.gpu_type = gpu_type  # the labelled GPU slot Ray placed this engine on (batch/pool.py)
        self.error: str | None = None
        self.llm: Any = None
        self.tokenizer: Any = None
        self.args: dict[str, Any] = {}
        self.max_model_len = 0
        self._runners: dict[str, TaskRunner] = {}
        self.load_meter = LoadMeter()  # its max_num_seqs: vLLM's own, once the engine has started
        self._stats_task: asyncio.Task | None = None
        self.exit_on_dead = _in_ray_actor() if exit_on_dead is None else exit_on_dead
        t0 = time.monotonic()
        self.device = detect_device()
        try:
            path = self.model["path"]
            if is_local_path(path) and not Path(path).expanduser().is_dir():
                raise FileNotFoundError(f"model path {path} does not exist")
            resolved = resolve(
                self.model,
                self.device,
                max_labels=max_labels,
                model_max_len=model_context_len(path),
                gpu_type=gpu_type,
            )
            self.args = resolved.args
            self.gpu_type = resolved.profile.name  # whose engine_by_gpu entry applied
            from vllm import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM

            self.llm = AsyncLLM.from_engine_args(
                AsyncEngineArgs(**self.args), stat_loggers=[self.load_meter.factory()]
            )
            self.tokenizer = self.llm.get_tokenizer()
            self.max_model_len = int(self.llm.model_config.max_model_len)
            self.load_meter.max_num_seqs = int(self.llm.vllm_config.scheduler_config.max_num_seqs)
        except Exception as e:  # reported through info(); an actor that raises here would restart forever
            self.error = f"cannot start vLLM engine for {self.model.get('path')}: {_one_line(e)}"
            if "See root cause above" in self.error:
                self.error += " (rerun with TURBO_BATCH_VERBOSE=1 to see the engine's log)"
            log.error(self.error)
        self.start_s = time.monotonic() - t0

    # -- status ---------------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        return {
            "error": self.error,
            "model": self.model.get("path"),
            "max_model_len": self.max_model_len,
            "max_num_seqs": self.args.get("max_num_seqs"),
            "kv_cache_tokens": self.kv_cache_tokens(),
            "async_scheduling": self._resolved("scheduler_config", "async_scheduling"),
            "engine_args": {k: v for k, v in self.args.items() if _jsonable(v)},
            "device": describe(self.device),
            "gpu_type": self.gpu_type,
            "node": _ray_node_id(),
            "pid": os.getpid(),
            "start_s": round(self.start_s, 2),
        }

    def _resolved(self, section: str, key: str) -> Any:
        """A setting as vLLM resolved it at start (e.g. async scheduling, which vLLM decides), or None."""
        try:
            v = getattr(getattr(self.llm.vllm_config, section), key)
        except Exception:  # not started, or a vLLM without it
            return None
        return v if _jsonable(v) else str(v)

    def kv_cache_tokens(self) -> int | None:
        """KV cache size in tokens (vLLM's blocks × block size, known once the engine has started)."""
        try:
            cache = self.llm.vllm_config.cache_config
            return int(cache.num_gpu_blocks * cache.block_size) if cache.num_gpu_blocks else None
        except Exception:  # not started, or a vLLM without these fields
            return None

    async def warmup(self) -> float:
        """Run two throwaway requests so one-time costs (the first logprobs / allowed-token request pays
        ~2 s on CPU) are paid at start, not by the first rows. Returns its seconds; counted as start."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        if self.llm is None:
            return 0.0
        t0 = time.monotonic()
        ids = list(self.tokenizer.encode("warm up the engine", add_special_tokens=True))[:8] or [0]
        final = RequestOutputKind.FINAL_ONLY
        allowed = sorted(set(ids))[:2]
        params = [
            SamplingParams(
                max_tokens=1,
                temperature=0.0,
                logprobs=len(allowed),
                allowed_token_ids=allowed,
                detokenize=False,
                output_kind=final,
            ),
            SamplingParams(max_tokens=4, temperature=0.0, output_kind=final),
        ]
        for i, p in enumerate(params):
            async for _ in self.stream(ids, p, f"warmup-{uuid.uuid4().hex[:8]}-{i}"):
                pass
        took = time.monotonic() - t0
        self.start_s += took
        return took

    def load(self) -> dict[str, Any]:
        """A reading of the scheduler's load so far (engine/load.py: `window()` of two is a summary)."""
        return self.load_meter.reading()

    def _log_stats_every(self) -> None:
        """vLLM's periodic stats line (throughput, requests running and waiting, KV cache use) in this
        engine's log, every VLLM_LOG_STATS_INTERVAL s as `vllm serve` writes it: AsyncLLM logs only when
        asked. Started by the first request, in the caller's event loop."""
        if self._stats_task is not None or self.llm is None or not self.llm.log_stats:
            return
        every = float(os.environ.get("VLLM_LOG_STATS_INTERVAL", "10"))
        if every <= 0:
            return

        async def loop() -> None:
            while self.llm is not None:
                await asyncio.sleep(every)
                with contextlib.suppress(Exception):
                    await self.llm.do_log_stats()

        self._stats_task = asyncio.get_running_loop().create_task(loop())

    def num_unfinished(self) -> int:
        return 0 if self.llm is None else int(self.llm.output_processor.get_num_unfinished_requests())

    async def check_health(self) -> None:
        if self.llm is None:
            raise RuntimeError(self.error or "engine not started")
        await self.llm.check_health()

    def runner(self, task: Mapping[str, Any], sampling: Mapping[str, Any]) -> TaskRunner:
        key = json.dumps([task, sampling], sort_keys=True, default=str)
        if key not in self._runners:
            self._runners[key] = TaskRunner(task, sampling, self.tokenizer)
        return self._runners[key]

    # -- batch ----------------------------------------------------------------------------------------
    async def run_rows(
        self,
        rows: Sequence[Mapping[str, Any]],
        task: Mapping[str, Any],
        sampling: Mapping[str, Any],
        *,
        priority: int = 0,
        tag: str = "row",
    ) -> list[dict[str, Any]]:
        """Run rendered rows ({row_id, prompt_ids, label_ids}) concurrently; one result per row."""
        if self.llm is None:
            raise RuntimeError(self.error or "engine not started")
        runner = self.runner(task, sampling)
        self._log_stats_every()
        return list(
            await asyncio.gather(*(self._row(self._runner_for(runner, r), r, priority, tag) for r in rows))
        )

    def _runner_for(self, runner: TaskRunner, row: Mapping[str, Any]) -> TaskRunner:
        """A row's own sampling (an OpenAI batch line's max_tokens, stop, temperature, ...) over the job's."""
        raw = row.get("sampling")
        if not raw:
            return runner
        over = json.loads(raw) if isinstance(raw, str) else dict(raw)
        task = dict(runner.task)
        for key in ("max_tokens", "stop"):
            if over.get(key) is not None:
                task[key] = over[key]
        sampling = {**runner.sampling, **{k: v for k, v in over.items() if k not in ("max_tokens", "stop")}}
        sampling["extra"] = {**(runner.sampling.get("extra") or {}), **(over.get("extra") or {})}
        return self.runner(task, sampling)

    async def _row(
        self, runner: TaskRunner, row: Mapping[str, Any], priority: int, tag: str
    ) -> dict[str, Any]:
        from vllm.inputs import TokensPrompt

        row_id = row["row_id"]
        ids = row["prompt_ids"]
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)  # numpy from the batch driver
        label_ids = list(row["label_ids"]) if row.get("label_ids") is not None else None
        budget = runner.output_budget(label_ids)
        if len(ids) + budget > self.max_model_len:
            return _error(
                row_id,
                RowError.PROMPT_TOO_LONG,
                f"prompt has {len(ids)} tokens + {budget} to generate > max_model_len {self.max_model_len}",
                prompt_tokens=len(ids),
            )
        request_id = f"{tag}-{row_id}-{uuid.uuid4().hex[:8]}"
        try:
            final = None
            async for out in self.llm.generate(
                TokensPrompt(prompt_token_ids=ids),
                runner.sampling_params(label_ids),
                request_id,
                priority=priority,
            ):
                final = out
            if final is None:
                return _error(
                    row_id, RowError.ENGINE_ERROR, "engine returned no output", prompt_tokens=len(ids)
                )
            return {"row_id": row_id, **runner.parse(final, label_ids)}
        except asyncio.CancelledError:
            await self.llm.abort(request_id)
            raise
        except Exception as e:
            self._maybe_die(e)
            return _error(row_id, RowError.ENGINE_ERROR, _one_line(e), prompt_tokens=len(ids))

    def _maybe_die(self, e: BaseException) -> None:
        from vllm.v1.engine.exceptions import EngineDeadError

        if isinstance(e, EngineDeadError) or (self.llm is not None and getattr(self.llm, "errored", False)):
            log.error("vLLM engine core is dead (%s)", _one_line(e))
            if self.exit_on_dead:
                os._exit(70)  # Ray restarts the actor; the caller redoes the rows it had in flight
            raise e

    # -- online -----------------------------------------------------------------------------------------
    async def stream(
        self, prompt_ids: Sequence[int], params: Any, request_id: str, *, priority: int = 0
    ) -> AsyncIterator[Any]:
        """Yield vLLM RequestOutputs for one request; closing the iterator aborts it in the engine."""
        from vllm.inputs import TokensPrompt

        if self.llm is None:
            raise RuntimeError(self.error or "engine not started")
        self._log_stats_every()
        finished = False
        try:
            async for out in self.llm.generate(
                TokensPrompt(prompt_token_ids=list(prompt_ids)), params, request_id, priority=priority
            ):
                finished = out.finished
                yield out
        except Exception as e:
            self._maybe_die(e)
            raise
        finally:
            if not finished:
                await self.llm.abort(request_id)

    async def abort(self, request_id: str) -> None:
        if self.llm is not None:
            await self.llm.abort(request_id)

    def shutdown(self) -> None:
        if self._stats_task is not None:
            self._stats_task.cancel()
            self._stats_task = None
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None


def _error(row_id: Any, code: RowError, message: str, **extra: Any) -> dict[str, Any]:
    return {"row_id": row_id, "error_code": str(code), "error_message": message, **extra}


def _jsonable(v: Any) -> bool:
    return isinstance(v, str | int | float | bool | type(None))


def _in_ray_actor() -> bool:
    try:
        import ray

        return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
    except Exception:
        return False


def _ray_node_id() -> str | None:
    """The Ray node this engine runs on (None outside Ray): where a labelled cluster put it."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:
        return None
