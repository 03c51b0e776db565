"""Every number what it claims: the loss of a step under gradient accumulation and DDP, metrics.json against
TensorBoard, the final checkpoint, and what a resume may change."""

from __future__ import annotations

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

# Question/answer rows of different lengths with the question masked: micro-batches and ranks hold different
# numbers of labelled tokens, which a mean of per-micro-batch means would weigh wrongly. Dropout off and fp32,
# so the three ways of cutting one batch of 8 must give the same weights. eps=1 makes AdamW's first steps
# nearly linear in the gradient (update ≈ lr·g), so a wrongly weighted gradient shows in the weights.
QA = (
    "debug=fast",
    "data=gsm8k",
    "data.max_length=48",
    "+model.arch.resid_pdrop=0.0",
    "+model.arch.embd_pdrop=0.0",
    "+model.arch.attn_pdrop=0.0",
    "trainer.precision=32-true",
    "optim.lr=1e-2",
    "optim.eps=1.0",
    "optim.weight_decay=0.0",
    "trainer.max_steps=3",
    "trainer.val_check_interval=3",
    "callbacks.checkpoint.every_n_train_steps=2",  # a periodic save at step 2, the end at step 3
    "eval.repeats=0",
    "eval.max_new_tokens=4",
)
WAYS = {
    "one batch of 8": ("data.batch_size=8",),
    "accumulation 4 × 2": ("data.batch_size=2", "trainer.accumulate_grad_batches=4"),
    "2 ranks × 4": ("data.batch_size=4", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"),
}


@pytest.fixture(scope="module")
def ways(run_ok, tmp_path_factory):
    root = tmp_path_factory.mktemp("ways")
    runs = {name: root / f"way{i}" for i, name in enumerate(WAYS)}
    for name, overrides in WAYS.items():  # trainer.precision=32-true applies after trainer=ddp's bf16 preset
        run_ok(*QA, *overrides, f"hydra.run.dir={runs[name]}", timeout=600)
    return runs


def checkpoint(run) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def scalars(run, tag: str) -> list[tuple[int, float]]:
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_accumulation_and_ranks_train_exactly_as_one_batch(ways):
    reference = checkpoint(ways["one batch of 8"])["state_dict"]
    for name in ("accumulation 4 × 2", "2 ranks × 4"):
        weights = checkpoint(ways[name])["state_dict"]
        assert weights.keys() == reference.keys()
        for key in reference:  # the same sums in another order: equal to float rounding
            torch.testing.assert_close(
                weights[key], reference[key], rtol=1e-5, atol=1e-6, msg=f"{name}: {key}"
            )
    # The logged loss is the step's loss over every micro-batch and rank: the one batch's loss.
    losses = {name: scalars(run, "train/loss") for name, run in ways.items()}
    for name, curve in losses.items():
        assert [s for s, _ in curve] == [0, 1, 2], name
        assert [v for _, v in curve] == pytest.approx([v for _, v in losses["one batch of 8"]], rel=1e-5), (
            name
        )


def test_tokens_are_the_labelled_ones_of_all_ranks(ways):
    tokens = {
        name: json.loads((run / "metrics.json").read_text())["tokens_trained"] for name, run in ways.items()
    }
    assert len(set(tokens.values())) == 1, tokens
    # Fewer than the padded 3 × 8 × 47 positions: the questions and the padding carry no label.
    assert 0 < tokens["one batch of 8"] < 3 * 8 * 47


def test_metrics_json_and_tensorboard_agree(ways):
    for name, run in ways.items():
        record = json.loads((run / "metrics.json").read_text())
        curve = [v for _, v in scalars(run, "train/loss")]
        assert record["train"]["loss_first"] == pytest.approx(curve[0], rel=1e-6), name
        assert record["train"]["loss_last"] == pytest.approx(curve[-1], rel=1e-6), name
        assert record["train"]["loss_last10_mean"] == pytest.approx(sum(curve) / len(curve), rel=1e-6), name
        val = scalars(run, "val/loss")
        assert val[0][1] == pytest.approx(record["before"]["val_loss"], rel=1e-6), name
        assert val[-1][1] == pytest.approx(record["after"]["val_loss"], rel=1e-6), name


def test_last_checkpoint_holds_the_final_step(ways):
    for name, run in ways.items():
        assert checkpoint(run)["global_step"] == 3, name  # saved at 2 by the interval, and at the end


@pytest.mark.parametrize(
    "override",
    ["data.seed=3", "freeze=upper_qkv", "data.seq_len=32", "optim.lr=1e-3", "data.batch_size=4",
     "eval.reference=2701", "callbacks.reference.windows=4"],  # the probe's starting distributions belong to them
)  # fmt: skip
def test_resume_refuses_what_would_change_the_run(ways, override):
    from omegaconf import OmegaConf

    from gptft.config import resumed_config
    from gptft.errors import ConfigError

    run = ways["one batch of 8"]
    with pytest.raises(
        ConfigError, match=r"^resume= continues a run exactly, so (\S+) cannot apply"
    ) as error:
        resumed_config(OmegaConf.create({"resume": str(run)}), [f"resume={run}", override])
    assert override in str(error.value)
    allowed = resumed_config(
        OmegaConf.create({"resume": str(run)}), ["trainer.max_steps=5", "eval.repeats=1"]
    )
    assert (allowed.trainer.max_steps, allowed.eval.repeats, allowed.ckpt_path) == (
        5,
        1,
        str(run / "checkpoints/last.ckpt"),
    )


def test_a_refused_resume_is_one_line_and_writes_nothing(ways, run_gptft):
    run = ways["one batch of 8"]
    before = (run / "metrics.json").read_bytes()
    result = run_gptft(f"resume={run}", "seed=2")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("gptft: error: resume= continues a run exactly") and "seed=2" in line
    assert (run / "metrics.json").read_bytes() == before  # nothing written
