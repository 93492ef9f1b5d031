"""Global-memory traffic and tl.dot flops of Triton launches, counted under the Triton interpreter.

Usage (``TRITON_INTERPRET=1`` must be set before the kernels are imported)::

    with TrafficMeter() as m:
        launch()
    m.launches  # one LaunchRecord per kernel launch
    m.totals    # the sum over launches

The meter wraps the interpreter's builder methods while the ``with`` block runs; kernels are not
changed. Per launch it counts

* ``loaded_bytes`` / ``stored_bytes``: bytes as issued by every load / store, masked-off lanes
  excluded, every program counted (block pointers, tensor descriptors, gathers and scatters go through
  the same masked load / store; an atomic counts as a load and a store of its active lanes);
* ``unique_loaded_bytes`` / ``unique_stored_bytes``: distinct byte addresses read / written in the
  launch (the DRAM traffic with a perfect cache; the issued bytes are the traffic with no cache);
* ``dot_flops``: ``2 * M * N * K`` for every ``tl.dot`` of every program;
* ``programs``: the number of programs of the grid.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np

_COMPACT_AT = 1 << 22  # byte addresses buffered before de-duplicating


class _ByteSet:
    """Distinct byte addresses, buffered and de-duplicated in chunks to bound memory."""

    def __init__(self) -> None:
        self._parts: list[np.ndarray] = []
        self._pending = 0

    def add(self, addresses: np.ndarray, itemsize: int) -> None:
        if addresses.size == 0:
            return
        addr = addresses.astype(np.uint64, copy=False).reshape(-1)
        if itemsize > 1:
            addr = (addr[:, None] + np.arange(itemsize, dtype=np.uint64)[None, :]).reshape(-1)
        self._parts.append(addr)
        self._pending += addr.size
        if self._pending > _COMPACT_AT:
            self._compact()

    def _compact(self) -> None:
        if len(self._parts) > 1 or self._pending:
            self._parts = [np.unique(np.concatenate(self._parts))] if self._parts else []
        self._pending = 0

    def __len__(self) -> int:
        self._compact()
        return int(self._parts[0].size) if self._parts else 0


@dataclass
class LaunchRecord:
    kernel: str
    grid: tuple[int, int, int] = (0, 0, 0)
    loaded_bytes: int = 0
    stored_bytes: int = 0
    unique_loaded_bytes: int = 0
    unique_stored_bytes: int = 0
    dot_flops: int = 0
    dots: int = 0
    atomics: int = 0
    _loaded: _ByteSet = field(default_factory=_ByteSet, repr=False, compare=False)
    _stored: _ByteSet = field(default_factory=_ByteSet, repr=False, compare=False)

    @property
    def programs(self) -> int:
        return int(np.prod(self.grid))

    @property
    def issued_bytes(self) -> int:
        return self.loaded_bytes + self.stored_bytes

    @property
    def unique_bytes(self) -> int:
        return self.unique_loaded_bytes + self.unique_stored_bytes

    def _finish(self) -> None:
        self.unique_loaded_bytes = len(self._loaded)
        self.unique_stored_bytes = len(self._stored)
        self._loaded = self._stored = _ByteSet()  # free the address sets


@dataclass
class Totals:
    launches: int = 0
    programs: int = 0
    loaded_bytes: int = 0
    stored_bytes: int = 0
    unique_loaded_bytes: int = 0  # summed per launch: data re-read by a later launch counts again
    unique_stored_bytes: int = 0
    dot_flops: int = 0

    @property
    def issued_bytes(self) -> int:
        return self.loaded_bytes + self.stored_bytes

    @property
    def unique_bytes(self) -> int:
        return self.unique_loaded_bytes + self.unique_stored_bytes


def _itemsize(ptr_handle) -> int:
    return max(1, ptr_handle.get_element_ty().primitive_bitwidth // 8)


def _active(ptrs: np.ndarray, mask) -> np.ndarray:
    """Addresses of the lanes whose mask is set."""
    if mask is None:
        return ptrs.reshape(-1)
    m = np.broadcast_to(np.asarray(mask, dtype=bool), ptrs.shape)
    return ptrs[m]


class TrafficMeter:
    """Counts memory traffic and dot flops of every interpreted Triton launch inside the block."""

    def __init__(self) -> None:
        self.launches: list[LaunchRecord] = []
        self._current: LaunchRecord | None = None
        self._stack: contextlib.ExitStack | None = None

    @property
    def totals(self) -> Totals:
        t = Totals(launches=len(self.launches))
        for r in self.launches:
            t.programs += r.programs
            t.loaded_bytes += r.loaded_bytes
            t.stored_bytes += r.stored_bytes
            t.unique_loaded_bytes += r.unique_loaded_bytes
            t.unique_stored_bytes += r.unique_stored_bytes
            t.dot_flops += r.dot_flops
        return t

    # -- accounting ------------------------------------------------------------------------------
    def _load(self, ptrs, mask) -> None:
        rec = self._current
        if rec is None:
            return
        addr = _active(ptrs.data, None if mask is None else mask.data)
        size = _itemsize(ptrs)
        rec.loaded_bytes += addr.size * size
        rec._loaded.add(addr, size)

    def _store(self, ptrs, mask) -> None:
        rec = self._current
        if rec is None:
            return
        addr = _active(ptrs.data, None if mask is None else mask.data)
        size = _itemsize(ptrs)
        rec.stored_bytes += addr.size * size
        rec._stored.add(addr, size)

    def _dot(self, a, b) -> None:
        rec = self._current
        if rec is None:
            return
        # a: [..., M, K], b: [..., K, N] -> 2 * (batch * M * K) * N
        rec.dot_flops += 2 * int(a.data.size) * int(b.data.shape[-1])
        rec.dots += 1

    # -- patching --------------------------------------------------------------------------------
    def __enter__(self) -> TrafficMeter:
        from triton.runtime import interpreter

        builder = interpreter.interpreter_builder
        meter = self
        stack = contextlib.ExitStack()

        def patch_instance(name, make):
            original = getattr(builder, name)
            had_own = name in builder.__dict__
            setattr(builder, name, make(original))

            def restore():
                if had_own:
                    setattr(builder, name, original)
                else:
                    delattr(builder, name)

            stack.callback(restore)

        def masked_load(orig):
            def f(ptrs, mask, *args, **kwargs):
                meter._load(ptrs, mask)
                return orig(ptrs, mask, *args, **kwargs)

            return f

        def masked_store(orig):
            def f(ptrs, value, mask, *args, **kwargs):
                meter._store(ptrs, mask)
                return orig(ptrs, value, mask, *args, **kwargs)

            return f

        def dot(orig):
            def f(a, b, *args, **kwargs):
                meter._dot(a, b)
                return orig(a, b, *args, **kwargs)

            return f

        def atomic_rmw(orig):
            def f(rmw_op, ptr, val, mask, *args, **kwargs):
                meter._load(ptr, mask)
                meter._store(ptr, mask)
                if meter._current is not None:
                    meter._current.atomics += 1
                return orig(rmw_op, ptr, val, mask, *args, **kwargs)

            return f

        def atomic_cas(orig):
            def f(ptr, *args, **kwargs):
                meter._load(ptr, None)
                meter._store(ptr, None)
                if meter._current is not None:
                    meter._current.atomics += 1
                return orig(ptr, *args, **kwargs)

            return f

        def set_grid_dim(orig):
            def f(nx, ny, nz):
                if meter._current is not None:
                    meter._current.grid = (int(nx), int(ny), int(nz))
                return orig(nx, ny, nz)

            return f

        patch_instance("create_masked_load", masked_load)
        patch_instance("create_masked_store", masked_store)
        patch_instance("create_dot", dot)
        patch_instance("create_atomic_rmw", atomic_rmw)
        patch_instance("create_atomic_cas", atomic_cas)
        patch_instance("set_grid_dim", set_grid_dim)

        executor = interpreter.GridExecutor
        original_call = executor.__call__

        def call(executor_self, *args, **kwargs):
            outer = meter._current
            rec = LaunchRecord(kernel=executor_self.fn.__name__)
            meter._current = rec
            try:
                return original_call(executor_self, *args, **kwargs)
            finally:
                rec._finish()
                meter.launches.append(rec)
                meter._current = outer

        executor.__call__ = call
        stack.callback(setattr, executor, "__call__", original_call)
        self._stack = stack
        return self

    def __exit__(self, *exc) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None


def measure(launch) -> TrafficMeter:
    """Run ``launch()`` under a fresh meter and return the meter."""
    with TrafficMeter() as m:
        launch()
    return m
