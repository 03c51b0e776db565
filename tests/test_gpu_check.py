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
import torch
from safetensors import safe_open

from conftest import REPO

CORRECTNESS = {
    "chunked loss bf16 vs fp64",
    "chunked loss fp16 vs fp64",
    "SDPA attention",
    "ref_kl under bf16 vs fp64",
    "fused AdamW",
    "model.compile=true",
}
SMOKE = {"smoke qkv_parts=[k] + clip + checkpointing + compile", "smoke LoRA + compile, resumed"}
# Two experiments prove the check's experiment path (both arms of the paired study, gpt2-large's stand-in); every
# experiment runs end to end in the other tests, and each one here is a subprocess of ≈ 20 s.
EXPERIMENTS = {"freeze_attention", "instruct"}


@pytest.fixture(scope="module")
def check(gptft_env, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--cpu", "--out", str(out), "--experiments", ",".join(EXPERIMENTS)],
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
        "speed gptft.run",
        "memory gpt2-large",
        "DDP and FSDP vs one GPU",
    } <= names | SMOKE
    assert names >= SMOKE
    lines = [line for line in done.stdout.splitlines() if line.startswith(("PASS ", "FAIL ", "SKIP "))]
    assert len(lines) == len(report["checks"]) and all(line.startswith(("PASS ", "SKIP ")) for line in lines)
    assert report["ok"] and report["passed"] == len(report["checks"])
    # the preflight came first, and said so in one line
    assert done.stdout.splitlines()[0].startswith("gpu_check preflight: OK")


def test_correctness_numbers(check, data_dir):
    checks = {c["name"]: c["data"] for c in check[2]["checks"]}
    # The fp64 reference the chunked loss is judged against, recomputed here with transformers alone: the same
    # seeded random init of the tiny arch without dropout, the book's first training batch, cross-entropy in fp64.
    from transformers import GPT2Config, GPT2LMHeadModel

    from gptft.data import BookWindows

    torch.manual_seed(0)
    arch = {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 256, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
            "attn_pdrop": 0.0}  # fmt: skip
    model = GPT2LMHeadModel(GPT2Config(**arch)).double()
    book = BookWindows(seq_len=64, batch_size=2, data_dir=str(data_dir))
    book.setup("fit")
    x, y = book.train_sampler.batch(0)[:2]
    loss = torch.nn.functional.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten()).item()
    for label, rounding in (("bf16", 2**-8), ("fp16", 2**-11)):
        chunked = checks[f"chunked loss {label} vs fp64"]
        assert chunked["rows"] == 128 and chunked["loss_fp64"] == pytest.approx(loss, rel=1e-12)
        # random init: about ln 50257 = 10.8; both losses are within their precision's rounding of fp64
        assert (
            9 < loss < 12
            and chunked["loss_rel_chunked"] < rounding
            and chunked["loss_rel_standard"] < rounding
        )
        assert chunked["grad_rel_chunked"] <= max(2 * chunked["grad_rel_standard"], rounding)
    assert checks["SDPA attention"]["attn_implementation"] == "sdpa"
    kl = checks["ref_kl under bf16 vs fp64"]  # the probe turns autocast off: bf16 training reads fp32's value
    assert kl["kl_bf16"] == kl["kl_fp32"] and abs(kl["kl_fp32"] - kl["kl_fp64"]) <= 1e-2 * kl["kl_fp64"]
    assert kl["errors"]["naive"] > 0.1  # what it guards against: the same KL under bf16 autocast is far off
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
    run = checks["speed gptft.run"]  # the same shape through python -m gptft.run, beside the bare fit
    assert run["bare_s_per_step"] == checks["speed eager"]["s_per_step"]
    assert run["ratio"] == pytest.approx(run["s_per_step"] / run["bare_s_per_step"]) and run["s_per_step"] > 0
    assert math.isfinite(checks["memory gpt2-large"]["peak_gb"])
    assert checks["DDP and FSDP vs one GPU"]["skipped"] is True  # 2 GPUs needed


def test_experiments_ran_end_to_end(check):
    _, out, report = check
    runs = {
        c["name"][len("experiment ") :]: c["data"]
        for c in report["checks"]
        if c["name"].startswith("experiment ")
    }
    assert set(runs) >= EXPERIMENTS
    assert len(runs["freeze_attention"]["runs"]) == 2  # both arms of the paired study
    assert "experiment=instruct" in runs["instruct"]["command"] and runs["instruct"]["model"] == "gpt2-large"
    for data in runs.values():
        assert all(r["status"] == "completed" for r in data["runs"])
    export = next((out / "runs/instruct").rglob("hf_model/model.safetensors"))
    with safe_open(str(export), "pt") as f:  # the tiny stand-in for gpt2-large, loaded and saved the real way
        assert not any("_orig_mod." in k for k in f.keys())  # noqa: SIM118
    assert (out / "runs/freeze_attention/report/summary.md").is_file()
    smoke = {c["name"]: c["data"] for c in report["checks"] if c["name"] in SMOKE}
    assert all(r["status"] == "completed" for d in smoke.values() for r in d["runs"])
    assert smoke["smoke LoRA + compile, resumed"]["runs"][0]["steps"] == 3  # 2, then resumed for one more
    for key in ("freeze.qkv_parts=[k]", "trainer.gradient_clip_val=1.0", "model.gradient_checkpointing=true",
                "model.compile=aot_eager"):  # fmt: skip
        assert key in smoke["smoke qkv_parts=[k] + clip + checkpointing + compile"]["command"]


def test_markdown_table(check):
    _, out, report = check
    text = (out / "gpu_check.md").read_text()
    assert text.startswith("# gptft GPU check (cpu mode)")
    # one table: a header, a row per check, nothing else below the device line
    assert text.count("| check | result | numbers |") == 1 and text.count("| --- | --- | --- |") == 1
    assert text.count("| PASS |") + text.count("| SKIP |") == len(report["checks"])
    table = text[text.index("| check |") :].strip().splitlines()
    assert len(table) == 2 + len(report["checks"]) and all(line.startswith("| ") for line in table)
    assert "| speed eager | PASS |" in text and "| DDP and FSDP vs one GPU | SKIP |" in text
