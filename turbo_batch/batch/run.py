"""Run: a batch job end to end — read → render (Ray Data) → engines (driver) → write → summary.

Owns: `run_job()` (what `turbo-batch run` calls), `run_plan()` (with a given output dir and, in tests,
a shared engine pool), `build_dataset()` (the Ray Data pipeline of read and render stages) and
`open_output()`. An input of at most SMALL_INPUT_ROWS rows runs as one Ray Data task (read, order,
render) instead of one task per read unit and a distributed sort. Must not touch: the stages' own
logic (read.py, render.py, driver.py, write.py, report.py); this module only wires them, measures
the wall time and reads each engine's load over it (engine/load.py; engines of a job's own pool).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from turbo_batch.batch import openai_batch, report
from turbo_batch.batch.driver import Driver
from turbo_batch.batch.html_report import write_report
from turbo_batch.batch.lock import OutputLock
from turbo_batch.batch.order import add_order, order_mode, order_whole
from turbo_batch.batch.plan import Plan, preflight
from turbo_batch.batch.pool import EnginePool, Pool, ServePool
from turbo_batch.batch.read import BLOCK_ROWS, make_datasource, read_unit
from turbo_batch.batch.render import render_block
from turbo_batch.batch.write import OutputDir
from turbo_batch.engine.load import window as load_window
from turbo_batch.errors import JobError
from turbo_batch.prompt import PromptConfig
from turbo_batch.runtime import connect_ray
from turbo_batch.spec import JobSpec

PREFETCH_BLOCKS = 8
LOAD_READ_S = 10.0  # an engine's load reading that takes longer is left out
SMALL_INPUT_ROWS = BLOCK_ROWS  # an input of at most this many rows is read, ordered and rendered in one task
Progress = Callable[[int], None]


def init_ray(job: JobSpec) -> bool:
    """Connect to (or start) Ray for `job`; True if this call connected. A job with
    engine_source=serve joins the running cluster of `turbo-batch serve` ("local": this machine's)."""
    address = job.cluster.address
    if address == "local" and job.cluster.engine_source == "serve":
        address = "auto"
    return connect_ray(address, num_cpus=job.cluster.num_cpus)


def build_dataset(plan: Plan, committed: pa.Array | None):
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.print_on_execution_start = False
    for name in ("ray.data", "ray.data._internal.execution.streaming_executor"):
        logging.getLogger(name).setLevel(logging.WARNING)
    job = plan.job
    ordered = order_mode(job) != "none"
    # the input's first rows, to find the job's common prompt prefix (order.py; the same on every run)
    sample = next(read_unit(plan.units[0], plan.columns), None) if ordered and plan.units else None
    # A small input is one task, read → order → render: every Ray Data task is a fresh worker process
    # that imports transformers for its tokenizer (~5 s of CPU each), which cost a 400-row job ~50 s
    # on 2 cores in 11 processes (4 read+key tasks, the sort's shuffle, 4 render tasks).
    small = plan.total_rows <= SMALL_INPUT_ROWS
    arrange = functools.partial(order_whole, job=job, sample=sample) if ordered and small else None
    ds = ray.data.read_datasource(
        make_datasource(
            plan.units,
            plan.columns,
            job.input.id_column,
            committed,
            plan.hygiene,
            one_task=small,
            arrange=arrange,
        ),
        num_cpus=job.cluster.render_cpus,
        override_num_blocks=1 if small else None,  # else Ray Data splits its output, into 4 render tasks
    )
    if ordered and not small:  # order.py: rows sharing a prompt prefix, grouped across the input (a sort)
        ds = add_order(ds, job, num_cpus=job.cluster.render_cpus, sample=sample)
    ds = ds.map_batches(
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
    if ordered:  # render tasks must hand their blocks on in the sorted order
        ds.context.execution_options.preserve_order = True
    return ds


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


async def read_loads(slots: list[Any]) -> list[dict[str, Any] | None]:
    """Each engine's load reading (engine/load.py), None where a slot has none or does not answer:
    a reading only describes the job, it never fails it."""

    async def one(slot: Any) -> dict[str, Any] | None:
        if slot.load is None or slot.down:
            return None
        try:
            return await asyncio.wait_for(slot.load(), timeout=LOAD_READ_S)
        except Exception:  # an engine lost or restarted meanwhile: no window for it
            return None

    return list(await asyncio.gather(*(one(s) for s in slots)))


async def run_plan(
    plan: Plan, out: OutputDir, *, pool: Pool | None = None, progress: Progress | None = None
) -> dict[str, Any]:
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
    driver.results.timeline.start(engine_start_s, report.engine_rows(pool.slots, with_rows=False))
    load0 = await read_loads(pool.slots)
    t0 = time.monotonic()
    try:
        if producer is not None:
            await driver.consume(blocks)
            await producer
        driver.results.timeline.flush(final=True)
        wall = time.monotonic() - t0  # engines ready → last row committed (engine shutdown not counted)
        loads = [load_window(a, b) for a, b in zip(load0, await read_loads(pool.slots), strict=True)]
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
        engines=[
            {**s.info, "name": s.name, "rows": s.done, **driver.tail.stats(s), "load": load}
            for s, load in zip(pool.slots, loads, strict=True)
        ],
        job_name=job.name,
        output_dir=str(plan.output_dir),
        prices=job.report.gpu_hour_usd,
    )
    summary["fingerprint"] = plan.fingerprint
    summary["adopted_parts"] = out.adopted
    if out.committed_rows != plan.total_rows:
        out.write_summary(summary)
        write_report(plan.output_dir, summary)
        raise JobError(f"only {out.committed_rows} of {plan.total_rows} rows are committed; rerun to resume")
    if job.output.format != "parquet":  # derived from the committed parts, before _SUCCESS
        openai_batch.write_output(plan.output_dir, [f for f, _ in plan.files], job.model.path)
    write_report(plan.output_dir, summary, complete=True)  # before _SUCCESS, the last file
    out.finish(summary)
    return summary


def open_output(plan: Plan, *, restart: bool = False, force: bool = False) -> OutputDir:
    return OutputDir(plan.output_dir, plan.fingerprint, plan.job.model_dump(mode="json", by_alias=True)).open(
        restart=restart, force=force
    )


def run_job(
    job: JobSpec,
    *,
    restart: bool = False,
    force: bool = False,
    pool: Pool | None = None,
    progress: Progress | None = None,
    on_open: Callable[[Plan, OutputDir], None] | None = None,
) -> dict[str, Any]:
    """Run a job end to end (the `turbo-batch run` command without the printing)."""
    plan = preflight(job)
    with OutputLock(plan.output_dir):  # one writer per output dir, before anything is written (lock.py)
        out = open_output(plan, restart=restart, force=force)
        if on_open is not None:  # the CLI says what is resumed before Ray starts
            on_open(plan, out)
        started = init_ray(job)
        try:
            return asyncio.run(run_plan(plan, out, pool=pool, progress=progress))
        finally:
            if started:
                import ray

                ray.shutdown()
