"""The lean training step: the chunked output-layer loss equals the standard one; precision by hardware."""

import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gptft.models import build_model, cpu_products
from gptft.models.chunked_loss import chunked_linear_cross_entropy
from gptft.models.precision import (
    BF16_MARGIN,
    SPEEDUP_ENV,
    cpu_bf16_native,
    cpu_bf16_speedup,
    resolve_precision,
)
from gptft.tasks import CausalLM

from conftest import FORCED_PRECISION, REPO

OPTIM = {"lr": 1e-3, "weight_decay": 0.01}


def _loss_and_grads(model, chunk, batch):
    task = CausalLM(model, OPTIM, {"name": "constant"}, loss_chunk=chunk)
    model.zero_grad()
    loss, _ = task.compute_loss(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_chunked_loss_and_gradients_equal_the_standard_path(tiny_model_dir, chunk, masked):
    model = build_model(name_or_path=str(tiny_model_dir)).eval()  # no dropout: both passes see one function
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 50257, (3, 20), generator=g), torch.randint(0, 50257, (3, 20), generator=g)
    if masked:
        y[:, :8] = -100  # e.g. a masked prompt
        y[2] = -100
    ref_loss, ref_grads = _loss_and_grads(model, 0, (x, y))
    loss, grads = _loss_and_grads(model, chunk, (x, y))  # 60 rows: 7 does not divide them
    assert (loss - ref_loss).abs() / ref_loss <= 1e-5
    for name, ref in ref_grads.items():
        assert (grads[name] - ref).norm() / ref.norm() <= 1e-5, name


def test_chunked_function_on_its_own():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 5, 8, generator=g, requires_grad=True)
    weight = torch.randn(30, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 30, (2, 5), generator=g)
    ref = torch.nn.functional.cross_entropy((hidden @ weight.t()).flatten(0, 1), labels.flatten())
    ours = chunked_linear_cross_entropy(hidden, weight, labels, chunk=3)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    (gh_ref, gw_ref) = torch.autograd.grad(3 * ref, (hidden, weight))
    (gh, gw) = torch.autograd.grad(3 * ours, (hidden, weight))  # the upstream gradient is honoured
    assert torch.allclose(gh, gh_ref, atol=1e-6) and torch.allclose(gw, gw_ref, atol=1e-6)


def test_under_no_grad_it_is_the_loss_alone():
    """Validation and the probes take the chunked path too: under no_grad it skips the gradient products, and the
    loss must stay the standard one (here with a fully ignored chunk and a chunk size that does not divide the rows)."""
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(4, 6, 8, generator=g)
    weight = torch.nn.Parameter(torch.randn(30, 8, generator=g))
    labels = torch.randint(0, 30, (4, 6), generator=g)
    labels[0] = -100
    ref = torch.nn.functional.cross_entropy((hidden @ weight.t()).flatten(0, 1), labels.flatten())
    with torch.no_grad():
        ours = chunked_linear_cross_entropy(hidden, weight, labels, chunk=5)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)


def _head_problem(rows: int, vocab: int, ignored: int, seed: int):
    """Hidden states (rows × 64), a head of logits' spread ≈ 2 (as a trained head's) and labels whose first
    `ignored` are IGNORE_INDEX, each needing gradients where it can have them."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, 64, generator=g, requires_grad=True)
    weight = (torch.randn(vocab, 64, generator=g) / 4).requires_grad_()
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[:ignored] = -100
    return hidden, weight, labels


def test_chunked_loss_under_bf16_autocast_is_within_bf16_precision():
    """Under bf16 autocast the loss's three products run in bf16 (fp32 accumulation inside the kernel, each output
    rounded to bf16 once), the log-sum-exp, the sums and the weight gradient's accumulation over chunks in fp32.
    Against fp64: a product of inputs each rounded to bf16 (8 significant bits, u = 2⁻⁸), then rounded itself,
    errs by ≤ 2u relative, so the loss and both gradients must agree within 2u (here: 6e-5, 0.30% and 0.31%; a
    chunk dropped or scaled wrong errs by tens of percent)."""
    hidden, weight, labels = _head_problem(70, 1000, ignored=6, seed=3)
    with torch.autocast("cpu", torch.bfloat16):
        loss = chunked_linear_cross_entropy(hidden, weight, labels, chunk=32)  # 70 rows: 3 chunks, one short
    assert loss.dtype == torch.float32
    grads = torch.autograd.grad(2 * loss, (hidden, weight))
    h64, w64 = (t.detach().double().requires_grad_() for t in (hidden, weight))
    ref = torch.nn.functional.cross_entropy(h64 @ w64.t(), labels)
    refs = torch.autograd.grad(2 * ref, (h64, w64))
    u = 2.0**-8
    assert abs(loss.item() - ref.item()) / ref.item() <= 2 * u
    for ours, exact in zip(grads, refs, strict=True):
        assert ours.dtype == torch.float32
        assert (ours.double() - exact).norm() / exact.norm() <= 2 * u


@pytest.mark.skipif(not cpu_products.available(), reason="torch's library exports no MKL bf16 product here")
def test_bf16_weight_gradient_is_accumulated_over_the_chunks_unrounded():
    """On a CPU under bf16 autocast the head's weight gradient, Σ over chunks of gradᵀ · h, is summed in fp32 by MKL's
    bf16 product (gptft.models.cpu_products: the chunk's bf16 gradient and hidden states, an fp32 output). Oracle in
    fp64, from the same bf16 logits: that sum of the operands rounded to bf16, within 1e-6 (1e-7 here). Rounding
    each chunk's product to bf16 before the sum, as the step did before session 11, errs by ≈ 1e-3."""
    hidden, weight, labels = _head_problem(96, 1000, ignored=5, seed=4)
    with torch.autocast("cpu", torch.bfloat16):
        loss = chunked_linear_cross_entropy(hidden, weight, labels, chunk=32)
    (ours,) = torch.autograd.grad(loss, weight)

    def bf16(t):
        return t.to(torch.bfloat16).double()

    logits = bf16(bf16(hidden.detach()) @ bf16(weight.detach()).t())  # the products' bf16 output
    valid = labels != -100
    grad = torch.softmax(logits, dim=-1)
    grad[torch.arange(len(labels)), labels.clamp(min=0)] -= 1
    exact = bf16(grad[valid]).t() @ bf16(hidden.detach()[valid]) / valid.sum()
    assert ((ours.double() - exact).norm() / exact.norm()).item() <= 1e-6


def test_chunked_loss_under_fp16_autocast_is_within_fp16_precision():
    """fp16 (16-mixed: a GPU's, and torch's CPU autocast too) has bf16's error bound with u = 2⁻¹¹, but a range that
    ends at 6e-8: a gradient of the mean, (softmax − one-hot) / rows, underflowed there when each chunk's gradient
    was built before the loss scale was known (2.4e-3 here, 5u; 100× off at 2,048 rows of a 50,257-row head). The
    loss's gradients are those of the sum, divided by the row count in backward: 3.5e-4."""
    hidden, weight, labels = _head_problem(2048, 4096, ignored=6, seed=3)
    with torch.autocast("cpu", torch.float16):
        loss = chunked_linear_cross_entropy(hidden, weight, labels, chunk=512)
    scale = 2.0**16  # GradScaler's first loss scale
    grads = torch.autograd.grad(scale * loss, (hidden, weight))
    h64, w64 = (t.detach().double().requires_grad_() for t in (hidden, weight))
    ref = torch.nn.functional.cross_entropy(h64 @ w64.t(), labels)
    u = 2.0**-11
    assert abs(loss.item() - ref.item()) / ref.item() <= 2 * u
    for ours, exact in zip(grads, torch.autograd.grad(ref, (h64, w64)), strict=True):
        assert (ours.double() / scale - exact).norm() / exact.norm() <= 2 * u


def test_gpt2_activation_is_torchs_kernel_computing_the_same_function(tiny_model_dir):
    """build_model swaps transformers' gelu_new (8 tensor operations in Python) for torch's tanh-GELU kernel: the
    same function, so the logits equal those of transformers' own model within fp32 rounding, and the config
    (what an exported model says) still names gelu_new."""
    from transformers import AutoModelForCausalLM
    from transformers.activations import NewGELUActivation

    model = build_model(name_or_path=str(tiny_model_dir)).eval()
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    assert [type(m).__name__ for m in reference.modules()].count("NewGELUActivation") == len(reference.transformer.h)
    assert not any(isinstance(m, NewGELUActivation) for m in model.modules())
    assert model.config.activation_function == "gelu_new"
    x = torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours, theirs = model(input_ids=x).logits, reference(input_ids=x).logits
    assert (ours - theirs).norm() / theirs.norm() <= 1e-6


def test_training_curves_match_with_and_without_chunking(run_ok, tmp_path):
    no_dropout = ("+model.arch.resid_pdrop=0.0", "+model.arch.embd_pdrop=0.0", "+model.arch.attn_pdrop=0.0")
    # One multirun, the standard loss (job 0) and the chunked one (job 1); only the training curves are read.
    run_ok(
        "-m",
        "debug=fast",
        "optim.lr=1e-3",
        "trainer.precision=32-true",
        "task.loss_chunk=0,50",
        "eval=off",
        *no_dropout,
        f"hydra.sweep.dir={tmp_path}",
        "~hydra.callbacks.sweep_report",
    )
    curves = {}
    for job, chunk in enumerate((0, 50)):
        (run,) = tmp_path.glob(f"{job}_*/tensorboard")
        acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
        acc.Reload()
        curves[chunk] = [e.value for e in acc.Scalars("train/loss")]
    assert len(curves[0]) == 10
    assert curves[50] == pytest.approx(curves[0], rel=1e-4)


def test_precision_follows_the_hardware_unless_asked():
    assert resolve_precision("32-true", "cpu") == "32-true"
    assert resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"
    # auto on a CPU: bf16 only where it is native and its products are measured faster than fp32's by the margin
    speedup = cpu_bf16_speedup()
    assert cpu_bf16_speedup() is speedup  # measured once per process
    if FORCED_PRECISION is None:  # else the suite runs with the choice forced (tests/README.md)
        assert (speedup > 0) == cpu_bf16_native()
    assert resolve_precision("auto", "cpu") == ("bf16-mixed" if speedup >= BF16_MARGIN else "32-true")
    if not torch.cuda.is_available():
        assert resolve_precision("auto", "auto") == resolve_precision("auto", "cpu")


def test_the_processes_of_a_run_reuse_its_measurement(gptft_env):
    # A DDP rank inherits the first process's environment, so every rank makes the first process's choice.
    code = "from gptft.models.precision import resolve_precision; print(resolve_precision('auto', 'cpu'))"
    for speedup, chosen in (("9.0", "bf16-mixed"), ("0.5", "32-true")):
        env = {**gptft_env, SPEEDUP_ENV: speedup}
        done = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True)
        assert done.stdout.strip() == chosen, done.stderr[-2000:]  # on any CPU: the choice can be forced
