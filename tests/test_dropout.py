"""model.fast_dropout (gptft/models/dropout.py): its masks against their stated law, its dropout and its gradient
against plain torch arithmetic in fp64, its attention against transformers' own eager attention, and the GPT-2 it
builds against transformers' stock one."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.masking_utils import sdpa_mask
from transformers.models.gpt2.modeling_gpt2 import eager_attention_forward

from gptft.models import build_model
from gptft.models.dropout import ATTENTION, Dropout, attention, cpu_dropout, drop_mask, kept_scale

N = 1 << 22


@pytest.mark.parametrize("p", [0.1, 0.5, 0.03])
def test_masks_drop_each_element_with_p_rounded_to_1_65536_independently(p):
    torch.manual_seed(0)
    drop = drop_mask((N,), p)
    dropped = round(p * 65536) / 65536
    sigma = math.sqrt(dropped * (1 - dropped) / N)
    assert abs(drop.double().mean().item() - dropped) < 5 * sigma
    assert kept_scale(p) == 1 / (1 - dropped)
    # the four 16-bit lanes of one 64-bit draw, and neighbouring draws, are independent: P(both dropped) = p²
    lanes = drop.view(-1, 4).double()
    for a, b in [(0, 1), (1, 2), (2, 3), (0, 3)]:
        both = (lanes[:, a] * lanes[:, b]).mean().item()
        assert abs(both - dropped**2) < 5 * math.sqrt(dropped**2 * (1 - dropped**2) / (N // 4)), (a, b)
    both = (drop[:-4] & drop[4:]).double().mean().item()  # the same lane of the next draw
    assert abs(both - dropped**2) < 5 * math.sqrt(dropped**2 / (N - 4))


def test_dropout_is_mask_times_scale_and_its_gradient_too():
    x = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(1)
    y = cpu_dropout(x, 0.1)
    torch.manual_seed(1)
    keep = ~drop_mask(x.shape, 0.1)  # the draws dropout made, drawn again from the same seed
    scale = 1 / (1 - 6554 / 65536)
    expected = torch.where(keep, x.detach() * scale, torch.zeros((), dtype=torch.float64))
    assert torch.equal(y.detach(), expected)
    g = torch.randn_like(x)
    (y * g).sum().backward()
    assert torch.allclose(x.grad, torch.where(keep, g * scale, torch.zeros((), dtype=torch.float64)), rtol=1e-15)
    # the mean stays the input's: E[keep · scale] = 1
    torch.manual_seed(2)
    ones = cpu_dropout(torch.ones(N, dtype=torch.float64), 0.1)
    assert abs(ones.mean().item() - 1) < 5 * math.sqrt(0.1 / 0.9 / N)


def test_dropout_is_torchs_where_it_does_not_draw():
    x = torch.randn(4, 4)
    assert torch.equal(cpu_dropout(x, 0.1, training=False), x) and torch.equal(cpu_dropout(x, 0.0), x)
    assert torch.equal(cpu_dropout(x, 1.0), torch.zeros_like(x))
    module = Dropout(0.1).eval()
    assert torch.equal(module(x), x)
    torch.manual_seed(3)  # seeded draws repeat (a checkpoint's RNG state gives a resumed run the same masks)
    first = Dropout(0.1)(x)
    torch.manual_seed(3)
    assert torch.equal(Dropout(0.1)(x), first)


class _Attention(torch.nn.Module):
    is_causal = True
    training = True


def _qkv(b: int, h: int, q: int, kv: int, d: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(4)
    return [torch.randn(b, h, t, d, generator=g, dtype=dtype) for t in (q, kv, kv)]


@pytest.mark.parametrize("q_len", [9, 1])
def test_attention_is_transformers_eager_attention_with_the_masks_dropout_drew(q_len):
    """A causal batch with left padding (SDPA's bool mask), and the plain causal case where SDPA passes no mask;
    dropout on. The oracle: transformers' eager attention, fed the additive mask and the dropped weights' mask."""
    query, key, value = _qkv(2, 3, q_len, 9, 8)
    padding = torch.tensor([[1] * 9, [0, 0] + [1] * 7], dtype=torch.bool)
    for mask in (None, sdpa_mask(batch_size=2, q_length=q_len, kv_length=9, q_offset=9 - q_len, attention_mask=padding,
                                 allow_is_causal_skip=False)):  # fmt: skip
        torch.manual_seed(5)
        out, _ = attention(_Attention(), query, key, value, mask, dropout=0.1, scaling=0.3)
        torch.manual_seed(5)
        keep = ~drop_mask((2, 3, q_len, 9), 0.1)
        allowed = torch.ones(q_len, 9, dtype=torch.bool).tril(9 - q_len) if mask is None else mask
        additive = torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(~allowed, torch.finfo(torch.float64).min)
        reference, weights = eager_attention_forward(_Attention(), query, key, value, additive, scaling=0.3, dropout=0.0)
        # transformers' eager attention without its dropout, then the same mask applied to its weights
        dropped = weights * keep / (1 - 6554 / 65536)
        expected = torch.matmul(dropped, value).transpose(1, 2)
        assert torch.allclose(out, expected, rtol=1e-12, atol=1e-14)
        assert not torch.allclose(out, reference)  # the mask dropped something


def test_attention_gradients_are_those_of_transformers_eager_attention_with_the_same_mask():
    """attention's gradients with respect to q, k and v are autograd's through transformers' eager attention (fp64)
    with the weights masked by the same draws."""
    query, key, value = (t.requires_grad_() for t in _qkv(2, 3, 9, 9, 8))
    torch.manual_seed(11)
    out, _ = attention(_Attention(), query, key, value, None, dropout=0.1, scaling=0.3)
    g = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    ours = torch.autograd.grad((out * g).sum(), (query, key, value))
    torch.manual_seed(11)
    keep = ~drop_mask((2, 3, 9, 9), 0.1)
    causal = torch.zeros(9, 9, dtype=torch.float64).masked_fill(~torch.ones(9, 9).tril().bool(), -math.inf)
    _, weights = eager_attention_forward(_Attention(), query, key, value, causal, scaling=0.3, dropout=0.0)
    expected = torch.matmul(weights * keep / (1 - 6554 / 65536), value).transpose(1, 2)
    for mine, exact in zip(ours, torch.autograd.grad((expected * g).sum(), (query, key, value)), strict=True):
        assert torch.allclose(mine, exact, rtol=1e-10, atol=1e-12)


def test_attention_under_bf16_autocast_multiplies_in_bf16_within_its_tolerance():
    query, key, value = (t.float() for t in _qkv(2, 4, 64, 64, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(6)
        out, _ = attention(_Attention(), query, key, value, None, dropout=0.1)
    torch.manual_seed(6)
    keep = ~drop_mask((2, 4, 64, 64), 0.1)
    q, k, v = (t.double() for t in (query, key, value))
    scores = (q @ k.transpose(-1, -2) / math.sqrt(32)).masked_fill(~torch.ones(64, 64).tril().bool(), -math.inf)
    expected = ((scores.softmax(-1) * keep / (1 - 6554 / 65536)) @ v).transpose(1, 2)
    assert out.dtype == torch.bfloat16  # its products ran in the autocast dtype
    rel = ((out.double() - expected).norm() / expected.norm()).item()
    assert rel < 4 * 2**-8, rel


def test_gpt2_with_fast_dropout_is_transformers_gpt2(tiny_model_dir):
    """Dropout off (eval), the built model's logits are transformers' stock SDPA model's; in training every dropout
    is gptft's, and model.fast_dropout=false keeps torch's."""
    stock = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    ours = build_model(name_or_path=str(tiny_model_dir))
    x = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.allclose(ours.eval()(x).logits, stock(x).logits, atol=1e-5, rtol=1e-5)
    assert ours.config._attn_implementation == ATTENTION
    kinds = {type(m) for m in ours.modules() if isinstance(m, torch.nn.Dropout)}
    assert kinds == {Dropout}
    plain = build_model(name_or_path=str(tiny_model_dir), fast_dropout=False)
    assert plain.config._attn_implementation == "sdpa"
    assert {type(m) for m in plain.modules() if isinstance(m, torch.nn.Dropout)} == {torch.nn.Dropout}
    # trained with dropout the losses differ from eval's, and repeat under one seed
    ours.train()
    torch.manual_seed(8)
    a = ours(x, labels=x).loss
    torch.manual_seed(8)
    assert torch.equal(ours(x, labels=x).loss, a) and a != ours.eval()(x, labels=x).loss


def test_a_model_without_attention_dropout_keeps_sdpa():
    model = build_model(arch={"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2, "attn_pdrop": 0.0})
    assert model.config._attn_implementation == "sdpa"
    assert {type(m) for m in model.modules() if isinstance(m, torch.nn.Dropout)} == {Dropout}  # the others are ours


def test_a_gpt2_trains_through_the_same_law_as_with_torchs_dropout(tiny_model_dir):
    """The oracle is torch's own dropout: averaged over many draws, the residual stream after the first block and the
    training loss are the same under both (a lost or doubled 1/(1 - p), or a mask at the wrong rate, shifts them)."""
    fast = build_model(name_or_path=str(tiny_model_dir)).train()
    plain = build_model(name_or_path=str(tiny_model_dir), fast_dropout=False).train()
    x = torch.randint(0, 50257, (4, 64), generator=torch.Generator().manual_seed(9))

    def draws(model, n=60):
        rows = []
        with torch.no_grad():
            for i in range(n):
                torch.manual_seed(1000 + i)
                out = model(x, labels=x, output_hidden_states=True)
                rows.append(torch.stack([out.hidden_states[1].pow(2).mean(), out.loss]).double())
        return torch.stack(rows)

    a, b = draws(fast), draws(plain)
    se = (a.var(0) / len(a) + b.var(0) / len(b)).sqrt()
    assert ((a.mean(0) - b.mean(0)).abs() < 4 * se).all(), (a.mean(0), b.mean(0), se)
    with torch.no_grad():  # and dropout does move them: the test can tell a model without it
        h = plain.eval()(x, output_hidden_states=True).hidden_states[1].pow(2).mean().double()
    assert (a.mean(0)[0] - h).abs() > 4 * se[0]


def test_torch_compile_traces_the_model_in_one_graph():
    """Under torch.compile the dropout and attention are torch's (Dynamo cannot trace `random_`): one graph, as
    without fast dropout, not a graph break at every dropout."""
    model = build_model(arch={"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 256})
    x = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(10))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda ids: model.base_model(input_ids=ids, use_cache=False).last_hidden_state)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
