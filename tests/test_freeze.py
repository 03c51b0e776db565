"""The targeted-freezing study: strategies, the weight-change tracker, and the paired A/B run."""

import json

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from gptft.errors import ConfigError
from gptft.models import build_model
from gptft.tasks.freezing import apply_freeze

from conftest import REPO


def _strategy(name: str, *overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return dict(compose("config", overrides=[f"freeze={name}", *overrides]).freeze)


@pytest.fixture
def tiny(tiny_model_dir):
    return build_model(name_or_path=str(tiny_model_dir))  # 2 blocks: the upper half is block 1


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_upper_qkv_trains_exactly_the_upper_qkv_weights(tiny):
    report = apply_freeze(tiny, **_strategy("upper_qkv"))
    assert _trainable(tiny) == {"transformer.h.1.attn.c_attn.weight"}
    assert tiny.lm_head.weight.requires_grad is False  # tied to the frozen embedding
    assert report["trainable"] == 64 * 192 and report["per_block"]["h.1"]["trainable"] == 64 * 192
    assert report["trainable"] + report["frozen"] == sum(p.numel() for p in tiny.parameters())


def test_late_attention_freezes_exactly_the_upper_attention(tiny):
    apply_freeze(tiny, **_strategy("late_attention"))
    frozen = {n for n, p in tiny.named_parameters() if not p.requires_grad}
    assert frozen == {
        f"transformer.h.1.attn.{m}.{w}" for m in ("c_attn", "c_proj") for w in ("weight", "bias")
    }


def test_none_trains_everything(tiny):
    apply_freeze(tiny, **_strategy("none"))
    assert _trainable(tiny) == {n for n, _ in tiny.named_parameters()}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["freeze.trainable=[nothing.like.this]"],
            r"freeze.trainable=\['nothing.like.this'\] matches no parameter",
        ),
        (["freeze.frozen=[*]"], "leaves nothing trainable"),
        (["freeze.layers=[5]"], r"\[5\] beyond the model's 2 blocks"),
        (["freeze.layers=middle"], "freeze.layers=middle is unknown"),
        (["freeze.qkv_parts=[x]"], "use a non-empty subset of"),
    ],
)
def test_bad_strategies(tiny, overrides, message):
    with pytest.raises(ConfigError, match=message):
        apply_freeze(tiny, **_strategy("upper_qkv", *overrides))


def test_key_only_masks_the_query_and_value_thirds(tiny):
    report = apply_freeze(tiny, **_strategy("upper_qkv", "freeze.qkv_parts=[k]"))
    weight = tiny.transformer.h[1].attn.c_attn.weight  # GPT-2 Conv1D: (d, 3d), columns q | k | v
    tiny(torch.randint(0, 50257, (2, 16))).logits.sum().backward()
    assert weight.grad[:, :64].abs().sum() == 0 and weight.grad[:, 128:].abs().sum() == 0
    assert weight.grad[:, 64:128].abs().sum() > 0
    assert report["no_decay"] == ["transformer.h.1.attn.c_attn.weight"]  # decay would move the frozen thirds
    # The count is of the elements that train (tests/oracle/test_oracle_weights.py: those a run changes).
    assert report["trainable"] == report["per_block"]["h.1"]["trainable"] == 64 * 64
    assert report["trainable"] + report["frozen"] == sum(p.numel() for p in tiny.parameters())



def test_key_only_mask_follows_the_parameter_when_the_model_moves(tiny):
    """The mask is set up on the CPU in fp32, before Lightning moves the model (to a GPU, in bf16): it must follow
    the parameter. On the CPU a dtype change stands in for the device (a 0/1 fp32 mask made at set-up turned the
    bf16 gradient into fp32, which autograd refuses; the meta device cannot stand in: torch lets a meta gradient
    take a CPU mask)."""
    apply_freeze(tiny, **_strategy("upper_qkv", "freeze.qkv_parts=[k]"))
    tiny.to(torch.bfloat16)
    weight = tiny.transformer.h[1].attn.c_attn.weight
    tiny(torch.randint(0, 50257, (2, 16))).logits.float().sum().backward()
    assert weight.grad.dtype == torch.bfloat16
    assert weight.grad[:, :64].abs().sum() == 0 and weight.grad[:, 128:].abs().sum() == 0
    assert weight.grad[:, 64:128].abs().sum() > 0


@pytest.fixture(scope="module")
def paired(run_ok, tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("freeze")
    run_ok(
        "experiment=freeze_attention",
        f"model.name_or_path={tiny_model_dir}",
        "trainer.max_steps=10",
        "data.batch_size=4",
        "data.seq_len=64",
        "data.val_windows=8",
        "eval.max_new_tokens=20",
        "eval.repeats=1",
        f"hydra.sweep.dir={folder}",
    )
    a, b = sorted(p for p in folder.iterdir() if p.name[0].isdigit())
    return folder, a, b


def test_frozen_weights_are_bit_identical_after_training(paired, tiny_model_dir):
    _, a, b = paired
    start = load_file(tiny_model_dir / "model.safetensors")
    after_b = load_file(b / "hf_model/model.safetensors")
    changed = {name for name in start if not torch.equal(start[name], after_b[name])}
    assert changed == {"transformer.h.1.attn.c_attn.weight"}
    after_a = load_file(a / "hf_model/model.safetensors")
    assert len({name for name in start if not torch.equal(start[name], after_a[name])}) > 10


def test_a_and_b_saw_the_same_batches(paired):
    _, a, b = paired
    ma, mb = (json.loads((p / "metrics.json").read_text()) for p in (a, b))
    assert ma["data_fingerprint"] == mb["data_fingerprint"]
    assert ma["freeze"]["strategy"] == "none" and mb["freeze"]["strategy"] == "upper_qkv"
    assert mb["params"]["trainable"] == mb["freeze"]["trainable"] == 64 * 192 < ma["params"]["trainable"]
    assert ma["time"]["median_step_s"] > 0


def test_tracker_records_every_step_and_frozen_weights_do_not_move(paired):
    _, a, b = paired
    header, *rows = (b / "weight_delta.csv").read_text().splitlines()
    names = header.split(",")[1:]
    assert len(names) == 4 and len(rows) == 10  # c_attn and c_proj weights of 2 blocks, 10 steps
    for row in rows:
        values = dict(zip(names, map(float, row.split(",")[1:]), strict=True))
        assert values["transformer.h.1.attn.c_attn.weight"] > 0
        assert all(v == 0 for n, v in values.items() if n != "transformer.h.1.attn.c_attn.weight")


def test_paired_report(paired):
    folder, _, _ = paired
    for png in ("loss.png", "style_ratio.png", "loss_b_vs_a.png", "weight_delta.png"):
        assert (folder / "report" / png).is_file(), png
    summary = (folder / "report/summary.md").read_text()
    assert "saving r = (T_A − T_B) / T_A" in summary and "A and B trained on the same batches" in summary
    assert "| freeze=none |" in summary and "| freeze=upper_qkv |" in summary


# ‖ΔW‖ per step against the checkpoints' weights, in fp64: tests/oracle/test_oracle_weights.py.


def test_the_same_strategy_works_for_gpt_neo():
    """The course's model family: q_proj/k_proj/v_proj instead of GPT-2's fused c_attn."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "gpt_neo",
        num_layers=2,
        hidden_size=64,
        num_heads=2,
        attention_types=[[["global", "local"], 1]],
        vocab_size=50257,
        max_position_embeddings=256,
        window_size=32,
    )
    neo = AutoModelForCausalLM.from_config(config)
    apply_freeze(neo, **_strategy("upper_qkv"))
    assert _trainable(neo) == {f"transformer.h.1.attn.attention.{p}_proj.weight" for p in "qkv"}
    apply_freeze(neo, **_strategy("late_attention"))
    assert {n for n, p in neo.named_parameters() if not p.requires_grad} == {
        n for n, _ in neo.named_parameters() if n.startswith("transformer.h.1.attn.")
    }
