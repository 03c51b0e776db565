"""Full fine-tuning vs LoRA vs upper_qkv: training-step time and peak memory, side by side.

Run by hand (`make bench`). Benchmark 1's shape and path (benchmarks/train_step.py: GPT-2 with 4 layers, d 256,
context 256, batch 8 × 256, the same Gulliver batches, gptft's defaults: bf16-mixed where native, chunked loss,
fused AdamW), each model set up by its strategy exactly as `freeze=<name>` does (conf/freeze/<name>.yaml);
interleaved repeats, medians of per-step times after warm-up steps. Peak memory: in a fresh process per method,
fp32 training steps, the peak RSS minus the RSS before the model was built, i.e. the weights, the gradients, the
AdamW state and what a step holds. Prints a table and writes outputs/benchmarks/lora.json.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).parent))
import train_step  # noqa: E402  (benchmark 1: its batches, its model, its gptft training path)

from gptft.utils.io import atomic_write_json  # noqa: E402

METHODS = ("none", "lora", "upper_qkv")  # conf/freeze/<name>.yaml
NAMES = {"none": "full fine-tuning", "lora": "LoRA (rank 8, c_attn + c_proj)", "upper_qkv": "upper_qkv"}
CONF = Path(__file__).resolve().parents[1] / "conf" / "freeze"


def prepare(model: torch.nn.Module, method: str) -> torch.nn.Module:
    """The model as `freeze=<method>` leaves it (LoRA wraps it; the others set requires_grad)."""
    from gptft.tasks.freezing import apply_freeze
    from gptft.tasks.lora import apply_lora, is_lora

    cfg = OmegaConf.to_container(OmegaConf.load(CONF / f"{method}.yaml"))
    if is_lora(cfg):
        return apply_lora(model, **cfg)[0]
    apply_freeze(model, **cfg)
    return model


def step_times(method: str, data: list) -> list[float]:
    """Benchmark 1's gptft path (Lightning, RunRecord's clock) on the model `method` sets up."""
    original = train_step.fresh_model
    train_step.fresh_model = lambda: prepare(original(), method)
    try:
        return train_step.gptft(data, "auto", 512)
    finally:
        train_step.fresh_model = original


def peak_memory_mb(method: str) -> float:
    """In a fresh process: peak RSS of 3 fp32 training steps minus the RSS before the model was built (Linux)."""
    code = f"""
import re, sys, torch
sys.path.insert(0, "benchmarks")
import lora, train_step
from gptft.tasks import CausalLM
def kb(field):
    return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))
data = train_step.batches(3)
base = kb("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current RSS
task = CausalLM(lora.prepare(train_step.fresh_model(), {method!r}), {{"lr": 1e-3, "weight_decay": 0.0}}, {{}},
                loss_chunk=512)
opt = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-3)
for batch in data:
    loss, _ = task.compute_loss(batch)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
print((kb("VmHWM") - base) / 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def trainable(method: str) -> int:
    torch.manual_seed(0)
    return sum(p.numel() for p in prepare(train_step.fresh_model(), method).parameters() if p.requires_grad)


def main() -> None:
    data = train_step.batches(train_step.WARMUP + train_step.STEPS)
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for repeat in range(train_step.REPEATS):
        for method in METHODS:
            times[method].append(statistics.median(step_times(method, data)[train_step.WARMUP :]))
            print(f"repeat {repeat}: {NAMES[method]:<32} {times[method][-1]:.3f} s/step", flush=True)
    medians = {m: statistics.median(v) for m, v in times.items()}
    memory = {m: peak_memory_mb(m) for m in METHODS}
    params = {m: trainable(m) for m in METHODS}
    tokens = train_step.BATCH * train_step.SEQ
    print(
        f"\n{'method':<32}{'trainable':>12}{'s/step':>9}{'tokens/s':>10}{'vs full':>9}{'peak MB':>9}{'vs full':>9}"
    )
    for m in METHODS:
        print(
            f"{NAMES[m]:<32}{params[m]:>12,}{medians[m]:>9.3f}{tokens / medians[m]:>10.0f}"
            f"{medians['none'] / medians[m]:>8.2f}×{memory[m]:>9.0f}{memory[m] / memory['none']:>8.2f}×"
        )
    print(f"threads={torch.get_num_threads()}; peak MB: fp32 steps, RSS above the process before the model")
    atomic_write_json(
        "outputs/benchmarks/lora.json",
        {"repeats": times, "medians": medians, "memory_mb": memory, "trainable": params, "names": NAMES},
    )


if __name__ == "__main__":
    main()
