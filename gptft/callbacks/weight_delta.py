"""Per-step weight change: ‖W_t − W_{t−1}‖_F of every tracked weight matrix, after every optimizer step."""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import Strategy
from torch.distributed.tensor import DTensor

from gptft.tasks.lora import delta_weight, is_adapter_part, lora_layers
from gptft.utils.io import atomic_write_text


class WeightDelta(L.Callback):
    """Tracks matrices whose names match `patterns` (default: every attention weight matrix).

    Norms stay on the device until a checkpoint or the end (no sync in the step); they are logged to
    TensorBoard as `dW/<name>` every `log_every_n_steps` and written whole to `<out_dir>/weight_delta.csv` at
    the end and when a run stops early. The rows are part of every checkpoint, so a resumed run's CSV holds
    every step since the start.
    """

    def __init__(self, out_dir: str, patterns: list[str] | None = None, log_every_n_steps: int = 1):
        self.out_dir = Path(out_dir)
        self.patterns = list(patterns or ["*.attn.*weight"])
        self.log_every_n_steps = log_every_n_steps
        self.names: list[str] = []
        self._params: list[torch.Tensor] = []
        self._sharded = False
        self._previous: list[torch.Tensor] = []
        self._lora: list[tuple[str, torch.nn.Module]] = []
        self._lora_previous: list[torch.Tensor] = []
        self._rows: list[tuple[int, torch.Tensor]] = []
        self._saved: list[list[float]] = []  # [step, norms...] of earlier segments, from the checkpoint
        self._last_step = -1

    def track(self, model: torch.nn.Module) -> None:
        """Select the matrices to follow and remember their current values."""
        tracked = [
            (n, p)
            for n, p in model.named_parameters()
            if p.dim() == 2 and any(fnmatch.fnmatchcase(n, pat) for pat in self.patterns)
        ]
        # freeze=lora: a wrapped matrix is followed as its effective weight W + (alpha / rank)·BA (W stays frozen),
        # named like the plain matrix; its base weight and adapter matrices are not followed on their own.
        self._lora = [
            (f"{m}.weight", layer)
            for m, layer in lora_layers(model).items()
            if any(fnmatch.fnmatchcase(f"{m}.weight", pat) for pat in self.patterns)
        ]
        self._lora_previous = [delta_weight(layer) for _, layer in self._lora]
        tracked = [(n, p) for n, p in tracked if not is_adapter_part(n)]
        self.names = [n for n, _ in tracked] + [n for n, _ in self._lora]
        # Under trainer=fsdp each rank follows its own shard of every matrix (the optimizer updates it in place).
        self._sharded = any(isinstance(p, DTensor) for _, p in tracked)
        self._params = [p.to_local() if isinstance(p, DTensor) else p for _, p in tracked]
        self._previous = [p.detach().clone() for p in self._params]

    @torch.no_grad()
    def step_norms(self, strategy: Strategy | None = None) -> torch.Tensor:
        """‖W − W_previous‖_F of every tracked matrix, then remember W (foreach ops, no device sync; one
        all-reduce of the squared norms of the shards when they are sharded)."""
        norms = torch.zeros(0)
        # torch's multi-tensor ops (private, as torch.nn.utils.clip_grad_norm_ itself uses them): the public
        # get_total_norm gives only the norm of all tensors together, and a loop of vector_norm launches one
        # kernel per matrix per step.
        if self._params:
            norms = torch.stack(torch._foreach_norm(torch._foreach_sub(self._params, self._previous)))
            torch._foreach_copy_(self._previous, self._params)
        if self._sharded:  # the shards of a matrix add up: ‖ΔW‖² = Σ over ranks of ‖ΔW_rank‖²
            norms = strategy.reduce(norms.float().square(), reduce_op="sum").sqrt()
        if self._lora:  # ‖Δ(W + sBA)‖ = ‖s·B'A' − s·BA‖
            current = [delta_weight(layer) for _, layer in self._lora]
            lora = torch.stack(torch._foreach_norm(torch._foreach_sub(current, self._lora_previous)))
            self._lora_previous = current
            norms = torch.cat([norms.to(lora), lora])
        return norms

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.track(pl_module.model)
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step == self._last_step or not self.names:
            return  # no optimizer step happened (gradient accumulation)
        self._last_step = trainer.global_step
        norms = self.step_norms(trainer.strategy)
        self._rows.append((trainer.global_step, norms))
        if trainer.global_step % self.log_every_n_steps == 0:
            pl_module.log_dict({f"dW/{n}": v for n, v in zip(self.names, norms, strict=True)}, on_step=True)

    def state_dict(self) -> dict[str, Any]:
        return {"names": self.names, "rows": self.table()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._saved = state_dict["rows"]

    def table(self) -> list[list[float]]:
        """[step, ‖ΔW‖ of each tracked matrix] for every step so far, earlier segments of the run included."""
        if self._rows:  # read this segment's norms from the device once
            values = torch.stack([norms for _, norms in self._rows]).float().cpu().tolist()
            self._saved += [[step, *row] for (step, _), row in zip(self._rows, values, strict=True)]
            self._rows = []
        return self._saved

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._write(trainer)  # an interrupted or diverged run keeps what it measured

    def _write(self, trainer: L.Trainer) -> None:
        rows = self.table()
        if not rows or not trainer.is_global_zero:
            return
        lines = [",".join(["step", *self.names])]
        # 9 significant digits: each float32 norm as measured (6 would round it to 5e-6, above fp32's 6e-8).
        lines += [",".join([str(int(row[0])), *(f"{v:.9g}" for v in row[1:])]) for row in rows]
        atomic_write_text(self.out_dir / "weight_delta.csv", "\n".join(lines) + "\n")

    def metrics(self) -> dict[str, Any]:
        rows = self.table()
        if not rows:
            return {}
        total = [sum(column) for column in zip(*(row[1:] for row in rows), strict=True)]
        return {
            "weight_delta": {
                "tracked": len(self.names),
                "sum_over_steps": dict(zip(self.names, total, strict=True)),
            }
        }
