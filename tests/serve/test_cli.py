"""`turbo-batch serve` as a user runs it: a subprocess with its own Ray, ready on /health, streaming
token by token, then SIGTERM: the app is undeployed, Ray stops, the process exits 0 and the port is
closed. Two layouts here (the package's shared app runs the default, direct): colocated (the Engine
deployment is the ingress behind Serve's proxy) and split-direct with two Api replicas that both
listen on the one http.port (SO_REUSEPORT) and call the Engine deployment by handle."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.helpers import TINY_ENGINE

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _listeners(port: int) -> int:
    """Listening TCP sockets on `port` (IPv4), from /proc/net/tcp: one per process that shares it."""
    rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return sum(1 for r in rows if r.split()[1].endswith(f":{port:04X}") and r.split()[3] == "0A")


@contextlib.contextmanager
def _serving(tmp_path: Path, tiny_model: Path, http: dict):
    """`turbo-batch serve` in a subprocess until the body's end (SIGTERM, then checks of the exit)."""
    port = _free_port()
    spec = {
        "name": "tb-cli",
        "model": {"path": str(tiny_model), "engine": dict(TINY_ENGINE)},
        "served_model_name": "tiny",
        "http": {"host": "127.0.0.1", "port": port, **http},
        "cluster": {"num_cpus": 2, "engine_cpus": 0.5},
        "auth": {"api_key_env": "TB_CLI_KEY"},
    }
    f = tmp_path / "serve.yaml"
    f.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "TB_CLI_KEY": "cli-key", "RAY_ADDRESS": ""}
    out_f, err_f = tmp_path / "out.txt", tmp_path / "err.txt"
    with out_f.open("w") as out, err_f.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "turbo_batch.cli", "serve", str(f)],
            stdout=out, stderr=err, text=True, env=env, cwd=REPO, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while "Ctrl-C to stop" not in err_f.read_text():  # deployed (serve.run returned)
            assert proc.poll() is None, err_f.read_text()[-3000:]
            assert time.monotonic() < deadline, "serve did not become ready"
            time.sleep(1)
        yield port
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        err = err_f.read_text()
        assert proc.returncode == 0, err[-3000:]
        assert "serving tiny at" in out_f.read_text() and "shutting down" in err
        assert not _port_open(port)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


def _streams_token_by_token(port: int) -> None:
    import openai

    assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json() == {"status": "ready"}
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="cli-key", max_retries=0)
    chunks = list(
        client.completions.create(
            model="tiny", prompt="hello", max_tokens=32, temperature=0, stream=True,
            extra_body={"ignore_eos": True},
        )
    )  # fmt: skip
    assert len([c for c in chunks if c.choices and c.choices[0].text]) >= 16
    assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401


def test_serve_colocated_starts_streams_and_undeploys_on_sigterm(tiny_model, tmp_path):
    with _serving(tmp_path, tiny_model, {"layout": "colocated"}) as port:
        _streams_token_by_token(port)


def test_serve_split_direct_two_ingress_replicas_share_the_port(tiny_model, tmp_path):
    """Tokens come back on the ingress's shared channel (channel.py): concurrent streams each get their
    own tokens (the same text as unstreamed answers), a stream left early and a refused request spare
    the rest."""
    from concurrent.futures import ThreadPoolExecutor

    import openai

    with _serving(tmp_path, tiny_model, {"layout": "split-direct", "ingress_replicas": 2}) as port:
        assert _listeners(port) == 2  # both Api replicas listen on http.port itself; no Serve proxy
        _streams_token_by_token(port)
        # many connections, each answered (the kernel spreads them over the two replicas)
        codes = {httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code for _ in range(12)}
        assert codes == {200}
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="cli-key", max_retries=0)
        # a different length per stream (the tiny model writes the same token over and over): a delta
        # handed to the wrong stream would show in its text or its token count
        prompts = [f"story number {i}:" for i in range(8)]
        kw = {"model": "tiny", "temperature": 0, "extra_body": {"ignore_eos": True}}

        def streamed(i: int) -> tuple[str, int]:
            chunks = list(client.completions.create(prompt=prompts[i], max_tokens=12 + 3 * i, stream=True,
                                                    stream_options={"include_usage": True}, **kw))  # fmt: skip
            return "".join(c.choices[0].text for c in chunks if c.choices), chunks[-1].usage.completion_tokens

        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(streamed, range(8)))
        plain = [client.completions.create(prompt=p, max_tokens=12 + 3 * i, **kw).choices[0].text
                 for i, p in enumerate(prompts)]  # fmt: skip
        assert [t for t, _ in got] == plain and [n for _, n in got] == [12 + 3 * i for i in range(8)]
        assert len(set(plain)) == 8
        left = client.completions.create(prompt="left early", stream=True, max_tokens=400, **kw)
        next(iter(left))
        left.close()  # the ingress aborts it on the engine replica
        with pytest.raises(openai.BadRequestError, match="top_k"):
            client.completions.create(prompt="x", extra_body={"top_k": -5}, model="tiny")  # refused at submit
        assert streamed(0) == got[0]
