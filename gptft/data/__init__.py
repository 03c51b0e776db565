"""LightningDataModules."""

from gptft.data.windows import BookWindows, WindowSampler, split_segments

__all__ = ["BookWindows", "WindowSampler", "split_segments"]
