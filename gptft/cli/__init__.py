"""Console commands that use what a run trained: gptft-generate, gptft-chat, gptft-evaluate, gptft-export."""
