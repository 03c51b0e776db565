"""LoRA (Hu et al., 2021) through PEFT: low-rank adapters beside frozen weights, as the `lora` freeze strategy.

`freeze=lora` wraps the model with `peft.get_peft_model`: every weight stays frozen and each targeted matrix W
gets W + (alpha / rank) · B A, with A (rank × d_in) random and B (d_out × rank) zero at the start, so the wrapped
model starts exactly where the base model is. The wrapped model is a `PeftModelForCausalLM`: its forward takes
the same arguments as the Hugging Face model's (the chunked loss's `output_hidden_states`, `logits_to_keep`), and
attribute lookups (`config`, `get_output_embeddings`, `generate`) reach the model inside.

At the end, the adapter is saved in PEFT's format (`<run>/lora_adapter/`) and merged into the weights for
`hf_model/`, which `AutoModelForCausalLM.from_pretrained` loads like any other export.
"""

from __future__ import annotations

import logging
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from gptft.errors import ConfigError

log = logging.getLogger(__name__)

ADAPTER = "default"  # PEFT's name of the one adapter
# Matrices adapted when freeze.target_modules is null. GPT-2's c_proj names both the attention output and the
# MLP's output projection: PEFT matches module names by their last part, so both are adapted.
DEFAULT_TARGETS = {"gpt2": ["c_attn", "c_proj"], "gpt_neo": ["q_proj", "k_proj", "v_proj"]}


def is_lora(freeze: Mapping[str, Any]) -> bool:
    """A freeze strategy is LoRA when it sets a rank (conf/freeze/lora.yaml, or a user's copy of it)."""
    return freeze.get("rank") is not None


def resolve_targets(model: torch.nn.Module, given: Sequence[str] | None) -> list[str]:
    """The module names to adapt: the setting if given, else the defaults for this model type (PEFT's own
    table for types gptft does not list)."""
    if given:
        return [str(t) for t in given]
    model_type = model.config.model_type
    if model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type]
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    if model_type not in PEFT_DEFAULTS:
        raise ConfigError(
            f"freeze.target_modules=null: no default for a {model_type} model: list the module names to adapt, "
            "e.g. freeze.target_modules=[q_proj,v_proj]"
        )
    return list(PEFT_DEFAULTS[model_type])


def apply_lora(
    model: torch.nn.Module,
    name: str = "lora",
    rank: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    target_modules: Sequence[str] | None = None,
    layers: str | Sequence[int] = "all",
    strategy: str | None = None,
    **_: Any,  # the plain strategies' keys (trainable, frozen, qkv_parts) mean nothing here
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(the model wrapped with LoRA adapters, the parameter counts for the log and metrics.json).

    `strategy`: the trainer's strategy class, to refuse FSDP (it shards Hugging Face blocks, which PEFT wraps).
    """
    if strategy and strategy.endswith("FSDP2Strategy"):
        raise ConfigError(
            "freeze=lora with trainer=fsdp is not supported (FSDP shards the model's blocks, PEFT wraps the model): "
            "use trainer=ddp; LoRA's optimizer state is small, so the model fits wherever its weights do"
        )
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    from gptft.tasks.freezing import _depth, freeze_table, layer_indices

    if int(rank) != rank or rank < 1:  # also in gptft.config's schema; here for callers from Python
        raise ConfigError(f"freeze.rank={rank} must be a whole number ≥ 1: give e.g. freeze.rank=8")
    targets = resolve_targets(model, target_modules)
    config = LoraConfig(
        r=int(rank),
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        # GPT-2's Conv1D stores W as d_in × d_out; PEFT needs to be told (it would guess it with a warning).
        fan_in_fan_out=any(isinstance(m, Conv1D) for m in model.modules()),
        layers_to_transform=None if layers == "all" else layer_indices(layers, _depth(model)),
        task_type="CAUSAL_LM",
    )
    try:
        wrapped = get_peft_model(model, config)
    except ValueError as e:
        if "not found in the base model" not in str(e):
            raise
        raise ConfigError(
            f"freeze.target_modules={targets} matches no module of this {model.config.model_type} model"
            f"{'' if layers == 'all' else f' in freeze.layers={layers}'}: name linear layers, e.g. "
            "c_attn, c_proj, c_fc (GPT-2) or q_proj, k_proj, v_proj, out_proj (GPT-Neo)"
        ) from None
    report = freeze_table(wrapped)
    report["strategy"] = name
    report["lora"] = {
        "rank": int(rank),
        "alpha": alpha,
        "dropout": dropout,
        "target_modules": targets,
        "adapted": len(lora_layers(wrapped)),
    }
    log.info(
        "freeze=%s: LoRA rank %d, alpha %g on %d matrices (%s); %d adapter parameters train, every other is frozen",
        name, rank, alpha, report["lora"]["adapted"], ", ".join(targets), report["trainable"],
    )  # fmt: skip
    return wrapped, report


def lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every LoRA-wrapped layer by module name (empty for a plain model)."""
    if "peft" not in sys.modules:  # nothing can be wrapped: skip importing peft (a second) for plain runs
        return {}
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A}


def is_adapter_part(param_name: str) -> bool:
    """A parameter of a LoRA layer (its frozen base weight or an adapter matrix) rather than a plain one."""
    return any(part in param_name for part in (".base_layer.", ".lora_A.", ".lora_B."))


@torch.no_grad()
def delta_weight(layer: torch.nn.Module) -> torch.Tensor:
    """(alpha / rank) · B A in the base weight's layout: the effective weight minus the frozen one."""
    return layer.get_delta_weight(ADAPTER)


def is_peft_model(model: torch.nn.Module) -> bool:
    if "peft" not in sys.modules:
        return False
    from peft import PeftModel

    return isinstance(model, PeftModel)


def save_adapter_and_merge(model: torch.nn.Module, folder: str | Path) -> torch.nn.Module:
    """Save the adapter in PEFT's format into `folder` (via a temporary folder and a rename), then merge it into
    the base weights and return the plain Hugging Face model (for hf_model/). Changes `model` in place: call it
    last."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    log.info("LoRA adapter (PEFT format): %s", folder)
    return model.merge_and_unload()
