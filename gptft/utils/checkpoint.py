"""Checkpoints: written atomically beside their final name, and checked against the model before a resume."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from gptft.errors import ConfigError
from gptft.utils.io import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save into a temporary file in the checkpoint's own folder, then a rename.

    Lightning's default stages the file in the system temp folder and moves it, which is a copy (not
    atomic) when that folder is on another device, and needs the checkpoint's size free there.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        atomic_write(os.fspath(path), lambda f: torch.save(checkpoint, f))


def check_resumable(ckpt_path: str | None, model: torch.nn.Module) -> None:
    """Fail with one line before training when `ckpt_path` is no checkpoint or holds another model's weights."""
    if not ckpt_path:
        return
    path = Path(ckpt_path)  # its existence is checked with the config (gptft.config.validate)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["state_dict"]
    except Exception as e:  # a truncated or foreign file: say so instead of a pickle traceback
        raise ConfigError(
            f"ckpt_path={ckpt_path} is not a Lightning checkpoint ({type(e).__name__}): give a run's "
            "checkpoints/last.ckpt"
        ) from None
    here = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    there = {k: tuple(v.shape) for k, v in saved.items()}
    for key in here.keys() & there.keys():
        if here[key] != there[key]:
            raise ConfigError(
                f"ckpt_path={ckpt_path} holds another model shape ({key} is {list(there[key])} there, "
                f"{list(here[key])} here): resume with the model settings it was trained with "
                "(its run's .hydra/config.yaml), or use resume=<run folder>"
            )
    odd = sorted(here.keys() ^ there.keys())
    if odd:
        where = "there" if odd[0] in there else "here"
        raise ConfigError(
            f"ckpt_path={ckpt_path} holds another model ({odd[0]} is only {where}, and {len(odd) - 1} more "
            "such weights): resume with the model settings it was trained with, or use resume=<run folder>"
        )
