"""turbo-batch's serving code without Ray: the direct layout's app and engine in one plain process.

A control for bench_serve.py (variant `turbo-plain`): the same `EngineReplica` (turbo_batch.engine
Engine → vLLM AsyncLLM) and the same routes (`ingress.Api` over a `LocalEngine`), served by uvicorn
on uvloop in a process that is not a Ray worker, as `vllm serve` runs. Against `turbo-direct` (the
same code inside a Ray Serve replica) it says whether a gap to `vllm serve` comes from turbo-batch's
request path or from living in a Ray process. Not a supported way to serve: no Serve supervision.

    python benchmarks/serve_plain.py serve.yaml --port 8000
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


async def main(path: str, host: str, port: int) -> None:
    import uvicorn

    from turbo_batch.serve.app import api_config
    from turbo_batch.serve.client import LocalEngine
    from turbo_batch.serve.ingress import Api
    from turbo_batch.serve.replica import EngineReplica
    from turbo_batch.serve.spec import api_key, load_serve

    spec = load_serve(Path(path), {})
    replica = EngineReplica.__new__(EngineReplica)
    lim = spec.limits
    await replica.__init__(spec.model.model_dump(mode="json"), spec.max_labels, lim.max_online_per_engine)
    api = Api(LocalEngine(replica), api_config(spec, key=api_key(spec)))
    config = uvicorn.Config(api.__serve_build_asgi_app__(), host=host, port=port, log_level="warning")
    await uvicorn.Server(config).serve()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("serve_file")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    a = ap.parse_args()
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())  # as vllm serve runs, where it is installed
    except ImportError:
        pass
    asyncio.run(main(a.serve_file, a.host, a.port))
