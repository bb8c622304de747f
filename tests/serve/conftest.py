"""The serve tests' shared app: one Serve app on the tiny model for the whole package (one engine
start), reached with the official `openai` client and raw HTTP."""

from __future__ import annotations

import secrets
import socket
from dataclasses import dataclass

import pytest

from tests.helpers import TINY_ENGINE

LABELS = ["positive", "negative"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Served:
    url: str  # .../v1
    base: str  # scheme://host:port
    key: str
    spec: object

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def client(self, **kw):
        import openai

        return openai.OpenAI(base_url=self.url, api_key=self.key, max_retries=0, timeout=60, **kw)

    def engine_info(self) -> dict:
        from ray import serve

        handle = serve.get_deployment_handle("Engine", app_name=self.spec.name)
        return handle.info.remote().result(timeout_s=30)


@pytest.fixture(scope="package")
def served(ray_session, tiny_model, monkeypatch_package):
    from turbo_batch.serve import app as tbs
    from turbo_batch.serve import spec as tbspec

    key = "tb-" + secrets.token_hex(12)
    monkeypatch_package.setenv("TB_TEST_API_KEY", key)
    spec = tbspec.parse(
        tbspec.ServeSpec,
        {
            "name": "tb-test",
            "model": {"path": str(tiny_model), "engine": dict(TINY_ENGINE)},
            "served_model_name": "tiny",
            "http": {"host": "127.0.0.1", "port": _free_port()},
            "cluster": {"engine_cpus": 0.5},
            "auth": {"api_key_env": "TB_TEST_API_KEY"},
            "limits": {
                "max_body_bytes": 512 * 1024,  # room for a 200,000-deep JSON body (400 kB)
                "max_messages": 8,
                "max_tokens": 1000,
                "default_max_tokens": 16,
                "max_inputs": 8,
                "max_concurrent": 8,
                "max_online_per_engine": 16,
                "engine_max_queued": 8,
            },
            "classifiers": {
                "sentiment": {"labels": LABELS},
                "review": {"labels": LABELS, "prompt": {"template": "Review: {{ text }}", "chat": False}},
            },
        },
    )
    url = tbs.deploy(spec, key=tbspec.api_key(spec))
    yield Served(url, url.removesuffix("/v1"), key, spec)
    tbs.undeploy(spec, shutdown=True)


@pytest.fixture(scope="package")
def monkeypatch_package():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()
