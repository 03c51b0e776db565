"""Freezing as a strategy every task takes: parameter-name patterns decide what trains.

Patterns are shell-style globs (fnmatch) over parameter names, where `{layer}` stands for each block index
of `layers` ("all", "upper_half", "lower_half", or a list of indices). They work for GPT-2
(`transformer.h.6.attn.c_attn.weight`) and GPT-Neo (`transformer.h.6.attn.attention.k_proj.weight`).

GPT-2 fuses q, k and v into one `c_attn` matrix (columns q | k | v). `qkv_parts: [k]` trains only the key
third of every matched `c_attn` tensor: the gradient of the other thirds is zeroed by a hook, and such
tensors get no weight decay, so the untrained thirds stay bit-identical (Adam's moments stay zero there).
`trained_numel` is the one answer to "how many elements of this tensor train": the freeze table, metrics.json
`params` and the FLOPs count (gptft.models.flops) all read it, so a tensor trained in part counts its kept thirds.
Tied weights (GPT-2's embedding is its output head) share one tensor: freezing one freezes both, and the
log says so.
"""

from __future__ import annotations

import fnmatch
import logging
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch

from gptft.errors import ConfigError

log = logging.getLogger(__name__)

QKV = ("q", "k", "v")
# Set on a tensor trained in part (qkv_parts): how many of its elements train. An attribute of the Parameter, so it
# travels with it (as its gradient hook does) wherever the model goes.
_TRAINED_PART = "gptft_trained_numel"


def trained_numel(p: torch.Tensor) -> int:
    """How many elements of `p` train: none when it is frozen, the kept thirds of a fused c_attn tensor under
    qkv_parts (its gradient mask), else all of them."""
    if not p.requires_grad:
        return 0
    return int(getattr(p, _TRAINED_PART, p.numel()))


def _depth(model: torch.nn.Module) -> int:
    config = model.config
    return int(
        getattr(config, "n_layer", None) or getattr(config, "num_layers", None) or config.num_hidden_layers
    )


def layer_indices(layers: str | Sequence[int], depth: int) -> list[int]:
    if layers == "all":
        return list(range(depth))
    if layers == "upper_half":
        return list(range(depth // 2, depth))
    if layers == "lower_half":
        return list(range(depth // 2))
    if isinstance(layers, str):
        raise ConfigError(
            f"freeze.layers={layers} is unknown: use all, upper_half, lower_half or a list like [6, 7]"
        )
    bad = [i for i in layers if not 0 <= int(i) < depth]
    if bad:
        raise ConfigError(
            f"freeze.layers={list(layers)}: {bad} beyond the model's {depth} blocks (0-{depth - 1})"
        )
    return [int(i) for i in layers]


def _expand(patterns: Sequence[str], layers: list[int]) -> list[str]:
    return [p.replace("{layer}", str(i)) for p in patterns for i in layers] if patterns else []


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def apply_freeze(
    model: torch.nn.Module,
    name: str = "none",
    trainable: Sequence[str] | None = None,
    frozen: Sequence[str] = (),
    layers: str | Sequence[int] = "all",
    qkv_parts: Sequence[str] = QKV,
) -> dict[str, Any]:
    """Set requires_grad by the patterns; return the counts (for the log and metrics.json).

    trainable=None: everything trains except `frozen`; a list: only the matches train, minus `frozen`.
    """
    idx = layer_indices(layers, _depth(model))
    train_patterns, frozen_patterns = _expand(trainable or [], idx), _expand(frozen, idx)
    # Every name of every tensor, tied ones included, so a pattern may name either side of a tie.
    names_of: dict[int, list[str]] = defaultdict(list)
    params: dict[int, torch.nn.Parameter] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        names_of[id(p)].append(pname)
        params[id(p)] = p
    used: set[str] = set()
    for key, p in params.items():
        names = names_of[key]
        hits = {pat for pat in train_patterns + frozen_patterns for n in names if fnmatch.fnmatchcase(n, pat)}
        used |= hits
        p.requires_grad_(
            (trainable is None or bool(hits & set(train_patterns))) and not hits & set(frozen_patterns)
        )
        if len(names) > 1:
            state = "trains" if p.requires_grad else "is frozen"
            log.info("%s are one tied tensor: it %s as a whole", " and ".join(names), state)
    _check_patterns({"trainable": trainable or [], "frozen": frozen}, idx, used)
    if not any(p.requires_grad for p in params.values()):
        raise ConfigError(
            f"freeze={name} leaves nothing trainable: loosen freeze.frozen or widen freeze.trainable"
        )
    masked = _mask_qkv(model, train_patterns, qkv_parts, name)
    report = freeze_table(model)
    report["strategy"] = name
    report["no_decay"] = masked  # trained in part: the task must not decay them (CausalLM's `no_decay`)
    return report


def _check_patterns(raw_patterns: dict[str, Sequence[str]], layers: list[int], used: set[str]) -> None:
    """A pattern list is wrong when none of its patterns matched any parameter name. (Single patterns may
    miss: a strategy lists GPT-2 and GPT-Neo names side by side.)"""
    for kind, patterns in raw_patterns.items():
        if patterns and not set(_expand(patterns, layers)) & used:
            raise ConfigError(
                f"freeze.{kind}={list(patterns)} matches no parameter of this model: fix the patterns (names look "
                "like transformer.h.0.attn.c_attn.weight in GPT-2, transformer.h.0.attn.attention.k_proj.weight "
                "in GPT-Neo)"
            )


def _mask_qkv(model: torch.nn.Module, train_patterns: list[str], parts: Sequence[str], name: str) -> list[str]:
    """Mask the untrained thirds' gradients of the matched c_attn tensors; return those tensors' names."""
    parts = list(parts)
    if sorted(parts) == sorted(QKV):
        return []
    if not parts or any(part not in QKV for part in parts):
        raise ConfigError(f"freeze.qkv_parts={parts}: use a non-empty subset of [q, k, v]")
    masked = []
    for pname, p in model.named_parameters():
        if (
            p.requires_grad
            and pname.endswith(("c_attn.weight", "c_attn.bias"))
            and _matches(pname, train_patterns)
        ):
            width = p.shape[-1] // 3
            # Column slices rather than a 0/1 mask tensor: nothing to keep on the device the model moves to.
            dropped = [slice(i * width, (i + 1) * width) for i, part in enumerate(QKV) if part not in parts]
            p.register_hook(lambda grad, dropped=dropped: _zero_columns(grad, dropped))
            setattr(p, _TRAINED_PART, p.numel() // 3 * len(parts))
            masked.append(pname)  # decay would move the untrained thirds
    if not masked:
        raise ConfigError(
            f"freeze={name}: qkv_parts={parts} needs fused c_attn tensors (GPT-2) among the trainable ones"
        )
    log.info(
        "freeze=%s: only the %s third(s) of %d fused c_attn tensors train", name, "/".join(parts), len(masked)
    )
    return masked


def _zero_columns(grad: torch.Tensor, columns: list[slice]) -> torch.Tensor:
    grad = grad.clone()  # a hook must not change the gradient autograd handed it
    for cols in columns:
        grad[..., cols] = 0
    return grad


def freeze_table(model: torch.nn.Module) -> dict[str, Any]:
    """Trainable and frozen parameter counts (elements, by trained_numel), in all and per block (`h.<i>`; the
    rest by top module)."""
    rows: dict[str, list[int]] = {}
    for pname, p in model.named_parameters():
        parts = pname.split(".")
        block = f"h.{parts[parts.index('h') + 1]}" if "h" in parts else parts[-2] if len(parts) > 1 else pname
        row = rows.setdefault(block, [0, 0])
        trained = trained_numel(p)
        row[0] += trained
        row[1] += p.numel() - trained
    trainable = sum(r[0] for r in rows.values())
    frozen = sum(r[1] for r in rows.values())
    return {
        "trainable": trainable,
        "frozen": frozen,
        "per_block": {k: {"trainable": v[0], "frozen": v[1]} for k, v in rows.items()},
    }


def format_freeze_table(report: dict[str, Any]) -> str:
    lines = [f"{'block':<12}{'trainable':>14}{'frozen':>14}"]
    for block, row in report["per_block"].items():
        lines.append(f"{block:<12}{row['trainable']:>14,}{row['frozen']:>14,}")
    lines.append(f"{'total':<12}{report['trainable']:>14,}{report['frozen']:>14,}")
    return "\n".join(lines)
