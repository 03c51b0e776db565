"""The KL-target study: target distributions, the loss, and a real learning signal on the tiny model."""

import json

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gptft.errors import ConfigError
from gptft.models import build_model
from gptft.tasks import KLTarget, matching_ids, target_distribution
from gptft.tasks.targets import token_strings

OPTIM = {"lr": 1e-3, "weight_decay": 0.01}


def test_x_target_is_uniform_over_the_897_x_tokens():
    p, ids = target_distribution("x")
    assert len(ids) == 897 and 50256 in ids.tolist()  # "<|endoftext|>" contains an x, as in the course
    assert p.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(p[ids], torch.full((897,), 1 / 897))
    outside = torch.ones_like(p, dtype=torch.bool)
    outside[ids] = False
    assert p[outside].sum() == 0
    assert all("x" in token_strings()[i] for i in ids.tolist())


def test_case_and_alpha_beta():
    assert len(matching_ids("x", ignore_case=True)) > len(matching_ids("x"))
    p, ids = target_distribution("x", mass=None, alpha=3.0, beta=1.0)
    other = 0 if 0 not in ids.tolist() else 1
    assert p[ids[0]] / p[other] == pytest.approx(3.0)
    assert p.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_mass_is_the_matches_total_probability():
    p, ids = target_distribution("x", mass=0.9)
    assert p[ids].sum().item() == pytest.approx(0.9, abs=1e-5) and p.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert (p[ids] == p[ids[0]]).all() and p[ids[0]] == p.max()  # even over the matches; the rest share 0.1
    # The write-up's per-token α 0.9, β 0.1 puts n·α / (n·α + (V − n)·β) on the 897 x tokens: about 14%.
    per_token, _ = target_distribution("x", mass=None, alpha=0.9, beta=0.1)
    assert per_token[ids].sum().item() == pytest.approx(897 * 0.9 / (897 * 0.9 + (50257 - 897) * 0.1), abs=1e-5)
    assert 0.13 < per_token[ids].sum().item() < 0.15


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"pattern": "x("}, "is not a valid regular expression"),
        ({"pattern": "zzzzzzzzzz"}, "matches no token"),
        ({"pattern": ".*"}, "matches every token"),
        ({"pattern": "x", "mass": None, "alpha": 1.0, "beta": 1.0}, "need alpha > beta ≥ 0"),
        ({"pattern": "x", "mass": None, "alpha": 1.0, "beta": -0.5}, "need alpha > beta ≥ 0"),
        ({"pattern": "x", "alpha": 0.9, "beta": 0.1}, "two ways to say the same"),
        ({"pattern": "x", "mass": 0.0}, "must be in"),
    ],
)
def test_bad_targets(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("*", r"\*")):
        target_distribution(**kwargs)


def test_loss_equals_a_hand_computation(tiny_model_dir):
    task = KLTarget(
        build_model(name_or_path=str(tiny_model_dir)).eval(),
        OPTIM,
        {"name": "constant"},
        {"pattern": "x", "mass": None, "alpha": 2.0, "beta": 0.5},
    )
    x = torch.randint(0, 50257, (2, 8), generator=torch.Generator().manual_seed(0))
    loss, extras = task.compute_loss((x, x))
    q = F.softmax(task.model(x).logits.double(), -1).reshape(16, -1)
    p = task.p_target.double()
    by_hand = (p * (p.log() - q.log())).sum(-1).mean()  # mean over all B·T positions
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-4)
    assert extras["target_mass"].item() == pytest.approx(
        q[:, task.target_ids].sum(-1).mean().item(), rel=1e-4
    )


def test_kl_x_run_raises_target_mass_and_x_ratio(run_ok, tiny_model_dir, tmp_path):
    """A real learning signal: 20 steps at a high lr move the tiny model's mass onto the x tokens."""
    sweep = tmp_path / "kl"
    run_ok(
        "experiment=kl_x",
        f"model.name_or_path={tiny_model_dir}",
        "trainer.max_steps=20",
        "optim.lr=1e-2",
        "eval.max_new_tokens=30",
        "eval.repeats=2",
        "data.val_windows=8",
        f"hydra.sweep.dir={sweep}",
    )
    run = next(sweep.glob("0_*"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["config"]["task"]["target"]["pattern"] == "x"
    assert "val_ppl" not in metrics["after"]  # a KL divergence has no perplexity
    assert metrics["after"]["val_loss"] < metrics["before"]["val_loss"]
    assert metrics["after"]["target_ratio"]["mean"] > metrics["before"]["target_ratio"]["mean"] + 0.2
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    mass = [e.value for e in acc.Scalars("train/target_mass")]
    assert len(mass) == 20 and mass[-1] > 10 * mass[0]
    assert (sweep / "report/target_ratio.png").is_file()
    summary = (sweep / "report/summary.md").read_text()
    assert "target ratio before → after" in summary and "Why did the chicken cross the road?" in summary


def test_random_token_source(data_dir):
    from gptft.data import BookWindows

    dm = BookWindows(data_dir=str(data_dir), seq_len=64, batch_size=4, source="random_tokens", seed=3)
    dm.setup("fit")
    a, b = dm.train_sampler.batch(0), dm.train_sampler.batch(0)
    assert a[0].shape == (4, 64) and torch.equal(a[0], b[0])
    assert not torch.equal(a[0], dm.train_sampler.batch(1)[0])
    assert a[0].max() < 50257
    with pytest.raises(ConfigError, match="data.source=web is unknown"):
        BookWindows(data_dir=str(data_dir), source="web").setup("fit")
