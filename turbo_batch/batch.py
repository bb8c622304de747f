"""The batch pipeline: Ray Data reads and renders rows, a pool of engine actors runs them, the driver commits.

    read    RowSource (Ray Data Datasource): stable row_id, committed rows dropped   (CPU tasks)
    render  map_batches(render_block): sandboxed Jinja + chat template → token ids     (CPU tasks)
    engine  EnginePool: one Engine actor per GPU, hundreds of rows in flight each      (GPU actors)
    write   OutputDir: parquet parts, atomic commit, manifest, success marker         (driver)

The driver streams rendered blocks out of Ray Data and dispatches them in small batches to the least
loaded engine that fits the row (mixed clusters: an engine only gets rows within its max_model_len).
A dead engine actor is restarted by Ray and its rows are redone; a row that keeps killing engines is
isolated by bisection and becomes an ENGINE_ERROR row. Results are committed in parts as they finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.util
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from turbo_batch import report
from turbo_batch.errors import EngineStartError, JobError, RowError, SpecError
from turbo_batch.output import OutputDir
from turbo_batch.prompt import PromptBuilder, PromptConfig, RowProblem, load_tokenizer, template_variables
from turbo_batch.sources import (
    INPUT_ERROR,
    Unit,
    discover,
    input_columns,
    make_datasource,
    plan_units,
    read_ids,
)
from turbo_batch.spec import ClassifyTask, ExtractTask, JobSpec, resolve_output_dir

log = logging.getLogger("turbo_batch")
RESULT_COLUMNS = frozenset(
    {
        "row_id",
        "label",
        "probs",
        "text",
        "json",
        "finish_reason",
        "prompt_tokens",
        "output_tokens",
        "error_code",
        "error_message",
    }
)
FLUSH_SECONDS = 20.0
REVIVE_TIMEOUT_S = 1800.0
PREFETCH_BLOCKS = 8


# ------------------------------------------------------------------------------------------- preflight


@dataclass
class Plan:
    job: JobSpec
    files: list[tuple[str, str]]
    units: list[Unit]
    columns: list[str]  # input columns the pipeline reads
    passthrough: list[str]  # input columns copied to the output
    output_dir: Path
    total_rows: int
    fingerprint: str


def _needed_columns(job: JobSpec) -> list[str]:
    cfg = PromptConfig.from_job(job)
    names = list(job.input.text_columns)
    for src in (cfg.user_template, cfg.system_template):
        if src:
            names += sorted(template_variables(src) - {"labels", "label_descriptions", "schema"})
    names += list(job.output.keep_columns)
    if job.input.id_column:
        names.append(job.input.id_column)
    if isinstance(job.task, ClassifyTask) and job.task.gold_column:
        names.append(job.task.gold_column)
    return list(dict.fromkeys(names))


def _check_engine_keys(job: JobSpec) -> None:
    if not job.model.engine or importlib.util.find_spec("vllm") is None:
        return
    from vllm.engine.arg_utils import AsyncEngineArgs

    known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    bad = sorted(set(job.model.engine) - known)
    if bad:
        raise SpecError("job", [f"model.engine.{k}: not a vLLM engine argument" for k in bad])


def preflight(job: JobSpec) -> Plan:
    """Every check that needs the data or the machine, before Ray or an engine starts."""
    out_dir = resolve_output_dir(job)
    files = discover(job.input.paths, job.input.format, job.input.split)
    units = plan_units(files, job.input.limit)
    needed = _needed_columns(job)
    have = input_columns(files)
    if have is not None:
        missing = [c for c in needed if c not in have]
        if missing:
            where = {c: _field_of(job, c) for c in missing}
            raise SpecError(
                "job",
                [
                    f"{where[c]}: column {c!r} is not in the input (columns: {', '.join(sorted(have))})"
                    for c in missing
                ],
            )
    if job.input.id_column:
        ids = read_ids(units, job.input.id_column)
        if ids.null_count:
            raise JobError(f"input.id_column: {job.input.id_column!r} has {ids.null_count} null values")
        if len(ids) != len(ids.unique()):
            raise JobError(
                f"input.id_column: {job.input.id_column!r} has duplicate values; ids must be unique"
            )
    model_path = job.model.path
    if model_path.startswith(("/", "./", "../", "~")) and not Path(model_path).expanduser().is_dir():
        raise JobError(f"model.path: {model_path} does not exist")
    _check_engine_keys(job)
    signature = [(Path(f).name, os.path.getsize(f)) for f, _ in files]
    import hashlib

    fp = hashlib.sha256((job.fingerprint() + repr(signature)).encode()).hexdigest()[:16]
    passthrough = list(
        dict.fromkeys(
            list(job.output.keep_columns)
            + ([job.task.gold_column] if isinstance(job.task, ClassifyTask) and job.task.gold_column else [])
        )
    )
    return Plan(job, files, units, needed, passthrough, out_dir, sum(u.num_rows for u in units), fp)


def _field_of(job: JobSpec, column: str) -> str:
    if column in job.input.text_columns:
        return "input.text_columns"
    if column == job.input.id_column:
        return "input.id_column"
    if column in job.output.keep_columns:
        return "output.keep_columns"
    if isinstance(job.task, ClassifyTask) and column == job.task.gold_column:
        return "task.gold_column"
    return "prompt.template"


# ---------------------------------------------------------------------------------------------- render


_BUILDERS: dict[str, tuple[PromptBuilder, Any]] = {}


def _builder(cfg: PromptConfig, tokenizer_path: str, trust_remote_code: bool) -> tuple[PromptBuilder, Any]:
    """One builder per worker process and job (Ray reuses workers, so the tokenizer loads once)."""
    from turbo_batch.tasks import TaskRunner

    key = json.dumps(
        [dataclasses.asdict(cfg), tokenizer_path, trust_remote_code], sort_keys=True, default=str
    )
    if key not in _BUILDERS:
        tok = load_tokenizer(tokenizer_path, trust_remote_code)
        _BUILDERS[key] = (PromptBuilder(cfg, tok), TaskRunner(cfg.task, {}, tok))
    return _BUILDERS[key]


def render_block(
    block: pa.Table,
    *,
    cfg: PromptConfig,
    tokenizer_path: str,
    trust_remote_code: bool,
    passthrough: Sequence[str],
) -> pa.Table:
    """Ray Data stage: input rows → token ids (+ label first tokens) or an error code per row."""
    builder, runner = _builder(cfg, tokenizer_path, trust_remote_code)
    # Text columns go through bytes so invalid UTF-8 is caught per row, not for the whole block.
    for col in cfg.text_columns:
        if col in block.column_names and pa.types.is_string(block.schema.field(col).type):
            idx = block.column_names.index(col)
            block = block.set_column(idx, col, block.column(col).cast(pa.binary()))
    prompt_ids, label_ids, budgets, ntok, codes, messages = [], [], [], [], [], []
    for row in block.to_pylist():
        ids: list[int] | None = None
        labels: list[int] | None = None
        code = message = None
        if row.get(INPUT_ERROR):
            code, _, message = row[INPUT_ERROR].partition(":")
        else:
            try:
                ids, labels = builder.build(row)
            except RowProblem as e:
                code, message = str(e.code), e.message
            except Exception as e:  # a tokenizer failure on odd input must not stop the job
                code, message = str(RowError.INTERNAL_ERROR), f"render: {type(e).__name__}: {e}"
        prompt_ids.append(ids)
        label_ids.append(labels)
        budgets.append(runner.output_budget(labels) if ids is not None else None)
        ntok.append(len(ids) if ids is not None else None)
        codes.append(code)
        messages.append(message)
    cols = {"row_id": block.column("row_id")}
    for c in passthrough:
        cols[c] = block.column(c)
    cols.update(
        {
            "prompt_ids": pa.array(prompt_ids, pa.list_(pa.int32())),
            "label_ids": pa.array(label_ids, pa.list_(pa.int32())),
            "budget": pa.array(budgets, pa.int32()),
            "prompt_tokens": pa.array(ntok, pa.int32()),
            "error_code": pa.array(codes, pa.string()),
            "error_message": pa.array(messages, pa.string()),
        }
    )
    return pa.table(cols)


# ------------------------------------------------------------------------------------------ engine pool


@dataclass
class Slot:
    """One engine as the dispatcher sees it."""

    name: str
    call: Callable[..., Any]  # async (rows, task, sampling, priority) -> results
    info: dict[str, Any]
    capacity: int
    inflight: int = 0
    done: int = 0
    reserved: bool = False  # running quarantined rows alone
    ping: Callable[[], Any] | None = None  # async: returns once the engine answers (raises while it is down)
    down: bool = False  # lost; waiting for Ray to restart it

    @property
    def max_model_len(self) -> int:
        return int(self.info.get("max_model_len") or 0)


def engine_actor_options(job: JobSpec, index: int, use_gpu: bool) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "num_cpus": job.cluster.engine_cpus,
        "num_gpus": 1 if use_gpu else 0,
        "max_restarts": -1,
        "max_task_retries": 0,
        "max_concurrency": 1000,
        "scheduling_strategy": "SPREAD",
        "runtime_env": {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "VLLM_USE_FLASHINFER_SAMPLER": "0"}},
    }
    if job.cluster.reuse_engines:
        import hashlib

        key = hashlib.sha256(
            repr((job.model.model_dump(mode="json"), _max_labels(job))).encode()
        ).hexdigest()[:10]
        opts.update(
            name=f"tb-engine-{key}-{index}", namespace="turbo-batch", lifetime="detached", get_if_exists=True
        )
    return opts


def _max_labels(job: JobSpec) -> int:
    return len(job.task.labels) if isinstance(job.task, ClassifyTask) else 0


class EnginePool:
    """Engine actors owned by a job (or reused across jobs with cluster.reuse_engines)."""

    def __init__(self, slots: list[Slot], actors: list[Any], owned: bool):
        self.slots = slots
        self.actors = actors
        self.owned = owned
        self.start_s = 0.0

    @classmethod
    async def start(cls, job: JobSpec) -> EnginePool:
        import ray

        from turbo_batch.engine import Engine

        gpus = int(ray.cluster_resources().get("GPU", 0))
        count = job.cluster.engines if job.cluster.engines != "auto" else max(gpus, 1)
        use_gpu = gpus > 0
        actor_cls = ray.remote(Engine)
        t0 = time.monotonic()
        actors = [
            actor_cls.options(**engine_actor_options(job, i, use_gpu)).remote(
                job.model.model_dump(mode="json"), max_labels=_max_labels(job)
            )
            for i in range(count)
        ]
        infos = await asyncio.gather(*(a.info.remote() for a in actors))
        pool = cls([], actors, owned=not job.cluster.reuse_engines)
        failed = [i for i in infos if i["error"]]
        if failed:
            await pool.close(force=True)
            raise EngineStartError(failed[0]["error"])
        await asyncio.gather(*(a.warmup.remote() for a in actors))
        infos = await asyncio.gather(*(a.info.remote() for a in actors))
        pool.start_s = time.monotonic() - t0
        for i, (actor, info) in enumerate(zip(actors, infos, strict=True)):
            seqs = int(info.get("max_num_seqs") or 64)
            cap = job.cluster.rows_in_flight or 2 * seqs
            pool.slots.append(Slot(f"engine-{i}", _actor_call(actor), info, cap, ping=_actor_ping(actor)))
        return pool

    async def close(self, force: bool = False) -> None:
        if not self.owned and not force:
            return
        import ray

        for a in self.actors:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(a.shutdown.remote(), timeout=30)
            ray.kill(a, no_restart=True)


def _actor_call(actor: Any) -> Callable[..., Any]:
    async def call(rows, task, sampling, priority, tag):
        return await actor.run_rows.remote(rows, task, sampling, priority=priority, tag=tag)

    return call


def _actor_ping(actor: Any) -> Callable[[], Any]:
    async def ping():  # only after a loss: the actor Ray restarted is a fresh engine
        info = await actor.info.remote()
        if info.get("error"):
            raise EngineStartError(f"a restarted engine failed to start: {info['error']}")
        await actor.warmup.remote()
        return await actor.info.remote()

    return ping


def _is_engine_loss(e: BaseException) -> bool:
    import ray.exceptions as rex

    lost = (rex.RayActorError, rex.ActorUnavailableError, rex.WorkerCrashedError, rex.NodeDiedError)
    if isinstance(e, lost):
        return True
    try:  # Serve: a replica that died mid-request
        from ray.serve.exceptions import BackPressureError, RequestCancelledError

        return isinstance(e, BackPressureError | RequestCancelledError)
    except ImportError:
        return False


# ---------------------------------------------------------------------------------------------- driver


@dataclass
class _Work:
    rows: list[dict[str, Any]]
    attempts: int = 0


@dataclass
class Driver:
    job: JobSpec
    plan: Plan
    pool: Any  # EnginePool-like: .slots
    out: OutputDir
    priority: int = 0
    on_progress: Callable[[int], None] = lambda n: None
    stats: report.Stats = field(init=False)
    buffer: list[dict[str, Any]] = field(default_factory=list)
    passthrough: dict[Any, dict[str, Any]] = field(default_factory=dict)
    schema: pa.Schema | None = None

    def __post_init__(self) -> None:
        task = self.job.task
        # Input columns copied to the output keep their names unless a result column has that name.
        self.out_names = {c: (f"input_{c}" if c in RESULT_COLUMNS else c) for c in self.plan.passthrough}
        gold = task.gold_column if isinstance(task, ClassifyTask) else None
        self.stats = report.Stats(
            task.labels if isinstance(task, ClassifyTask) else (),
            self.out_names[gold] if gold else None,
            task.gold_map if isinstance(task, ClassifyTask) else None,
        )
        self.task = task.model_dump(mode="json")
        self.sampling = self.job.sampling.model_dump(mode="json")
        self.cond = asyncio.Condition()
        self.quarantine = asyncio.Lock()
        self.tasks: set[asyncio.Task] = set()
        self.oldest: float | None = None  # when the oldest row still in the buffer arrived
        self.tag = (self.job.name or "job").replace(" ", "_")[:24]

    # -- schema of the output ------------------------------------------------------------------------
    def _output_schema(self, rendered: pa.Schema) -> pa.Schema:
        fields = [rendered.field("row_id")]
        for c in self.plan.passthrough:
            f = rendered.field(c)
            fields.append(pa.field(self.out_names[c], pa.string() if pa.types.is_null(f.type) else f.type))
        if isinstance(self.job.task, ClassifyTask):
            labels = self.job.task.labels
            fields += [
                pa.field("label", pa.string()),
                pa.field("probs", pa.struct([pa.field(lab, pa.float64()) for lab in labels])),
            ]
        elif isinstance(self.job.task, ExtractTask):
            fields += [
                pa.field("json", pa.string()),
                pa.field("text", pa.string()),
                pa.field("finish_reason", pa.string()),
            ]
        else:
            fields += [pa.field("text", pa.string()), pa.field("finish_reason", pa.string())]
        fields += [
            pa.field("prompt_tokens", pa.int32()),
            pa.field("output_tokens", pa.int32()),
            pa.field("error_code", pa.string()),
            pa.field("error_message", pa.string()),
        ]
        return pa.schema(fields)

    # -- results -------------------------------------------------------------------------------------
    async def _accept(self, results: Sequence[dict[str, Any]]) -> None:
        if results and self.oldest is None:
            self.oldest = time.monotonic()
        for r in results:
            row = {**self.passthrough.pop(r["row_id"], {}), **r}
            self.stats.add(row)
            self.buffer.append(row)
        self.on_progress(len(results))
        # a part is full, or a row has waited FLUSH_SECONDS (a slow job still commits often, so a crash
        # loses little; the clock starts at the first buffered row, not at driver start)
        if len(self.buffer) >= self.job.output.part_rows or (
            self.oldest is not None and time.monotonic() - self.oldest > FLUSH_SECONDS
        ):
            await self.flush()

    async def flush(self) -> None:
        while self.buffer:
            rows, self.buffer = (
                self.buffer[: self.job.output.part_rows],
                self.buffer[self.job.output.part_rows :],
            )
            table = pa.Table.from_pylist(rows, schema=self.schema)
            await asyncio.to_thread(self.out.commit, table)
        self.oldest = None

    # -- dispatch ------------------------------------------------------------------------------------
    def _eligible(self, work: _Work) -> list[Slot]:
        need = max(r["prompt_tokens"] + r["budget"] for r in work.rows)
        return [s for s in self.pool.slots if s.max_model_len >= need]

    async def _too_long(self, work: _Work) -> None:
        longest = max(s.max_model_len for s in self.pool.slots)
        await self._accept(
            [
                {
                    "row_id": r["row_id"],
                    "prompt_tokens": r["prompt_tokens"],
                    "error_code": str(RowError.PROMPT_TOO_LONG),
                    "error_message": f"prompt has {r['prompt_tokens']} tokens + {r['budget']} to generate > "
                    f"max_model_len {longest} of every engine",
                }
                for r in work.rows
            ]
        )

    async def submit(self, work: _Work) -> None:
        """Send rows to the least loaded engine that fits them, waiting while all are full."""
        eligible = self._eligible(work)
        if not eligible:
            await self._too_long(work)
            return
        async with self.cond:
            while True:
                free = [
                    s
                    for s in eligible
                    if not s.reserved and (s.inflight + len(work.rows) <= s.capacity or s.inflight == 0)
                ]
                if free:
                    slot = min(free, key=lambda s: (s.inflight / s.capacity, s.max_model_len))
                    break
                await self.cond.wait()
            slot.inflight += len(work.rows)
        t = asyncio.create_task(self._run(slot, work))
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    async def _call(self, slot: Slot, work: _Work) -> list[dict[str, Any]] | None:
        """One engine call; None if the engine was lost (actor died, node lost, replica gone)."""
        payload = [
            {"row_id": r["row_id"], "prompt_ids": r["prompt_ids"], "label_ids": r["label_ids"]}
            for r in work.rows
        ]
        try:
            return await slot.call(payload, self.task, self.sampling, self.priority, self.tag)
        except Exception as e:
            if not _is_engine_loss(e):
                raise
            if not slot.down:  # one line per loss, not one per call that was in flight
                log.warning(
                    "%s lost (%s): its %d rows in flight will be redone once it is back",
                    slot.name,
                    type(e).__name__,
                    slot.inflight,
                )
                slot.down = True
                t = asyncio.create_task(self._revive(slot))
                self.tasks.add(t)
                t.add_done_callback(self.tasks.discard)
            return None

    async def _revive(self, slot: Slot) -> None:
        """Wait for Ray to restart a lost engine (a vLLM start can take minutes), then use it again."""
        deadline = time.monotonic() + REVIVE_TIMEOUT_S
        delay = 0.5
        while True:
            try:
                if slot.ping is None:
                    await asyncio.sleep(5)
                else:
                    slot.info.update(await slot.ping())
                break
            except EngineStartError:
                raise
            except Exception as e:
                if not _is_engine_loss(e) or time.monotonic() > deadline:
                    raise JobError(f"{slot.name} did not come back after it was lost: {e}") from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        log.warning("%s is back", slot.name)
        async with self.cond:
            slot.down = False
            self.cond.notify_all()

    async def _run(self, slot: Slot, work: _Work) -> None:
        try:
            results = await self._call(slot, work)
        finally:
            async with self.cond:
                slot.inflight -= len(work.rows)
                self.cond.notify_all()
        if results is not None:
            slot.done += len(results)
            await self._accept(results)
            return
        # Every row that was on a lost engine is a suspect: most were innocent bystanders of a kill or
        # of one bad row. Suspects run in quarantine, one batch at a time on an engine of their own.
        async with self.quarantine:
            await self._isolate(work)

    async def _reserve(self, work: _Work) -> Slot | None:
        eligible = self._eligible(work)
        if not eligible:
            return None
        async with self.cond:
            while True:
                free = [s for s in eligible if not s.reserved and not s.down]
                if free:
                    slot = min(free, key=lambda s: s.inflight)
                    slot.reserved = True
                    break
                await self.cond.wait()
            while slot.inflight:  # let its other rows finish first
                await self.cond.wait()
        return slot

    async def _isolate(self, work: _Work) -> None:
        """Run suspect rows alone: a batch that still kills its engine is bisected until the row that
        does it stands alone; that row gets max_attempts tries, then becomes an ENGINE_ERROR row."""
        queue = [work]
        while queue:
            w = queue.pop(0)
            slot = await self._reserve(w)
            if slot is None:
                await self._too_long(w)
                continue
            try:
                results = await self._call(slot, w)
            finally:
                async with self.cond:
                    slot.reserved = False
                    self.cond.notify_all()
            if results is not None:
                slot.done += len(results)
                await self._accept(results)
            elif len(w.rows) > 1:
                mid = len(w.rows) // 2
                queue[:0] = [_Work(w.rows[:mid], w.attempts), _Work(w.rows[mid:], w.attempts)]
            elif w.attempts + 1 >= self.job.cluster.max_attempts:
                r = w.rows[0]
                await self._accept(
                    [
                        {
                            "row_id": r["row_id"],
                            "prompt_tokens": r["prompt_tokens"],
                            "error_code": str(RowError.ENGINE_ERROR),
                            "error_message": f"the engine died each of the {w.attempts + 1} times it ran this row alone",
                        }
                    ]
                )
            else:
                await asyncio.sleep(min(2.0 * (w.attempts + 1), 10))
                queue.insert(0, _Work(w.rows, w.attempts + 1))

    async def consume(self, blocks: asyncio.Queue) -> None:
        """Dispatch rendered blocks from `blocks` (None ends the stream; an exception is re-raised)."""
        batch_rows = self.job.cluster.batch_rows
        while True:
            block = await blocks.get()
            if block is None:
                break
            if isinstance(block, BaseException):
                raise block
            if self.schema is None:
                self.schema = self._output_schema(block.schema)
            errors, ok = [], []
            for row in block.to_pylist():
                self.passthrough[row["row_id"]] = {self.out_names[c]: row[c] for c in self.plan.passthrough}
                if row["error_code"]:
                    errors.append(
                        {k: row[k] for k in ("row_id", "prompt_tokens", "error_code", "error_message")}
                    )
                else:
                    ok.append(row)
            if errors:
                await self._accept(errors)
            ok.sort(key=lambda r: r["prompt_tokens"] + r["budget"])  # similar lengths travel together
            for i in range(0, len(ok), batch_rows):
                await self.submit(_Work(ok[i : i + batch_rows]))
        while self.tasks:
            await asyncio.gather(*list(self.tasks))
        await self.flush()


# ------------------------------------------------------------------------------------------------ entry


def init_ray(job: JobSpec) -> bool:
    """Connect to (or start) Ray; returns True if this call started it."""
    import ray

    if ray.is_initialized():
        return False
    logging.getLogger("ray").setLevel(logging.WARNING)
    kw: dict[str, Any] = {
        "logging_level": logging.WARNING,
        "log_to_driver": bool(os.environ.get("TURBO_BATCH_VERBOSE")),
    }
    if job.cluster.address == "local" and job.cluster.engine_source != "serve":
        ray.init(address="local", num_cpus=job.cluster.num_cpus, include_dashboard=False, **kw)
    else:  # engine_source=serve joins the running cluster of `turbo-batch serve` ("local": this machine's)
        address = "auto" if job.cluster.address == "local" else job.cluster.address
        if "RAY_AUTH_MODE" not in os.environ:  # Ray 2.60 sends ~/.ray/auth_token to an explicit address
            from ray._private.authentication import authentication_token_setup as auth  # only if told so

            auth.maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
        try:
            ray.init(address=address, **kw)
        except ConnectionError as e:
            raise JobError(f"cannot connect to the Ray cluster at {address!r}: {e}") from None
    return True


def build_dataset(plan: Plan, committed: pa.Array | None):
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.print_on_execution_start = False
    for name in ("ray.data", "ray.data._internal.execution.streaming_executor"):
        logging.getLogger(name).setLevel(logging.WARNING)
    job = plan.job
    ds = ray.data.read_datasource(
        make_datasource(plan.units, plan.columns, job.input.id_column, committed),
        num_cpus=job.cluster.render_cpus,
    )
    return ds.map_batches(
        render_block,
        batch_format="pyarrow",
        batch_size=None,
        num_cpus=job.cluster.render_cpus,
        fn_kwargs={
            "cfg": PromptConfig.from_job(job),
            "tokenizer_path": job.model.tokenizer or job.model.path,
            "trust_remote_code": job.model.trust_remote_code,
            "passthrough": plan.passthrough,
        },
    )


async def _produce(ds: Any, blocks: asyncio.Queue) -> None:
    """Pull rendered blocks out of Ray Data (a blocking iterator) into a bounded queue."""
    it = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2))
    try:
        while True:
            block = await asyncio.to_thread(next, it, None)
            await blocks.put(block)
            if block is None:
                return
    except asyncio.CancelledError:
        raise
    except BaseException as e:  # surfaces in the consumer, which re-raises it
        await blocks.put(e)


async def run_plan(plan: Plan, out: OutputDir, *, pool: Any = None, progress: Any = None) -> dict[str, Any]:
    job = plan.job
    committed = out.committed_ids()
    skipped = out.committed_rows
    todo = max(plan.total_rows - skipped, 0)
    own_pool = pool is None
    # Ray Data starts reading and rendering while the engines start (minutes on a GPU): the first
    # rendered blocks are waiting when the engines are ready.
    blocks: asyncio.Queue = asyncio.Queue(maxsize=PREFETCH_BLOCKS)
    producer = asyncio.create_task(_produce(build_dataset(plan, committed), blocks)) if todo else None
    t_engine = time.monotonic()
    try:
        if pool is None:
            if job.cluster.engine_source == "serve":
                from turbo_batch.serve_client import ServePool

                pool = await ServePool.connect(job)
            else:
                pool = await EnginePool.start(job)
    except BaseException:
        if producer is not None:
            producer.cancel()
        raise
    engine_start_s = time.monotonic() - t_engine if own_pool else 0.0
    priority = job.cluster.priority if job.cluster.engine_source == "serve" else 0
    driver = Driver(job, plan, pool, out, priority=priority, on_progress=progress or (lambda n: None))
    t0 = time.monotonic()
    try:
        if producer is not None:
            await driver.consume(blocks)
            await producer
        wall = time.monotonic() - t0  # engines ready → last row committed (engine shutdown not counted)
    finally:
        if producer is not None and not producer.done():
            producer.cancel()
        if own_pool:
            await pool.close()
    summary = report.summary(
        driver.stats,
        wall_s=wall,
        engine_start_s=engine_start_s,
        skipped=skipped,
        engines=[{**s.info, "name": s.name, "rows": s.done} for s in pool.slots],
        job_name=job.name,
        output_dir=str(plan.output_dir),
    )
    summary["fingerprint"] = plan.fingerprint
    summary["adopted_parts"] = out.adopted
    if out.committed_rows != plan.total_rows:
        out.write_summary(summary)
        raise JobError(f"only {out.committed_rows} of {plan.total_rows} rows are committed; rerun to resume")
    out.finish(summary)
    return summary


def open_output(plan: Plan, *, restart: bool = False, force: bool = False) -> OutputDir:
    return OutputDir(plan.output_dir, plan.fingerprint, plan.job.model_dump(mode="json", by_alias=True)).open(
        restart=restart, force=force
    )


def run_job(
    job: JobSpec, *, restart: bool = False, force: bool = False, pool: Any = None, progress: Any = None
) -> dict[str, Any]:
    """Run a job end to end (the `turbo-batch run` command without the printing)."""
    plan = preflight(job)
    out = open_output(plan, restart=restart, force=force)
    started = init_ray(job)
    try:
        return asyncio.run(run_plan(plan, out, pool=pool, progress=progress))
    finally:
        if started:
            import ray

            ray.shutdown()
