"""End to end through Hydra, as a user runs it: `python -m gptft.run ...` in a subprocess."""

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM

SMOKE = (
    "experiment=scratch",
    "model=tiny",
    "trainer=smoke",
    "data.batch_size=4",
    "data.seq_len=64",
    "data.val_windows=8",
    "eval.max_new_tokens=30",
)


@pytest.fixture(scope="module")
def scratch_run(run_ok, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "scratch"
    result = run_ok(*SMOKE, f"hydra.run.dir={out}")
    return out, result


def _scalars(run_dir):
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_scratch_smoke_run_writes_every_output(scratch_run):
    out, result = scratch_run
    for path in (
        "metrics.json",
        "checkpoints/last.ckpt",
        "hf_model/config.json",
        "hf_model/model.safetensors",
        "hf_model/tokenizer.json",
        "samples/before.txt",
        "samples/after.txt",
        ".hydra/config.yaml",
    ):
        assert (out / path).is_file(), path
    assert str(out) in result.stdout + result.stderr  # it says where the outputs went
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["seed"] == 1337 and metrics["steps"] == 20
    assert metrics["params"]["total"] == metrics["params"]["trainable"] > 3_000_000
    assert metrics["config"]["optim"]["lr"] == 1e-3
    assert metrics["time"]["tokens_per_s"] > 0 and metrics["time"]["fit_s"] > 0
    assert metrics["tokens_trained"] == 20 * 4 * 64


def test_scratch_smoke_run_learns(scratch_run):
    metrics = json.loads((scratch_run[0] / "metrics.json").read_text())
    assert metrics["train"]["loss_first"] > 10.5  # ln(50257) ≈ 10.8 at random init
    assert metrics["train"]["loss_last10_mean"] < metrics["train"]["loss_first"] - 0.5
    assert metrics["after"]["val_loss"] < metrics["before"]["val_loss"] - 0.5
    assert metrics["after"]["val_ppl"] == pytest.approx(
        torch.tensor(metrics["after"]["val_loss"]).exp().item()
    )


def test_tensorboard_has_the_curves_and_samples(scratch_run):
    acc = _scalars(scratch_run[0])
    tags = acc.Tags()
    assert {"train/loss", "val/loss", "val/ppl", "lr"} <= set(tags["scalars"])
    assert len(acc.Scalars("train/loss")) == 20
    assert [e.step for e in acc.Scalars("val/loss")][0] == 0  # the before-training point
    assert {"samples/before/text_summary", "samples/after/text_summary"} <= set(tags["tensors"])


def test_samples_continue_the_prompt(scratch_run):
    before = (scratch_run[0] / "samples/before.txt").read_text()
    assert "The man-mountain shall not depart from our dominions" in before


def test_checkpoint_and_exported_model(scratch_run):
    out = scratch_run[0]
    ckpt = torch.load(
        out / "checkpoints/last.ckpt", weights_only=True, map_location="cpu"
    )  # as Lightning resumes
    assert ckpt["global_step"] == 20
    assert not any(k.startswith("_orig_mod") or "._orig_mod." in k for k in ckpt["state_dict"])
    model = AutoModelForCausalLM.from_pretrained(out / "hf_model")
    assert model.config.n_layer == 2
    assert torch.equal(model.transformer.wte.weight, ckpt["state_dict"]["model.transformer.wte.weight"])


def test_finetune_a_saved_model_through_name_or_path(scratch_run, run_ok, tmp_path):
    """The pretrained path: a scratch run's hf_model is what `model.name_or_path=` fine-tunes offline."""
    first = json.loads((scratch_run[0] / "metrics.json").read_text())
    out = tmp_path / "finetune"
    run_ok(
        *SMOKE,
        f"model.name_or_path={scratch_run[0] / 'hf_model'}",
        "optim.lr=1e-4",
        "trainer.max_steps=5",
        f"hydra.run.dir={out}",
    )
    second = json.loads((out / "metrics.json").read_text())
    # Same test windows: the loaded model starts exactly where the first run ended (not from random init).
    assert second["before"]["val_loss"] == pytest.approx(first["after"]["val_loss"], rel=1e-5)
