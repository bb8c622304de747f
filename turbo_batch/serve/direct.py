"""Layout `direct`: an engine replica serves its FastAPI app on its own port, as `vllm serve` does.

Why: measured on this CPU (tiny Gemma 4, concurrency 8, 64 tokens in / 32 out, streaming), the same
app and engine in one process under plain uvicorn answered 40.8 req/s with a 48 ms median first token
and a 6.2 ms median gap between chunks — `vllm serve`'s own figures (32.1 req/s, 30 ms, 6.6 ms) —
while behind Ray Serve's HTTP proxy the same replica gave 7.5 req/s, 520 ms and tokens in clumps; on
an H200 the proxy path held each stream back for ~3 s (benchmarks/results/serve_parity_gpu_probe.md).
So the replica listens itself; Serve still runs the replicas (placement, restarts, health checks) and
batch jobs still reach them by handle.

Owns: `DirectServer` (a uvicorn server on the replica's own event loop, the first free port from
`port` on, no signal handlers: the process belongs to Ray). Must not touch: routes (ingress.py), the
engine (replica.py), Serve options (app.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from typing import Any

log = logging.getLogger("turbo_batch.serve")
PORT_TRIES = 64  # replicas on one host take port, port + 1, ...


def _free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


class DirectServer:
    """uvicorn serving `app` in the running event loop (the replica's), until `stop()`."""

    def __init__(self, server: Any, task: asyncio.Task, host: str, port: int):
        self.server, self.task, self.host, self.port = server, task, host, port

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}/v1"

    @classmethod
    async def start(cls, app: Any, host: str, port: int) -> DirectServer:
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):  # SIGTERM belongs to Ray (graceful replica shutdown)
                yield

        for candidate in range(port, port + PORT_TRIES):
            if not _free(host, candidate):
                continue
            config = uvicorn.Config(
                app,
                host=host,
                port=candidate,
                loop="none",  # the replica's running loop: the engine's output handler lives there
                lifespan="off",
                log_level="warning",
                access_log=False,
                timeout_graceful_shutdown=5,
            )
            server = Server(config)
            task = asyncio.get_running_loop().create_task(server.serve())
            while not server.started and not task.done():
                await asyncio.sleep(0.02)
            if server.started:
                log.info("engine replica serving HTTP on %s:%d", host, candidate)
                return cls(server, task, host, candidate)
        raise OSError(f"no free port for the engine replica's HTTP server in {port}..{port + PORT_TRIES - 1}")

    def stop(self) -> None:
        self.server.should_exit = True
