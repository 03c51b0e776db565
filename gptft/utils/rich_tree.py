"""The composed config as a tree at the start of every run, so what ran is never a guess."""

from __future__ import annotations

from collections.abc import Sequence

import rich
import rich.syntax
import rich.tree
from omegaconf import DictConfig, OmegaConf

ORDER = (
    "experiment_name",
    "data",
    "model",
    "task",
    "optim",
    "schedule",
    "trainer",
    "eval",
    "callbacks",
    "logger",
)


def print_config_tree(cfg: DictConfig, order: Sequence[str] = ORDER) -> None:
    tree = rich.tree.Tree("config", style="dim", guide_style="dim")
    keys = [k for k in order if k in cfg] + [k for k in cfg if k not in order]
    for key in keys:
        node = cfg[key]
        text = OmegaConf.to_yaml(node, resolve=True) if isinstance(node, DictConfig) else str(node)
        tree.add(f"[bold]{key}[/bold]").add(rich.syntax.Syntax(text, "yaml", theme="ansi_dark"))
    rich.print(tree)
