"""Peak RSS of a conversion stays under its memory budget (RSS sampled in a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from turbo_batch.convert import list_tensors
from turbo_batch.testing.synthetic_nvfp4 import write_synthetic_nvidia_checkpoint

REPO = Path(__file__).resolve().parents[2]

_MEMORY_CHILD = textwrap.dedent(
    """
    import gc, json, re, sys, threading, time
    from turbo_batch.convert import convert

    def status(key):  # bytes, from /proc/self/status
        return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read())[1]) * 1024

    warm, src, dst, budget = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    convert(warm, dst + "-warm", progress=False, memory_budget_bytes=budget)  # imports, allocator warm-up
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (peak RSS) to the current RSS
    base = status("VmRSS")
    sampled = [base]
    done = threading.Event()
    def sample():  # a second, independent measurement
        while not done.is_set():
            sampled[0] = max(sampled[0], status("VmRSS"))
            time.sleep(0.001)
    th = threading.Thread(target=sample)
    th.start()
    report = convert(src, dst, progress=False, memory_budget_bytes=budget)
    done.set()
    th.join()
    print(json.dumps({"base": base, "hwm": status("VmHWM"), "sampled": sampled[0], "problems": report["problems"]}))
    """
)


def test_memory_stays_bounded(tmp_path):
    budget = 24 << 20
    warm = write_synthetic_nvidia_checkpoint(tmp_path / "warm", with_encoders=False)
    big = write_synthetic_nvidia_checkpoint(
        tmp_path / "big",
        hidden_size=2048,
        intermediate_size=4096,
        num_hidden_layers=3,
        num_attention_heads=16,
        num_key_value_heads=8,
        num_global_key_value_heads=8,
        head_dim=128,
        vocab_size=16384,
        attention_k_eq_v=False,
        max_shard_bytes=60 << 20,
    )
    tensors = list_tensors(big)
    total, largest = sum(t.nbytes for t in tensors), max(t.nbytes for t in tensors)
    assert total > 6 * budget and largest > budget  # bigger than the budget, as a whole and per tensor
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY_CHILD, str(warm), str(big), str(tmp_path / "out"), str(budget)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    assert m["problems"] == []
    growth = max(m["hwm"], m["sampled"]) - m["base"]
    print(f"source {total / 2**20:.0f} MiB, largest tensor {largest / 2**20:.0f} MiB, budget {budget / 2**20:.0f} "
          f"MiB, peak RSS growth {growth / 2**20:.1f} MiB")  # fmt: skip
    assert 0 < growth < budget
