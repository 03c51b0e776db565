"""The GPU check's CPU mode: every check of `make gpu-check` at tiny sizes, so the script never rots.

One run of `benchmarks/gpu_check.py --cpu` (a subprocess, as CI and a user run it); the tests read what it
printed and wrote. About a minute of CPU work; the timeout is generous for a shared, oversubscribed machine.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from safetensors import safe_open

from conftest import REPO

CORRECTNESS = {"chunked loss", "SDPA attention", "fused AdamW", "model.compile=true"}
EXPERIMENTS = {"lr_sweep", "kl_x", "freeze_attention", "instruct"}  # and learn_forget where its config exists


@pytest.fixture(scope="module")
def check(gptft_env, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--cpu", "--out", str(out)],
        cwd=REPO, env=gptft_env, capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    return done, out, json.loads((out / "gpu_check.json").read_text())


def test_every_check_passes_and_prints_one_line(check):
    done, _, report = check
    failed = [c["data"].get("stderr_tail") or c["summary"] for c in report["checks"] if not c["ok"]]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + "\n".join(failed)
    names = {c["name"] for c in report["checks"]}
    assert names >= CORRECTNESS
    assert {f"experiment {e}" for e in EXPERIMENTS} <= names
    assert {
        "speed eager",
        "speed compiled",
        "speed standard loss",
        "speed vocab 50,304",
        "memory: chunked vs standard loss",
    } <= names
    lines = [line for line in done.stdout.splitlines() if line.startswith(("PASS ", "FAIL "))]
    assert len(lines) == len(report["checks"]) and all(line.startswith("PASS ") for line in lines)
    assert report["ok"] and report["passed"] == len(report["checks"])


def test_correctness_numbers(check):
    checks = {c["name"]: c["data"] for c in check[2]["checks"]}
    chunked = checks["chunked loss"]
    # random init: about ln 50257 = 10.8
    assert math.isfinite(chunked["loss_chunked"]) and 9 < chunked["loss_standard"] < 12
    assert chunked["grad_rel_max"] < 5e-2
    assert checks["SDPA attention"]["attn_implementation"] == "sdpa"
    assert checks["fused AdamW"]["fused"] is True  # CausalLM picks the fused kernel on the CPU too
    compiled = checks["model.compile=true"]
    assert compiled["orig_mod_keys"] == {"state_dict": [], "checkpoint": [], "hf_model": []}


def test_speed_rows_and_memory(check):
    report = check[2]
    assert report["device"]["type"] == "cpu" and report["device"]["matmul_gflops"] > 0
    checks = {c["name"]: c["data"] for c in report["checks"]}
    for name in ("speed eager", "speed compiled", "speed vocab 50,304"):
        row = checks[name]
        assert row["tokens_per_s"] > 0 and row["mfu"] > 0 and row["flops_per_token"] > 0
    # the padded output layer is counted: 47 more rows of the tied embedding
    assert checks["speed vocab 50,304"]["flops_per_token"] > checks["speed eager"]["flops_per_token"]
    memory = checks["memory: chunked vs standard loss"]
    assert memory["chunked_mb"] < memory["standard_mb"]  # the B × T × V logits never exist


def test_experiments_ran_end_to_end(check):
    _, out, report = check
    runs = {c["name"][len("experiment ") :]: c["data"] for c in report["checks"] if c["kind"] == "experiment"}
    assert set(runs) >= EXPERIMENTS
    assert len(runs["freeze_attention"]["runs"]) == 2  # both arms of the paired study
    assert "experiment=instruct" in runs["instruct"]["command"] and runs["instruct"]["model"] == "gpt2-large"
    for data in runs.values():
        assert all(r["status"] == "completed" for r in data["runs"])
    export = next((out / "runs/instruct").rglob("hf_model/model.safetensors"))
    with safe_open(str(export), "pt") as f:  # the tiny stand-in for gpt2-large, loaded and saved the real way
        assert not any("_orig_mod." in k for k in f.keys())  # noqa: SIM118
    assert (out / "runs/lr_sweep/report/summary.md").is_file()


def test_markdown_table(check):
    _, out, report = check
    text = (out / "gpu_check.md").read_text()
    assert text.startswith("# gptft GPU check (cpu mode)")
    assert text.count("| PASS |") == len(report["checks"])
    assert "| eager |" in text and "| compiled |" in text and "tokens/s | MFU" in text
