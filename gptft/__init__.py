"""gptft: fine-tune GPT-2 models with Lightning + Hydra and measure what fine-tuning does to them."""

__version__ = "0.1.0"
