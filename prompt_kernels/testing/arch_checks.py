"""What "prompt_kernels works on this architecture" means, checked on a tiny random model.

``check_architecture(model_type, mapping)`` builds the tiny model (``tiny_models.build_tiny``) and checks:

1. P-tuning v2 (``PrefixTuningConfig``): forward with labels and backward give a finite loss and a
   non-zero gradient on the prompts; the same prompts through the concatenation route
   (``attention_route="concat"``: the prompt keys/values put in front of the layer's own and run
   through the model's own attention implementation) give the same loss, outputs and prompt
   gradients;
2. ``detach`` gives back the model bit for bit: the same outputs, config object, attention
   implementation and ``requires_grad`` flags;
3. ``save_prompts`` / ``load_prompts`` onto the detached model give identical outputs;
4. prompt tuning (``PromptTuningConfig``): finite loss, non-zero prompt gradient;
5. models that generate (causal-LM and seq2seq heads): where the bare tiny model's greedy ``generate``
   runs, the prompted one does too, and on the attention interface gives the same tokens and logits with
   the prompts moved into the key/value cache at the prefill (the default, where the first generate's
   check allows it) as with the prompts joined in the attention at every step (``cache_prompts=False``);
   on the cache route (prompts in generate's own growing cache where the first generate's check allows
   it, else every step recomputed) a causal LM's logits equal prompted forwards.

On a model no route reaches the layers of (its own attention code and no key/value cache: Mamba,
DeBERTa, XLNet, ...), ``attach`` refuses P-tuning v2 with the reason; prompt tuning must then pass
checks 2-4 by itself (input style only).

It raises ``ArchitectureCheckFailed`` naming the check that failed (``TinyModelUnavailable`` when the
bare tiny model does not run).
"""

from __future__ import annotations

import tempfile

import torch

from prompt_kernels.testing.tiny_models import build_tiny, tiny_inputs

PROMPT_LENGTH = 3


class ArchitectureCheckFailed(Exception):
    pass


def _main(output) -> torch.Tensor:
    for name in ("logits", "last_hidden_state"):
        t = getattr(output, name, None)
        if torch.is_tensor(t):
            return t
    return output[0] if isinstance(output, tuple) else next(v for v in output.values() if torch.is_tensor(v))


def _fail(what: str, exc: BaseException | None = None):
    detail = (
        ""
        if exc is None
        else f": {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    )
    raise ArchitectureCheckFailed(f"{what}{detail}") from exc


def _run(pm, inputs):
    out = pm(**inputs)
    loss = out.loss
    if loss is None or not torch.isfinite(loss):
        _fail(f"loss is {None if loss is None else float(loss)}")
    loss.backward()
    grads = [p.grad for p in pm.method.prompt_parameters()]
    if any(g is None for g in grads) or sum(float(g.abs().sum()) for g in grads) == 0:
        _fail("no gradient reaches the prompts")
    return loss.detach(), _main(out).detach(), [g.clone() for g in grads]


def _close(a, b, what: str, rtol=1e-4, atol=1e-5):
    try:
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    except AssertionError as exc:
        _fail(what, exc)


class LayersUnreachable(Exception):
    """``attach`` refused a method that prompts the layers: no route reaches them (input style only)."""


def check_prefix(model, inputs) -> None:
    """P-tuning v2: checks 1-3. ``LayersUnreachable`` when ``attach`` refuses it because no route reaches
    the model's layers (its own attention code and no key/value cache)."""
    import prompt_kernels as pk

    _check_attached(model, inputs, pk.PrefixTuningConfig(prompt_length=PROMPT_LENGTH), concat=True)


def check_prompt_tuning(model, inputs, full: bool = False) -> None:
    """Prompt tuning: check 4 (``full``: checks 2 and 3 as well)."""
    import prompt_kernels as pk

    config = pk.PromptTuningConfig(prompt_length=PROMPT_LENGTH)
    if full:
        _check_attached(model, inputs, config, concat=False)
        return
    try:
        pm = pk.attach(model, config)
        _run(pm, inputs)
    except ArchitectureCheckFailed:
        raise
    except Exception as exc:
        _fail("prompt tuning", exc)
    pm.detach()


def _check_attached(model, inputs, config, concat: bool) -> None:
    import prompt_kernels as pk

    name = type(config).__name__
    with torch.no_grad():
        bare = _main(model(**inputs)).clone()
    config_before, attn_before = model.config, model.config._attn_implementation
    flags = [p.requires_grad for p in model.parameters()]
    try:
        pm = pk.attach(model, config)
    except ValueError as exc:
        if "cannot reach" in str(exc) and "input embeddings" in str(exc):
            raise LayersUnreachable(str(exc)) from exc
        _fail(f"attach {name}", exc)
    except Exception as exc:
        _fail(f"attach {name}", exc)
    if config_before._attn_implementation != attn_before:
        _fail("attach changed the caller's config object")
    try:
        loss, out, grads = _run(pm, inputs)
    except ArchitectureCheckFailed:
        raise
    except Exception as exc:
        _fail(f"{name} forward/backward", exc)
    state = {k: v.clone() for k, v in pm.method.state_dict().items()}
    with torch.no_grad():
        inference = _main(pm(**inputs)).clone()
    with tempfile.TemporaryDirectory() as tmp:
        pm.save_prompts(tmp)
        model = pm.detach()
        if concat and pm.info.layout.kind == "interface":  # the cache route is the model's own concatenation
            pm = pk.attach(model, config, attention_route="concat")
            pm.method.load_state_dict(state)
            try:
                loss_c, out_c, grads_c = _run(pm, inputs)
            except Exception as exc:
                _fail("concatenation route", exc)
            _close(loss, loss_c, "loss differs from the concatenation route")
            _close(out, out_c, "outputs differ from the concatenation route")
            for g, gc in zip(grads, grads_c):
                _close(g, gc, "prompt gradients differ from the concatenation route", rtol=1e-3, atol=1e-5)
            model = pm.detach()
        pm = pk.load_prompts(model, tmp)
        with torch.no_grad():
            _close(_main(pm(**inputs)), inference, "outputs after save/load differ", rtol=0, atol=0)
        model = pm.detach()
    with torch.no_grad():
        after = _main(model(**inputs))
    if not torch.equal(after, bare):
        _fail("detach did not restore the model's outputs bit for bit")
    if model.config is not config_before or model.config._attn_implementation != attn_before:
        _fail("detach did not restore the model's config")
    if [p.requires_grad for p in model.parameters()] != flags:
        _fail("detach did not restore requires_grad")


def _greedy(model, inputs):
    with torch.no_grad():
        return model.generate(
            **inputs,
            max_new_tokens=4,
            min_new_tokens=4,
            do_sample=False,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )


def _check_recomputed_generate(pm, inputs, mapping: str) -> None:
    """The cache route's generate (prompts in generate's growing cache, or every step recomputed): its
    logits equal greedy steps of prompted forwards over everything so far (decoder-only models; an
    encoder-decoder's is checked to run)."""
    # No padding: a left-padded row's positions are the model's own generate business (mask-aware there,
    # arange in a plain forward), with or without prompts.
    inputs = {**inputs, "attention_mask": torch.ones_like(inputs["attention_mask"])}
    try:
        got = _greedy(pm, inputs)
    except Exception as exc:
        _fail("generate with prompts (cache route)", exc)
    if mapping != "causal-lm":
        return
    seq, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        for step, logits in enumerate(got.logits):
            ref = pm(input_ids=seq, attention_mask=mask).logits[:, -1]
            _close(
                logits,
                ref,
                f"generate step {step}: logits differ from a prompted forward",
                rtol=1e-3,
                atol=1e-4,
            )
            nxt = got.sequences[:, seq.shape[1] : seq.shape[1] + 1]
            seq, mask = torch.cat([seq, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)


def check_generate(model, mapping: str) -> str | None:
    """None (no generate to check), "cache" (the prompts went into the key/value cache), "joined", or on
    the cache route "grown" (the prompts in front of generate's own cache) or "recompute" (every step
    recomputed with the prompts as the cache)."""
    import prompt_kernels as pk

    if mapping not in ("causal-lm", "seq2seq") or not model.can_generate():
        return None
    inputs = tiny_inputs(model, mapping, batch=2, length=5, padding="left")
    inputs = {k: inputs[k] for k in ("input_ids", "attention_mask") if k in inputs}
    try:
        _greedy(model, inputs)
    except Exception:
        return None  # the bare tiny model does not generate: nothing to compare
    pm = pk.attach(model, pk.PrefixTuningConfig(prompt_length=PROMPT_LENGTH))
    try:
        with torch.no_grad():
            for p in pm.method.parameters():
                p.mul_(3.0)  # make the prompts matter
        if pm.info.layout.kind == "cache":
            _check_recomputed_generate(pm, inputs, mapping)
            return "grown" if pm._cache_route_exact else "recompute"
        try:
            cached = _greedy(pm, inputs)
            pm.cache_prompts = False
            joined = _greedy(pm, inputs)
        except Exception as exc:
            _fail("generate with prompts", exc)
        if not torch.equal(cached.sequences, joined.sequences):
            _fail("generate: the prompts in the key/value cache give other tokens than joined at every step")
        _close(
            torch.stack(cached.logits, 1),
            torch.stack(joined.logits, 1),
            "generate: logits with the prompts in the key/value cache differ from joined at every step",
            rtol=1e-3,
            atol=1e-4,
        )
        return "cache" if pm._cache_route_exact else "joined"
    finally:
        pm.detach()


def check_architecture(model_type: str, mapping: str) -> dict:
    """Runs the checks; returns ``{"generate": None | "cache" | "joined" | "grown" | "recompute", "layers":
    bool, "reason": str}``: how
    ``generate`` decoded, and whether prompts reach the layers (False: ``attach`` refused P-tuning v2
    with its reason, and prompt tuning passed checks 2-4 on its own: input style only)."""
    model = build_tiny(model_type, mapping)
    for p in model.parameters():
        p.requires_grad_(True)
    inputs = tiny_inputs(model, mapping)
    try:
        check_prefix(model, inputs)
    except LayersUnreachable as exc:
        check_prompt_tuning(model, tiny_inputs(model, mapping, padding="left"), full=True)
        return {"generate": None, "layers": False, "reason": str(exc)}
    check_prompt_tuning(model, tiny_inputs(model, mapping, padding="left"))
    return {"generate": check_generate(model, mapping), "layers": True, "reason": ""}


def main(argv=None) -> None:
    """``python -m prompt_kernels.testing.arch_checks [--mappings ...]``: every type of the mappings through
    ``check_architecture`` (one thread), then per mapping the counts: layers prompted, input style only,
    failing, and how ``generate`` decoded (the numbers the README quotes)."""
    import argparse
    import collections
    import warnings

    import transformers

    from prompt_kernels.testing.tiny_models import MAPPINGS, TinyModelUnavailable, model_types

    ap = argparse.ArgumentParser(description=main.__doc__.split("\n\n")[0])
    ap.add_argument("--mappings", nargs="+", choices=MAPPINGS, default=list(MAPPINGS))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    transformers.logging.set_verbosity_error()
    for mapping in args.mappings:
        kinds, generated, failed = collections.Counter(), collections.Counter(), []
        for model_type in model_types(mapping):
            try:
                result = check_architecture(model_type, mapping)
            except TinyModelUnavailable:
                continue
            except Exception as exc:  # a report: every failure is listed
                failed.append(f"{model_type} ({type(exc).__name__})")
                continue
            kinds["layers" if result["layers"] else "input style only"] += 1
            if result["generate"] is not None:
                generated[result["generate"]] += 1
        print(
            f"{mapping}: {dict(kinds)}; failing {len(failed)}: {', '.join(failed) or '-'}; generate: {dict(generated)}"
        )


if __name__ == "__main__":
    main()
