"""LightningModules: CausalLM, and the studies that change what it learns."""

from gptft.tasks.causal_lm import CausalLM, lr_lambda
from gptft.tasks.kl_target import KLTarget
from gptft.tasks.targets import matching_ids, target_distribution

__all__ = ["CausalLM", "KLTarget", "lr_lambda", "matching_ids", "target_distribution"]
