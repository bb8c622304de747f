"""bench_serve.py's helpers: a server process group (started, probed, stopped) and the results file.

`Server` runs one server (`vllm serve` or `turbo-batch serve`) in its own session and kills the whole
session on stop, so no Ray worker or engine core outlives a variant; `machine()` and `markdown()` write
what bench_serve.py measured. Nothing here is turbo-batch code.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


class Server:
    """One server process group: started, probed until ready, stopped with SIGTERM then SIGKILL."""

    def __init__(self, cmd: list[str], log_path: Path, env: dict[str, str]):
        self.log_path = log_path
        self.out = log_path.open("w")
        self.proc = subprocess.Popen(
            cmd, stdout=self.out, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=REPO
        )

    def wait_ready(self, url: str, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {tail(self.log_path)}")
            try:
                if httpx.get(url, timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError(f"not ready after {timeout:.0f} s: {tail(self.log_path)}")

    def stop(self, grace: float = 20) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        # Ray workers and vLLM engine cores live in the same session: leave none behind
        subprocess.run(["pkill", "-KILL", "-s", str(self.proc.pid)], check=False)
        self.out.close()


def tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    try:
        import vllm

        info["vllm"] = vllm.__version__
    except Exception:
        pass
    if shutil.which("nvidia-smi"):
        q = ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]
        info["gpu"] = subprocess.run(q, capture_output=True, text=True).stdout.strip()
    return info


def markdown(d: dict[str, Any]) -> str:
    lines = [f"# Serve parity: {d['preset']} ({d['date']})", "", f"Machine: `{json.dumps(d['machine'])}`",
             f"Engine args (both servers): `{json.dumps(d['engine_args'], default=str)}`",
             f"Concurrency {d['concurrency']}; streaming /v1/completions, random token prompts, ignore_eos. "
             f"Tokenizer: `{json.dumps(d.get('tokenizer'))}`."
             + "".join(f" {w['name']}: Poisson arrivals at {w['rate']} req/s." for w in d["workloads"] if w.get("rate")),
             "",
             "| workload | server | req/s | median TTFT ms | P99 TTFT ms | median ITL ms | P99 ITL ms "
             "| median TPOT ms | failed |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for v, r in d["variants"].items():
        if "error" in r:
            lines.append(f"| all | {v} | failed: {r['error'][:120]} | | | | | | |")
            continue
        for wl, m in r["workloads"].items():
            cells = [m.get(k) for k in ("req_s", "median_ttft_ms", "p99_ttft_ms", "median_itl_ms",
                                         "p99_itl_ms", "median_tpot_ms")]  # fmt: skip
            txt = " | ".join("—" if c is None else f"{c:,.1f}" if c >= 10 else f"{c:.2f}" for c in cells)
            lines.append(f"| {wl} | {v} | {txt} | {m.get('failed', 0)} |")
    waves = [f"{v} {wl} {m['median_ttft_first_wave_ms']:,.1f} / {m['median_ttft_after_first_wave_ms']:,.1f}"
             for v, r in d["variants"].items() for wl, m in (r.get("workloads") or {}).items()
             if m.get("median_ttft_after_first_wave_ms") is not None]  # fmt: skip
    if waves:
        lines += ["", f"Median TTFT ms of the first {d['concurrency']} requests (sent at once) / of the rest: "
                  + "; ".join(waves) + "."]  # fmt: skip
    for v, r in d["variants"].items():
        for wl, m in (r.get("workloads") or {}).items():
            if m.get("front_threads_cpu_s"):
                lines += ["", f"Serving process, {v} {wl}: {m.get('front_cpu_ms_per_1k_tokens')} ms CPU per 1,000 "
                          f"output tokens; CPU s by thread `{json.dumps(m['front_threads_cpu_s'])}`"]  # fmt: skip
    for v, r in d["variants"].items():
        if r.get("trace"):
            lines += ["", f"Per-stage trace, {v} (median ms): `{json.dumps(r['trace'])}`"]
    for v, r in d["variants"].items():
        for wl, m in (r.get("workloads") or {}).items():
            p = m.get("profile")
            if p and "error" not in p:
                top = ", ".join(f"{f} {s:.0%}" for f, s in p["top_self"][:8])
                lines += ["", f"py-spy, {v} {wl}: {p['samples']} samples; busy share per thread "
                          f"`{json.dumps(p['thread_share'])}`; top self: {top}"]  # fmt: skip
            elif p:
                lines += ["", f"py-spy, {v} {wl}: {p['error']}"]
    return "\n".join(lines) + "\n"
