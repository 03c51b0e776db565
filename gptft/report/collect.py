"""Find the runs under a folder and read what they left: metrics.json, overrides, the loss curve."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gptft.errors import ConfigError


@dataclass
class Run:
    path: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, str] = field(default_factory=dict)
    label: str = ""
    # Read once: the figures of a report each draw it. Kept on the run, not in a dict by label: a crashed
    # attempt and the completed run of one seed (two sweep folders) share a label, not a curve.
    _curves: dict[str, tuple[list[int], list[float]]] | None = field(default=None, repr=False, compare=False)

    @property
    def status(self) -> str:
        return self.metrics.get("status", "no metrics.json")

    @property
    def lr(self) -> float | None:
        return self.metrics.get("config", {}).get("optim", {}).get("lr")

    def measure(self, when: str, name: str) -> dict[str, Any] | None:
        """A probe measure (mean/std/values) taken `when` ("before" or "after"), if it was taken."""
        value = self.metrics.get(when, {}).get(name)
        return value if isinstance(value, dict) else None

    def loss_curve(self) -> tuple[list[int], list[float]]:
        """(steps, train/loss) from the run's TensorBoard events; empty if it logged none."""
        return self._read_curves().get("train/loss", ([], []))

    def val_curve(self) -> tuple[list[int], list[float]]:
        """(steps, val/loss): the held-out loss at every validation and probe; empty if it logged none."""
        return self._read_curves().get("val/loss", ([], []))

    def _read_curves(self) -> dict[str, tuple[list[int], list[float]]]:
        if self._curves is not None:
            return self._curves
        self._curves = {}
        events = self.path / "tensorboard"
        if not events.is_dir():
            return self._curves
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        logging.getLogger("tensorboard").setLevel(logging.WARNING)  # its directory watcher chats at INFO

        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in ("train/loss", "val/loss"):
            if tag in acc.Tags().get("scalars", []):
                points = acc.Scalars(tag)
                self._curves[tag] = ([p.step for p in points], [p.value for p in points])
        return self._curves

    def weight_deltas(self) -> tuple[list[int], dict[str, list[float]]] | None:
        """(steps, {weight name: ‖ΔW‖ per step}) from weight_delta.csv, if the run tracked weights."""
        file = self.path / "weight_delta.csv"
        if not file.is_file():
            return None
        header, *rows = [line.split(",") for line in file.read_text().splitlines() if line]
        steps = [int(r[0]) for r in rows]
        return steps, {name: [float(r[i + 1]) for r in rows] for i, name in enumerate(header[1:])}


def repeat_std(measure: dict[str, Any]) -> float | None:
    """A probe's std over its generation repeats; None where one repeat measured no spread (`std` null, or the
    0.0 that runs before the null wrote for a single value)."""
    values = measure.get("values")
    if measure.get("std") is None or (isinstance(values, list) and len(values) < 2):
        return None
    return measure["std"]


def _read_overrides(path: Path) -> dict[str, str]:
    file = path / ".hydra" / "overrides.yaml"
    if not file.is_file():
        return {}
    items = yaml.safe_load(file.read_text()) or []
    return dict(item.split("=", 1) for item in items if "=" in item and not item.startswith(("hydra.", "~")))


def find_runs(folder: str | Path) -> list[Run]:
    """Every run at or under `folder`: a folder with metrics.json or a .hydra/ config (a run that died early)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(
            f"{folder} is not a folder: give a run or sweep folder, e.g. outputs/lr_sweep/multirun_..."
        )
    found = {p.parent for p in folder.rglob("metrics.json")} | {p.parent for p in folder.rglob(".hydra")}
    paths = sorted(p for p in found if "report" not in p.relative_to(folder).parts)
    if not paths:
        raise ConfigError(
            f"{folder} holds no runs (no metrics.json or .hydra/ under it): give a run or sweep folder from outputs/"
        )
    runs = []
    for path in paths:
        metrics_file = path / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        runs.append(Run(path, metrics, _read_overrides(path)))
    _label(runs, folder)
    return runs


def is_paired(runs: list[Run]) -> bool:
    """Two runs that differ only in their freeze strategy: model A and model B of a freezing study."""
    if len(runs) != 2:
        return False
    keys = set(runs[0].overrides) | set(runs[1].overrides)
    return {k for k in keys if runs[0].overrides.get(k) != runs[1].overrides.get(k)} == {"freeze"}


def _label(runs: list[Run], folder: Path) -> None:
    """Name each run by the overrides that differ between runs (e.g. optim.lr=0.0001), else by its folder."""
    keys = sorted({k for r in runs for k in r.overrides})
    varying = [k for k in keys if len({r.overrides.get(k) for r in runs}) > 1]
    for run in runs:
        parts = [f"{k}={run.overrides[k]}" for k in varying if k in run.overrides]
        run.label = ", ".join(parts) or (run.path.name if run.path != folder else folder.name)
