"""P-tuning v2 through the patch layer equals Hugging Face PEFT's prefix tuning (outputs and gradients).

Given the same prefix keys/values. PEFT's cache holds the p prefix tokens, so it numbers the real
tokens from p (it even adds p to explicit position_ids); we pass ``position_ids + p`` to our model so
both see the same positions.

SEQ_CLS on transformers >= 5.24: PEFT's ``PeftModelForSequenceClassification._prefix_tuning_forward``
(checked up to peft 0.21.2) hands the prefix to the model only if ``"past_key_values"`` is a parameter
of the model's forward (else of its backbone's), and raises "Model does not support past key values
which are required for prefix tuning" otherwise. transformers 5.24 renamed that parameter to ``cache``
(``@deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")``; the old keyword still works), so
the check fails although the model takes the prefix. There we run the same classifier through PEFT's
FEATURE_EXTRACTION wrapper, which passes ``past_key_values=get_prompt(B)`` unconditionally and makes
the same call the SEQ_CLS wrapper made (prompt mask in front, position_ids + p, labels to the model's
own loss): same prompt encoder, same logits, loss and gradients.
"""

from __future__ import annotations

import copy

import pytest
import torch
from patch_helpers import batch, one_thread, tiny_model  # noqa: F401  (one_thread: autouse fixture)

import prompt_kernels as pk
from benchmarks.bench_patch import peft_task_type

peft = pytest.importorskip("peft")

CASES = [
    ("llama", "lm", "CAUSAL_LM"),
    ("llama", "cls", "SEQ_CLS"),
    ("bert", "cls", "SEQ_CLS"),
    ("bert", "base", "FEATURE_EXTRACTION"),
    ("gpt2", "lm", "CAUSAL_LM"),
    ("qwen2", "lm", "CAUSAL_LM"),
    ("roberta", "cls", "SEQ_CLS"),
]


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("model_type,head,task", CASES)
def test_prefix_tuning_equals_peft(model_type, head, task, projection):
    # PEFT's reparameterisation embeds in Hkv * Dh (not d) dimensions: compare it on multi-head models.
    overrides = {"num_key_value_heads": 4} if projection and model_type in ("llama", "qwen2") else {}
    model = tiny_model(model_type, head, dropout=False, **overrides)
    ids, mask = batch(model_type)
    B, T = ids.shape
    p, r = 4, 16
    peft_cfg = peft.PrefixTuningConfig(
        task_type=peft_task_type(task, model),
        num_virtual_tokens=p,
        prefix_projection=projection,
        encoder_hidden_size=r,
    )
    theirs = peft.get_peft_model(copy.deepcopy(model), peft_cfg).eval()
    ours = pk.attach(
        model,
        pk.PrefixTuningConfig(
            prompt_length=p, prefix_projection=projection, projection_hidden_size=r, prefix_dropout=0.0
        ),
    )
    encoder = theirs.prompt_encoder["default"]
    ours.method.load_state_dict(encoder.state_dict())

    pos = torch.arange(T)[None].expand(B, -1)
    kwargs = dict(input_ids=ids, attention_mask=mask)
    if head == "lm":
        kwargs["labels"] = ids.masked_fill(mask == 0, -100)
    elif head == "cls":
        kwargs["labels"] = torch.tensor([0, 1, 2])
    out_theirs = theirs(**kwargs, position_ids=pos)
    out_ours = ours(**kwargs, position_ids=pos + p)
    key = "last_hidden_state" if head == "base" else "logits"
    torch.testing.assert_close(out_ours[key], out_theirs[key], rtol=1e-5, atol=1e-6)

    if head == "base":
        w = torch.randn_like(out_ours[key])
        loss_ours, loss_theirs = (out_ours[key] * w).sum(), (out_theirs[key] * w).sum()
    else:
        torch.testing.assert_close(out_ours.loss, out_theirs.loss)
        loss_ours, loss_theirs = out_ours.loss, out_theirs.loss
    loss_ours.backward()
    loss_theirs.backward()
    grads_theirs = dict(encoder.named_parameters())
    for name, prm in ours.method.named_parameters():
        assert prm.grad is not None and prm.grad.abs().sum() > 0, name
        torch.testing.assert_close(prm.grad, grads_theirs[name].grad, rtol=1e-5, atol=1e-7, msg=name)
    assert all(q.grad is None for q in model.parameters())
