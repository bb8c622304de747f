"""Layout `direct`: an engine replica serves its FastAPI app on its own port, as `vllm serve` does.

Why: measured on this CPU (tiny Gemma 4, concurrency 8, 64 tokens in / 32 out, streaming), the same
app and engine in one process under plain uvicorn answered 40.8 req/s with a 48 ms median first token
and a 6.2 ms median gap between chunks — `vllm serve`'s own figures (32.1 req/s, 30 ms, 6.6 ms) —
while behind Ray Serve's HTTP proxy the same replica gave 7.5 req/s, 520 ms and tokens in clumps; on
an H200 the proxy path held each stream back for ~3 s (benchmarks/results/serve_parity_gpu_probe.md).
So the replica listens itself; Serve still runs the replicas (placement, restarts, health checks) and
batch jobs still reach them by handle.

Layout `split-direct` uses the same server in the Api ingress replicas (`DirectApi`): they all listen
on http.port itself, shared with SO_REUSEPORT (the kernel spreads connections over the replicas of one
host), and call the Engine deployment by handle: HTTP, tokenization and SSE scale apart from the
engines, and a token crosses one Ray hop (engine → ingress) instead of two (→ Serve's proxy as well).

Owns: `DirectServer` (a uvicorn server on the replica's own event loop: the first free port from `port`
on, or `port` itself shared by SO_REUSEPORT; no signal handlers: the process belongs to Ray) and
`DirectApi`. Must not touch: routes (ingress.py), the engine (replica.py), Serve options (app.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from typing import Any

from turbo_batch.serve.ingress import Api

log = logging.getLogger("turbo_batch.serve")
PORT_TRIES = 64  # replicas on one host take port, port + 1, ...


def _shared_socket(host: str, port: int) -> socket.socket:
    """A listening socket on host:port that other processes of this user may bind too (SO_REUSEPORT:
    the kernel hands each new connection to one of them)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise OSError(f"the ingress replica cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


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
    async def start(cls, app: Any, host: str, port: int, shared: bool = False) -> DirectServer:
        """Serve `app` on the first free port from `port` on, or (`shared`) on `port` itself beside
        the other replicas of this host that listen there (SO_REUSEPORT)."""
        if shared:
            sock = _shared_socket(host, port)  # from here the server owns it and closes it on stop
            server = await cls._serve(app, host, port, [sock])
            if server is None:
                sock.close()
                raise OSError(f"the ingress replica's HTTP server did not start on {host}:{port}")
            return server
        for candidate in range(port, port + PORT_TRIES):
            if _free(host, candidate):
                server = await cls._serve(app, host, candidate, None)
                if server is not None:
                    return server
        raise OSError(f"no free port for the engine replica's HTTP server in {port}..{port + PORT_TRIES - 1}")

    @classmethod
    async def _serve(cls, app: Any, host: str, port: int, sockets: list | None) -> DirectServer | None:
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):  # SIGTERM belongs to Ray (graceful replica shutdown)
                yield

        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            loop="none",  # the replica's running loop: the engine's output handler lives there
            lifespan="off",
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=5,
        )
        server = Server(config)
        task = asyncio.get_running_loop().create_task(server.serve(sockets=sockets))
        while not server.started and not task.done():
            await asyncio.sleep(0.02)
        if not server.started:
            return None
        log.info("replica serving HTTP on %s:%d%s", host, port, " (shared port)" if sockets else "")
        return cls(server, task, host, port)

    def stop(self) -> None:
        self.server.should_exit = True


class DirectApi(Api):
    """Layout split-direct: the Api ingress (routes, auth, tokenization, SSE) serving HTTP itself on
    the shared http.port; the engine is the Serve handle of the Engine deployment. Wrapped by
    serve.ingress() in app.build_app like Api, so the Serve proxy could route to it too (it is not
    started in this layout)."""

    async def __init__(self, engine: Any, config: dict[str, Any]):
        Api.__init__(self, engine, config)
        self.direct: DirectServer | None = await DirectServer.start(
            self.__serve_build_asgi_app__(), config["direct"]["host"], config["direct"]["port"], shared=True
        )

    def __del__(self) -> None:
        direct = getattr(self, "direct", None)
        if direct is not None:
            direct.stop()
