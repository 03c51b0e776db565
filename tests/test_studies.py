"""`python -m gptft.studies`: the claims' verdicts against an independent computation (mpmath's t quantile, every
sign pattern enumerated, numpy's SVD), and the whole command on the tiny model: a report with a verdict line for every
claim, and a second call after a kill that trains nothing twice."""

from __future__ import annotations

import itertools
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from oracle.independent import t_quantile

from gptft.studies.claims import CLAIMS, Claim, judge
from gptft.studies.weights import effective_rank

REPO = Path(__file__).resolve().parents[1]


def independent(values: list[float], null: float) -> tuple[float, float, float, float]:
    """Mean of value − null, an independent 95% t interval (mpmath), and the two-sided sign-flip p over all 2^n patterns."""
    d = np.asarray(values, dtype=np.float64) - null
    n, mean = len(d), float(d.mean())
    half = t_quantile(0.975, n - 1) * d.std(ddof=1) / math.sqrt(n)
    low, high = mean - half, mean + half
    means = [abs(float(np.dot(signs, d))) / n for signs in itertools.product((1.0, -1.0), repeat=n)]
    p = sum(m >= abs(mean) - 1e-12 for m in means) / len(means)
    return mean, float(low), float(high), p


def expected_verdict(kind: str, low: float, high: float, margin: float | None) -> str:
    if kind == "within":
        if -margin < low and high < margin:
            return "reproduced"
        return "contradicted" if low > margin or high < -margin else "inconclusive"
    sign = 1 if kind == "greater" else -1
    if sign * low > 0 and sign * high > 0:
        return "reproduced"
    return "contradicted" if sign * low < 0 and sign * high < 0 else "inconclusive"


@pytest.mark.parametrize(
    "kind, values, null, margin",
    [
        ("greater", [0.5, 0.7, 0.6, 0.8, 0.55, 0.65], 0.0, None),  # reproduced, p = 2/2^6
        ("greater", [0.5, -0.7, 0.6, -0.2], 0.0, None),  # inconclusive
        ("less", [0.31, 0.35, 0.33], 0.1, None),  # contradicted: above the null on every seed
        ("less", [0.01, 0.02, 0.015], 0.1, None),  # reproduced below a null of 0.1
        ("within", [24.0, 26.5, 25.5], 25.0, 10.0),  # reproduced: inside 25 ± 10
        ("within", [60.0, 70.0, 65.0, 62.0], 25.0, 10.0),  # contradicted: wholly beyond it
        ("within", [10.0, 40.0, 25.0], 25.0, 10.0),  # inconclusive: straddles the margin
    ],
)
def test_verdict_against_an_independent_computation(kind, values, null, margin):
    claim = Claim(
        "t-1", "study", "the write-up", "a statement", "", kind, lambda d: {}, null=null, margin=margin
    )
    verdict = judge(claim, dict(enumerate(values, start=1)))
    mean, low, high, p = independent(values, null)
    assert verdict.n == len(values)
    assert verdict.mean == pytest.approx(mean, rel=1e-12, abs=1e-12)
    assert (verdict.low, verdict.high) == (pytest.approx(low, rel=1e-9), pytest.approx(high, rel=1e-9))
    assert verdict.p == pytest.approx(p, rel=1e-12)
    assert verdict.verdict == expected_verdict(kind, low, high, margin)


def test_exactly_zero_and_missing_claims():
    zero = Claim("z-1", "study", "w", "s", "", "zero", lambda d: {})
    assert judge(zero, {1: 0.0, 2: 0.0}).verdict == "reproduced"
    assert judge(zero, {1: 0.0, 2: 1e-9}).verdict == "contradicted"
    missing = judge(CLAIMS[0], {})
    assert missing.verdict == "inconclusive" and missing.settle


def test_effective_rank_against_numpy():
    rng = np.random.default_rng(0)
    for shape, true_rank in (((64, 192), 5), ((40, 40), 40), ((30, 90), 1)):
        delta = rng.standard_normal((shape[0], true_rank)) @ rng.standard_normal((true_rank, shape[1]))
        delta += 1e-3 * rng.standard_normal(shape)
        s2 = np.linalg.svd(delta, compute_uv=False) ** 2
        expected = int(np.argmax(np.cumsum(s2) / s2.sum() >= 0.9)) + 1
        assert effective_rank(torch.from_numpy(delta)) == expected
    assert effective_rank(torch.zeros(8, 8)) == 0


def _completed(folder: Path) -> dict[Path, int]:
    """metrics.json files under `folder` whose run completed, with their modification times (ns)."""
    out = {}
    for file in folder.rglob("metrics.json"):
        try:
            if json.loads(file.read_text()).get("status") == "completed":
                out[file] = file.stat().st_mtime_ns
        except ValueError:  # being written
            continue
    return out


def test_studies_report_every_claim_and_a_rerun_after_a_kill_trains_nothing_twice(
    tmp_path, tiny_model_dir, gptft_env
):
    out = tmp_path / "studies"
    command = [
        sys.executable,
        "-m",
        "gptft.studies",
        "scale=smoke",
        f"base={tiny_model_dir}",
        f"out={out}",
        "seeds=1",
        "paired_seeds=1",
        "extra=[trainer.max_steps=2,trainer.val_check_interval=1,eval.max_new_tokens=4,eval.repeats=0,"
        "data.val_windows=2]",
        "studies.lr_sweep.sweep={optim.lr:[1e-4,1e-6]}",  # the claims compare the highest lr with the lowest
        "studies.learn_forget.sweep={freeze:[none,lora]}",  # the ranks compare full fine-tuning with LoRA
        "studies.instruct.overrides=[data.max_length=96,data.batch_size=2,data.val_pairs=2,"
        "callbacks.exact_match.questions=1,callbacks.exact_match.max_new_tokens=4]",
    ]
    # One thread: a tiny model's kernels are too small to share, and beside another process (the rest of the suite)
    # two spinning OpenMP threads per process made this test 5 times slower on 2 cores.
    env = {**gptft_env, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while len(_completed(out)) < 2 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)  # a hard stop, wherever it is: the next run may be half made
    first.wait()
    before = _completed(out)
    assert len(before) >= 2, first.stderr.read().decode()[-3000:]

    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    after = _completed(out)
    # every run of the first call that had ended is untouched; every run of the plan ended, once each
    assert {f: after.get(f) for f in before} == before
    runs = {p.parent for p in out.rglob("metrics.json")}
    expected = {"lr_sweep": 2, "scratch": 1, "kl_x": 2, "freezing": 2, "instruct": 1, "learn_forget": 2}
    assert {s: sum(r.parent.name == s for r in runs) for s in expected} == expected
    assert set(after) == {r / "metrics.json" for r in runs}

    report = (out / "REPORT.md").read_text()
    for claim in CLAIMS:
        lines = [line for line in report.splitlines() if line.startswith(f"- **{claim.id}**")]
        assert len(lines) == 1, claim.id
        assert any(f"**{v}**" in lines[0] for v in ("reproduced", "contradicted", "inconclusive")), lines[0]
        assert "Scale smoke" in lines[0] and "a toy base is not GPT-2" in lines[0]
    summary = json.loads((out / "summary.json").read_text())
    assert [c["id"] for c in summary["claims"]] == [c.id for c in CLAIMS]
    # the frozen matrices of the freezing pair's model B did not move: ΔW is exactly 0 (fp64)
    assert next(c for c in summary["claims"] if c["id"] == "freeze-5")["verdict"] == "reproduced"
    ranks = summary["studies"]["learn_forget"]["delta_w"]["rank"]
    assert max(ranks["freeze=lora"].values()) <= 8 < max(ranks["freeze=none"].values())  # LoRA's rank is ≤ r
