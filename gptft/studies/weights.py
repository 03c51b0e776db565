"""What fine-tuning did to each weight matrix: ΔW = W_tuned − W_base from the two exported models, its Frobenius norm
and its effective rank (the number of singular values that hold `share` of ‖ΔW‖²), in fp64.

The weight_delta callback records ‖W_t − W_{t−1}‖ step by step, not ΔW itself; the whole update is the difference
of the run's hf_model/ and the base's (a LoRA run's hf_model/ holds the merged W + (alpha / rank)·BA).
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Any

import torch

SHARE = 0.9  # the effective rank holds this share of ‖ΔW‖²
DEFAULT_PATTERNS = ["*.attn.*weight"]  # the weight_delta callback's default: every attention matrix
CACHE = "delta_w.json"


def effective_rank(delta: torch.Tensor, share: float = SHARE) -> int:
    """How many of ΔW's largest singular values hold `share` of ‖ΔW‖_F² = Σ σ²; 0 for ΔW = 0."""
    sigma2 = torch.linalg.svdvals(delta.double()).square()
    total = float(sigma2.sum())
    if total == 0.0:
        return 0
    held = torch.cumsum(sigma2, 0) / total
    return int(torch.searchsorted(held, torch.tensor(share, dtype=held.dtype) - 1e-12).item()) + 1


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no *.safetensors")
    out: dict[str, torch.Tensor] = {}
    for file in files:
        out |= load_file(str(file))
    return out


def weight_changes(
    base: str | Path, run: str | Path, patterns: list[str] | None = None, share: float = SHARE
) -> dict[str, dict[str, Any]]:
    """{matrix name: {"norm": ‖ΔW‖_F, "rank": effective rank, "full_rank": min(shape)}} for every 2-D weight whose
    name matches `patterns`, between the base's hf_model/ and the run's; cached in <run>/delta_w.json."""
    run = Path(run)
    cache = run / CACHE
    patterns = list(patterns or DEFAULT_PATTERNS)
    key = {"base": str(Path(base).resolve()), "patterns": patterns, "share": share}
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            return saved["matrices"]
    before, after = _weights(Path(base)), _weights(run / "hf_model")
    out = {}
    for name, w in after.items():
        if w.dim() != 2 or name not in before or not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        delta = w.double() - before[name].double()
        out[name] = {
            "norm": float(torch.linalg.matrix_norm(delta)),
            "rank": effective_rank(delta, share),
            "full_rank": min(delta.shape),
        }
    from gptft.utils.io import atomic_write_json

    atomic_write_json(cache, {"key": key, "matrices": out})
    return out


def block_of(name: str) -> int | None:
    """The block index in transformer.h.<i>.… (None outside the blocks)."""
    parts = name.split(".")
    for a, b in zip(parts, parts[1:], strict=False):
        if a == "h" and b.isdigit():
            return int(b)
    return None
