"""Models come from `from_pretrained` (the hub cache or a local folder) or from an architecture config.

Weights are never downloaded silently and never replaced by random ones: when they are not on disk and
the hub cannot be reached, the run stops at once with one line saying what to do.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from gptft.errors import ConfigError
from gptft.models.cpu_kernels import GELUTanh
from gptft.models.cpu_products import use_fp32_weight_gradients
from gptft.models.dropout import use_fast_dropout
from gptft.text.tokenizer import VOCAB_SIZE

log = logging.getLogger(__name__)


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be used right now, or None if it can (checked in ≤ 3 s, no retries)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError as e:
        return f"{host} is unreachable ({e.strerror or e})"
    return None


def _resolve(name_or_path: str) -> tuple[str, bool]:
    """(what to pass to from_pretrained, whether it is a local folder)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"model.name_or_path={name_or_path} has no config.json: point it at a folder written by "
                "save_pretrained (e.g. outputs/<run>/hf_model)"
            )
        return str(path), True
    if path.is_absolute() or name_or_path.startswith((".", "~")) or name_or_path.count("/") > 1:
        raise ConfigError(
            f"model.name_or_path={name_or_path}: no such folder: point it at a saved model (e.g. outputs/<run>/hf_model)"
        )
    return name_or_path, False


def _load(loader: Any, name_or_path: str, **kwargs: Any) -> Any:
    """loader.from_pretrained from a folder or the hub cache; the hub only if it is reachable."""
    source, local = _resolve(name_or_path)
    try:
        return loader.from_pretrained(source, local_files_only=True, **kwargs)
    except OSError:
        if local:
            raise
    why = hub_unreachable()
    if why:
        raise ConfigError(
            f"model.name_or_path={name_or_path}: weights are not in the Hugging Face cache and {why}: download "
            f"them once where there is a network (`hf download {name_or_path}`) or set model.name_or_path to a "
            "saved model folder (e.g. outputs/<a scratch run>/hf_model)"
        )
    return loader.from_pretrained(source, **kwargs)


def model_config(name_or_path: str | None = None, arch: dict | None = None) -> PretrainedConfig:
    """The architecture config alone (cheap): lets settings be checked before any weights load."""
    if name_or_path:
        return _load(AutoConfig, name_or_path)
    if not arch:
        raise ConfigError(
            "model: set model.name_or_path (pretrained) or model.arch (random init), e.g. model=small"
        )
    arch = dict(arch)
    model_type = arch.pop("model_type", "gpt2")
    arch.setdefault("vocab_size", VOCAB_SIZE)
    return AutoConfig.for_model(model_type, **arch)


def context_length(config: PretrainedConfig) -> int:
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, key, None)
        if value:
            return int(value)
    raise ConfigError(f"model: cannot tell the context length of a {config.model_type} model")


def build_model(
    name_or_path: str | None = None,
    arch: dict | None = None,
    attn_implementation: str = "sdpa",
    compile: bool | str = False,
    gradient_checkpointing: bool = False,
    fast_dropout: bool = True,
    **_: Any,
) -> PreTrainedModel:
    """A causal LM in fp32 (mixed precision is the trainer's job): pretrained if name_or_path, else random init.

    `gradient_checkpointing` recomputes each block's activations in backward instead of keeping them (HF's
    own switch, set on the blocks, so every path through the model gets it, CausalLM's chunked loss included).
    `compile`: true compiles the transformer with torch's default backend (inductor); a backend's name picks
    that one (aot_eager traces and checks the graphs without generating code: seconds instead of a minute of
    C++ builds on a small CPU).
    `fast_dropout`: on a CPU, dropout masks from 16-bit random integers and eager attention where dropout is on
    (gptft.models.dropout: 3× faster to draw, p rounded to 1/65536); false keeps torch's dropout and SDPA throughout.
    """
    config = model_config(name_or_path, arch)
    if config.vocab_size < VOCAB_SIZE:
        raise ConfigError(
            f"model: vocabulary of {config.vocab_size} ids is smaller than GPT-2's {VOCAB_SIZE}: gptft's data are "
            "GPT-2 token ids, so use a model with the GPT-2 vocabulary (GPT-2, GPT-Neo, ...)"
        )
    if name_or_path:
        model = _load(AutoModelForCausalLM, name_or_path, attn_implementation=attn_implementation)
        log.info("loaded pretrained %s", name_or_path)
    else:
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
        log.info("built %s from its config, random init", config.model_type)
    # fp32 master weights; train mode, as from_pretrained leaves eval mode (dropout off) and Lightning keeps it.
    model = model.to(torch.float32).train()
    fuse_gelu(model)
    use_fp32_weight_gradients(model)  # GPT-2's linear layers under CPU bf16 autocast
    if fast_dropout:
        use_fast_dropout(model)
    if gradient_checkpointing:
        # Non-reentrant: works when the inputs need no grad (token ids) and with frozen blocks. Training
        # passes use_cache=False itself; config.use_cache stays, so the exported model still generates fast.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5 renamed the switch
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        log.info("gradient checkpointing on: activations recomputed in backward")
    if compile:
        backend = "inductor" if compile is True else str(compile)
        if backend not in torch._dynamo.list_backends(exclude_tags=()):
            known = ", ".join(torch._dynamo.list_backends(exclude_tags=()))
            raise ConfigError(f"model.compile={compile} is no torch.compile backend: use true (inductor) or one of {known}")
        # The transformer, in place: parameter names stay unprefixed (no _orig_mod.), and the head stays eager,
        # as CausalLM's chunked loss runs it chunk by chunk outside the model.
        model.base_model.compile(backend=backend)
    return model


def fuse_gelu(model: torch.nn.Module) -> int:
    """GPT-2's activation, gelu_new, is GELU's tanh approximation written as 8 tensor operations in Python
    (transformers' NewGELUActivation): 8 passes over the 4·d-wide activations forward, more in backward, each
    rounded to bf16 under autocast. torch's F.gelu(approximate="tanh") is the same function in one kernel (computed
    in fp32 inside), its gradient in one: swapped in module by module, so the config, and a model exported from
    the run, still say gelu_new. In bf16 on a CPU both come from gptft's fused kernels (torch's computes tanh with
    Sleef: 4-5× slower; gptft.models.cpu_kernels). Returns how many were swapped."""
    from transformers.activations import NewGELUActivation

    swapped = 0
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is NewGELUActivation:
                setattr(module, name, GELUTanh())
                swapped += 1
    return swapped


def export_hf_model(model: PreTrainedModel, folder: str | Path) -> Path:
    """save_pretrained the model and the GPT-2 tokenizer files, via a temporary folder then a rename."""
    from gptft.text.tokenizer import hf_tokenizer

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    hf_tokenizer().save_pretrained(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder
