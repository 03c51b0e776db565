"""The configs compose as users type them (Hydra's compose API, no training)."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from gptft.config import validate
from gptft.errors import ConfigError

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=False)


def test_scratch_has_the_course_settings():
    cfg = _compose("experiment=scratch")
    assert (cfg.model.arch.n_layer, cfg.model.arch.n_embd, cfg.model.arch.n_head) == (12, 768, 12)
    assert cfg.model.arch.n_positions == 256 and cfg.model.name_or_path is None
    assert (cfg.data.batch_size, cfg.data.seq_len, cfg.data.split, cfg.data.test_fraction) == (
        16,
        256,
        "tail",
        0.1,
    )
    assert (cfg.optim.lr, cfg.optim.weight_decay) == (1e-3, 0.01)
    assert (cfg.trainer.max_steps, cfg.trainer.val_check_interval) == (501, 100)
    assert cfg.eval.prompts == ["The man-mountain shall not depart from our dominions"]
    assert cfg.eval.max_new_tokens == 100


def test_quickstart_is_the_small_model():
    cfg = _compose("experiment=quickstart")
    assert (cfg.model.arch.n_layer, cfg.model.arch.n_embd, cfg.model.arch.n_positions) == (4, 256, 128)
    assert cfg.data.seq_len <= cfg.model.arch.n_positions


def test_trainer_presets_override_the_experiment():
    cfg = _compose("experiment=scratch", "model=tiny", "trainer=smoke")
    assert cfg.trainer.max_steps == 20 and cfg.trainer.accelerator == "cpu"
    assert cfg.model.arch.n_layer == 2  # the command line beats the experiment's model choice
    assert _compose("experiment=scratch", "trainer=gpu").trainer.precision == "bf16-mixed"
    assert _compose("experiment=scratch", "trainer.max_steps=7").trainer.max_steps == 7


@pytest.mark.parametrize("name", ["gpt2", "gpt2-medium", "gpt2-large"])
def test_pretrained_model_configs(name):
    cfg = _compose(f"model={name}")
    assert cfg.model.name_or_path == name and cfg.model.arch is None


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=0", "optim.lr=0 must be > 0"),
        ("optim.lr=-1e-4", "optim.lr=-0.0001 must be > 0"),
        ("optim.lr=fast", "optim.lr='fast' is not a number"),
        ("data.batch_size=0", "data.batch_size=0 must be a whole number"),
        ("data.test_fraction=1.5", "data.test_fraction=1.5 must be strictly between 0 and 1"),
        ("optim.lr=inf", "optim.lr=inf is not a finite number"),
        ("schedule.name=linear", "schedule.name=linear is unknown: use one of constant, cosine"),
        ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches=0 must be a whole number ≥ 1"),
        ("eval.repeats=1.5", "eval.repeats=1.5 must be a whole number ≥ 0"),
        ("+data.max_length=0", "data.max_length=0 must be a whole number ≥ 1"),
        ("ckpt_path=/no/such.ckpt", "ckpt_path=/no/such.ckpt does not exist"),
        ("trainer=fsdp freeze.qkv_parts=[k]", "freeze.qkv_parts=['k'] masks gradients with hooks"),
        ("trainer.max_steps=-1", "trainer.max_steps=-1 must be a whole number"),
    ],
)
def test_bad_settings_are_named(override, message):
    cfg = _compose("experiment=quickstart", *override.split())
    with pytest.raises(
        ConfigError, match=message.replace(".", r"\.").replace("(", r"\(").replace("[", r"\[")
    ):
        validate(cfg)


def test_every_experiment_validates():
    for path in Path(CONF, "experiment").glob("*.yaml"):
        validate(_compose(f"experiment={path.stem}"))
    assert OmegaConf.select(_compose(), "experiment_name") == "default"


def test_every_schema_setting_is_a_real_key():
    """The schema names keys that exist: each appears in some experiment or data option."""
    from gptft.config import SCHEMA

    configs = [_compose(f"experiment={p.stem}") for p in Path(CONF, "experiment").glob("*.yaml")]
    configs += [
        _compose(f"{group}={p.stem}")
        for group in ("data", "schedule", "freeze")
        for p in Path(CONF, group).glob("*.yaml")
    ]
    for setting in SCHEMA:
        assert any(OmegaConf.select(c, setting.key) is not None for c in configs), setting.key


def test_renamed_settings_are_refused_in_a_config_and_read_in_a_saved_run():
    from gptft.config import RENAMED, migrate_renamed

    old = _compose("experiment=quickstart")  # as a run's .hydra/config.yaml from before the renames
    with open_dict(old):
        old.eval.seeds, old.model.loss_chunk, old.model.tf32 = (
            old.eval.pop("repeats"),
            old.task.pop("loss_chunk"),
            True,
        )
    with pytest.raises(ConfigError, match=r"^eval\.seeds is now eval\.repeats: rename it"):
        validate(old)  # a user's own experiment file that still says eval.seeds
    assert migrate_renamed(old) == ["eval.seeds", "model.loss_chunk", "model.tf32"]
    assert (old.eval.repeats, old.task.loss_chunk, old.trainer.tf32) == (3, 512, True)
    assert all(OmegaConf.select(old, key) is None for key in RENAMED)
    validate(old)
