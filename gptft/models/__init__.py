"""Building GPT-2 (any Hugging Face causal LM): pretrained through from_pretrained, or from a config."""

from gptft.models.build import build_model, context_length, export_hf_model, model_config
from gptft.models.generate import sample_tokens

__all__ = ["build_model", "context_length", "export_hf_model", "model_config", "sample_tokens"]
