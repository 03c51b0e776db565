"""Training-step speed and memory: gptft vs a bare PyTorch loop vs the Hugging Face Trainer, and how close each
comes to the machine's limit.

Run by hand (`make bench`). GPT-2 with 4 layers, d 256, context 256, batch 8 × 256, the same Gulliver
batches for every variant, the same thread count; interleaved repeats; medians of per-step times after
warm-up steps. The limit is the machine's matrix-product ceiling (GFLOP/s of a 2048² product) in the precision
each variant trains in, probed beside every step (just before and just after it, the faster of the two); a step's
achieved GFLOP/s is its model FLOPs (gptft.models.flops: 6·N + 12·L·d·T per token) over its time. The Hugging Face
Trainer runs in its faster precision here: bf16 where the CPU runs bf16 products measurably faster (the rule trainer.precision=auto
follows), else fp32. Peak memory is the growth of the process's peak RSS during training steps, each variant in a
fresh subprocess. Prints a table per shape and writes outputs/benchmarks/train_step.json (an entry per shape). Beside
the ratios of medians, each variant's paired figures: the median over repeats of its ratio to the HF Trainer within
one repeat (the host's speed drifts between repeats; within one the variants run a few minutes apart), and the
median over its steps of each step's share of the ceiling probed beside it, with their ranges.

The same comparison runs at the studies' own shape, GPT-2 124M (12 layers, d 768, context 256, batch 8 × 256; fewer
steps and repeats, and no bare loop, whose full fp32 logits alone take seconds there): at d 256 every product's inner
dimension is 256, where no kernel reaches its peak. `--shape small|gpt2` runs one of the two; `--profile` adds a
torch.profiler table (operators by self time) of the precision `auto` picks, two steps of gptft's step at each shape
run, written to outputs/benchmarks/train_step_profile_<shape>.txt.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import lightning as L
import torch
import torch.nn.functional as F

from gptft.models.precision import BF16_MARGIN, cpu_bf16_speedup, resolve_precision
from gptft.utils.io import atomic_write_json

ARCH = {"model_type": "gpt2", "n_layer": 4, "n_embd": 256, "n_head": 4, "n_positions": 256}
BATCH, SEQ, WARMUP, STEPS, REPEATS = 8, 256, 2, 8, 3  # benchmark 1 (benchmarks/lora.py reuses them)
GPT2_ARCH = {"model_type": "gpt2", "n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 256}
HF_BF16 = cpu_bf16_speedup() >= BF16_MARGIN  # the Trainer's faster precision on this CPU (as auto decides)
HF = f"HF Trainer {'bf16' if HF_BF16 else 'fp32'}"
TORCH_DROPOUT = ", torch dropout"  # a gptft variant with model.fast_dropout=false (the lever measured beside it)
VARIANTS = ("bare fp32 loop", HF, "gptft fp32, full logits", "gptft fp32", "gptft defaults" + TORCH_DROPOUT,
            "gptft defaults")  # fmt: skip
# The precision each variant trains in: its share is taken of the ceiling in that precision.
PRECISION = {"bare fp32 loop": "32-true", HF: "bf16-mixed" if HF_BF16 else "32-true", "gptft fp32, full logits":
             "32-true", "gptft fp32": "32-true", "gptft defaults": resolve_precision("auto", "cpu")}  # fmt: skip
PRECISION |= {name + TORCH_DROPOUT: PRECISION[name] for name in ("gptft fp32", "gptft defaults")}


@dataclass(frozen=True)
class Shape:
    """One model and batch shape, with the variants, steps and repeats it is timed with."""

    name: str
    title: str
    arch: dict
    warmup: int
    steps: int
    repeats: int
    variants: tuple[str, ...]
    batch: int = BATCH
    seq: int = SEQ


SHAPES = {
    "small": Shape(
        "small", "benchmark 1: GPT-2 with 4 layers, d 256", ARCH, WARMUP, STEPS, REPEATS, VARIANTS
    ),
    # 2-10 s per step on a 2-core CPU: 1 + 3 steps per variant and repeat, about 2.5 minutes a repeat.
    "gpt2": Shape(
        "gpt2", "GPT-2 124M: 12 layers, d 768", GPT2_ARCH, 1, 3, 3,
        (HF, "gptft fp32" + TORCH_DROPOUT, "gptft fp32", "gptft defaults" + TORCH_DROPOUT, "gptft defaults"),
    ),
}


def matmul_gflops(
    dtype: torch.dtype, device: str | torch.device = "cpu", n: int = 2048, repeats: int = 5
) -> float:
    """The matrix-product ceiling: GFLOP/s of an n × n × n product in `dtype` (2·n³ FLOPs), the median of
    `repeats` timings after one warm-up product; on a GPU each timing covers 10 products between two syncs."""
    device = torch.device(device)
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    inner = 10 if device.type == "cuda" else 1
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    rates = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        for _ in range(inner):
            a @ b
        sync()
        rates.append(2 * n**3 * inner / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates)


class CeilingProbe:
    """The ceiling beside each step: one 2048² product in the step's precision timed just before the step and one
    just after it, outside the step's own time; the step's ceiling is the faster of the two. The AMX units of a
    shared host change speed from one minute to the next (445-2,601 GFLOP/s in one session), so a ceiling
    measured once per repeat, minutes from the steps, made shares of 27-166% in one run."""

    def __init__(self, precision: str, n: int = 2048):
        dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float32
        self.a, self.b = (torch.randn(n, n).to(dtype) for _ in range(2))
        self.a @ self.b  # warm-up: oneDNN picks its kernel
        self.rates: list[float] = []
        self._before = 0.0

    def _rate(self) -> float:
        start = time.perf_counter()
        self.a @ self.b
        return 2 * self.a.size(0) ** 3 / (time.perf_counter() - start) / 1e9

    def before(self) -> None:
        self._before = self._rate()

    def after(self) -> None:
        self.rates.append(max(self._before, self._rate()))


def data_dir() -> str:
    return os.environ.get("GPTFT_DATA_DIR", "data")


def batches(n: int, batch: int = BATCH, seq: int = SEQ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from gptft.data import BookWindows

    data = BookWindows(seq_len=seq, batch_size=batch, data_dir=data_dir())
    data.setup("fit")
    return [data.train_sampler.batch(k)[:2] for k in range(n)]


def fresh_model(arch: dict = ARCH, fast_dropout: bool = True) -> torch.nn.Module:
    """gptft's model: build_model's levers (the GELU kernel, fast dropout) on."""
    from gptft.models import build_model

    torch.manual_seed(0)
    return build_model(arch=arch, fast_dropout=fast_dropout)


def stock_model(arch: dict = ARCH) -> torch.nn.Module:
    """The model as transformers builds it (SDPA attention, its GELU, torch's dropout), for the loops not gptft's."""
    from transformers import AutoModelForCausalLM

    from gptft.models import model_config

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(model_config(arch=arch), attn_implementation="sdpa").train()


def bare_loop(data: list, arch: dict = ARCH, probe: CeilingProbe | None = None) -> list[float]:
    """A hand-written fp32 loop: forward, full-logits cross-entropy, backward, foreach AdamW."""
    model = stock_model(arch)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, foreach=True)
    times = []
    for x, y in data:
        if probe:
            probe.before()
        start = time.perf_counter()
        logits = model(input_ids=x, use_cache=False).logits
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - start)
        if probe:
            probe.after()
    return times


def hf_trainer(data: list, arch: dict = ARCH, probe: CeilingProbe | None = None) -> list[float]:
    """transformers.Trainer in its faster precision here, on the same windows (it shifts the labels itself)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Rows(torch.utils.data.Dataset):
        def __init__(self):
            self.rows = [x[i] for x, _ in data for i in range(len(x))]

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            return {"input_ids": self.rows[i], "labels": self.rows[i]}

    class StepClock(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], 0.0

        def on_step_begin(self, *args, **kwargs):
            if probe:
                probe.before()
            self.start = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            self.times.append(time.perf_counter() - self.start)
            if probe:
                probe.after()

    clock = StepClock()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=len(data[0][0]),
            max_steps=len(data),
            learning_rate=1e-3,
            weight_decay=0.01,
            bf16=HF_BF16,
            use_cpu=True,
            logging_steps=10_000,
            save_strategy="no",
            report_to=[],
            dataloader_num_workers=0,
            disable_tqdm=True,
            lr_scheduler_type="constant",
        )
        Trainer(model=stock_model(arch), args=args, train_dataset=Rows(), callbacks=[clock]).train()
    return clock.times


class StepTimes(L.Callback):
    """Each training batch's time: forward, backward and optimizer step, as the bare loop times them; the ceiling
    probed beside each, where a probe is given."""

    def __init__(self, probe: CeilingProbe | None = None):
        self.times: list[float] = []
        self._start = 0.0
        self.probe = probe

    def on_train_batch_start(self, *args: object) -> None:
        if self.probe:
            self.probe.before()
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args: object) -> None:
        self.times.append(time.perf_counter() - self._start)
        if self.probe:
            self.probe.after()


def gptft(
    data: list,
    precision: str,
    loss_chunk: int,
    arch: dict | None = None,
    callbacks: list[L.Callback] = (),
    fast_dropout: bool = True,
    probe: CeilingProbe | None = None,
) -> list[float]:
    """gptft's own path: CausalLM and its data module (the same batches: batch k of the seed's draw) through a
    Lightning Trainer, as `python -m gptft.run` trains. Benchmark 1's model unless `arch` is given (called as
    fresh_model(), which benchmarks/lora.py replaces)."""
    from gptft.data import BookWindows
    from gptft.tasks import CausalLM
    from gptft.utils.logs import quiet_lightning

    quiet_lightning()
    model = fresh_model() if arch is None else fresh_model(arch, fast_dropout)
    task = CausalLM(model, {"lr": 1e-3, "weight_decay": 0.01}, {"name": "constant"}, loss_chunk=loss_chunk)
    clock = StepTimes(probe)
    with tempfile.TemporaryDirectory() as out:
        trainer = L.Trainer(
            accelerator="cpu",
            precision=resolve_precision(precision, "cpu"),
            max_steps=len(data),
            limit_val_batches=0,
            logger=False,
            callbacks=[clock, *callbacks],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=out,
        )
        x = data[0][0]
        trainer.fit(
            task, datamodule=BookWindows(seq_len=x.size(1), batch_size=x.size(0), data_dir=data_dir())
        )
    return clock.times


def run_variant(name: str, data: list, arch: dict = ARCH) -> tuple[list[float], list[float]]:
    """(the variant's step times, the ceiling probed beside each step in its precision)."""
    probe = CeilingProbe(PRECISION[name])
    if name == "bare fp32 loop":
        times = bare_loop(data, arch, probe)
    elif name == HF:
        times = hf_trainer(data, arch, probe)
    elif name == "gptft fp32, full logits":
        times = gptft(data, "32-true", 0, arch, probe=probe)
    else:
        fast_dropout = not name.endswith(TORCH_DROPOUT)
        precision = "32-true" if name.startswith("gptft fp32") else "auto"
        times = gptft(data, precision, 512, arch, fast_dropout=fast_dropout, probe=probe)
    return times, probe.rates


def peak_memory_mb(loss_chunk: int) -> float:
    """In a fresh process: peak RSS of fp32 training steps above the static level (weights, gradients and
    AdamW state already allocated), i.e. what the step itself holds at its peak. Linux: the peak is the
    process's VmHWM, reset at the start (ru_maxrss would carry over the parent's peak into the child)."""
    code = f"""
import re, sys, torch
sys.path.insert(0, "benchmarks")
import train_step as b
from gptft.tasks import CausalLM
def kb(field):
    return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))
data = b.batches(2)
task = CausalLM(b.fresh_model(), {{"lr": 1e-3, "weight_decay": 0.0}}, {{}}, loss_chunk={loss_chunk})
opt = torch.optim.AdamW(task.parameters(), lr=1e-3)
for p in task.parameters():
    p.grad = torch.zeros_like(p)
opt.step()  # allocates the AdamW state
open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current RSS
base = kb("VmRSS")
for batch in data:
    loss, _ = task.compute_loss(batch)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=False)
print((kb("VmHWM") - base) / 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def measure(shape: Shape) -> dict:
    """Times every variant of `shape` in interleaved repeats, each step beside its own ceiling probe; prints and
    returns the table."""
    data = batches(shape.warmup + shape.steps, shape.batch, shape.seq)
    times: dict[str, list[float]] = {name: [] for name in shape.variants}  # each repeat's median step
    steps: dict[str, list[tuple[float, float]]] = {name: [] for name in shape.variants}  # (step time, its ceiling)
    print(
        f"\n{shape.title}, batch {shape.batch} × {shape.seq}; load average before: {os.getloadavg()[0]:.2f}"
    )
    for repeat in range(shape.repeats):
        for name in shape.variants:
            step_times, rates = run_variant(name, data, shape.arch)
            steps[name] += list(zip(step_times[shape.warmup :], rates[shape.warmup :], strict=True))
            times[name].append(statistics.median(step_times[shape.warmup :]))
            ceiling_now = statistics.median(rates[shape.warmup :])
            print(f"repeat {repeat}: {name:<32} {times[name][-1]:.3f} s/step (ceiling beside its steps: "
                  f"{ceiling_now:.0f} GFLOP/s)", flush=True)  # fmt: skip
    medians = {name: statistics.median(v) for name, v in times.items()}
    probed = {p: [c for name in shape.variants if PRECISION[name] == p for _, c in steps[name]]
              for p in ("32-true", "bf16-mixed")}  # fmt: skip
    from gptft.models.flops import model_flops_per_token

    flops_per_step = model_flops_per_token(fresh_model(shape.arch), shape.seq) * shape.batch * shape.seq
    tokens = shape.batch * shape.seq
    ranges = "; ".join(f"{'fp32' if p == '32-true' else 'bf16'} {statistics.median(v):.0f} ({min(v):.0f}-{max(v):.0f})"
                       for p, v in probed.items() if v)  # fmt: skip
    print(
        f"\n{shape.title}: model FLOPs per step {flops_per_step / 1e9:.1f} G; matrix-product ceiling beside the "
        f"steps (GFLOP/s, median and range): {ranges}; {torch.get_num_threads()} threads; load average after: "
        f"{os.getloadavg()[0]:.2f}"
    )
    base = next((v for v in ("bare fp32 loop", "gptft fp32" + TORCH_DROPOUT) if v in medians), HF)
    print(f"{'variant':<32}{'precision':>11}{'s/step':>8}{'tokens/s':>10}{'GFLOP/s':>9}{'of ceiling':>11}"
          f"{'vs ' + base:>{len(base) + 6}}{'vs HF':>8}{'paired vs HF':>20}{'stepwise of ceiling':>24}")  # fmt: skip
    rows = {}
    for name, m in medians.items():
        achieved = flops_per_step / m / 1e9
        ceiling = statistics.median(c for _, c in steps[name])
        share = achieved / ceiling
        # The host's speed drifts between repeats (the same variant ±35%): the median of each repeat's own ratio
        # to the Trainer is the steadier figure; each step's share is of the ceiling probed beside that step.
        vs_hf = [hf / t for hf, t in zip(times[HF], times[name], strict=True)]
        shares = [flops_per_step / t / 1e9 / c for t, c in steps[name]]
        rows[name] = {"precision": PRECISION[name], "s_per_step": m, "tokens_per_s": tokens / m, "gflops": achieved,
                      "ceiling_gflops": ceiling, "share_of_ceiling": share, "vs_base": medians[base] / m,
                      "vs_hf": medians[HF] / m, "paired_vs_hf": statistics.median(vs_hf), "paired_vs_hf_repeats": vs_hf,
                      "stepwise_share_of_ceiling": statistics.median(shares), "steps": steps[name]}  # fmt: skip
        paired = f"{statistics.median(vs_hf):.2f}× ({min(vs_hf):.2f}-{max(vs_hf):.2f})"
        stepwise = f"{statistics.median(shares):.0%} ({min(shares):.0%}-{max(shares):.0%})"
        print(
            f"{name:<32}{PRECISION[name]:>11}{m:>8.3f}{tokens / m:>10.0f}{achieved:>9.0f}{share:>10.0%} "
            f"{medians[base] / m:>{len(base) + 4}.2f}×{medians[HF] / m:>7.2f}×{paired:>20}{stepwise:>24}"
        )
    return {"title": shape.title, "batch": shape.batch, "seq": shape.seq, "repeats": times, "medians": medians,
            "ceilings_probed": probed, "flops_per_step": flops_per_step, "threads": torch.get_num_threads(),
            "baseline": base, "variants": rows}  # fmt: skip


class Profile(L.Callback):
    """torch.profiler over the training batches after the first `skip` (warm-up: oneDNN picks its kernels)."""

    def __init__(self, skip: int):
        self.skip, self.profiler = (
            skip,
            torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]),
        )

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.skip:
            self.profiler.__enter__()

    def on_train_end(self, *args: object) -> None:
        self.profiler.__exit__(None, None, None)


def profile(shape: Shape, steps: int = 2) -> str:
    """Operators by self time over `steps` of gptft's defaults (after one warm-up step), as a table."""
    data = batches(1 + steps, shape.batch, shape.seq)
    prof = Profile(skip=1)
    gptft(data, "auto", 512, shape.arch, callbacks=[prof])
    table = prof.profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
    head = (f"{shape.title}, batch {shape.batch} × {shape.seq}, gptft defaults ({PRECISION['gptft defaults']}), "
            f"{steps} steps after 1 warm-up, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    return head + "\n" + table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=[*SHAPES, "all"], default="all")
    parser.add_argument("--profile", action="store_true", help="also profile gptft's step at each shape run")
    args = parser.parse_args()
    shapes = list(SHAPES.values()) if args.shape == "all" else [SHAPES[args.shape]]
    out = {shape.name: measure(shape) for shape in shapes}
    if args.profile:
        for shape in shapes:
            text = profile(shape)
            print("\n" + text)
            os.makedirs("outputs/benchmarks", exist_ok=True)
            with open(f"outputs/benchmarks/train_step_profile_{shape.name}.txt", "w") as f:
                f.write(text)
    if "small" in out:
        memory = {"full logits": peak_memory_mb(0), "chunked (512 rows)": peak_memory_mb(512)}
        ratio = memory["chunked (512 rows)"] / memory["full logits"]
        print(
            f"\npeak memory of fp32 training steps above weights + grads + AdamW state: full logits "
            f"{memory['full logits']:.0f} MB, chunked {memory['chunked (512 rows)']:.0f} MB, ratio {ratio:.2f} (target ≤ 0.6)"
        )
        out["small"] |= {"memory_mb": memory, "memory_ratio": ratio}
    atomic_write_json(
        f"outputs/benchmarks/train_step{'' if args.shape == 'all' else '_' + args.shape}.json", out
    )


if __name__ == "__main__":
    main()
