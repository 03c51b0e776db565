"""LightningDataModules."""

from gptft.data.instruct import InstructPairs
from gptft.data.windows import BookWindows, WindowSampler, split_segments

__all__ = ["BookWindows", "InstructPairs", "WindowSampler", "split_segments"]
