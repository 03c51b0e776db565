"""gptft/models/cpu_products.py: MKL's bf16 product with an fp32 output, against fp64; GPT-2's linear layers with it
under bf16 autocast, against transformers' own Conv1D (forward) and fp64 (gradients)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from gptft.models import build_model
from gptft.models.cpu_products import (
    FP32GradConv1D,
    add_transposed_product,
    available,
    use_fp32_weight_gradients,
)

pytestmark = pytest.mark.skipif(not available(), reason="torch's library exports no MKL bf16 product here")


def _bf16(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def _rel(ours: torch.Tensor, exact: torch.Tensor) -> float:
    return ((ours.double() - exact).norm() / exact.norm()).item()


def test_transposed_product_is_summed_in_fp32():
    """a.T @ b over 300 rows of bf16 operands, into fp32, and added to what out holds: within fp32's rounding of the
    fp64 product (7e-8 here), where torch's bf16 product, rounded to bf16, errs by up to 2u (u = 2⁻⁸; 1.6e-3 here)."""
    a, b = _bf16((300, 40), 0), _bf16((300, 24), 1)
    exact = a.double().t() @ b.double()
    out = torch.empty(40, 24)
    assert _rel(add_transposed_product(a, b, out, accumulate=False), exact) < 1e-6
    assert 1e-4 < _rel(a.t() @ b, exact) < 2 * 2**-8  # the bf16 output it replaces
    before = out.clone()
    wide = _bf16((300, 60), 2)  # a non-contiguous operand (a column slice) is made row-major first
    add_transposed_product(wide[:, 10:50], b, out, accumulate=True)
    assert _rel(out, before.double() + wide[:, 10:50].double().t() @ b.double()) < 1e-6
    with pytest.raises(TypeError):
        add_transposed_product(a.float(), b, out, accumulate=False)
    with pytest.raises(ValueError):
        add_transposed_product(a, b[:299], out, accumulate=False)


def _layers(seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(seed)
    stock = Conv1D(24, 40)
    torch.nn.init.normal_(stock.bias, std=0.1)
    ours = copy.deepcopy(torch.nn.Sequential(stock))
    assert use_fp32_weight_gradients(ours) == 1
    return stock, ours[0]


def test_gpt2_linear_layer_under_bf16_autocast_is_conv1d_with_fp32_weight_gradients():
    """Forward: transformers' Conv1D under autocast to the bit (the same bf16 addmm). Backward: the input's gradient
    is Conv1D's to the bit too; the weight's and bias's, summed over 3 × 70 rows, are fp64's sums of the same bf16
    operands within 1e-6 (6e-8 and 0 here), where Conv1D's (a bf16 product or sum, then cast up) err by 1.6e-3 and
    1.8e-3."""
    stock, ours = _layers(0)
    assert isinstance(ours, FP32GradConv1D) and isinstance(ours, Conv1D)
    x = torch.randn(3, 70, 40, generator=torch.Generator().manual_seed(1))
    g = torch.randn(3, 70, 24, generator=torch.Generator().manual_seed(2))
    grads, outs = [], []
    for layer in (stock, ours):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", torch.bfloat16):
            out = layer(xi)
        (out * g).sum().backward()
        outs.append(out)
        grads.append((xi.grad, layer.weight.grad, layer.bias.grad))
    assert outs[1].dtype == torch.bfloat16 and torch.equal(outs[0], outs[1])
    assert torch.equal(grads[0][0], grads[1][0])
    rows, grad_rows = x.reshape(-1, 40).to(torch.bfloat16).double(), g.reshape(-1, 24).to(torch.bfloat16).double()
    exact_w, exact_b = rows.t() @ grad_rows, grad_rows.sum(0)
    assert grads[1][1].dtype == torch.float32 and _rel(grads[1][1], exact_w) < 1e-6
    assert _rel(grads[1][2], exact_b) < 1e-6
    assert _rel(grads[0][1], exact_w) > 1e-4  # the rounded gradient it replaces


def test_gpt2_linear_layer_is_conv1d_outside_bf16_autocast_training():
    """In fp32, and under no_grad, the layer is Conv1D itself: equal outputs and gradients."""
    stock, ours = _layers(3)
    x = torch.randn(2, 9, 40, generator=torch.Generator().manual_seed(4))
    for layer in (stock, ours):
        layer(x).square().sum().backward()
    assert torch.equal(stock.weight.grad, ours.weight.grad) and torch.equal(stock.bias.grad, ours.bias.grad)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        assert torch.equal(stock(x), ours(x))


def test_built_gpt2_has_them_and_keeps_its_state_dict(tiny_model_dir):
    model = build_model(name_or_path=str(tiny_model_dir))
    layers = [m for m in model.modules() if isinstance(m, Conv1D)]
    assert layers and all(type(m) is FP32GradConv1D for m in layers)
    stock = type(model).from_pretrained(tiny_model_dir)
    assert model.state_dict().keys() == stock.state_dict().keys()
