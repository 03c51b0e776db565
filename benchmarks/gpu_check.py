"""The GPU check: proves gptft's GPU path on one CUDA device (two where there are two), and measures it.

    make gpu-check                            # a venv keeping the image's CUDA torch, gptft's dependencies, this
    python benchmarks/gpu_check.py [--out DIR] [--jobs N] [--experiments lr_sweep,kl_x]
    python benchmarks/gpu_check.py --preflight   # only the preflight: one line per problem, with its fix
    python benchmarks/gpu_check.py --cpu      # the same checks at tiny sizes on the CPU (CI: tests/test_gpu_check.py)

First a preflight (standard library only): every dependency imports, the data files are found, a CUDA device and a
C compiler exist. Then, each check one PASS/FAIL/SKIP line (the exit status is 1 if one fails):
- chunked loss under bf16 and fp16 (loss-scaled) against fp64, beside the standard loss in the same precision;
- SDPA: the models use it, its flash kernel runs forward and backward, and matches eager attention;
- ref_kl (the forgetting probe) under bf16 autocast: the fp32 value, and fp64's to fp32 rounding;
- fused AdamW: CausalLM picks it on the device, and a Lightning run with it matches one with foreach AdamW;
- model.compile=true: losses match the eager run, and no `_orig_mod.` in state_dict, checkpoint or export;
- speed: GPT-2 124M (conf/model/scratch.yaml at context 1024), batch 16 × 1024 tokens of the book, bf16-mixed,
  eager, compiled (an MFU floor), the standard loss and a vocabulary padded to 50,304: s/step, tokens/s, MFU, the
  share of the matrix-product ceiling measured here, peak memory; the same shape through `python -m gptft.run`;
- gpt2-large's peak memory at the instruction study's batch beside the README's figure;
- with 2 GPUs, trainer=ddp and trainer=fsdp against one GPU's accumulation: the same weights;
- every experiment end to end (`python -m gptft.run experiment=X trainer=gpu trainer.max_steps=3`) and a smoke
  matrix (key-only freezing with clipping, checkpointing and compile; LoRA compiled and resumed), on models of the
  GPT-2 preset shapes built from their configs and saved with save_pretrained (no hub weights needed).
Sizes follow the card's memory (sized_for). <out>/gpu_check.json and <out>/gpu_check.md (one table; default
outputs/gpu_check/<time>/) hold them all, written atomically.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import importlib.metadata
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]  # gptft from this checkout, installed or not

# ---------------------------------------------------------------- preflight (the standard library only)
#
# It runs before anything else is imported, so that a stock CUDA image (torch and nothing else) gets one line
# naming what is missing and how to get it, not the traceback of the first failing import.

# The data every section reads, found as a run finds it (data/, $GPTFT_SHARED_DATA, ../shared/data/*/): the
# book the studies train on, the forgetting probe's reference book, the instruction study's GSM8K split.
DATA_FILES = {"book": (829, 2701), "qa": ("gsm8k_train.jsonl", "gsm8k_test.jsonl")}


def requirements() -> list[tuple[str, str]]:
    """(distribution, lowest version) of every runtime dependency in pyproject.toml (all are `name>=floor`)."""
    text = (REPO / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M)
    return re.findall(r'"([A-Za-z0-9_.-]+)>=([0-9][0-9.]*)"', block.group(1) if block else "")


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:3])


def _import_names() -> dict[str, list[str]]:
    """distribution name (normalised) -> the top-level modules it installs."""
    names: dict[str, list[str]] = {}
    for module, dists in importlib.metadata.packages_distributions().items():
        for dist in dists:
            names.setdefault(re.sub(r"[-_.]+", "-", dist).lower(), []).append(module)
    return names


def data_dir() -> str:
    return os.environ.get("GPTFT_DATA_DIR", str(REPO / "data"))


def data_files() -> tuple[list[Path], list[str]]:
    """(the DATA_FILES found, by gptft's own resolvers, the names of those not found)."""
    from gptft.data.qa.files import resolve_qa_file
    from gptft.errors import ConfigError
    from gptft.text.corpus import resolve_book

    found, absent = [], []
    for book in DATA_FILES["book"]:
        try:
            found.append(resolve_book(book, data_dir=data_dir(), download=False))
        except ConfigError:
            absent.append(f"pg{book}.txt")
    for name in DATA_FILES["qa"]:
        try:
            found.append(resolve_qa_file(name, "data.train_file", data_dir()))
        except ConfigError:
            absent.append(name)
    return found, absent


def preflight(gpu: bool) -> list[str]:
    """Every problem that would stop the check, each as one line with its fix; [] when it can run."""
    problems = []
    missing, old, broken = [], [], []
    modules = _import_names()
    for dist, floor in requirements():
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            missing.append(dist)
            continue
        if _version_tuple(version) < _version_tuple(floor):
            old.append(f"{dist} {version} < {floor}")
            continue
        key = re.sub(r"[-_.]+", "-", dist).lower()
        names = sorted(n for n in modules.get(key, []) if not n.startswith("_"))
        module = key.replace("-", "_") if key.replace("-", "_") in names else (names or [None])[0]
        try:
            if module:
                importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 - an installed package that cannot be imported is a finding
            broken.append(f"{dist} ({type(e).__name__}: {str(e).strip().splitlines()[0][:80] if str(e).strip() else ''})")
    torch_issue = [x for x in missing + old if x.split()[0] == "torch"]
    if torch_issue:
        problems.append(
            f"torch: {torch_issue[0]} (pyproject.toml needs torch>={dict(requirements())['torch']}): install a CUDA "
            "build of torch into this Python first (https://pytorch.org/get-started/locally/), then `make gpu-check`"
        )
    others = [x for x in missing if x != "torch"] + [x for x in old if not x.startswith("torch ")] + broken
    if others:
        problems.append(
            f"{len(others)} of gptft's dependencies missing, too old or broken in {sys.executable}: "
            f"{', '.join(others)}: run `make gpu-check` (a virtual environment that keeps this Python's torch and "
            "adds the rest; WHEELS=<folder from make wheels> where PyPI cannot be reached)"
        )
    if problems:  # the data and device checks below need torch and gptft's modules
        return problems
    found, absent = data_files()
    if absent:
        problems.append(
            f"data files not found: {', '.join(absent)} (looked in {data_dir()}/, $GPTFT_SHARED_DATA and "
            "../shared/data/*/): copy the team's shared/data folder beside the checkout, set "
            "GPTFT_SHARED_DATA=<folder>, or `make wheels` (it carries them) and `make gpu-check WHEELS=wheels`"
        )
    import torch

    if gpu and not torch.cuda.is_available():
        problems.append(
            f"no CUDA device for torch {torch.__version__} (CUDA {torch.version.cuda}): run it on a GPU machine "
            "with a CUDA build of torch, or pass --cpu for the tiny CPU version"
        )
    if gpu and not any(shutil.which(c) for c in (os.environ.get("CC", "cc"), "gcc", "clang")):
        problems.append(
            "no C compiler (cc, gcc or clang): torch.compile's inductor builds its launchers with one: "
            "apt-get install gcc (or set CC=)"
        )
    return problems


def run_preflight(gpu: bool) -> bool:
    problems = preflight(gpu)
    for line in problems:
        print(f"gpu_check preflight: {line}", file=sys.stderr, flush=True)
    if not problems:
        print(f"gpu_check preflight: OK ({len(requirements())} dependencies import, data files found, "
              f"{'CUDA device and C compiler present' if gpu else 'CPU mode'})", flush=True)  # fmt: skip
    return not problems


if __name__ == "__main__" and "--requirements" in sys.argv:  # what `make gpu-check` installs
    print("\n".join(f"{d}>={v}" for d, v in requirements()))
    sys.exit(0)
if __name__ == "__main__" and "--data-files" in sys.argv:  # what `make wheels` carries
    print("\n".join(map(str, data_files()[0])))
    sys.exit(0)
if __name__ == "__main__" and "--preflight" in sys.argv:
    sys.exit(0 if run_preflight(gpu="--cpu" not in sys.argv) else 2)
if __name__ == "__main__" and not run_preflight(gpu="--cpu" not in sys.argv):
    sys.exit(2)

import lightning as L  # noqa: E402  (after the preflight, which says in one line what is missing)
import torch  # noqa: E402
from train_step import matmul_gflops  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)

NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
# Widths of the Hugging Face GPT-2 checkpoints (their config.json): (n_layer, n_embd, n_head), context 1024.
GPT2_PRESETS = {
    "gpt2": (12, 768, 12),
    "gpt2-medium": (24, 1024, 16),
    "gpt2-large": (36, 1280, 20),
    "gpt2-xl": (48, 1600, 25),
}
# One lr of a sweep is enough to prove a study's path; the freezing study keeps both arms (the pairing is its point).
EXPERIMENT_OVERRIDES = {"lr_sweep": ["optim.lr=1e-4"], "kl_x": ["optim.lr=1e-4"]}
EXPERIMENTS = ("lr_sweep", "kl_x", "freeze_attention", "instruct", "learn_forget")


@dataclass(frozen=True)
class Size:
    """What --cpu shrinks: the model and batch of the speed runs, step counts, the experiments' shapes."""

    model_conf: str  # conf/model/<name>.yaml: the arch of the correctness and speed model
    context: int
    batch: int
    seq: int
    check_batch: int  # rows of the chunked-vs-standard comparison (the standard loss holds all its logits)
    warmup: int
    steps: int
    loss_chunk: int
    compile_backend: str
    preset_dims: dict[str, tuple[int, int, int]] | None  # None: the real GPT-2 preset widths
    trainer: str
    exp_steps: int
    book_overrides: tuple[str, ...]
    qa_overrides: tuple[str, ...]
    matmul_n: int
    experiment_extra: dict[str, tuple[str, ...]] = field(default_factory=dict)


GPU = Size(
    "scratch", 1024, 16, 1024, 8, 3, 10, 512, "inductor", None, "gpu", 3,
    ("data.val_windows=8", "eval.max_new_tokens=20"),
    ("data.val_pairs=8", "eval.max_new_tokens=20"),
    8192,
)  # fmt: skip
# Inductor's C++ code generation takes about a minute on 2 cores; aot_eager traces the same graphs through
# Dynamo and AOT autograd (graph breaks, recompiles, parameter names) without generating code.
CPU = Size(
    "tiny", 256, 2, 64, 2, 1, 1, 32, "aot_eager", {k: (2, 64, 2) for k in GPT2_PRESETS}, "cpu", 2,
    ("data.seq_len=64", "data.batch_size=2", "data.val_windows=2", "eval.max_new_tokens=8"),
    ("data.max_length=128", "data.batch_size=2", "data.val_pairs=4", "eval.max_new_tokens=8"),
    1024,
    {
        "learn_forget": ("freeze=none,lora",),  # two of its four arms: full fine-tuning and the PEFT path
        # exact match answers one question at a time: two short answers prove the path
        "instruct": ("callbacks.exact_match.questions=2", "callbacks.exact_match.max_new_tokens=8"),
    },
)  # fmt: skip


@dataclass
class Check:
    name: str
    ok: bool
    summary: str
    kind: str = "correctness"  # correctness | speed | experiment
    data: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        result = "SKIP" if self.data.get("skipped") else "PASS" if self.ok else "FAIL"
        return f"{result} {self.name}: {self.summary}"


# ---------------------------------------------------------------- the device


def device_info(size: Size, device: torch.device) -> dict[str, Any]:
    """Name, precision, the dense peak (FLOP/s) and the matrix-product ceiling measured here, in that precision."""
    from gptft.models.flops import dense_peak
    from gptft.models.precision import resolve_precision

    precision = resolve_precision("auto", device.type)
    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float32
    info: dict[str, Any] = {"type": device.type, "torch": torch.__version__, "precision": precision}
    if device.type == "cuda":
        info.update(name=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        info["peak_flops"], info["peak_source"] = dense_peak(device, dtype)
        info["memory_gb"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    else:
        info["name"] = cpu_name()
        info["threads"] = torch.get_num_threads()
    info["matmul_gflops"] = matmul_gflops(dtype, device, n=size.matmul_n)
    if device.type == "cpu":  # no datasheet peak for a CPU: its measured ceiling stands in
        info["peak_flops"], info["peak_source"] = info["matmul_gflops"] * 1e9, "measured matrix products"
    return info


def cpu_name() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "CPU"
    name = re.search(r"model name\s*:\s*(.+)", text)
    flags = re.search(r"flags\s*:\s*(.+)", text)
    extras = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if flags and f in flags.group(1).split()]
    return f"{name.group(1).strip() if name else 'CPU'} ({', '.join(extras) or 'no AVX-512'})"


def peak_memory_start(device: torch.device) -> float:
    """Reset the peak-memory counter; returns the baseline the peak is measured above (MB)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return 0.0
    from gptft.callbacks.memory import release_free_memory

    # Memory earlier rows freed would otherwise serve this row's allocations unseen (the standard loss's logits
    # read 0 MB after the chunked rows): hand it back before the baseline is read.
    release_free_memory()
    try:  # Linux: reset VmHWM to the current resident size
        Path("/proc/self/clear_refs").write_text("5")
        return _status_mb("VmRSS")
    except OSError:
        return math.nan


def peak_memory_mb(device: torch.device, base: float) -> float:
    """CUDA: torch.cuda.max_memory_allocated (everything: weights, AdamW state, the step). CPU: growth of the
    resident peak above the baseline."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        return _status_mb("VmHWM") - base
    except OSError:
        return math.nan


def _status_mb(key: str) -> float:
    return int(re.search(key + r":\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- models and data


def model_arch(size: Size) -> dict[str, Any]:
    from omegaconf import OmegaConf

    arch = OmegaConf.to_container(OmegaConf.load(REPO / "conf/model" / f"{size.model_conf}.yaml").arch)
    return {**arch, "n_positions": size.context, **NO_DROPOUT}


def book(size: Size, batch: int):
    from gptft.data import BookWindows

    return BookWindows(seq_len=size.seq, batch_size=batch, data_dir=os.environ.get("GPTFT_DATA_DIR", "data"))


def first_batch(size: Size, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    data = book(size, batch)
    data.setup("fit")
    x, y = data.train_sampler.batch(0)[:2]
    return x.to(device), y.to(device)


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


# ---------------------------------------------------------------- correctness


def chunked_loss_checks(size: Size, device: torch.device) -> list[Check]:
    """The chunked and the standard loss under bf16 and fp16 autocast, each against an fp64 computation of the
    same loss (the standard cross-entropy of an fp64 copy of the model): loss and every gradient. The chunked loss
    passes when it is no further from fp64 than the standard loss in the same precision (×2, or within the
    precision's rounding): it must cost memory, not accuracy."""
    from gptft.models import build_model
    from gptft.tasks import CausalLM

    torch.manual_seed(0)
    model = build_model(arch=model_arch(size)).to(device)
    x, y = first_batch(size, size.check_batch, device)

    def loss_and_grads(
        m: torch.nn.Module, chunk: int, dtype: torch.dtype, scale: float
    ) -> tuple[float, torch.Tensor]:
        task = CausalLM(m, {"lr": 1e-4, "weight_decay": 0.0}, {}, loss_chunk=chunk)
        m.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype):
            loss, _ = task.compute_loss((x, y))
        (loss * scale).backward()  # fp16: as 16-mixed's GradScaler does (its first scale), so nothing underflows
        grads = _flat({n: p.grad for n, p in m.named_parameters()}) / scale
        m.zero_grad(set_to_none=True)
        return loss.item(), grads

    ref_model = build_model(arch=model_arch(size)).to(device, torch.float64)
    ref_model.load_state_dict(model.state_dict())
    # The reference in plain torch, fp64 throughout (CausalLM's standard loss casts the logits to fp32).
    ref = torch.nn.functional.cross_entropy(ref_model(input_ids=x).logits.flatten(0, 1), y.flatten(), ignore_index=-100)
    ref.backward()
    ref_loss, ref_grads = ref.item(), _flat({n: p.grad for n, p in ref_model.named_parameters()})
    del ref_model
    checks = []
    for label, dtype, rounding, scale in (
        ("bf16", torch.bfloat16, 2**-8, 1.0),
        ("fp16", torch.float16, 2**-11, 2.0**16),
    ):
        errors = {}
        for name, chunk in (("chunked", size.loss_chunk), ("standard", 0)):
            loss, grads = loss_and_grads(model, chunk, dtype, scale)
            errors[name] = (abs(loss - ref_loss) / abs(ref_loss), rel(grads, ref_grads))
        (loss_c, grad_c), (loss_s, grad_s) = errors["chunked"], errors["standard"]
        ok = all(math.isfinite(v) for v in (loss_c, grad_c)) and all(
            c <= max(2 * st, rounding) for c, st in ((loss_c, loss_s), (grad_c, grad_s))
        )
        checks.append(
            Check(
                f"chunked loss {label} vs fp64",
                ok,
                f"{label} autocast{', loss scale 2^16' if scale > 1 else ''}, {size.check_batch * size.seq:,} rows, chunk {size.loss_chunk}; relative error "
                f"against fp64 of the loss: chunked {loss_c:.1e}, standard {loss_s:.1e}; of the whole gradient: "
                f"chunked {grad_c:.1e}, standard {grad_s:.1e} (passes at ≤ 2× the standard's or ≤ {rounding:.0e})",
                data={"rows": size.check_batch * size.seq, "loss_fp64": ref_loss, "loss_rel_chunked": loss_c,
                      "loss_rel_standard": loss_s, "grad_rel_chunked": grad_c, "grad_rel_standard": grad_s},
            )  # fmt: skip
        )
    del model
    return checks


def check_sdpa(size: Size, device: torch.device, bf16: bool) -> Check:
    """The models use SDPA, its flash kernel runs forward and backward (forced: no silent fallback to the math
    kernel), and its output matches eager attention on the same weights."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from gptft.models import build_model

    torch.manual_seed(0)
    model = build_model(arch=model_arch(size)).to(device)
    eager = build_model(arch=model_arch(size), attn_implementation="eager").to(device)
    eager.load_state_dict(model.state_dict())
    x, _ = first_batch(size, size.check_batch, device)
    implementation = model.config._attn_implementation
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), autocast(device, bf16):
        logits = model(input_ids=x, use_cache=False).logits
        logits.float().logsumexp(-1).mean().backward()  # the backward kernel too
    with torch.no_grad(), autocast(device, bf16):
        reference = eager(input_ids=x, use_cache=False).logits
    error = rel(logits.detach().float(), reference.float())
    tol = 2e-2 if bf16 else 1e-4
    ok = implementation == "sdpa" and error <= tol and all(p.grad is not None for p in model.parameters())
    del model, eager
    return Check(
        "SDPA attention",
        ok,
        f"attn_implementation={implementation}, flash kernel forward + backward ran; logits vs eager attention "
        f"rel {error:.1e} ≤ {tol:.0e}",
        data={"attn_implementation": implementation, "logits_rel": error},
    )


def check_ref_kl(size: Size, device: torch.device) -> Check:
    """The forgetting probe's ref_kl (gptft.callbacks.reference) when the run trains under bf16 autocast: the probe
    turns autocast off, so it must equal its value in fp32 training exactly, and an fp64 computation of the same KL
    (plain torch, two fp64 copies of the models) to fp32's rounding, for a small drift (weights moved by 3e-2
    relative: a KL of 3.2e-5 on the random-init model, which fp32 gave to 0.2% on an AMX Xeon and 0.02% with AVX2
    kernels; a 1e-2 move's 3.6e-6 came out 1.8% off with AVX2's, over the bound, and a 1e-3 move's 4e-8 is below
    what fp32 log-probabilities of about -10.8 resolve)."""
    import torch.nn.functional as F

    from gptft.callbacks.reference import ReferenceProbe
    from gptft.models import build_model
    from gptft.tasks import CausalLM

    torch.manual_seed(0)
    model = build_model(arch=model_arch(size)).to(device)
    task = CausalLM(model, {"lr": 1e-4, "weight_decay": 0.0}, {})
    probe = ReferenceProbe(text=2701, windows=2, seq_len=size.seq, batch_size=2, kl_tokens=2 * size.seq,
                           data_dir=data_dir())  # fmt: skip
    probe._prepare()
    trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)  # fmt: skip
    base = {n: p.detach().double().clone() for n, p in model.state_dict().items()}
    probe.probe("before", trainer, task)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 3e-2 * p.std().clamp(min=1e-3))
    kl32 = probe.probe("after", trainer, task)["ref_kl"]
    with torch.autocast(device.type, dtype=torch.bfloat16):
        kl_bf16 = probe.probe("after", trainer, task)["ref_kl"]
        naive = _kl(model, model, probe._x[:2].to(device), base)  # what a probe left under autocast would read
    ref = build_model(arch=model_arch(size)).to(device, torch.float64)
    ref.load_state_dict(base)
    now = build_model(arch=model_arch(size)).to(device, torch.float64)
    now.load_state_dict({n: p.double() for n, p in model.state_dict().items()})
    with torch.no_grad():
        kl64 = F.kl_div(
            F.log_softmax(now(input_ids=probe._x[:2].to(device)).logits, -1),
            F.log_softmax(ref(input_ids=probe._x[:2].to(device)).logits, -1),
            log_target=True, reduction="sum",
        ).item() / probe._x[:2].numel()  # fmt: skip
    errors = {k: abs(v - kl64) / kl64 for k, v in (("fp32", kl32), ("bf16", kl_bf16), ("naive", naive))}
    ok = kl_bf16 == kl32 and errors["fp32"] <= 1e-2
    del model, ref, now, task
    return Check(
        "ref_kl under bf16 vs fp64",
        ok,
        f"weights moved by 3e-2 (relative), {probe._x[:2].numel()} positions: fp64 KL {kl64:.4e}; the probe's "
        f"ref_kl in fp32 training {kl32:.4e} (relative error {errors['fp32']:.1e} ≤ 1e-2), under bf16 autocast "
        f"{kl_bf16:.4e} ({'the same' if kl_bf16 == kl32 else 'differs'}); a KL computed under bf16 autocast would "
        f"read {naive:.4e} (error {errors['naive']:.0e})",
        data={"kl_fp64": kl64, "kl_fp32": kl32, "kl_bf16": kl_bf16, "kl_naive_bf16": naive, "errors": errors},
    )


@torch.no_grad()
def _kl(model: torch.nn.Module, _: torch.nn.Module, x: torch.Tensor, base: dict[str, torch.Tensor]) -> float:
    """Mean KL(base ‖ model) per position of x, both through `model` in the ambient precision (autocast)."""
    import torch.nn.functional as F

    now = F.log_softmax(model(input_ids=x).logits.float(), -1)
    saved = {n: p.detach().clone() for n, p in model.state_dict().items()}
    model.load_state_dict({n: p.to(saved[n].dtype) for n, p in base.items()})
    then = F.log_softmax(model(input_ids=x).logits.float(), -1)
    model.load_state_dict(saved)
    return (F.kl_div(now, then, log_target=True, reduction="sum") / x.numel()).item()


# ---------------------------------------------------------------- Lightning runs (speed, fused AdamW, compile)


@dataclass
class Run:
    name: str
    step_s: float
    losses: list[float]
    peak_mb: float
    flops_per_token: float
    weights: dict[str, torch.Tensor]
    fused: bool
    keys: dict[str, list[str]]  # where a parameter name was read -> names holding "_orig_mod."


def fit(size: Size, device: torch.device, precision: str, name: str, workdir: Path, **options: Any) -> Run:
    """A fresh model, seeded identically, trained warmup + steps steps by gptft's task and data module through a
    Lightning Trainer; the steady steps are timed between two device syncs."""
    from safetensors import safe_open

    from gptft.models import build_model, export_hf_model
    from gptft.models.flops import model_flops_per_token
    from gptft.tasks import CausalLM
    from gptft.utils.logs import quiet_lightning

    quiet_lightning()
    compiled = options.get("compile", False)
    torch.manual_seed(0)
    arch = (options.get("arch") or model_arch(size)) | ({"vocab_size": options["vocab"]} if options.get("vocab") else {})
    model = build_model(arch=arch, compile=size.compile_backend if compiled else False)
    optim = {"lr": 1e-4, "weight_decay": 0.01, "fused": options.get("fused")}
    task = CausalLM(model, optim, {"name": "constant"}, loss_chunk=options.get("loss_chunk", size.loss_chunk))
    clock = StepClock(size.warmup, device)
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision=precision,
        max_steps=size.warmup + size.steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        callbacks=[clock],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=workdir,
    )
    base = peak_memory_start(device)
    trainer.fit(task, datamodule=book(size, size.batch))
    peak = peak_memory_mb(device, base)
    keys = {"state_dict": [k for k in task.model.state_dict() if "_orig_mod." in k]}
    if compiled:  # what a compiled run leaves behind: the Lightning checkpoint and the exported model
        ckpt = workdir / f"{name}.ckpt"
        trainer.save_checkpoint(ckpt)
        keys["checkpoint"] = [
            k for k in torch.load(ckpt, weights_only=True)["state_dict"] if "_orig_mod." in k
        ]
        folder = export_hf_model(task.model, workdir / f"{name}_hf_model")
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            keys["hf_model"] = [k for k in f.keys() if "_orig_mod." in k]  # noqa: SIM118 (safe_open has no __iter__)
    run = Run(
        name,
        clock.seconds / size.steps,
        [float(v) for v in torch.stack(clock.losses).float().cpu()],
        peak,
        model_flops_per_token(task.model, size.seq),
        {n: p.detach().float().cpu() for n, p in task.model.named_parameters()},
        bool(trainer.optimizers[0].defaults.get("fused")),
        keys,
    )
    del task, model, trainer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return run


class StepClock(L.Callback):
    """The time of steps warmup .. end (one device sync at each end) and every step's loss, kept on the device
    until the run ends."""

    def __init__(self, warmup: int, device: torch.device):
        self.warmup, self.device = warmup, device
        self.losses: list[torch.Tensor] = []
        self.seconds = self._t0 = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.warmup:
            sync(self.device)
            self._t0 = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.losses.append(outputs["loss"].detach())
        if batch_idx + 1 == trainer.max_steps:
            sync(self.device)
            self.seconds = time.perf_counter() - self._t0


PADDED_VOCAB = 50_304  # GPT-2's 50,257 rounded up to a multiple of 64
# The compiled GPT-2 124M step at 16 × 1024 in bf16 must reach this share of the dense peak. nanoGPT reports about
# 50% on an A100 for this shape with compile and flash attention; an H100's peak is 3.2× the A100's and small models
# reach less of it, so 25% is not a tuned ceiling: below it a lever is broken (no flash kernel, an eager fallback,
# a sync per step, TF32 or fused AdamW off).
MFU_FLOOR = 0.25
# gptft.run's steps (all callbacks, logging, the progress bar) may take this much longer than the bare fit's.
RUN_OVERHEAD_MAX = 1.2
# README "What each GPT-2 size needs on a GPU": gpt2-large, instruction batch 8 × 256, chunked loss: ≈ 17 GB, ±30%.
README_LARGE_GB, README_TOLERANCE = 17.0, 0.3


def speed_checks(size: Size, device: torch.device, info: dict[str, Any], workdir: Path) -> list[Check]:
    """Five Lightning runs on the same seed and batches: eager (gptft's defaults), compiled, the standard loss,
    foreach AdamW, and the output layer padded to 50,304 rows (a multiple of 64: the lever nanoGPT measured on
    GPUs; the padded logits only take softmax mass here). Speed rows for all but foreach; fused AdamW, compile
    and memory are judged between them."""
    precision = info["precision"]
    runs = {
        "eager": fit(size, device, precision, "eager", workdir),
        "standard loss": fit(size, device, precision, "standard", workdir, loss_chunk=0),
        "foreach AdamW": fit(size, device, precision, "foreach", workdir, fused=False),
        "compiled": fit(size, device, precision, "compiled", workdir, compile=True),
        f"vocab {PADDED_VOCAB:,}": fit(size, device, precision, "padded", workdir, vocab=PADDED_VOCAB),
    }
    bf16 = precision.startswith("bf16")
    tokens = size.batch * size.seq
    checks = []
    for name in ("eager", "compiled", "standard loss", f"vocab {PADDED_VOCAB:,}"):
        r = runs[name]
        tokens_s = tokens / r.step_s
        achieved = r.flops_per_token * tokens_s
        mfu = achieved / info["peak_flops"] if info.get("peak_flops") else None
        ceiling = achieved / (info["matmul_gflops"] * 1e9)
        floor = MFU_FLOOR if name == "compiled" and device.type == "cuda" and mfu is not None else None
        checks.append(
            Check(
                f"speed {name}",
                math.isfinite(r.step_s) and r.step_s > 0 and all(map(math.isfinite, r.losses))
                and (floor is None or mfu >= floor),
                f"{precision}, batch {size.batch} × {size.seq}: {r.step_s:.4f} s/step, {tokens_s:,.0f} tokens/s, "
                + (f"MFU floor {floor:.0%}: " if floor else "")
                + f"{_tflops(achieved)} = MFU {_pct(mfu)} of {_tflops(info.get('peak_flops'))} peak, "
                f"{ceiling:.0%} of the measured {_tflops(info['matmul_gflops'] * 1e9)} matmul ceiling; "
                f"peak memory {r.peak_mb:,.0f} MB; {runs['eager'].step_s / r.step_s:.2f}× eager's speed",
                kind="speed",
                data={
                    "s_per_step": r.step_s,
                    "tokens_per_s": tokens_s,
                    "flops_per_token": r.flops_per_token,
                    "achieved_flops": achieved,
                    "mfu": mfu,
                    "share_of_matmul_ceiling": ceiling,
                    "peak_memory_mb": r.peak_mb,
                    "vs_eager": runs["eager"].step_s / r.step_s,
                    "losses": r.losses,
                },
            )  # fmt: skip
        )
    eager, compiled, standard, foreach = (
        runs[k] for k in ("eager", "compiled", "standard loss", "foreach AdamW")
    )
    tol = 2e-2 if bf16 else 1e-4
    # Fused against foreach AdamW: the same updates, so the same losses and weights (update-relative error).
    loss_err = max(abs(a - b) / abs(b) for a, b in zip(eager.losses, foreach.losses, strict=True))
    start = _initial_weights(size)
    update_err = rel(_flat(eager.weights) - start, _flat(foreach.weights) - start)
    checks.append(
        Check(
            "fused AdamW",
            eager.fused and not foreach.fused and loss_err <= tol and update_err <= 5 * tol,
            f"CausalLM chose fused={eager.fused} on {device.type}; {len(eager.losses)} steps against foreach AdamW: "
            f"losses rel ≤ {loss_err:.1e} (≤ {tol:.0e}), weight updates rel {update_err:.1e} (≤ {5 * tol:.0e})",
            data={"fused": eager.fused, "loss_rel_max": loss_err, "update_rel": update_err},
        )
    )
    loss_err = max(abs(a - b) / abs(b) for a, b in zip(eager.losses, compiled.losses, strict=True))
    leaked = {k: v for k, v in compiled.keys.items() if v}
    checks.append(
        Check(
            "model.compile=true",
            loss_err <= tol and not leaked and set(compiled.keys) == {"state_dict", "checkpoint", "hf_model"},
            f"backend {size.compile_backend}: {len(eager.losses)} losses vs eager rel ≤ {loss_err:.1e} (≤ {tol:.0e}); "
            f"'_orig_mod.' in state_dict/checkpoint/hf_model: {leaked or 'none'}; "
            f"compiled/eager step time {compiled.step_s / eager.step_s:.2f}×",
            data={
                "loss_rel_max": loss_err,
                "orig_mod_keys": compiled.keys,
                "speedup": eager.step_s / compiled.step_s,
            },
        )
    )
    saved = 1 - eager.peak_mb / standard.peak_mb
    checks.append(
        Check(
            "memory: chunked vs standard loss",
            eager.peak_mb < standard.peak_mb,
            f"peak {eager.peak_mb:,.0f} MB with task.loss_chunk={size.loss_chunk} vs {standard.peak_mb:,.0f} MB "
            f"with the standard loss ({saved:.0%} less); step {standard.step_s / eager.step_s:.2f}× as fast",
            kind="speed",
            data={"chunked_mb": eager.peak_mb, "standard_mb": standard.peak_mb, "saved": saved},
        )
    )
    return checks


def run_speed_check(size: Size, device: torch.device, bare_s: float, workdir: Path) -> Check:
    """The eager speed run's shape through `python -m gptft.run` (every callback, logging, the progress bar):
    metrics.json's median step time beside the bare Lightning fit's."""
    run_dir = workdir / "gptft_run"
    steps = size.warmup + size.steps
    overrides = [
        f"model={size.model_conf}", f"model.arch.n_positions={size.context}",
        *(f"+model.arch.{k}={v}" for k, v in NO_DROPOUT.items()),
        f"trainer={size.trainer}", f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}",
        f"data.seq_len={size.seq}", f"data.batch_size={size.batch}", "data.val_windows=2",
        f"task.loss_chunk={size.loss_chunk}", "eval.repeats=1", "eval.max_new_tokens=8",
        f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    rc, tail, _ = run_gptft(overrides, os.cpu_count() or 1)
    metrics_file = run_dir / "metrics.json"
    if rc != 0 or not metrics_file.is_file():
        return Check("speed gptft.run", False, f"exit status {rc}: {tail.strip().splitlines()[-1:]}", kind="speed")
    import json

    step_s = json.loads(metrics_file.read_text())["time"]["median_step_s"]
    ratio = step_s / bare_s
    ok = math.isfinite(ratio) and (device.type != "cuda" or ratio <= RUN_OVERHEAD_MAX)
    return Check(
        "speed gptft.run",
        ok,
        f"`python -m gptft.run` at the eager run's shape: median {step_s:.4f} s/step, {ratio:.2f}× the bare fit's "
        f"{bare_s:.4f}" + (f" (≤ {RUN_OVERHEAD_MAX}×)" if device.type == "cuda" else " (no bound on the CPU: the "
        "tiny model's step is mostly overhead)"),
        kind="speed",
        data={"s_per_step": step_s, "bare_s_per_step": bare_s, "ratio": ratio, "command": " ".join(overrides)},
    )


def large_memory_check(size: Size, device: torch.device, info: dict[str, Any], workdir: Path) -> Check:
    """gpt2-large's peak memory at the instruction study's batch (8 × 256, chunked loss, bf16-mixed, fused AdamW)
    beside the README's figure. On the CPU the tiny stand-in, without the comparison."""
    dims = (size.preset_dims or GPT2_PRESETS)["gpt2-large"]
    arch = {"model_type": "gpt2", "n_layer": dims[0], "n_embd": dims[1], "n_head": dims[2], "n_positions": 1024}
    shape = dataclasses.replace(size, batch=8 if device.type == "cuda" else 2, seq=256 if device.type == "cuda" else 64,
                                warmup=1, steps=2)  # fmt: skip
    if device.type == "cuda" and info.get("memory_gb", 0) < README_LARGE_GB * (1 + README_TOLERANCE):
        return Check("memory gpt2-large", True, f"skipped: {info.get('memory_gb', 0):.0f} GB card", kind="speed",
                     data={"skipped": True})  # fmt: skip
    run = fit(shape, device, info["precision"], "large", workdir, arch=arch | NO_DROPOUT)
    gb = run.peak_mb / 1024
    low, high = README_LARGE_GB * (1 - README_TOLERANCE), README_LARGE_GB * (1 + README_TOLERANCE)
    ok = math.isfinite(gb) and all(map(math.isfinite, run.losses)) and (device.type != "cuda" or low <= gb <= high)
    return Check(
        "memory gpt2-large",
        ok,
        f"{dims[0]} × {dims[1]}, batch {shape.batch} × {shape.seq}, {info['precision']}, chunked loss: peak "
        f"{gb:.1f} GB" + (f"; README's table: ≈ {README_LARGE_GB:.0f} GB (passes within {low:.0f}-{high:.0f} GB)"
                          if device.type == "cuda" else " (the tiny stand-in: no README figure to compare)"),
        kind="speed",
        data={"peak_gb": gb, "readme_gb": README_LARGE_GB, "s_per_step": run.step_s},
    )  # fmt: skip


def parallel_checks(size: Size, device: torch.device, out: Path) -> list[Check]:
    """With 2 or more GPUs: trainer=ddp and trainer=fsdp on 2 of them against one GPU accumulating the same 2
    micro-batches, in fp32 without dropout: the exported weights after 3 steps must agree (the same gradients,
    reduced in another order: 1e-5)."""
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if count < 2:
        return [Check("DDP and FSDP vs one GPU", True, f"skipped: {count or 'no'} CUDA device(s), 2 needed",
                      kind="experiment", data={"skipped": True})]  # fmt: skip
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory(prefix="gpu_check_parallel_") as tmp:
        model_dir = build_preset("gpt2", size, Path(tmp) / "gpt2", device, dropout=False)
        common = [f"model.name_or_path={model_dir}", "trainer.precision=32-true", "trainer.max_steps=3",
                  "trainer.val_check_interval=3", "eval.repeats=1", "data.batch_size=4", "data.seq_len=256",
                  "data.val_windows=4", "eval.max_new_tokens=8"]  # fmt: skip
        arms = {
            "one GPU, accumulate 2": ["trainer=gpu", "trainer.accumulate_grad_batches=2"],
            "ddp": ["trainer=ddp", "trainer.devices=2"],
            "fsdp": ["trainer=fsdp", "trainer.devices=2"],
        }
        weights, problems = {}, []
        for arm, extra in arms.items():
            run_dir = out / "runs" / ("parallel_" + arm.split(",")[0].replace(" ", "_"))
            rc, tail, _ = run_gptft([*common, *extra, f"hydra.run.dir={run_dir}"], os.cpu_count() or 1)
            export = run_dir / "hf_model/model.safetensors"
            if rc != 0 or not export.is_file():
                problems.append(f"{arm}: exit status {rc}: {(tail.strip().splitlines() or [''])[-1]}")
            else:
                weights[arm] = load_file(str(export))
    reference = weights.get("one GPU, accumulate 2")
    checks = []
    for arm in ("ddp", "fsdp"):
        if reference is None or arm not in weights:
            checks.append(Check(f"{arm} vs one GPU", False, "; ".join(problems) or "no weights", kind="experiment"))
            continue
        error = max(rel(weights[arm][k].float(), v.float()) for k, v in reference.items())
        checks.append(Check(f"{arm} vs one GPU", error <= 1e-5,
                            f"trainer={arm} on 2 GPUs, 3 steps of 2 × 4 rows, against one GPU accumulating 2 × 4: "
                            f"worst tensor's relative weight difference {error:.1e} (≤ 1e-5)", kind="experiment",
                            data={"weight_rel_max": error}))  # fmt: skip
    return checks


def _initial_weights(size: Size) -> torch.Tensor:
    from gptft.models import build_model

    torch.manual_seed(0)
    return _flat({n: p.detach() for n, p in build_model(arch=model_arch(size)).named_parameters()})


def _flat(weights: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([w.flatten().double() for _, w in sorted(weights.items())])


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _tflops(x: float | None) -> str:
    return "unknown" if not x else f"{x / 1e12:,.1f} TFLOP/s" if x >= 1e12 else f"{x / 1e9:,.1f} GFLOP/s"


# ---------------------------------------------------------------- experiments end to end


def experiment_model(name: str) -> str | None:
    """The pretrained preset an experiment loads (`override /model: gpt2-large` → gpt2-large), or None."""
    from omegaconf import OmegaConf

    spec = OmegaConf.load(REPO / "conf/experiment" / f"{name}.yaml")
    for entry in spec.get("defaults") or []:
        for key, value in entry.items() if hasattr(entry, "items") else []:
            if key.strip() == "override /model":
                return OmegaConf.load(REPO / "conf/model" / f"{value}.yaml").get("name_or_path")
    return None


def experiment_data(name: str) -> str:
    text = (REPO / "conf/experiment" / f"{name}.yaml").read_text()
    data = re.search(r"override /data:\s*(\S+)", text)
    return data.group(1) if data else "book"


def build_preset(preset: str, size: Size, folder: Path, device: torch.device, dropout: bool = True) -> Path:
    """A GPT-2 of a hub checkpoint's shape, random init, saved the way a downloaded one is loaded."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from gptft.models import export_hf_model

    n_layer, n_embd, n_head = (size.preset_dims or GPT2_PRESETS)[preset]
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=1024, vocab_size=50257,
                        **({} if dropout else NO_DROPOUT))  # fmt: skip
    torch.manual_seed(0)
    with device:  # random init on the device: gpt2-large's 774 M parameters initialise in seconds there
        model = GPT2LMHeadModel(config)
    export_hf_model(model, folder)
    del model
    return folder


def run_experiment(name: str, model_dir: Path | None, size: Size, out: Path, threads: int) -> Check:
    run_dir = out / "runs" / name
    overrides = [
        f"experiment={name}",
        f"trainer={size.trainer}",
        f"trainer.max_steps={size.exp_steps}",
        f"trainer.val_check_interval={size.exp_steps}",
        "eval.repeats=1",
        f"hydra.run.dir={run_dir}",  # whichever the experiment is, a single run or a sweep
        f"hydra.sweep.dir={run_dir}",
        *([f"model.name_or_path={model_dir}"] if model_dir else []),
        *(size.book_overrides if experiment_data(name) == "book" else size.qa_overrides),
        *EXPERIMENT_OVERRIDES.get(name, []),
        *size.experiment_extra.get(name, ()),
    ]
    rc, tail, seconds = run_gptft(overrides, threads)
    return judge_experiment(name, run_dir, rc, tail, seconds, " ".join(overrides))


def run_gptft(overrides: list[str], threads: int, env_extra: dict[str, str] | None = None) -> tuple[int, str, float]:
    """`python -m gptft.run OVERRIDES` as a user runs it: (exit status, the end of its output, seconds)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYDRA_")}
    env.update(HF_HUB_OFFLINE="1", MPLBACKEND="Agg", TQDM_DISABLE="1", OMP_NUM_THREADS=str(threads))
    env["HYDRA_FULL_ERROR"] = "1"  # a failure's whole traceback lands in the report
    env.update(env_extra or {})
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "gptft.run", *overrides],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        rc, tail = done.returncode, (done.stderr or done.stdout)[-2000:]
    except subprocess.TimeoutExpired:
        rc, tail = -1, "timed out after 600 s"
    return rc, tail, time.perf_counter() - start


def judge_experiment(
    name: str, run_dir: Path, rc: int, tail: str, seconds: float, command: str, steps: int | None = None
) -> Check:
    """Every run of it completed, with finite before/after losses, an export without _orig_mod., and a sweep
    ends with its report."""
    import json

    runs = sorted(run_dir.rglob("metrics.json"))
    rows, problems = [], []
    for path in runs:
        m = json.loads(path.read_text())
        before, after = (m.get(k, {}).get("val_loss") for k in ("before", "after"))
        export = path.parent / "hf_model/model.safetensors"
        if m.get("status") != "completed":
            problems.append(f"{path.parent.name}: status {m.get('status')}")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (before, after)):
            problems.append(f"{path.parent.name}: val loss {before} → {after}")
        if not export.is_file():
            problems.append(f"{path.parent.name}: no hf_model/model.safetensors")
        if steps is not None and m.get("steps") != steps:
            problems.append(f"{path.parent.name}: {m.get('steps')} steps, not {steps}")
        rows.append({"run": str(path.parent.relative_to(run_dir)), "status": m.get("status"), "before": before,
                     "after": after, "steps": m.get("steps"), "fit_s": (m.get("time") or {}).get("fit_s")})  # fmt: skip
    if (run_dir / "multirun.yaml").is_file() and not (run_dir / "report/summary.md").is_file():
        problems.append("the sweep wrote no report/summary.md")
    if rc != 0:
        errors = [line for line in tail.splitlines() if re.search(r"Error|error:|Exception", line)]
        problems.append(f"exit status {rc}: {(errors or tail.strip().splitlines() or [''])[-1].strip()}")
    if not runs:
        problems.append("no metrics.json")
    losses = ", ".join(f"{r['before']:.3f} → {r['after']:.3f}" for r in rows if r["before"] and r["after"])
    summary = f"{len(runs)} run(s), val loss {losses or 'n/a'}, {seconds:.0f} s" + (
        f"; {'; '.join(problems)}" if problems else ""
    )
    label = name if name.startswith("smoke ") else f"experiment {name}"
    return Check(label, not problems, summary, kind="experiment",
                 data={"runs": rows, "seconds": seconds, "command": command, "exit_status": rc,
                       "problems": problems, "stderr_tail": tail if problems else ""})  # fmt: skip


# The settings whose paths only meet on a GPU, each run through gptft.run on the gpt2 shape with the probes on:
# the key-only mask's hook with clipping (fused AdamW under bf16-mixed), gradient checkpointing and compile
# (validation adds graphs; the probes run eagerly: gptft.callbacks.before_after); LoRA (PEFT's wrapped modules)
# compiled, stopped and resumed one step on.
SMOKE = {
    "smoke qkv_parts=[k] + clip + checkpointing + compile": (
        "freeze=upper_qkv", "freeze.qkv_parts=[k]", "trainer.gradient_clip_val=1.0",
        "model.gradient_checkpointing=true", "model.compile={backend}",
    ),
    "smoke LoRA + compile, resumed": ("freeze=lora", "model.compile={backend}"),
}  # fmt: skip


def smoke_run(label: str, model_dir: Path, size: Size, out: Path, threads: int) -> Check:
    run_dir = out / "runs" / re.sub(r"\W+", "_", label[len("smoke ") :]).strip("_")
    overrides = [
        f"trainer={size.trainer}",
        f"trainer.max_steps={size.exp_steps}",
        f"trainer.val_check_interval={size.exp_steps}",
        "eval.repeats=1",
        f"hydra.run.dir={run_dir}",
        f"model.name_or_path={model_dir}",
        *size.book_overrides,
        *(o.format(backend=size.compile_backend) for o in SMOKE[label]),
    ]
    rc, tail, seconds = run_gptft(overrides, threads)
    steps = None
    if "resumed" in label and rc == 0:  # one step more from its last checkpoint, as `resume=` documents
        steps = size.exp_steps + 1
        rc, tail, more = run_gptft([f"resume={run_dir}", f"trainer.max_steps={steps}"], threads)
        seconds += more
    return judge_experiment(label, run_dir, rc, tail, seconds, " ".join(overrides), steps)


def experiment_checks(
    size: Size, device: torch.device, names: list[str], out: Path, jobs: int
) -> list[Check]:
    """Every experiment and the smoke matrix, `jobs` at a time, on random-init models of the presets' shapes."""
    with tempfile.TemporaryDirectory(prefix="gpu_check_models_") as tmp:
        presets = {n: experiment_model(n) for n in names}
        folders = {}
        for preset in sorted({p for p in presets.values() if p} | {"gpt2"}):
            if preset not in GPT2_PRESETS:
                raise ValueError(f"no preset shape for model {preset}: add it to GPT2_PRESETS")
            folders[preset] = build_preset(preset, size, Path(tmp) / preset, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        threads = max(1, (os.cpu_count() or 1) // jobs)
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = [
                pool.submit(run_experiment, n, folders.get(presets[n]), size, out, threads) for n in names
            ] + [pool.submit(smoke_run, label, folders["gpt2"], size, out, threads) for label in SMOKE]
            checks = [f.result() for f in futures]
        for check, name in zip(checks, names, strict=False):
            check.data["model"] = presets[name] or "its own config"
        return checks


# ---------------------------------------------------------------- report


def markdown(report: dict[str, Any]) -> str:
    """The report a user pastes into an issue: one line naming the device, then one table, a row per check."""
    info = report["device"]
    device = f"{info['name']}, torch {info['torch']}" + (
        f", CUDA {info['cuda']}, compute capability {info['capability']}, {info['memory_gb']:.0f} GB"
        if info["type"] == "cuda"
        else ""
    )
    lines = [
        f"# gptft GPU check ({report['mode']} mode)",
        "",
        f"{device}; trained in {info['precision']}; peak {_tflops(info.get('peak_flops'))} ({info['peak_source']}); "
        f"matrix-product ceiling measured here {info['matmul_gflops']:,.0f} GFLOP/s. {report['passed']} of "
        f"{len(report['checks'])} checks pass; {report['wall_s']:.0f} s.",
        "",
        "| check | result | numbers |",
        "| --- | --- | --- |",
    ]
    for c in report["checks"]:
        result = "SKIP" if c["data"].get("skipped") else "PASS" if c["ok"] else "FAIL"
        lines.append(f"| {c['name']} | {result} | {c['summary'].replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def sized_for(memory_gb: float, jobs: int | None) -> tuple[Size, int]:
    """The GPU sizes and experiments at once for a card of `memory_gb`. The largest of the check's own runs: the
    standard-loss speed run at 16 × 1024 (≈ 16 GB: 8 GB in the loss alone), the fp64 reference of the chunked loss
    at 8 × 1024 (≈ 10 GB), and gpt2-large's instruction run (≈ 17 GB) beside two more experiments."""
    if memory_gb >= 60:
        return GPU, jobs or 3
    if memory_gb >= 30:
        return GPU, jobs or 2
    if memory_gb >= 20:
        return dataclasses.replace(GPU, batch=8, check_batch=4), jobs or 1
    # 16 GB and less: gpt2-large's instruction run only fits with checkpointing and half its batch
    extra = dict(GPU.experiment_extra) | {"instruct": ("model.gradient_checkpointing=true", "data.batch_size=4")}
    return dataclasses.replace(GPU, batch=4, check_batch=2, experiment_extra=extra), jobs or 1


def bare_step_s(checks: list[Check]) -> float:
    """The eager speed run's s/step (the speed section ran before)."""
    return next(c.data["s_per_step"] for c in checks if c.name == "speed eager")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU (CI), under a minute")
    parser.add_argument("--out", type=Path, help="output folder (default outputs/gpu_check/<time>/)")
    parser.add_argument(
        "--jobs", type=int, default=None, help="experiments run at once (default: 2 CPU; GPU: by its memory, 1-3)"
    )
    parser.add_argument(
        "--experiments", default=",".join(EXPERIMENTS), help="comma-separated experiment names"
    )
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device: run it on a GPU machine, or pass --cpu for the tiny CPU version",
            file=sys.stderr,
        )
        return 2
    size, device = (CPU, torch.device("cpu")) if args.cpu else (GPU, torch.device("cuda"))
    jobs = args.jobs or 2
    if device.type == "cuda":
        size, jobs = sized_for(torch.cuda.get_device_properties(device).total_memory / 2**30, args.jobs)
    out = args.out or REPO / "outputs/gpu_check" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S.%f")
    if (out / "gpu_check.json").exists():
        print(f"gpu_check: {out} already holds a check: choose another --out", file=sys.stderr)
        return 2
    names = [
        n for n in args.experiments.split(",") if n and (REPO / "conf/experiment" / f"{n}.yaml").is_file()
    ]
    start = time.perf_counter()
    if device.type == "cuda":
        from gptft.models.precision import set_tf32

        set_tf32(True)  # as trainer=gpu does
    info = device_info(size, device)
    print(f"gpu_check: {info['name']}, {info['precision']}, peak {_tflops(info.get('peak_flops'))}, "
          f"matmul ceiling {info['matmul_gflops']:,.0f} GFLOP/s", flush=True)  # fmt: skip
    bf16 = info["precision"].startswith("bf16")
    checks: list[Check] = []
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as workdir:
        sections = [
            ("chunked loss", lambda: chunked_loss_checks(size, device)),
            ("SDPA attention", lambda: [check_sdpa(size, device, bf16)]),
            ("ref_kl under bf16", lambda: [check_ref_kl(size, device)]),
            ("speed", lambda: speed_checks(size, device, info, Path(workdir))),
            ("speed gptft.run", lambda: [run_speed_check(size, device, bare_step_s(checks), Path(workdir))]),
            ("memory gpt2-large", lambda: [large_memory_check(size, device, info, Path(workdir))]),
            ("DDP and FSDP", lambda: parallel_checks(size, device, out)),
            (
                "experiments",
                lambda: experiment_checks(size, device, names, out, jobs),
            ),
        ]
        for name, section in sections:
            try:
                results = section()
            except Exception as e:  # one broken section must not hide the others' results
                traceback.print_exc()
                results = [
                    Check(
                        name, False, f"raised {type(e).__name__}: {(str(e).strip().splitlines() or [''])[-1]}"
                    )
                ]
            for check in results:
                print(check.line(), flush=True)
            checks += results
    report = {
        "mode": "cpu" if args.cpu else "gpu",
        "device": info,
        "speed_model": f"GPT-2 {model_arch(size)['n_layer']} × {model_arch(size)['n_embd']} ({size.model_conf}, "
        f"context {size.context}), batch {size.batch} × {size.seq}",
        "checks": [c.__dict__ for c in checks],
        "passed": sum(c.ok for c in checks),
        "ok": all(c.ok for c in checks),
        "wall_s": time.perf_counter() - start,
    }
    from gptft.utils.io import atomic_write_json, atomic_write_text

    atomic_write_json(out / "gpu_check.json", report)
    atomic_write_text(out / "gpu_check.md", markdown(report))
    print(
        f"gpu_check: {report['passed']} of {len(checks)} pass in {report['wall_s']:.0f} s; {out}/gpu_check.md"
    )
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
