"""Oracles for what freezing, LoRA and the weight-change tracker report: the trainable-parameter count,
‖ΔW‖ per step, LoRA's merged export and adapter size, and the model FLOPs per token behind MFU.

Each number is computed again from what the run saved (hf_model/, lora_adapter/, the per-step checkpoints,
weight_delta.csv, metrics.json) and the starting model's files, with plain torch, safetensors, transformers
and PEFT. gptft is imported only as the side under test (its FLOPs count of GPT-2 small as a strategy freezes
it). Every run trains in fp32 (`trainer.precision=32-true`).

FLOPs are checked against torch's FlopCounterMode, which counts the matrix products autograd runs (on the
meta device: shapes only, seconds for GPT-2 small). gptft's count follows a convention the counter does not
see (gptft/models/flops.py), added here by hand: biases and LayerNorm gains cost 2 FLOPs per element forward,
2 more once the backward pass reaches them and 2 more if they train, like matrices of their size; and under
`freeze.qkv_parts` gptft counts only the useful part of the fused c_attn weight gradient (autograd computes
all of it, a hook zeroes the untrained thirds), so the counter reads 2 FLOPs per untrained element more.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

REPO = Path(__file__).resolve().parents[2]
STEPS = 3


def _ckpt_args(run: Path) -> tuple[str, ...]:
    """fp32, 3 steps, a checkpoint after each (step 0 is the starting model), the tracker on every attention
    weight; no generation or forgetting probe (nothing here reads them)."""
    return (
        "debug=fast",
        "~callbacks.reference",
        "trainer.precision=32-true",
        f"trainer.max_steps={STEPS}",
        "optim.lr=1e-2",
        "callbacks=weight_delta",
        "callbacks.checkpoint.every_n_train_steps=1",
        "callbacks.checkpoint.save_top_k=-1",
        "eval.repeats=0",
        f"hydra.run.dir={run}",
    )


@pytest.fixture(scope="module")
def key_run(run_ok, tiny_model_dir, tmp_path_factory) -> Path:
    """The course's key-only variant: block 1's fused c_attn weight trains in its k third only."""
    run = tmp_path_factory.mktemp("oracle-key") / "run"
    run_ok(
        *_ckpt_args(run), f"model.name_or_path={tiny_model_dir}", "freeze=upper_qkv", "freeze.qkv_parts=[k]"
    )
    return run


@pytest.fixture(scope="module")
def lora_run(run_ok, tiny_model_dir, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("oracle-lora") / "run"
    run_ok(*_ckpt_args(run), f"model.name_or_path={tiny_model_dir}", "freeze=lora", "freeze.rank=4")
    return run


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def _states(run: Path) -> dict[int, dict[str, torch.Tensor]]:
    """The model's weights after each step, keyed by step, names without Lightning's `model.` prefix."""
    states = {}
    for step in range(1, STEPS + 1):
        ckpt = torch.load(
            run / f"checkpoints/epoch=0-step={step}.ckpt", weights_only=True, map_location="cpu"
        )
        states[step] = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    return states


def _csv(run: Path) -> tuple[list[str], dict[int, list[float]]]:
    header, *rows = [line.split(",") for line in (run / "weight_delta.csv").read_text().splitlines()]
    return header[1:], {int(row[0]): [float(v) for v in row[1:]] for row in rows}


def _norm(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.linalg.norm(a.double() - b.double()).item()


# -- trainable parameters and ‖ΔW‖ of a partly trained fused c_attn


def test_trainable_count_is_the_elements_that_changed(key_run, tiny_model_dir):
    start = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(key_run / "hf_model" / "model.safetensors")
    changed = {name: int((start[name] != after[name]).sum()) for name in start}
    moved = {name: n for name, n in changed.items() if n}
    weight = "transformer.h.1.attn.c_attn.weight"
    assert moved == {weight: 64 * 64}  # d × d: the k third (columns d..2d) only
    assert torch.equal(start[weight][:, :64], after[weight][:, :64])  # q, bit-identical
    assert torch.equal(start[weight][:, 128:], after[weight][:, 128:])  # v, bit-identical
    record = _metrics(key_run)
    assert record["params"]["trainable"] == record["freeze"]["trainable"] == sum(changed.values())
    assert record["freeze"]["per_block"]["h.1"]["trainable"] == 64 * 64
    assert record["params"]["total"] == record["freeze"]["trainable"] + record["freeze"]["frozen"]


def test_weight_delta_equals_the_checkpoints_difference(key_run, tiny_model_dir):
    names, rows = _csv(key_run)
    assert sorted(rows) == list(range(1, STEPS + 1))
    states = _states(key_run)
    states[0] = load_file(tiny_model_dir / "model.safetensors")  # before step 1: the starting model
    for step, norms in rows.items():
        for name, norm in zip(names, norms, strict=True):
            by_hand = _norm(states[step][name], states[step - 1][name])
            assert norm == pytest.approx(by_hand, rel=1e-6, abs=0), (step, name)
    moving = [n for n, v in zip(names, rows[STEPS], strict=True) if v > 0]
    assert moving == ["transformer.h.1.attn.c_attn.weight"]


# -- LoRA: the merged export, the adapter's size, ‖Δ(W + s·BA)‖


def test_lora_export_is_peft_merge_and_unload(lora_run, tiny_model_dir):
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    merged = PeftModel.from_pretrained(base, lora_run / "lora_adapter").merge_and_unload().state_dict()
    exported = load_file(lora_run / "hf_model" / "model.safetensors")
    assert exported.keys() <= merged.keys() and "transformer.h.0.attn.c_attn.weight" in exported
    for name, tensor in exported.items():
        assert torch.allclose(tensor, merged[name], rtol=0, atol=1e-6), name
    start = load_file(tiny_model_dir / "model.safetensors")
    assert not torch.equal(
        exported["transformer.h.1.mlp.c_proj.weight"], start["transformer.h.1.mlp.c_proj.weight"]
    )


def test_lora_trainable_count_is_peft_s(lora_run, tiny_model_dir):
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    adapted = PeftModel.from_pretrained(base, lora_run / "lora_adapter", is_trainable=True)
    trainable, total = adapted.get_nb_trainable_parameters()
    params = _metrics(lora_run)["params"]
    assert (params["trainable"], params["total"]) == (trainable, total)
    # By hand: rank 4 on c_attn (64 → 192) and both c_proj (64 → 64, 256 → 64) of 2 blocks.
    assert trainable == 2 * 4 * ((64 + 192) + (64 + 64) + (256 + 64))


def test_lora_weight_delta_is_the_effective_weights_change(lora_run):
    config = json.loads((lora_run / "lora_adapter" / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    names, rows = _csv(lora_run)
    states = _states(lora_run)

    def effective_delta(state: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        """s · B A, in float64 (PEFT's layout: A is r × d_in, B is d_out × r)."""
        stem = "base_model.model." + name.removeprefix("base_model.model.").removesuffix(".weight")
        a, b = (
            state[f"{stem}.lora_A.default.weight"].double(),
            state[f"{stem}.lora_B.default.weight"].double(),
        )
        return scale * b @ a

    for step, norms in rows.items():
        for name, norm in zip(names, norms, strict=True):
            now = effective_delta(states[step], name)
            # B starts at zero, so before step 1 the effective weight is the frozen base weight alone.
            before = effective_delta(states[step - 1], name) if step > 1 else torch.zeros_like(now)
            assert norm == pytest.approx(torch.linalg.norm(now - before).item(), rel=1e-6, abs=0), (
                step,
                name,
            )


# -- FLOPs per token against torch's FlopCounterMode


def _counted(model: torch.nn.Module, seq_len: int) -> float:
    """FlopCounterMode's FLOPs per token of one forward and backward of a (1, seq_len) batch."""
    x = torch.zeros((1, seq_len), dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        model(x).logits.sum().backward()
    return counter.get_total_flops() / seq_len


def _vector_convention(model: torch.nn.Module, trained: dict[str, int]) -> int:
    """What the convention adds for biases and LayerNorm gains (no matrix product, so the counter sees none):
    2 per element forward, 2 more once the backward pass has reached them (any tensor used before them trains;
    the embeddings come first), 2 more per trained element."""
    reached, total = False, 0
    for name, p in model.named_parameters():  # forward order in GPT-2 and PEFT's wrapped GPT-2
        if p.dim() == 1:
            total += 2 * p.numel() * (1 + reached) + 2 * trained.get(name, 0)
        reached |= name in trained
    return total


def _oracle_flops(model: torch.nn.Module, trained: dict[str, int], seq_len: int) -> float:
    """The convention's FLOPs per token of `model` on the meta device when the tensors in `trained` train (the
    value: how many of their elements do)."""
    for name, p in model.named_parameters():
        p.requires_grad_(name in trained)
    waste = sum(  # the weight gradient autograd computes for elements a hook then zeroes (qkv_parts)
        2 * (p.numel() - trained[n]) for n, p in model.named_parameters() if n in trained
    )
    return _counted(model, seq_len) - waste + _vector_convention(model, trained)


def _meta_gpt2(config: GPT2Config) -> GPT2LMHeadModel:
    config._attn_implementation = "eager"  # matmuls the counter sees on any device (causal mask ignored, too)
    with torch.device("meta"):
        return GPT2LMHeadModel(config)


def test_flops_of_a_run_equal_the_counters_for_the_weights_that_changed(key_run, tiny_model_dir):
    """The number metrics.json reports (T = 64), against the counter on the run's model with exactly the
    elements that changed in training."""
    start = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(key_run / "hf_model" / "model.safetensors")
    trained = {n: int((start[n] != after[n]).sum()) for n in start if not torch.equal(start[n], after[n])}
    model = _meta_gpt2(GPT2Config.from_pretrained(key_run / "hf_model"))
    reported = _metrics(key_run)["perf"]["flops_per_token"]
    assert reported == _oracle_flops(model, trained, 64)


def test_flops_of_a_lora_run_equal_the_counters(lora_run):
    from peft import LoraConfig, get_peft_model

    model = _meta_gpt2(GPT2Config.from_pretrained(lora_run / "hf_model"))
    adapter = json.loads((lora_run / "lora_adapter" / "adapter_config.json").read_text())
    config = LoraConfig(
        r=adapter["r"],
        lora_alpha=adapter["lora_alpha"],
        target_modules=adapter["target_modules"],
        fan_in_fan_out=adapter["fan_in_fan_out"],
    )
    with torch.device("meta"):
        wrapped = get_peft_model(model, config)
    trained = {n: p.numel() for n, p in wrapped.named_parameters() if ".lora_" in n}
    assert _metrics(lora_run)["perf"]["flops_per_token"] == _oracle_flops(wrapped, trained, 64)


def _gptft_flops(model: torch.nn.Module, strategy: str, *overrides: str) -> float:
    """gptft's count: the strategy's file applied by gptft's freezing, counted as the throughput monitor
    counts it."""
    from gptft.models.flops import model_flops_per_token
    from gptft.tasks.freezing import apply_freeze, trained_numel

    freeze = OmegaConf.merge(
        OmegaConf.load(REPO / "conf" / "freeze" / f"{strategy}.yaml"), OmegaConf.from_dotlist(list(overrides))
    )
    apply_freeze(model, **freeze)
    return model_flops_per_token(model, 1024, trained_numel)


def _upper(name: str) -> bool:
    """A tensor of blocks 6-11 of GPT-2 small's 12: the upper half the strategies name."""
    parts = name.split(".")
    return parts[1] == "h" and int(parts[2]) >= 6


@pytest.mark.parametrize(
    ("strategy", "overrides", "trained"),
    [
        ("none", (), lambda n, p: p.numel()),
        ("late_attention", (), lambda n, p: 0 if _upper(n) and ".attn." in n else p.numel()),
        ("upper_qkv", (), lambda n, p: p.numel() if _upper(n) and n.endswith("attn.c_attn.weight") else 0),
        (
            "upper_qkv",
            ("qkv_parts=[k]",),
            lambda n, p: p.numel() // 3 if _upper(n) and n.endswith("attn.c_attn.weight") else 0,
        ),
        # The first trained tensor comes after its block's attention: that attention runs no backward.
        (
            "upper_qkv",
            ("trainable=['*.h.{layer}.mlp.*']",),
            lambda n, p: p.numel() if _upper(n) and ".mlp." in n else 0,
        ),
    ],
    ids=["full", "late_attention", "upper_qkv", "upper_qkv-k-only", "upper-mlp"],
)
def test_flops_of_gpt2_small_equal_the_counters(strategy, overrides, trained):
    """GPT-2 small's shape at T = 1024, the model the write-up's MFU is quoted for."""
    model = _meta_gpt2(GPT2Config())
    elements = {n: k for n, p in model.named_parameters() if (k := trained(n, p))}
    expected = _oracle_flops(model, elements, 1024)
    assert _gptft_flops(_meta_gpt2(GPT2Config()), strategy, *overrides) == expected
