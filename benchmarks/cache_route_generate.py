"""Greedy decoding on the cache route (a model without the attention interface), without a real model.

A random BLOOM (d 256, 4 layers, 8 heads; BLOOM computes attention in its own code and reads its prompts
from the key/value cache), batch 4, 64-token prompts, 32 new tokens, P-tuning v2 with 10 prefix tokens.
Three arms, interleaved per repeat, wall time on one thread, medians:

- ``plain``: the model without prompts;
- ``grown``: ``PromptedModel.generate`` with the prompts put into generate's own cache at the prefill
  (the default, where the first generate's check finds it exact);
- ``recomputed``: ``cache_prompts = False``: every step recomputes the whole sequence::

    OMP_NUM_THREADS=1 python -m benchmarks.cache_route_generate --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main(argv=None) -> None:
    from transformers import BloomConfig, BloomForCausalLM

    import prompt_kernels as pk

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = BloomForCausalLM(
        BloomConfig(vocab_size=1000, hidden_size=256, n_layer=4, n_head=8, pad_token_id=0)
    )
    model.eval()
    ids = torch.randint(1, 1000, (4, 64))
    mask = torch.ones_like(ids)
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    pm = pk.attach(model, pk.PrefixTuningConfig(prompt_length=10))
    times = {"plain": [], "grown": [], "recomputed": []}
    with torch.no_grad():
        pm.generate(input_ids=ids[:1, :4], max_new_tokens=1, pad_token_id=0)  # the first generate's check
        arms = {
            "plain": lambda: pm.disabled(),
            "grown": lambda: _setting(pm, True),
            "recomputed": lambda: _setting(pm, False),
        }
        for _ in range(args.repeats):
            for name, ctx in arms.items():
                with ctx():
                    gen = model.generate if name == "plain" else pm.generate
                    start = time.perf_counter()
                    gen(input_ids=ids, attention_mask=mask, **kw)
                    times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"cache route, random BLOOM (d 256, 4 layers), batch 4 x 64 tokens, {args.new_tokens} new, 10 prefix "
        f"tokens, 1 thread, medians of {args.repeats}; the first generate's check: {pm._cache_route_exact}"
    )
    for name, t in med.items():
        print(f"  {name:<11} {t * 1000:8.0f} ms   {med['plain'] / t:5.2f}x the plain model's tokens/s")


class _setting:
    """``pm.cache_prompts`` set for the block."""

    def __init__(self, pm, value: bool):
        self.pm, self.value = pm, value

    def __enter__(self):
        self.old, self.pm.cache_prompts = self.pm.cache_prompts, self.value

    def __exit__(self, *exc):
        self.pm.cache_prompts = self.old


if __name__ == "__main__":
    main()
