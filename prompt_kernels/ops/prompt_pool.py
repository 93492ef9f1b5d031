"""Masked adaptive average pooling of a sequence to a fixed prompt length.

    x:              [B, T, D]   float32 | float16 | bfloat16 (the reference also takes float64)
    attention_mask: [B, T]      bool or integer, nonzero = real token; or None (every token is real)
    length:         int >= 1
    -> out:         [B, length, D], the dtype of x

For row ``b`` let the real tokens be ``v_0 .. v_{n-1}`` in order (padding may sit anywhere). Then
``out[b, j] = mean(x[b, v_s .. v_{e-1}])`` with ``s = floor(j * n / length)`` and
``e = ceil((j + 1) * n / length)``: the bins of ``torch.nn.AdaptiveAvgPool1d`` over the real tokens.
A row with ``n = 0`` gives zeros; ``n < length`` repeats tokens in several bins. Differentiable with
respect to ``x`` (the mask and the length are not).

A token's bins follow from its rank ``r`` among the real tokens (the exclusive cumulative sum of the
mask): it lies in bins ``j`` with ``s_j <= r < e_j``, i.e. ``floor(r * length / n) <= j <
ceil((r + 1) * length / n)``. The kernels use that both ways: the forward gathers the rows of the
real tokens ranked ``s_j .. e_j - 1``; the backward gives each real token the sum of
``grad_out[b, j] / (e_j - s_j)`` over its bins and padding tokens zero.
"""

from __future__ import annotations

import torch

from prompt_kernels import _alloc, _backend, _cpp, _validate
from prompt_kernels.floors import prompt_pool_floors  # noqa: F401  (the op's floors, re-exported)

OP = "prompt_pool"
# Mask dtypes the C++ and Triton kernels read directly; any other integer mask is turned into bool first.
KERNEL_MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _check(x, attention_mask, length, dtypes=_validate.FLOAT_DTYPES) -> tuple[int, int, int]:
    _validate.tensor("x", x, ndim=3, dtypes=dtypes)
    B, T, D = x.shape
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(
                f"attention_mask must be a torch.Tensor [B, T] or None, got {type(attention_mask).__name__}"
            )
        if attention_mask.is_floating_point() or attention_mask.is_complex():
            raise TypeError(
                "attention_mask must have dtype bool or an integer dtype (nonzero = real token), "
                f"got {str(attention_mask.dtype).replace('torch.', '')}"
            )
        if tuple(attention_mask.shape) != (B, T):
            raise ValueError(
                f"attention_mask must have shape [B={B}, T={T}] (the first two dimensions of x), "
                f"got {tuple(attention_mask.shape)}"
            )
        _validate.same_device("x", x, attention_mask=attention_mask)
    _validate.positive_int("length", length)
    return B, T, D


def bin_bounds(n: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive-pooling bins over ``n`` real tokens. ``n``: integer [...]; returns ``start, end``:
    [..., length], bin ``j`` covers the real tokens ranked ``start[j] <= r < end[j]``."""
    j = torch.arange(length, device=n.device)
    n = n.unsqueeze(-1)
    start = torch.div(j * n, length, rounding_mode="floor")
    end = torch.div((j + 1) * n + length - 1, length, rounding_mode="floor")
    return start, end


def bin_weights(
    attention_mask: torch.Tensor | None, B: int, T: int, length: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The pooling as a matrix: [B, length, T], ``1 / (e_j - s_j)`` where real token t lies in bin j."""
    if attention_mask is None:
        real = torch.ones(B, T, dtype=torch.bool, device=device)
    else:
        real = attention_mask != 0
    real_i = real.long()
    rank = torch.cumsum(real_i, dim=1) - real_i  # [B, T]: rank among the real tokens
    n = real_i.sum(dim=1)  # [B]
    start, end = bin_bounds(n, length)  # [B, length]
    r = rank[:, None, :]
    in_bin = real[:, None, :] & (r >= start[:, :, None]) & (r < end[:, :, None])  # [B, length, T]
    count = (end - start).clamp(min=1)  # n = 0: empty bins, zero weights
    return in_bin.to(dtype) / count[:, :, None].to(dtype)


def prompt_pool_reference(x: torch.Tensor, attention_mask: torch.Tensor | None, length: int) -> torch.Tensor:
    """Plain-PyTorch specification: the [B, length, T] bin-weight matrix times ``x``."""
    B, T, _ = _check(x, attention_mask, length, _validate.REFERENCE_DTYPES)
    return torch.bmm(bin_weights(attention_mask, B, T, length, x.dtype, x.device), x)


def _has_cpp() -> bool:
    # Built extension without this op (stale build): auto falls back to the reference, cpp raises.
    return not _cpp.available() or _cpp.has("prompt_pool_forward")


def _cpp_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    if attention_mask is None:
        return None
    if attention_mask.dtype not in KERNEL_MASK_DTYPES:
        attention_mask = attention_mask != 0
    return attention_mask.contiguous()


@torch.library.custom_op("prompt_kernels::prompt_pool", mutates_args=())
def _prompt_pool_op(x: torch.Tensor, attention_mask: torch.Tensor | None, length: int) -> torch.Tensor:
    backend = _backend.select(OP, x.device, has_cpp=_has_cpp())
    if backend == "triton":
        from prompt_kernels.kernels import prompt_pool as kernels

        return kernels.prompt_pool_forward(x, attention_mask, length)
    if backend == "cpp":
        B, _, D = x.shape
        out = _alloc.empty((B, length, D), dtype=x.dtype, device=x.device)
        _cpp.op("prompt_pool_forward")(x.contiguous(), _cpp_mask(attention_mask), length, out)
        return out
    return prompt_pool_reference(x, attention_mask, length)


@_prompt_pool_op.register_fake
def _(x, attention_mask, length):
    return x.new_empty((x.shape[0], length, x.shape[2]))


@torch.library.custom_op("prompt_kernels::prompt_pool_backward", mutates_args=())
def _prompt_pool_backward_op(
    grad_out: torch.Tensor, attention_mask: torch.Tensor | None, seq_len: int
) -> torch.Tensor:
    """grad_out: [B, length, D] -> grad_x: [B, seq_len, D] (zero on padding tokens)."""
    backend = _backend.select(OP, grad_out.device, has_cpp=_has_cpp())
    if backend == "triton":
        from prompt_kernels.kernels import prompt_pool as kernels

        return kernels.prompt_pool_backward(grad_out, attention_mask, seq_len)
    if backend == "cpp":
        B, _, D = grad_out.shape
        grad_x = _alloc.empty((B, seq_len, D), dtype=grad_out.dtype, device=grad_out.device)
        _cpp.op("prompt_pool_backward")(grad_out.contiguous(), _cpp_mask(attention_mask), grad_x)
        return grad_x
    return _backward_reference(grad_out, attention_mask, seq_len)


def _backward_reference(grad_out, attention_mask, seq_len):
    # The pooling is linear in x: grad_x = weights^T @ grad_out.
    B, length, _ = grad_out.shape
    w = bin_weights(attention_mask, B, seq_len, length, grad_out.dtype, grad_out.device)
    return torch.bmm(w.transpose(1, 2), grad_out)


@_prompt_pool_backward_op.register_fake
def _(grad_out, attention_mask, seq_len):
    return grad_out.new_empty((grad_out.shape[0], seq_len, grad_out.shape[2]))


def _setup_context(ctx, inputs, output):
    x, attention_mask, _ = inputs
    ctx.save_for_backward(attention_mask)
    ctx.seq_len = x.shape[1]


def _backward(ctx, grad_out):
    (attention_mask,) = ctx.saved_tensors
    return _prompt_pool_backward_op(grad_out, attention_mask, ctx.seq_len), None, None


_prompt_pool_op.register_autograd(_backward, setup_context=_setup_context)


def _setup_context_bwd(ctx, inputs, output):
    grad_out, attention_mask, _ = inputs
    ctx.save_for_backward(attention_mask)
    ctx.length = grad_out.shape[1]


def _backward_bwd(ctx, grad_grad_x):
    # The backward is the adjoint of a linear map; its own adjoint is the forward pooling.
    (attention_mask,) = ctx.saved_tensors
    return _prompt_pool_op(grad_grad_x, attention_mask, ctx.length), None, None


_prompt_pool_backward_op.register_autograd(_backward_bwd, setup_context=_setup_context_bwd)


def prompt_pool(x: torch.Tensor, attention_mask: torch.Tensor | None, length: int) -> torch.Tensor:
    """Masked adaptive average pooling of ``x`` [B, T, D] to [B, length, D] (see the module docstring).

    Dispatches per call to Triton (CUDA), the C++ kernel (CPU) or the PyTorch reference.
    """
    _check(x, attention_mask, length)
    return _prompt_pool_op(x, attention_mask, length)
