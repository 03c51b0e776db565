"""freeze=lora: only the adapters train, the merged export equals the adapted model, exact resume after a SIGKILL,
the weight-change tracker follows W + BA, and bad LoRA settings stop with one line."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from safetensors.torch import load_file
from test_reliability import final_weights, start, train_losses, wait_for

PREFIX = "model.base_model.model."  # the task's `model`, then PEFT's PeftModel → LoraModel → the HF model


def lora_run_args(tiny_model_dir) -> tuple[str, ...]:
    # fp32 and adapter dropout on: exact resume must restore the dropout masks of the adapters too.
    return (
        "debug=fast",
        f"model.name_or_path={tiny_model_dir}",
        "freeze=lora",
        "freeze.rank=4",
        "freeze.dropout=0.1",
        "trainer.precision=32-true",
        "optim.lr=1e-2",
        "trainer.max_steps=12",
        "callbacks=weight_delta",
        "callbacks.checkpoint.every_n_train_steps=4",
        "eval.repeats=0",
    )


def metrics(run_dir) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def lora_run(run_ok, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "whole"
    run_ok(*lora_run_args(tiny_model_dir), f"hydra.run.dir={out}", timeout=600)
    return out


def test_only_the_adapters_train(lora_run, tiny_model_dir):
    base = load_file(tiny_model_dir / "model.safetensors")
    ckpt = torch.load(lora_run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    adapters = {k: v for k, v in ckpt["state_dict"].items() if ".lora_" in k}
    frozen = {
        k.removeprefix(PREFIX).replace(".base_layer", ""): v
        for k, v in ckpt["state_dict"].items()
        if k not in adapters
    }
    head = {"lm_head.weight"}  # tied to the embedding: saved once or twice, depending on the writer
    assert frozen.keys() - head == base.keys() - head  # every base weight, no more
    assert all(torch.equal(frozen[k], base[k]) for k in base if k in frozen)  # bit-identical after 12 steps
    # lora_B starts at zero: a nonzero one was trained. 2 blocks × (c_attn, attn c_proj, mlp c_proj) × (A, B).
    assert len(adapters) == 12 and all(v.abs().sum() > 0 for k, v in adapters.items() if "lora_B" in k)
    record = metrics(lora_run)
    assert record["status"] == "completed"
    assert (
        record["params"]["trainable"]
        == record["freeze"]["trainable"]
        == sum(v.numel() for v in adapters.values())
    )
    assert record["freeze"]["lora"]["target_modules"] == ["c_attn", "c_proj"]
    blocks = record["freeze"]["per_block"]
    assert blocks["h.0"]["trainable"] > 0 and blocks["h.1"]["trainable"] > 0
    assert blocks["wte"]["trainable"] == 0
    assert record["memory"]["train_peak_mb"] > 0
    assert record["after"]["ref_kl"] > 0 and "ref_loss" in record["before"]  # the forgetting probe ran too


def test_weight_tracker_follows_the_effective_weight(lora_run):
    header, *rows = [line.split(",") for line in (lora_run / "weight_delta.csv").read_text().splitlines()]
    # Named like the plain matrices; the base weights and the adapters' own A and B are not listed.
    assert header[1:] == [
        f"base_model.model.transformer.h.{i}.attn.{m}.weight" for i in (0, 1) for m in ("c_attn", "c_proj")
    ]
    assert len(rows) == 12 and all(float(v) > 0 for row in rows for v in row[1:])


def test_merged_hf_model_gives_the_adapted_models_logits(lora_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        base_logits = base(ids).logits
        adapted = PeftModel.from_pretrained(base, lora_run / "lora_adapter").eval()
        adapted_logits = adapted(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(lora_run / "hf_model").eval()
        merged_logits = merged(ids).logits
    assert type(merged).__name__ == "GPT2LMHeadModel"
    assert not any(".lora_" in k for k in merged.state_dict())
    assert torch.allclose(merged_logits, adapted_logits, atol=1e-5, rtol=1e-5)
    assert (merged_logits - base_logits).abs().max() > 1e-3  # the adapter did change the model


def test_sigkill_then_resume_matches_the_uninterrupted_run(
    lora_run, tiny_model_dir, run_ok, gptft_env, tmp_path
):
    killed = tmp_path / "killed"
    with open(tmp_path / "killed.log", "w") as log:
        proc = start(gptft_env, *lora_run_args(tiny_model_dir), f"hydra.run.dir={killed}", log=log)
        wait_for((killed / "checkpoints" / "last.ckpt").is_file, proc, timeout=300)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    saved = torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert 4 <= saved["global_step"] < 12
    run_ok(f"resume={killed}", timeout=600)
    assert metrics(killed)["status"] == "completed" and metrics(killed)["steps"] == 12
    resumed_losses, whole_losses = train_losses(killed), train_losses(lora_run)
    assert set(range(saved["global_step"], 12)) <= set(resumed_losses)
    assert all(resumed_losses[step] == whole_losses[step] for step in resumed_losses)
    whole, resumed = final_weights(lora_run), final_weights(killed)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole) and whole.keys() == resumed.keys()
    adapter = "adapter_model.safetensors"
    a, b = (load_file(run / "lora_adapter" / adapter) for run in (lora_run, killed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The starting model's distributions came back from the checkpoint.
    assert metrics(killed)["after"]["ref_kl"] == pytest.approx(metrics(lora_run)["after"]["ref_kl"], rel=1e-5)
    assert metrics(killed)["after"]["ref_loss"] == metrics(lora_run)["after"]["ref_loss"]


@pytest.mark.parametrize(
    ("override", "line"),
    [
        ("freeze.target_modules=[nope]", "freeze.target_modules=['nope'] matches no module"),
        ("freeze.rank=0", "freeze.rank=0 must be a whole number ≥ 1"),
    ],
    ids=["targets-match-nothing", "rank-0"],
)
def test_bad_lora_settings_stop_with_one_line(override, line, train_here):
    # In this process (tests/test_bad_input.py runs the command line's exit status and stderr line).
    from gptft.errors import ConfigError

    with pytest.raises(ConfigError) as error:
        train_here("debug=fast", "freeze=lora", override)
    assert str(error.value).startswith(line) and "\n" not in str(error.value)
