"""Speed and scale settings, run on the CPU: DDP over 2 processes, bf16 with torch.compile, the FLOPs count,
the throughput monitor, and the GPU presets as they compose."""

import json
import re

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.strategies import ModelParallelStrategy
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM

from gptft.data import BookWindows
from gptft.data.windows import RandomTokens
from gptft.models import build_model
from gptft.models.flops import flops_per_token, model_flops_per_token

from conftest import REPO, SMALL_BF16

# The tiny model (tests/conftest.py): 2 blocks, d 64, 4 × d MLP, context 256, GPT-2's 50,257-word vocabulary.
TINY_WTE = 50257 * 64
TINY_BLOCK = (
    2 * 64 + (64 * 192 + 192) + (64 * 64 + 64) + 2 * 64 + (64 * 256 + 256) + (256 * 64 + 64)
)  # 49,984
TINY_N = TINY_WTE + 2 * TINY_BLOCK + 2 * 64  # + ln_f; wpe (256 × 64) left out: 3,316,544
# Block 0 frozen with the embeddings below it training: its weights pass gradients down (4 FLOPs), the rest
# trains (6), attention runs backward in both blocks.
TINY_FLOPS_BLOCK0_FROZEN = 6 * (TINY_N - TINY_BLOCK) + 4 * TINY_BLOCK + 12 * 2 * 64 * 64  # 19,897,600


def test_flops_per_token_of_gpt2_small_by_hand():
    # GPT-2 small: 124,439,808 parameters, of which wpe 1024 × 768 = 786,432 are left out.
    n = 124_439_808 - 786_432
    assert flops_per_token(n, 0, 0, n_layer=12, d_model=768, seq_len=1024) == 6 * n + 12 * 12 * 768 * 1024
    assert flops_per_token(n, 0, 0, 12, 768, 1024) == 855_166_464  # ≈ 0.86 GFLOP per token, as PaLM counts
    # Nothing trained: the forward pass alone, 2N + 4·L·d·T.
    assert flops_per_token(0, 0, n, 12, 768, 1024, n_layer_backward=0) == 2 * n + 4 * 12 * 768 * 1024


def test_flops_of_the_tiny_model_as_it_is_frozen(tiny_model_dir):
    model = build_model(name_or_path=str(tiny_model_dir))
    assert TINY_N == 3_316_544 == sum(p.numel() for n, p in model.named_parameters() if "wpe" not in n)
    assert model_flops_per_token(model, 64) == 6 * TINY_N + 12 * 2 * 64 * 64 == 19_997_568
    # Train only block 1's q/k/v: block 0 and block 1's first LayerNorm see no backward (2 FLOPs per weight),
    # the rest of block 1, the final norm and the tied output layer pass gradients down (4), c_attn's bias trains
    # (6), its weight too but its input carries no gradient (4); attention runs backward in block 1 only.
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith("transformer.h.1.attn.c_attn.")
    first, trained, forward_only = 64 * 192, 192, TINY_BLOCK + 2 * 64
    frozen_backward = TINY_N - first - trained - forward_only
    expected = 6 * trained + 4 * (first + frozen_backward) + 2 * forward_only + (4 * 2 + 8 * 1) * 64 * 64
    assert model_flops_per_token(model, 64) == expected == 13_231_872
    # Block 0 frozen, everything else trains: the token embedding is the output layer too, but as the input
    # lookup it still needs gradients through block 0.
    for name, p in model.named_parameters():
        p.requires_grad = not name.startswith("transformer.h.0.")
    assert model_flops_per_token(model, 64) == TINY_FLOPS_BLOCK0_FROZEN == 19_897_600


# The count against torch's FlopCounterMode, exactly, with its convention stated: tests/oracle/test_oracle_weights.py.


def test_each_rank_draws_its_slice_of_one_global_batch(data_dir):
    data = BookWindows(seq_len=64, batch_size=4, seed=7, data_dir=str(data_dir))
    data.setup("fit")
    sampler = data.train_sampler
    single = sampler.starts(3)
    sampler.batch_size = 8  # one process, twice the batch: the reference union
    union = sampler.starts(3)
    sampler.batch_size, sampler.world_size = 4, 2
    per_rank = []
    for rank in (0, 1):
        sampler.rank = rank
        per_rank.append(sampler.starts(3))
    assert torch.equal(torch.cat(per_rank), union)
    assert torch.equal(per_rank[0], single)  # rank 0 of 2 trains what a single process at batch 4 trains
    assert not torch.equal(per_rank[0], per_rank[1])
    sampler.rank = 1
    assert not torch.equal(sampler.starts(4), per_rank[1])  # and each step differs

    tokens = [RandomTokens(8, 2, seed=7) for _ in range(3)]
    tokens[0].batch_size = 4
    for rank in (1, 2):
        tokens[rank].rank, tokens[rank].world_size = rank - 1, 2
    assert torch.equal(torch.cat([tokens[1].batch(5)[0], tokens[2].batch(5)[0]]), tokens[0].batch(5)[0])


# Two CPU processes (gloo), 4 steps. Block 0 is frozen, so the runs also show that frozen weights stay put,
# and the weight-change tracker follows every attention matrix; the embeddings, tied to the head, train.
# fp32: the DDP and FSDP runs are compared to 1e-6 (tests/README.md); trainer=ddp's own bf16-mixed is its config's
# (test_gpu_presets_are_settings below), and bf16 reduced in other orders differs at 1e-4 on CPUs with AMX.
PARALLEL = (
    "debug=fast",
    "trainer.precision=32-true",
    "trainer.accelerator=cpu",
    "trainer.devices=2",
    "trainer.max_steps=4",
    "eval.repeats=1",
    "eval.free_prompts=2",
    "callbacks=weight_delta",
    "callbacks.throughput.window=2",
    "callbacks.throughput.peak_flops=1e12",
    "freeze.frozen=[transformer.h.0.*]",
)


@pytest.fixture(scope="module")
def ddp_run(run_ok, tmp_path_factory):
    """trainer=ddp on PARALLEL: (run folder, the process's stdout + stderr)."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    result = run_ok(*PARALLEL, "trainer=ddp", f"hydra.run.dir={out}", timeout=240)
    return out, result.stdout + result.stderr


def _weights(run) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def test_ddp_on_two_cpu_processes(ddp_run, data_dir):
    out, log = ddp_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["steps"] == 4
    assert metrics["precision"] == "32-true"  # asked for after trainer=ddp's preset, which it overrides
    assert (out / "hf_model" / "model.safetensors").is_file() and (
        out / "checkpoints" / "last.ckpt"
    ).is_file()

    # Each rank logged the first tokens of its slice of batch 0; together they are one process's batch of 8.
    seen = dict(re.findall(r"rank (\d) of 2 \(first batch's first tokens (\[[\d, ]+\])\)", log))
    assert set(seen) == {"0", "1"} and seen["0"] != seen["1"]
    data = BookWindows(seq_len=64, batch_size=8, seed=1337, data_dir=str(data_dir))
    data.setup("fit")
    assert json.loads(seen["0"]) + json.loads(seen["1"]) == data.train_sampler.batch(0)[0][:, 0].tolist()

    # Tokens of both ranks (every window token carries a label): 4 steps × 2 ranks × 4 rows × 64.
    assert metrics["tokens_trained"] == 4 * 2 * 4 * 64 and "tokens_per_s" not in metrics["perf"]
    # The throughput monitor: the tiny model's FLOPs at T = 64, an MFU per device from peak_flops.
    perf = metrics["perf"]
    assert perf["flops_per_token"] == TINY_FLOPS_BLOCK0_FROZEN and perf["windows"] == 2
    assert perf["peak_flops"] == 1e12
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert {"perf/tokens_per_s", "perf/samples_per_s", "perf/mfu"} <= set(acc.Tags()["scalars"])
    assert len(acc.Scalars("perf/mfu")) == 2  # one point per window of 2 steps
    windows = [acc.Scalars(f"perf/{k}") for k in ("tokens_per_s", "samples_per_s", "mfu")]
    for tokens, samples, mfu in zip(*windows, strict=True):
        assert samples.value * 64 == pytest.approx(tokens.value, rel=1e-3)  # both over the 2 ranks
        assert mfu.value == pytest.approx(tokens.value / 2 * TINY_FLOPS_BLOCK0_FROZEN / 1e12, rel=1e-3)


def test_fsdp_shards_trains_as_ddp_does_and_resumes(ddp_run, run_ok, tmp_path):
    # trainer=fsdp for 2 steps, then resume=<run> to 4: every step must match trainer=ddp's 4 steps.
    out = tmp_path / "fsdp"
    first = run_ok(
        *PARALLEL,
        "trainer=fsdp",
        "trainer.max_steps=2",
        "callbacks.checkpoint.every_n_train_steps=2",
        f"hydra.run.dir={out}",
        timeout=240,
    )
    # Each rank holds its half of every tensor (rows split, rank 0 takes the odd one out).
    held = dict(re.findall(r"rank (\d) holds (\d+) of 3332928 parameters", first.stdout + first.stderr))
    assert set(held) == {"0", "1"} and int(held["0"]) + int(held["1"]) == 3332928
    assert all(abs(int(n) - 3332928 / 2) < 1000 for n in held.values()), held
    step2 = load_file(out / "hf_model" / "model.safetensors")  # resuming replaces hf_model/
    run_ok(f"resume={out}", "trainer.max_steps=4", timeout=240)

    ddp, _ = ddp_run
    metrics, reference = (json.loads((run / "metrics.json").read_text()) for run in (out, ddp))
    assert metrics["status"] == "completed" and metrics["steps"] == 4
    fsdp_weights, ddp_weights = _weights(out), _weights(ddp)
    assert fsdp_weights.keys() == ddp_weights.keys()
    for name, tensor in ddp_weights.items():  # the same sums of the same gradients, reduced another way
        torch.testing.assert_close(fsdp_weights[name], tensor, rtol=0, atol=1e-6, msg=name)
    # The root unit (embeddings = head) and block 1 trained after the resume; block 0 is frozen.
    assert not torch.equal(fsdp_weights["model.transformer.wte.weight"], step2["transformer.wte.weight"])
    assert not torch.equal(
        fsdp_weights["model.transformer.h.1.mlp.c_fc.weight"], step2["transformer.h.1.mlp.c_fc.weight"]
    )
    for name in [n for n in ddp_weights if n.startswith("model.transformer.h.0.")]:  # frozen: never touched
        assert torch.equal(fsdp_weights[name], step2[name.removeprefix("model.")]), name

    # The probes ran on every rank (a rank-0-only probe would hang on the sharded weights) and measured the
    # same model; the tracker summed the ranks' shards of every matrix into whole-matrix norms.
    assert metrics["after"]["val_loss"] == pytest.approx(reference["after"]["val_loss"], abs=1e-4)
    assert metrics["after"]["val_loss"] < metrics["before"]["val_loss"]
    rows = {run: (run / "weight_delta.csv").read_text().splitlines() for run in (out, ddp)}
    assert rows[out][0] == rows[ddp][0] and len(rows[out][0].split(",")) == 5  # step + 4 attention matrices
    # steps 1-4, across the resume
    for resumed, reference_row in zip(rows[out][1:], rows[ddp][1:], strict=True):
        assert [float(v) for v in resumed.split(",")] == pytest.approx(
            [float(v) for v in reference_row.split(",")], rel=1e-4, abs=1e-9
        )

    # hf_model/ holds the gathered weights as a plain GPT-2 that from_pretrained loads.
    config = json.loads((out / "hf_model" / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"]
    reloaded = AutoModelForCausalLM.from_pretrained(out / "hf_model")
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, fsdp_weights[f"model.{name}"]), name


def test_bf16_and_compile_train_save_and_load(run_ok, tmp_path):
    # Inductor's C++ builds take most of a minute on 2 cores: aot_eager runs the same in-place compile (Dynamo and
    # AOT autograd) without code generation; 2 steps, and probes that only measure the test loss.
    out = tmp_path / "compiled"
    run_ok(
        "debug=fast",
        "trainer.precision=bf16-mixed",
        *SMALL_BF16,
        "model.compile=aot_eager",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "callbacks.checkpoint.every_n_train_steps=2",
        "eval.repeats=0",
        "eval.prompts=[]",
        f"hydra.run.dir={out}",
        timeout=400,
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["precision"] == "bf16-mixed"
    assert metrics["after"]["val_loss"] < metrics["before"]["val_loss"]
    saved = load_file(out / "hf_model" / "model.safetensors")
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert not [k for k in [*saved, *ckpt] if "_orig_mod" in k]
    reloaded = AutoModelForCausalLM.from_pretrained(out / "hf_model")
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, ckpt[f"model.{name}"]), name  # the export is the trained, fp32 model


_TRACED: list[int] = []  # the graphs the counting backend below was handed


def test_probes_run_eagerly_under_model_compile(train_here):
    """The before/after probes (held-out loss, samples, the forgetting probe) add no graph to a compiled run: the
    same graphs are traced with them as without them (eval=off), where they used to trace their own, 13-22 s of a
    tiny run with aot_eager. A backend that counts the graphs Dynamo hands it stands in for inductor."""
    import torch._dynamo

    if "gptft_counting" not in torch._dynamo.list_backends(exclude_tags=()):

        @torch._dynamo.register_backend(name="gptft_counting")
        def counting(graph: torch.fx.GraphModule, inputs: list) -> object:
            _TRACED.append(1)
            return graph.forward

    run = ("debug=fast", "trainer.precision=32-true", "model.compile=gptft_counting", "trainer.max_steps=2",
           "trainer.val_check_interval=2", "eval.max_new_tokens=4", "callbacks.reference.kl_tokens=16")  # fmt: skip
    counts = {}
    for probes in ("eval=default", "eval=off"):
        torch._dynamo.reset()  # no graph cached from the run before
        _TRACED.clear()
        metrics = train_here(*run, probes)
        counts[probes] = len(_TRACED)
        assert metrics["status"] == "completed", metrics
    torch._dynamo.reset()  # nothing compiled left behind for the in-process tests after this one
    assert counts["eval=off"] > 0 and counts["eval=default"] == counts["eval=off"], counts


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_gpu_presets_are_settings():
    gpu = _compose("experiment=quickstart", "trainer=gpu")
    assert (gpu.trainer.accelerator, gpu.trainer.precision) == ("gpu", "bf16-mixed")
    assert gpu.data.pin_memory is True and gpu.trainer.tf32 is True and gpu.trainer.max_steps == 150
    assert _compose("trainer=gpu", "data.pin_memory=false").data.pin_memory is False
    assert _compose("trainer=cpu").trainer.tf32 is False  # off the GPU presets, nothing changes

    ddp = _compose("trainer=ddp", "trainer.devices=8", "trainer.num_nodes=2")
    assert (ddp.trainer.devices, ddp.trainer.num_nodes, ddp.trainer.precision) == (8, 2, "bf16-mixed")
    strategy = instantiate(ddp.trainer.strategy)
    assert type(strategy).__name__ == "DDPStrategy" and ddp.trainer.use_distributed_sampler is False

    fsdp = _compose("trainer=fsdp", "trainer.devices=8", "trainer.num_nodes=2")
    assert (fsdp.trainer.devices, fsdp.trainer.num_nodes, fsdp.trainer.precision) == (8, 2, "bf16-mixed")
    strategy = instantiate(fsdp.trainer.strategy)
    # FSDP2 over all 16 ranks: no tensor-parallel group, one checkpoint file gathered on rank 0.
    assert isinstance(strategy, ModelParallelStrategy) and fsdp.trainer.use_distributed_sampler is False
    assert strategy._tensor_parallel_size == 1 and strategy._save_distributed_checkpoint is False
