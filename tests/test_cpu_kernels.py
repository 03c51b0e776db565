"""gptft/models/cpu_kernels.{py,c}: the fused CPU kernels against fp64 (tanh-GELU, its gradient, the loss's passes over
the logits), the masks' SplitMix64 stream against its published numbers and against torch's integer operators, and
the fallback where no compiler works."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from gptft.models import cpu_kernels
from gptft.models.cpu_kernels import GELUTanh, cross_entropy_rows, keep_mask, splitmix64

from conftest import REPO

needs_kernels = pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler built gptft's CPU kernels here")
U = 2.0**-8  # bf16's unit roundoff is 2⁻⁹; one ulp (2u) allows for fp32's tanh and exp inside the kernel


def _gelu64(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _bf16_inputs(n: int, seed: int) -> torch.Tensor:
    """Wide-ranging bf16 values, the region GELU bends in included (and exact zeros)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.randn(n, generator=g) * 3, torch.linspace(-12, 12, 4001), torch.zeros(7)])
    return x.to(torch.bfloat16)


@needs_kernels
def test_gelu_and_its_gradient_are_the_tanh_approximation_within_one_bf16_ulp():
    """Forward and backward through the module (autograd) on bf16 inputs against fp64 of the same bf16 values:
    each output within one bf16 ulp of the exact value, |ours − exact| ≤ 2u · |exact|, plus fp32's rounding of the
    terms that cancel where the result vanishes (1 + tanh for large negative x: 2⁻²⁴ · |x|; in the gradient,
    1 − tanh², times terms of order |x|³: 2⁻²³ · |dy| · (1 + |x|³)), as in torch's kernel, which is held to the same
    bound; and ours within that bound of torch's. GELU's erf form also meets the bound, so at least 90% of the
    results must be fp64's rounded to bf16 (93% of ours and of torch's kernel's; erf's: 71% and 62%)."""
    x = _bf16_inputs(200_000, 0).view(-1, 8).requires_grad_()  # a 2-D activation, as in a model
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    y = GELUTanh()(x)
    (dx,) = torch.autograd.grad(y, x, dy)
    assert y.dtype == dx.dtype == torch.bfloat16
    x64 = x.detach().double().requires_grad_()
    exact = _gelu64(x64)
    (exact_dx,) = torch.autograd.grad(exact, x64, dy.double())
    exact, x64 = exact.detach(), x64.detach()
    y_bound = 2 * U * exact.abs() + 2**-24 * x64.abs()
    dx_bound = 2 * U * exact_dx.abs() + 2**-23 * dy.double().abs() * (1 + x64.abs() ** 3)
    torch_y = torch.nn.functional.gelu(x.detach(), approximate="tanh")
    torch_dx = torch.ops.aten.gelu_backward(dy, x.detach(), approximate="tanh")
    for ours in (y.detach(), torch_y):
        assert ((ours.double() - exact).abs() <= y_bound).all()
    for ours in (dx, torch_dx):
        assert ((ours.double() - exact_dx).abs() <= dx_bound).all()
    assert ((y.detach().double() - torch_y.double()).abs() <= y_bound).all()
    for ours, exact_value in ((y.detach(), exact), (dx, exact_dx)):
        assert (ours == exact_value.to(torch.bfloat16)).double().mean() >= 0.9


def test_gelu_elsewhere_is_torchs_kernel():
    """fp32, and bf16 that is not contiguous, take torch's kernel itself (bit-identical)."""
    x = torch.randn(64, 48, generator=torch.Generator().manual_seed(2))
    assert torch.equal(GELUTanh()(x), torch.nn.functional.gelu(x, approximate="tanh"))
    strided = x.to(torch.bfloat16).t()
    assert torch.equal(GELUTanh()(strided), torch.nn.functional.gelu(strided, approximate="tanh"))


@needs_kernels
@pytest.mark.parametrize("grad", [True, False])
def test_cross_entropy_rows_against_fp64(grad):
    """Each row's log-sum-exp within 4 fp32 ulps of fp64's (here 1 ulp), the target's logit exact, and the gradient
    weights · (softmax − one_hot) within one bf16 ulp of fp64's: on 300 rows of 50,257 bf16 logits, ignored
    (weight 0) rows and ids at both ends of the row included. Without `grad` the logits are left as they were."""
    g = torch.Generator().manual_seed(3)
    rows, cols = 300, 50_257
    logits = (torch.randn(rows, cols, generator=g) * 4).to(torch.bfloat16)
    targets = torch.randint(0, cols, (rows,), generator=g)
    targets[:2] = torch.tensor([0, cols - 1])
    weights = (torch.rand(rows, generator=g) > 0.1).float()
    x = logits.double()
    exact_lse = torch.logsumexp(x, dim=-1)
    exact_grad = torch.softmax(x, dim=-1) * weights.double()[:, None]
    exact_grad[torch.arange(rows), targets] -= weights.double()
    work = logits.clone()
    lse, target_logit = cross_entropy_rows(work, targets, weights, grad=grad)
    assert lse.dtype == target_logit.dtype == torch.float32
    assert ((lse.double() - exact_lse).abs() <= 4 * 2**-23 * exact_lse.abs()).all()
    assert torch.equal(target_logit, logits[torch.arange(rows), targets].float())
    if not grad:
        assert torch.equal(work, logits)
        return
    assert ((work.double() - exact_grad).abs() <= 2 * U * exact_grad.abs()).all()
    assert (work[weights == 0] == 0).all()


def test_splitmix64_is_the_published_stream():
    """SplitMix64 (Steele, Lea and Flood, 2014) from state 0: the first numbers as the reference implementation
    prints them (they seed xoshiro's generators); and a key is a shift of the counter's start."""
    first = [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F, 0xF88BB8A8724C81EC]
    assert [v & (2**64 - 1) for v in splitmix64(0, 4).tolist()] == first
    gamma = 0x9E3779B97F4A7C15
    assert torch.equal(splitmix64(gamma, 3), splitmix64(0, 4)[1:])


@needs_kernels
@pytest.mark.parametrize("n", [1, 13, 4096 * 4 * 3 + 2, 1_000_003])
def test_kernel_masks_are_the_streams_lanes_whatever_the_threads(n):
    """The C kernel's uint8 mask equals the one built from `splitmix64` with torch's operators (the fallback where
    no compiler works): lane j of number i at element 4i + j, the tail included; with one thread or two."""
    key, threshold = -(2**62) + 12345, -32768 + 6554
    lanes = splitmix64(key, (n + 3) // 4).view(torch.int16)[:n]
    expected = (lanes >= threshold).view(torch.uint8)
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            assert torch.equal(keep_mask((n,), threshold, key, "cpu"), expected)
    finally:
        torch.set_num_threads(threads)
    assert keep_mask((n,), threshold, key, "cpu").dtype == torch.uint8


def test_without_a_compiler_the_step_runs_on_torchs_operators(tmp_path):
    """CC names no compiler: one warning says so, `available()` is False, GELU is torch's kernel and the masks are
    the same stream's (equal to what this process draws from the same seed)."""
    torch.manual_seed(9)
    from gptft.models.dropout import keep_mask as draw

    here = draw((3, 1001), 0.1)
    code = (
        "import torch, logging; logging.basicConfig(level=logging.WARNING)\n"
        "from gptft.models import cpu_kernels\n"
        "from gptft.models.dropout import keep_mask\n"
        "assert not cpu_kernels.available()\n"
        "x = torch.randn(5, 7).bfloat16()\n"
        "assert torch.equal(cpu_kernels.gelu_tanh(x), torch.nn.functional.gelu(x, approximate='tanh'))\n"
        "torch.manual_seed(9)\n"
        f"torch.save(keep_mask((3, 1001), 0.1), r'{tmp_path / 'mask.pt'}')\n"
    )
    env = {**os.environ, "CC": str(tmp_path / "no-such-cc"), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "gptft's CPU kernels are off" in out.stderr and "no-such-cc" in out.stderr
    assert torch.equal(torch.load(tmp_path / "mask.pt"), here)


@needs_kernels
@pytest.mark.parametrize("q_len", [37, 5])
def test_causal_attention_probs_and_their_gradient_against_fp64(q_len):
    """softmax(scores + causal mask) · keep and its gradient, for bf16 scores of 2 × 3 heads × q_len queries over 37
    keys (query i sees keys up to i + 37 − q_len), against fp64 from the same bf16 scores and mask. The weights
    within one bf16 ulp (2u relative) of fp64's, zero beyond the causal edge and where dropped. The gradient, as
    autograd's through torch's softmax, uses the weights rounded to bf16: probs · (g − Σ g · probs) from them in fp64
    is met within 2u elementwise, and the exact gradient within 2u in norm (0.25% and 0.28% here: torch's path under
    autocast errs by as much; single rows with cancellation by up to 5%, in both)."""
    g = torch.Generator().manual_seed(5)
    scores = (torch.randn(2, 3, q_len, 37, generator=g) * 3).to(torch.bfloat16).requires_grad_()
    keep = (torch.rand(scores.shape, generator=g) > 0.1).to(torch.uint8)
    dropped = cpu_kernels.causal_attention_probs(scores, keep)
    upstream = torch.randn(scores.shape, generator=g).to(torch.bfloat16)
    (grad,) = torch.autograd.grad(dropped, scores, upstream)
    s64 = scores.detach().double().requires_grad_()
    visible = torch.ones(q_len, 37, dtype=torch.bool).tril(37 - q_len)
    probs = torch.softmax(s64.masked_fill(~visible, -math.inf), dim=-1)
    exact = probs * keep.double()
    (exact_grad,) = torch.autograd.grad(exact, s64, upstream.double())
    exact, probs = exact.detach(), probs.detach()
    assert dropped.dtype == grad.dtype == torch.bfloat16
    assert ((dropped.double() - exact).abs() <= 2 * U * exact.abs()).all()
    assert (dropped[..., ~visible] == 0).all() and (dropped[keep == 0] == 0).all()
    rounded = probs.to(torch.bfloat16).double()
    kept_grad = upstream.double() * keep.double()
    same_formula = rounded * (kept_grad - (kept_grad * rounded).sum(dim=-1, keepdim=True))
    assert ((grad.double() - same_formula).abs() <= 2 * U * same_formula.abs() + 1e-30).all()
    assert (grad.double() - exact_grad).norm() / exact_grad.norm() <= 2 * U
    with pytest.raises(ValueError, match="uint8 of the scores' shape"):  # the kernel walks the mask with the scores
        cpu_kernels.causal_attention_probs(scores, keep[..., :-1])


@needs_kernels
def test_loading_the_kernels_leaves_the_process_floating_point_mode_alone(tmp_path):
    """The C file is compiled with -ffast-math (glibc's vector exp and tanh need it), but linked without it: gcc 12
    links crtfastmath.o into a shared library built with it, whose constructor sets flush-to-zero for the whole
    process at load time. A subnormal float survives the library's load, in a fresh process and cache."""
    code = (
        "import torch\n"
        "from gptft.models import cpu_kernels\n"
        "assert cpu_kernels.available()\n"
        "tiny = torch.tensor([1e-40]) * torch.tensor([1.0])\n"
        "assert tiny.item() != 0.0, 'flush-to-zero is on'\n"
    )
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


@needs_kernels
def test_cross_entropy_rows_refuses_targets_outside_the_row():
    """The kernel indexes each row with its target: an id past the vocabulary is an error, not a read out of bounds."""
    logits = torch.zeros(3, 10, dtype=torch.bfloat16)
    with pytest.raises(IndexError, match=r"\[0, 10\)"):
        cross_entropy_rows(logits, torch.tensor([1, 10, 2]), torch.ones(3), grad=True)
