"""Benchmark 2, data: windows per second of gptft's sampler vs a per-window Python loop, and the data wait
as a share of a training step.

Run by hand (`make bench`). Windows of T = 256 tokens from Gulliver's training part. The sampler gathers a
whole batch with one tensor index; the loop is the course's and nanoGPT's `get_batch` (random starts, then
one slice per window and a stack). Interleaved repeats, medians. The data wait is the time to take one batch
of 8 × 256 from the DataLoader gptft trains from, against a bf16 training step of benchmark 1's model (4
layers, d 256) on the same batch. Prints a table and writes outputs/benchmarks/data.json.
"""

from __future__ import annotations

import statistics
import time

import torch

from gptft.utils.io import atomic_write_json

SEQ, REPEATS, STEPS = 256, 5, 200
BATCHES = (16, 256)
STEP_ARCH = {"model_type": "gpt2", "n_layer": 4, "n_embd": 256, "n_head": 4, "n_positions": 256}


def book():
    from gptft.data import BookWindows

    data = BookWindows(seq_len=SEQ, batch_size=16)
    data.setup("fit")
    return data


def sampler_rate(sampler, batch: int) -> float:
    """Windows per second of WindowSampler.batch (x and y of every window)."""
    sampler.batch_size = batch
    start = time.perf_counter()
    for step in range(STEPS):
        sampler.batch(step)
    return batch * STEPS / (time.perf_counter() - start)


def loop_rate(tokens: torch.Tensor, n_starts: int, batch: int) -> float:
    """Windows per second of a per-window Python loop (nanoGPT's get_batch)."""
    start = time.perf_counter()
    for _ in range(STEPS):
        ix = torch.randint(n_starts, (batch,))
        torch.stack([tokens[i : i + SEQ] for i in ix])
        torch.stack([tokens[i + 1 : i + 1 + SEQ] for i in ix])
    return batch * STEPS / (time.perf_counter() - start)


def data_wait_s(data, n: int = 50) -> float:
    """Median time to take the next batch (8 × 256) from the DataLoader gptft trains from."""
    from torch.utils.data import DataLoader

    from gptft.data.windows import _StepBatches

    data.train_sampler.batch_size = 8
    loader = iter(DataLoader(_StepBatches(data.train_sampler, lambda: 0, n), batch_size=None))
    times = []
    for _ in range(n):
        start = time.perf_counter()
        next(loader)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_s(data, n: int = 4) -> float:
    """Median time of a gptft-style training step: bf16 autocast, chunked loss, fused AdamW, 8 × 256."""
    from gptft.models import build_model
    from gptft.tasks import CausalLM

    torch.manual_seed(0)
    task = CausalLM(build_model(arch=STEP_ARCH), {"lr": 1e-3, "weight_decay": 0.01}, {}, loss_chunk=512)
    opt = torch.optim.AdamW(task.parameters(), lr=1e-3, fused=True)
    data.train_sampler.batch_size = 8
    times = []
    for k in range(n + 1):
        batch = data.train_sampler.batch(k)
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = task.compute_loss(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])  # the first step warms up


def main() -> None:
    data = book()
    sampler = data.train_sampler
    threads = torch.get_num_threads()
    # torch's thread count, and 1: on a busy machine every parallel region waits for a descheduled thread,
    # which small tensors (a batch of starts, a gather of 16 windows) feel most.
    cases = [(b, t) for b in BATCHES for t in dict.fromkeys((threads, 1))]
    rates: dict[str, list[float]] = {
        f"{kind} B={b} threads={t}": [] for b, t in cases for kind in ("sampler", "loop")
    }
    for repeat in range(REPEATS):
        for b, t in cases:
            torch.set_num_threads(t)
            rates[f"sampler B={b} threads={t}"].append(sampler_rate(sampler, b))
            rates[f"loop B={b} threads={t}"].append(loop_rate(data.tokens, sampler.n_starts, b))
        print(f"repeat {repeat}: " + ", ".join(f"{k} {v[-1]:.3g}/s" for k, v in rates.items()), flush=True)
    torch.set_num_threads(threads)
    medians = {k: statistics.median(v) for k, v in rates.items()}
    # The machine is shared: the median of the side-by-side ratios is steadier than a ratio of medians.
    ratios = {
        f"B={b} threads={t}": statistics.median(
            s / p
            for s, p in zip(
                rates[f"sampler B={b} threads={t}"], rates[f"loop B={b} threads={t}"], strict=True
            )
        )
        for b, t in cases
    }
    print(
        f"\n{'windows of 256 tokens':<24}{'threads':>8}{'sampler /s':>12}{'Python loop /s':>16}{'ratio':>8}"
    )
    for b, t in cases:
        s, loop = medians[f"sampler B={b} threads={t}"], medians[f"loop B={b} threads={t}"]
        print(f"{'batch ' + str(b):<24}{t:>8}{s:>12.3g}{loop:>16.3g}{ratios[f'B={b} threads={t}']:>7.1f}×")
    wait, step = data_wait_s(data), step_s(data)
    share = wait / step
    print(
        f"\ndata wait per batch (8 × 256, DataLoader): {wait * 1e3:.3f} ms; training step (4 layers, d 256, bf16): "
        f"{step:.3f} s; share {100 * share:.3f} % (target < 1 %)"
    )
    best = max(medians[f"sampler B=256 threads={t}"] for t in (threads, 1))
    print(f"sampler at batch 256: {best:.3g} windows/s at its best thread count (target ≥ 1e5)")
    atomic_write_json(
        "outputs/benchmarks/data.json",
        {
            "seq_len": SEQ,
            "repeats": rates,
            "medians_windows_per_s": medians,
            "ratios": ratios,
            "data_wait_s": wait,
            "step_s": step,
            "data_wait_share": share,
            "threads": threads,
        },
    )


if __name__ == "__main__":
    main()
