"""Training-step speed and memory: gptft vs a bare PyTorch loop vs the Hugging Face Trainer.

Run by hand (`make bench`). GPT-2 with 4 layers, d 256, context 256, batch 8 × 256, the same Gulliver
batches for every variant, the same thread count; interleaved repeats; medians of per-step times after
warm-up steps. Peak memory is the growth of the process's peak RSS during training steps, each variant in a
fresh subprocess. Prints a table and writes outputs/benchmarks/train_step.json.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gptft.utils.io import atomic_write_json

ARCH = {"model_type": "gpt2", "n_layer": 4, "n_embd": 256, "n_head": 4, "n_positions": 256}
BATCH, SEQ, WARMUP, STEPS, REPEATS = 8, 256, 2, 8, 3
VARIANTS = ("bare fp32 loop", "HF Trainer bf16", "gptft fp32, full logits", "gptft fp32", "gptft defaults")


def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from gptft.data import BookWindows

    data = BookWindows(seq_len=SEQ, batch_size=BATCH)
    data.setup("fit")
    return [data.train_sampler.batch(k) for k in range(n)]


def fresh_model() -> torch.nn.Module:
    from gptft.models import build_model

    torch.manual_seed(0)
    return build_model(arch=ARCH)


def bare_loop(data: list) -> list[float]:
    """A hand-written fp32 loop: forward, full-logits cross-entropy, backward, foreach AdamW."""
    model = fresh_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, foreach=True)
    times = []
    for x, y in data:
        start = time.perf_counter()
        logits = model(input_ids=x, use_cache=False).logits
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - start)
    return times


def hf_trainer(data: list) -> list[float]:
    """transformers.Trainer with bf16=True on the same windows (it shifts the labels itself)."""
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
            self.start = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            self.times.append(time.perf_counter() - self.start)

    clock = StepClock()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=BATCH,
            max_steps=len(data),
            learning_rate=1e-3,
            weight_decay=0.01,
            bf16=True,
            use_cpu=True,
            logging_steps=10_000,
            save_strategy="no",
            report_to=[],
            dataloader_num_workers=0,
            disable_tqdm=True,
            lr_scheduler_type="constant",
        )
        Trainer(model=fresh_model(), args=args, train_dataset=Rows(), callbacks=[clock]).train()
    return clock.times


def gptft(data: list, precision: str, loss_chunk: int) -> list[float]:
    """gptft's own path: CausalLM + Lightning Trainer + RunRecord timing, on the same batches."""
    import lightning as L

    from gptft.callbacks import RunRecord
    from gptft.models.precision import resolve_precision
    from gptft.tasks import CausalLM
    from gptft.utils.logs import quiet_lightning

    quiet_lightning()
    task = CausalLM(
        fresh_model(), {"lr": 1e-3, "weight_decay": 0.01}, {"name": "constant"}, loss_chunk=loss_chunk
    )
    with tempfile.TemporaryDirectory() as out:
        record = RunRecord(Path(out) / "metrics.json")
        trainer = L.Trainer(
            accelerator="cpu",
            precision=resolve_precision(precision, "cpu"),
            max_steps=len(data),
            logger=False,
            callbacks=[record],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(task, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    return record._batch_times


def run_variant(name: str, data: list) -> list[float]:
    if name == "bare fp32 loop":
        return bare_loop(data)
    if name == "HF Trainer bf16":
        return hf_trainer(data)
    if name == "gptft fp32, full logits":
        return gptft(data, "32-true", 0)
    if name == "gptft fp32":
        return gptft(data, "32-true", 512)
    return gptft(data, "auto", 512)


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


def main() -> None:
    data = batches(WARMUP + STEPS)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for repeat in range(REPEATS):
        for name in VARIANTS:
            step_times = run_variant(name, data)[WARMUP:]
            times[name].append(statistics.median(step_times))
            print(f"repeat {repeat}: {name:<26} {times[name][-1]:.3f} s/step", flush=True)
    medians = {name: statistics.median(v) for name, v in times.items()}
    tokens = BATCH * SEQ
    print(f"\n{'variant':<26}{'s/step':>9}{'tokens/s':>10}{'vs bare fp32':>14}{'vs HF bf16':>12}")
    for name, m in medians.items():
        print(
            f"{name:<26}{m:>9.3f}{tokens / m:>10.0f}{medians['bare fp32 loop'] / m:>13.2f}×"
            f"{medians['HF Trainer bf16'] / m:>11.2f}×"
        )
    memory = {"full logits": peak_memory_mb(0), "chunked (512 rows)": peak_memory_mb(512)}
    ratio = memory["chunked (512 rows)"] / memory["full logits"]
    print(
        f"\npeak memory of fp32 training steps above weights + grads + AdamW state: full logits {memory['full logits']:.0f} MB, "
        f"chunked {memory['chunked (512 rows)']:.0f} MB, ratio {ratio:.2f} (target ≤ 0.6)"
    )
    print(f"threads={torch.get_num_threads()}")
    atomic_write_json(
        "outputs/benchmarks/train_step.json",
        {"repeats": times, "medians": medians, "memory_mb": memory, "memory_ratio": ratio},
    )


if __name__ == "__main__":
    main()
