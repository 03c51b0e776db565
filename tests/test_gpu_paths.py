"""GPU code paths that a CPU can run (issue 30): gradient clipping under mixed precision with fused AdamW, the
dense peak of GPUs whose names contain another chip's, and RunRecord's step clock.

Every test here runs in seconds on the CPU; the GPU check (benchmarks/gpu_check.py) repeats them on a GPU.
"""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from gptft.data import BookWindows
from gptft.models import build_model
from gptft.tasks import CausalLM

from conftest import SMALL_BF16

TINY = {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 64}
NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


def _one_step(
    data_dir, precision: str, fused: bool, clip: float
) -> tuple[list[float], dict[str, torch.Tensor]]:
    """One Lightning step of CausalLM on the tiny model; returns the total norm of the gradients AdamW stepped with
    (read by a plain torch step post-hook: Lightning runs forward and backward inside `step`, as its closure, and
    the step leaves the gradients as it found them) and the weights after the step."""
    torch.manual_seed(0)
    model = build_model(arch=TINY | NO_DROPOUT)
    task = CausalLM(model, {"lr": 1e-3, "weight_decay": 0.0, "fused": fused}, {"name": "constant"})
    norms: list[float] = []

    class Record(L.Callback):
        def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            def post_hook(optimizer: torch.optim.Optimizer, *_: object) -> None:
                grads = [
                    p.grad.double() for g in optimizer.param_groups for p in g["params"] if p.grad is not None
                ]
                norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

            trainer.optimizers[0].register_step_post_hook(post_hook)

    # Lightning turns precision="16-mixed" into bf16 on a CPU; the plugin itself runs fp16 autocast and a GradScaler
    # here as on a GPU.
    plugin = (
        {"plugins": [MixedPrecision("16-mixed", "cpu")]}
        if precision == "16-mixed"
        else {"precision": precision}
    )
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=1, gradient_clip_val=clip, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()],
        **plugin,
    )  # fmt: skip
    trainer.fit(task, datamodule=BookWindows(seq_len=32, batch_size=2, data_dir=str(data_dir), val_windows=2))
    assert bool(trainer.optimizers[0].defaults["fused"]) is fused
    return norms, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_gradient_clipping_under_mixed_precision_with_fused_adamw(data_dir, precision):
    """Lightning refuses to clip for any optimizer that unscales in its own step (fused AdamW): gptft clips itself.
    The gradient AdamW sees has norm clip_val (the raw one is ≈ 5: clipping acts), and the step equals the one
    Lightning takes with foreach AdamW, which it does clip, to AdamW's rounding (the same bf16/fp16 forward)."""
    clip = 0.01
    raw, _ = _one_step(data_dir, precision, fused=False, clip=0.0)
    norms, fused = _one_step(data_dir, precision, fused=True, clip=clip)
    reference_norms, foreach = _one_step(data_dir, precision, fused=False, clip=clip)
    assert raw[0] > 10 * clip
    # fp16's GradScaler: the first step's norm is of the unscaled gradient (scale 65536 divided out), not 65536×
    assert norms[0] == pytest.approx(clip, rel=1e-4) and reference_norms[0] == pytest.approx(clip, rel=1e-4)
    for name, w in foreach.items():
        torch.testing.assert_close(fused[name], w, rtol=1e-5, atol=1e-6, msg=name)


def test_user_command_clips_in_bf16_mixed(run_ok, tmp_path):
    """The issue's command: two debug=fast steps with bf16-mixed and gradient_clip_val=1.0 complete (the run
    crashed with Lightning's RuntimeError before)."""
    out = tmp_path / "run"
    run_ok(
        "debug=fast", "trainer.max_steps=2", "trainer.precision=bf16-mixed", "trainer.gradient_clip_val=1.0",
        "eval.max_new_tokens=4", "callbacks.reference.kl_tokens=16", f"hydra.run.dir={out}",
        *SMALL_BF16,
    )  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["steps"] == 2 and metrics["precision"] == "bf16-mixed"


# Dense bf16 tensor-core peaks, TFLOP/s, from NVIDIA's datasheets (the with-sparsity figure halved where only it
# is printed): the names are torch.cuda.get_device_name's.
DATASHEET = {
    "NVIDIA L40S": 362,
    "NVIDIA L40": 181,
    "NVIDIA L4": 121,
    "NVIDIA H100 80GB HBM3": 989,
    "NVIDIA H100 PCIe": 756,
    "NVIDIA H200": 989,
    "NVIDIA A100-SXM4-80GB": 312,
    "NVIDIA A10G": 70,
    "NVIDIA GeForce RTX 4090": 165,
}


@pytest.mark.parametrize("chip", DATASHEET)
def test_dense_peak_of_chips_whose_names_contain_another(monkeypatch, chip):
    """MFU's denominator for a named GPU. Lightning's table matches substrings ("l4" in "nvidia l40s") and gptft
    took the lower figure: the L40S's MFU came out 3× too high. No GPU here: the device's name is the one input
    that needs one, so it is given; Lightning's own table runs as on the GPU."""
    from gptft.models.flops import dense_peak

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: chip)
    peak, source = dense_peak(torch.device("cuda", 0), torch.bfloat16)
    assert peak == DATASHEET[chip] * 1e12, source
