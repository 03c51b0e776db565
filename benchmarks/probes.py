"""Benchmark 3, probes: the batched KV-cached generation the probes use (gptft.models.generate.sample_tokens)
vs naive full recomputation, 100 new tokens.

Run by hand (`make bench`). The quickstart's model (4 layers, d 256, context 128, random init: speed does not
depend on the weights), 10 one-token prompts as the free-generation probe draws them, top-k 50. The naive
loop feeds the whole sequence through the model for every new token (O(T²) work), as the course's notebooks
do; both are batched, so the ratio is the KV cache's. Interleaved repeats, medians. Prints a table and writes
outputs/benchmarks/probes.json.
"""

from __future__ import annotations

import statistics
import time

import torch

from gptft.utils.io import atomic_write_json

ARCH = {"model_type": "gpt2", "n_layer": 4, "n_embd": 256, "n_head": 4, "n_positions": 128}
PROMPTS, NEW, REPEATS = 10, 100, 5


@torch.no_grad()
def naive(model: torch.nn.Module, prompt_ids: torch.Tensor, seed: int, new: int = NEW) -> torch.Tensor:
    """Top-k 50 sampling that recomputes the full sequence for every new token (no KV cache)."""
    g = torch.Generator().manual_seed(seed)
    ids = prompt_ids
    for _ in range(new):
        logits = model(input_ids=ids, use_cache=False).logits[:, -1].float()
        top, where = logits.topk(50, dim=-1)
        pick = torch.multinomial(top.softmax(-1), 1, generator=g)
        ids = torch.cat([ids, where.gather(-1, pick)], dim=1)
    return ids[:, prompt_ids.size(1) :]


def main() -> None:
    from gptft.models import build_model, sample_tokens

    torch.manual_seed(0)
    model = build_model(arch=ARCH).eval()
    prompts = torch.randint(0, 50257, (PROMPTS, 1), generator=torch.Generator().manual_seed(0))
    sample_tokens(model, prompts, max_new_tokens=5)  # warm up both paths
    naive(model, prompts, 0, new=5)
    times: dict[str, list[float]] = {"sample_tokens (KV cache)": [], "full recomputation": []}
    for repeat in range(REPEATS):
        for name in list(times)[:: 1 if repeat % 2 == 0 else -1]:  # alternate the order: drift hits both
            start = time.perf_counter()
            if name == "full recomputation":
                naive(model, prompts, repeat)
            else:
                assert sample_tokens(model, prompts, max_new_tokens=NEW, seed=repeat).shape == (PROMPTS, NEW)
            times[name].append(time.perf_counter() - start)
        print(f"repeat {repeat}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
    medians = {k: statistics.median(v) for k, v in times.items()}
    tokens = PROMPTS * NEW
    fast = medians["sample_tokens (KV cache)"]
    print(f"\n{'generation, 10 prompts × 100 tokens':<38}{'s':>8}{'tokens/s':>10}{'speed-up':>10}")
    for name, m in medians.items():
        print(f"{name:<38}{m:>8.2f}{tokens / m:>10.0f}{m / fast:>9.1f}×")
    # The machine is shared: the median of the side-by-side ratios is steadier than a ratio of medians.
    ratios = [
        a / b for a, b in zip(times["full recomputation"], times["sample_tokens (KV cache)"], strict=True)
    ]
    ratio = statistics.median(ratios)
    print(
        f"\nKV-cached batched generation is {ratio:.1f}× faster than full recomputation (median of the repeats' "
        f"ratios {', '.join(f'{r:.1f}' for r in ratios)}; target ≥ 5×)"
    )
    atomic_write_json(
        "outputs/benchmarks/probes.json",
        {
            "arch": ARCH,
            "prompts": PROMPTS,
            "new_tokens": NEW,
            "repeats": times,
            "medians_s": medians,
            "speedup": ratio,
            "speedup_per_repeat": ratios,
            "threads": torch.get_num_threads(),
        },
    )


if __name__ == "__main__":
    main()
