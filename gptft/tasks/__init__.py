"""LightningModules. The KL-target and frozen-layer studies extend CausalLM."""

from gptft.tasks.causal_lm import CausalLM, lr_lambda

__all__ = ["CausalLM", "lr_lambda"]
