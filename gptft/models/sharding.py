"""Fully sharded data parallelism (trainer=fsdp): PyTorch's FSDP2 `fully_shard` through Lightning.

Each transformer block is one shard unit, the rest (embeddings, final norm, the tied head) is the root unit.
A block's full weights exist only while it runs; otherwise every rank holds 1/world of each tensor, and of
its gradients and AdamW state. Anything that runs the model outside the training step (the probes'
generation) must therefore run on every rank, and anything that needs whole tensors (the hf_model/ export)
gathers them first (`full_weights`).

FSDP2 (per-parameter DTensor sharding) rather than Lightning's FSDPStrategy, which wraps the older
FlatParameter FSDP: FSDP2 is what PyTorch develops now, keeps parameter names and per-tensor requires_grad
(freezing) without options, and runs on CPUs with gloo, so the tests exercise the same code as a GPU run.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from transformers import AutoModelForCausalLM, PreTrainedModel

log = logging.getLogger(__name__)


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy with every rank in one data-parallel group and no tensor parallelism.

    ModelParallelStrategy's "auto" makes the GPUs of a node a tensor-parallel group, which GPT-2's blocks do
    not use; here the data-parallel size is the world size, whatever trainer.devices and num_nodes are.
    Checkpoints hold the full state in one file, as the other trainers write them (gathered on rank 0).
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("save_distributed_checkpoint", False)
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, **kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_model(model: PreTrainedModel, mesh: Any) -> int:
    """fully_shard every transformer block (the classes HF lists in `_no_split_modules`), then the root.

    Returns the number of block units. Call once, before the optimizer is built: sharding replaces the
    parameters by DTensors.
    """
    from torch.distributed.fsdp import fully_shard

    block_classes = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in block_classes]
    if not blocks:
        raise ValueError(f"{type(model).__name__} names no transformer block class (_no_split_modules)")
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the root keeps its weights gathered from forward to backward
    held = sum(p.to_local().numel() for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    log.info(
        "trainer=fsdp: %d blocks + the root sharded over %d ranks; rank %d holds %d of %d parameters",
        len(blocks),
        mesh.size(),
        mesh.get_local_rank(),
        held,
        total,
    )
    return len(blocks)


def full_weights(model: torch.nn.Module, strategy: Any) -> dict[str, torch.Tensor] | None:
    """The model's whole weights on rank 0 (on the CPU) when they are sharded, else None (use the model).

    Every rank must call it: gathering is a collective. Other ranks get an empty dict.
    """
    if not is_sharded(model):
        return None
    state = strategy.lightning_module_state_dict()
    prefix = next((f"{n}." for n, m in strategy.lightning_module.named_children() if m is model), "")
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def unsharded_copy(model: PreTrainedModel, weights: dict[str, torch.Tensor]) -> PreTrainedModel:
    """A plain model of `model`'s architecture holding `weights` (no copy: built on the meta device)."""
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(model.config)
    plain.load_state_dict(weights, strict=True, assign=True)
    plain.tie_weights()
    return plain.train(model.training)
