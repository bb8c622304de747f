"""engine/load.py: the scheduler's load over a window, from vLLM's per-step stats (no engine here; the
real engine's numbers are checked in tests/batch/test_batch.py)."""

from __future__ import annotations

from types import SimpleNamespace as NS

from turbo_batch.engine.load import LoadMeter, window


def _step(meter, running, waiting, prompt=0, out=0, kv=0.1):
    meter.record(
        NS(num_running_reqs=running, num_waiting_reqs=waiting, kv_cache_usage=kv),
        NS(num_prompt_tokens=prompt, num_generation_tokens=out),
    )


def test_window_is_the_difference_of_two_readings():
    m = LoadMeter(max_num_seqs=4)
    _step(m, 4, 10, prompt=100, out=4)  # before the window: not counted
    a = m.reading()
    _step(m, 4, 2, out=4)  # full
    _step(m, 3, 1, prompt=50, out=3)  # free seats but rows waiting: not starved
    _step(m, 2, 0, out=2, kv=0.5)  # free seats, nothing waiting: the dispatcher fell short
    _step(m, 1, 0, out=1)
    w = window(a, m.reading())
    assert w["steps"] == 4 and w["max_num_seqs"] == 4
    assert w["running_mean"] == 2.5 and w["waiting_mean"] == 0.75
    assert w["full_steps_pct"] == 25.0 and w["starved_steps_pct"] == 50.0
    assert w["prompt_tokens"] == 50 and w["output_tokens"] == 10
    assert w["kv_usage_mean"] == 0.2 and w["kv_usage_max_since_start"] == 0.5  # (0.1 + 0.1 + 0.5 + 0.1) / 4
    _step(m, 1, 0, kv=0.2)
    b = m.reading()
    _step(m, 1, 0, kv=0.3)
    later = window(b, m.reading())
    assert later["kv_usage_mean"] == 0.3 and later["kv_usage_max_since_start"] == 0.5


def test_no_window_without_readings_or_steps():
    m = LoadMeter(max_num_seqs=8)
    a = m.reading()
    assert window(a, m.reading()) is None  # nothing ran
    assert window(None, a) is None and window(a, None) is None


def test_missing_stats_count_as_nothing():
    """vLLM's stats objects are not a stable interface: absent fields or objects are zeros."""
    m = LoadMeter(max_num_seqs=2)
    a = m.reading()
    m.record(None, NS(num_generation_tokens=3))  # no scheduler stats: no step
    m.record(NS(), None)  # a step whose fields are all missing
    w = window(a, m.reading())
    assert w["steps"] == 1 and w["running_mean"] == 0 and w["starved_steps_pct"] == 100.0
    assert w["output_tokens"] == 3


def test_the_vllm_stat_logger_feeds_the_meter():
    from vllm.v1.metrics.loggers import StatLoggerBase

    m = LoadMeter(max_num_seqs=2)
    logger_cls = m.factory()
    assert issubclass(logger_cls, StatLoggerBase)
    logger = logger_cls(None, 0)  # what AsyncLLM's logger manager does with a factory
    logger.log_engine_initialized()
    a = m.reading()
    logger.record(
        NS(num_running_reqs=2, num_waiting_reqs=5), NS(num_prompt_tokens=7, num_generation_tokens=2)
    )
    w = window(a, m.reading())
    assert w["steps"] == 1 and w["full_steps_pct"] == 100.0 and w["prompt_tokens"] == 7


def test_a_jobs_load_readings_never_fail_it(monkeypatch):
    """batch/run.read_loads: an engine without the method (a reused engine of an older turbo-batch), one
    that does not answer in time, a lost one and a pool without readings each give None; the others read."""
    import asyncio

    from turbo_batch.batch import run

    monkeypatch.setattr(run, "LOAD_READ_S", 0.2)

    class Old:  # what a handle to an engine without `load` does: the attribute is missing
        @property
        def load(self):
            raise AttributeError("'ActorHandle' object has no attribute 'load'")

    async def fine():
        return {"steps": 3}

    async def hangs():
        await asyncio.sleep(10)

    async def gone():
        raise RuntimeError("actor died")

    async def old():
        return await Old().load.remote()

    slots = [NS(load=fine, down=False), NS(load=hangs, down=False), NS(load=gone, down=False),
             NS(load=old, down=False), NS(load=None, down=False), NS(load=fine, down=True)]  # fmt: skip
    assert asyncio.run(run.read_loads(slots)) == [{"steps": 3}, None, None, None, None, None]
