"""Parameterised hypercomplex multiplication (PHM) linear layer.

    x:       [..., in_features]
    rules:   [n, n, n]
    weights: [n, I, O]            I = in_features // n, O = out_features // n
    bias:    [out_features] or None
    -> y:    [..., out_features]

``y = x @ H + bias`` with ``H = sum_i kron(rules[i], weights[i])``, ``H: [in_features, out_features]``,
that is ``H[a*I + p, b*O + q] = sum_i rules[i, a, b] * weights[i, p, q]``.

Backends: the Triton kernels (CUDA, or CPU under the interpreter) never materialise ``H`` nor
reshaped copies of ``x``; the C++ CPU kernel builds ``H`` once per call (``n * in * out`` flops) and
runs one GEMM. The backward op returns ``(grad_x, grad_rules, grad_weights, grad_bias)`` with

    grad_x           = dy @ H^T
    dH_ab            = x_a^T dy_b          (x_a = x[:, aI:(a+1)I], dy_b = dy[:, bO:(b+1)O])
    grad_weights[i]  = sum_ab rules[i, a, b] * dH_ab
    grad_rules[i,a,b]= <weights[i], dH_ab>
    grad_bias        = dy.sum(rows)
"""

from __future__ import annotations

import functools

import torch

from prompt_kernels import _alloc, _backend, _cpp, _eager, _validate
from prompt_kernels.floors import PhmLinearFloors, phm_linear_floors  # noqa: F401  (re-exported)

OP = "phm_linear"


def _check(x, rules, weights, bias, dtypes=_validate.FLOAT_DTYPES) -> tuple[int, int, int]:
    """Validate the arguments; returns ``(n, in_features, out_features)``."""
    _validate.tensor("x", x, min_ndim=1, dtypes=dtypes)
    _validate.tensor("rules", rules, ndim=3, dtypes=dtypes)
    _validate.tensor("weights", weights, ndim=3, dtypes=dtypes)
    if bias is not None:
        _validate.tensor("bias", bias, ndim=1, dtypes=dtypes)
    _validate.same_dtype("x", x, rules=rules, weights=weights, bias=bias)
    _validate.same_device("x", x, rules=rules, weights=weights, bias=bias)
    n = rules.shape[0]
    if n < 1 or tuple(rules.shape) != (n, n, n):
        raise ValueError(f"rules must have shape [n, n, n] with n >= 1, got {tuple(rules.shape)}")
    if weights.shape[0] != n:
        raise ValueError(
            f"weights must have shape [n={n}, in_features // n, out_features // n] (n from rules), "
            f"got {tuple(weights.shape)}"
        )
    in_features = x.shape[-1]
    if in_features % n != 0:
        raise ValueError(f"x's last dimension (in_features={in_features}) must be divisible by n={n}")
    if weights.shape[1] * n != in_features:
        raise ValueError(
            f"weights must have shape [n={n}, in_features // n={in_features // n}, out_features // n], "
            f"got {tuple(weights.shape)}"
        )
    out_features = weights.shape[2] * n
    if bias is not None and bias.shape[0] != out_features:
        raise ValueError(f"bias must have shape [out_features={out_features}], got {tuple(bias.shape)}")
    return n, in_features, out_features


def phm_linear_reference(x, rules, weights, bias=None):
    """Plain-PyTorch specification: materialise ``H = sum_i kron(rules[i], weights[i])``, then
    ``x @ H + bias``. Accepts float64 too."""
    n, _, _ = _check(x, rules, weights, bias, _validate.REFERENCE_DTYPES)
    h = torch.kron(rules[0], weights[0])
    for i in range(1, n):
        h = h + torch.kron(rules[i], weights[i])
    y = torch.matmul(x, h)
    if bias is not None:
        y = y + bias
    return y


@functools.cache
def _has_cpp() -> bool:
    # Extension not built at all: say True so that `select` warns and falls back (or raises for "cpp").
    return _cpp.has("phm_linear_forward") if _cpp.available() else True


@functools.cache
def _cpp_op(name: str):
    return _cpp.op(name)


# Largest n the Triton kernels take (their tiles hold all n Kronecker blocks side by side:
# kernels.phm_linear.MAX_N_POW2); larger n (not a PHM layer anyone uses) runs the PyTorch path.
TRITON_MAX_N = 16


def _degenerate(x2: torch.Tensor, weights: torch.Tensor) -> bool:
    """Shapes the Triton kernels leave to PyTorch: no rows or features, or n > ``TRITON_MAX_N``."""
    return (
        x2.shape[0] == 0 or weights.shape[1] == 0 or weights.shape[2] == 0 or weights.shape[0] > TRITON_MAX_N
    )


def _phm_linear_impl(
    x: torch.Tensor, rules: torch.Tensor, weights: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    backend = _backend.select(OP, x.device, _has_cpp())
    in_features, out_features = x.shape[-1], weights.shape[2] * rules.shape[0]
    x2 = x.reshape(-1, in_features)
    if backend == "torch" or (backend == "triton" and _degenerate(x2, weights)):
        return phm_linear_reference(x, rules, weights, bias).contiguous()
    y = _alloc.empty((*x.shape[:-1], out_features), dtype=x.dtype, device=x.device)
    y2 = y.view(-1, out_features)
    if backend == "cpp":
        _cpp_op("phm_linear_forward")(x2, rules.contiguous(), weights.contiguous(), bias, y2)
    else:
        from prompt_kernels.kernels import phm_linear as kernels

        kernels.phm_linear_forward(x2, rules, weights, bias, y2)
    return y


_phm_linear_op = torch.library.custom_op("prompt_kernels::phm_linear", mutates_args=())(_phm_linear_impl)


@_phm_linear_op.register_fake
def _(x, rules, weights, bias):
    return x.new_empty((*x.shape[:-1], weights.shape[2] * rules.shape[0]))


def _backward_torch(dy2, x2, rules, weights, compute_dx, compute_dparams, compute_db):
    """The backward formulas in plain PyTorch (float32 arithmetic for fp16/bf16)."""
    opmath = torch.float32 if dy2.dtype in (torch.float16, torch.bfloat16) else dy2.dtype
    n, ib, ob = weights.shape
    dyf, xf, rf, wf = dy2.to(opmath), x2.to(opmath), rules.to(opmath), weights.to(opmath)
    dx = dr = dw = db = None
    if compute_dx:
        h = torch.einsum("iab,ipq->apbq", rf, wf).reshape(n * ib, n * ob)
        dx = (dyf @ h.t()).to(dy2.dtype)
    if compute_dparams:
        dh = (xf.t() @ dyf).view(n, ib, n, ob)
        dw = torch.einsum("iab,apbq->ipq", rf, dh).to(dy2.dtype)
        dr = torch.einsum("ipq,apbq->iab", wf, dh).to(dy2.dtype)
    if compute_db:
        db = dyf.sum(0).to(dy2.dtype)
    return dx, dr, dw, db


def _empty0(t: torch.Tensor) -> torch.Tensor:
    return t.new_empty((0,))


def _phm_linear_backward_impl(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    rules: torch.Tensor,
    weights: torch.Tensor,
    compute_dx: bool,
    compute_dparams: bool,
    compute_db: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(grad_x, grad_rules, grad_weights, grad_bias)``; a gradient not asked for is an
    empty ``[0]`` tensor."""
    backend = _backend.select(OP, x.device, _has_cpp())
    n, ib, ob = weights.shape
    in_features, out_features = n * ib, n * ob
    x2 = x.reshape(-1, in_features)
    dy2 = grad_out.reshape(-1, out_features)
    if backend == "torch" or (backend == "triton" and _degenerate(x2, weights)):
        dx, dr, dw, db = _backward_torch(dy2, x2, rules, weights, compute_dx, compute_dparams, compute_db)
        return (
            dx.reshape(x.shape) if compute_dx else _empty0(x),
            dr if compute_dparams else _empty0(x),
            dw if compute_dparams else _empty0(x),
            db if compute_db else _empty0(x),
        )
    dx = _alloc.empty(x.shape, dtype=x.dtype, device=x.device) if compute_dx else _empty0(x)
    dr = _alloc.empty_like(rules) if compute_dparams else _empty0(x)
    dw = _alloc.empty_like(weights) if compute_dparams else _empty0(x)
    db = _alloc.empty((out_features,), dtype=x.dtype, device=x.device) if compute_db else _empty0(x)
    dx2 = dx.view(-1, in_features) if compute_dx else dx
    if backend == "cpp":
        _cpp_op("phm_linear_backward")(
            dy2,
            x2,
            rules.contiguous(),
            weights.contiguous(),
            dx2,
            dr,
            dw,
            db,
            compute_dx,
            compute_dparams,
            compute_db,
        )
    else:
        from prompt_kernels.kernels import phm_linear as kernels

        kernels.phm_linear_backward(
            dy2,
            x2,
            rules,
            weights,
            dx2 if compute_dx else None,
            dr if compute_dparams else None,
            dw if compute_dparams else None,
            db if compute_db else None,
        )
    return dx, dr, dw, db


_phm_linear_backward_op = torch.library.custom_op("prompt_kernels::phm_linear_backward", mutates_args=())(
    _phm_linear_backward_impl
)


@_phm_linear_backward_op.register_fake
def _(grad_out, x, rules, weights, compute_dx, compute_dparams, compute_db):
    out = weights.shape[2] * rules.shape[0]
    return (
        x.new_empty(x.shape) if compute_dx else x.new_empty((0,)),
        rules.new_empty(rules.shape) if compute_dparams else x.new_empty((0,)),
        weights.new_empty(weights.shape) if compute_dparams else x.new_empty((0,)),
        x.new_empty((out,)) if compute_db else x.new_empty((0,)),
    )


def _setup_context(ctx, inputs, output):
    x, rules, weights, bias = inputs
    ctx.save_for_backward(x, rules, weights)
    ctx.has_bias = bias is not None


def _backward(ctx, grad, backward_op=_phm_linear_backward_op):
    x, rules, weights = ctx.saved_tensors
    need_x, need_r, need_w, need_b = ctx.needs_input_grad
    need_b = need_b and ctx.has_bias
    if not (need_x or need_r or need_w or need_b):
        return None, None, None, None
    dx, dr, dw, db = backward_op(grad, x, rules, weights, need_x, need_r or need_w, need_b)
    return (dx if need_x else None, dr if need_r else None, dw if need_w else None, db if need_b else None)


_phm_linear_op.register_autograd(_backward, setup_context=_setup_context)


_EagerPHMLinear = _eager.eager_function(
    "_EagerPHMLinear", _phm_linear_impl, _setup_context, _backward, _phm_linear_backward_impl
)


def phm_linear(x, rules, weights, bias=None):
    """PHM linear layer ``x @ sum_i kron(rules[i], weights[i]) + bias`` (see the module docstring).

    Dispatches per call to Triton (CUDA), C++ (CPU) or the PyTorch reference; differentiable with
    respect to ``x``, ``rules``, ``weights`` and ``bias``.
    """
    _check(x, rules, weights, bias)
    return _eager.call(_phm_linear_op, _EagerPHMLinear, x, rules, weights, bias)
