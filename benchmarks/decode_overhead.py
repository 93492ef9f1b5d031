"""Per-token cost of the patch layer in greedy decoding, without loading a real model.

A random Llama with SmolLM2-135M's shape (30 layers, d 576, 9 heads, 3 key/value heads), batch 4,
32-token prompts, 32 new tokens, P-tuning v2 with 10 prefix tokens. Plain model and prompted model
interleaved, process CPU time (one thread), medians over repeats::

    OMP_NUM_THREADS=1 python -m benchmarks.decode_overhead --repeats 5

Prints the medians and minima and ``plain / ours`` (the prompted model's tokens/s relative to the plain
model's). ``generate`` puts the prompts into the key/value cache at the prefill (checked exact on the first
call), so a decoding step is one attention call per layer, as in the plain model.

A third arm, ``plain_10_cached``, splits what prefix decoding must cost from what the patch layer adds: the
plain model (no patch layer at all) generates with 10 random key/value rows already in its
``DynamicCache`` (and 10 more mask columns), so its prefill and every decoding step attend over the same
number of keys, and copy the same cache rows, as the prompted model's. ``plain / plain_10_cached`` is the
cost of prefix decoding itself; ``plain_10_cached / ours`` is the patch layer's own.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import time

import torch


def _generate(model, ids, mask, new: int) -> None:
    with torch.no_grad():
        model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False
        )


def _generate_with_cached_rows(model, ids, mask, new: int, rows: int) -> None:
    """Greedy ``generate`` of the plain model with ``rows`` random key/value rows per layer already in
    its cache: the shapes prefix decoding has, without any patch layer."""
    from transformers import DynamicCache

    cfg = model.config
    kv_heads = cfg.num_key_value_heads
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    cache = DynamicCache(config=cfg)
    gen = torch.Generator().manual_seed(1)
    for layer in range(cfg.num_hidden_layers):
        k, v = (torch.randn(ids.shape[0], kv_heads, rows, head_dim, generator=gen) for _ in range(2))
        cache.update(k, v, layer)
    pad = torch.zeros(ids.shape[0], rows, dtype=ids.dtype)  # stand-ins for the cached positions
    # transformers renamed the cache argument (5.2x: ``cache``; before: ``past_key_values``)
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        model.generate(
            input_ids=torch.cat([pad, ids], 1),
            attention_mask=torch.cat([torch.ones_like(pad), mask], 1),
            **{name: cache},
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
        )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    from transformers import LlamaConfig, LlamaForCausalLM

    import prompt_kernels as pk
    from benchmarks.common import machine_name

    PREFIX = pk.PrefixTuningConfig(prompt_length=10)

    torch.set_num_threads(1)
    cfg = LlamaConfig(
        hidden_size=576,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        vocab_size=49152,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(10, 40000, (4, 32))
    mask = torch.ones_like(ids)
    times = {"plain": [], "plain_10_cached": [], "prompt_kernels": []}
    first = pk.attach(model, PREFIX)
    state = {k: v.clone() for k, v in first.method.state_dict().items()}  # the same prompts every repeat
    first.detach()
    for _ in range(args.repeats):
        # The very same model object (the same weights in memory) with and without prompts: separate
        # copies of a model can decode a few percent apart on this CPU (memory placement).
        for name in times:
            m = model
            if name == "prompt_kernels":
                m = pk.attach(model, PREFIX).eval()
                m.method.load_state_dict(state)
            if name == "plain_10_cached":
                _generate_with_cached_rows(m, ids, mask, 1, PREFIX.prompt_length)  # untimed warm-up
                t = time.process_time()
                _generate_with_cached_rows(m, ids, mask, 32, PREFIX.prompt_length)
            else:
                _generate(m, ids, mask, 1)  # untimed: warm, and the first generate's one-off cache check
                t = time.process_time()
                _generate(m, ids, mask, 32)
            times[name].append(time.process_time() - t)
            if name == "prompt_kernels":
                m.detach()
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    print(f"{machine_name()}, {args.repeats} repeats")
    for k in times:
        print(f"{k:<16} {med[k]:.3f} s CPU per generate (median), {low[k]:.3f} s (min)")
    print(
        f"prompt_kernels tokens/s relative to plain: {med['plain'] / med['prompt_kernels']:.3f} (medians), "
        f"{low['plain'] / low['prompt_kernels']:.3f} (minima: least disturbed by other jobs)"
    )
    print(
        f"prefix decoding itself (plain_10_cached relative to plain): "
        f"{med['plain'] / med['plain_10_cached']:.3f} (medians), {low['plain'] / low['plain_10_cached']:.3f} (minima)"
    )
    print(
        f"the patch layer's own (prompt_kernels relative to plain_10_cached): "
        f"{med['plain_10_cached'] / med['prompt_kernels']:.3f} (medians), "
        f"{low['plain_10_cached'] / low['prompt_kernels']:.3f} (minima)"
    )


if __name__ == "__main__":
    main()
