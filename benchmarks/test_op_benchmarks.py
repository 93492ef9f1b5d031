"""The op benchmarks through pytest-benchmark: ``pytest benchmarks/ --benchmark-only``.

The cases are the ones ``python -m benchmarks.run`` times (each ``benchmarks/bench_<op>.py``'s
``cases(quick)``), one test per case, grouped per op, mode and size so that pytest-benchmark prints
the providers side by side; ``--benchmark-save NAME`` / ``--benchmark-compare`` work as usual. Quick
sizes by default; ``PROMPT_KERNELS_BENCH_FULL=1`` for the full ones. The end-to-end modules
(``bench_patch``, ``bench_smollm2``: a model is loaded and trained) stay with ``benchmarks.run``.
Not part of ``make test`` (``python_tests/`` is); ``python_tests/test_bench_cli.py`` runs one case
through it.
"""

from __future__ import annotations

import os

import pytest

from benchmarks.run import discover

OPS = ("phm_linear", "prompt_pool", "vq", "gated_prefix_attention")
QUICK = os.environ.get("PROMPT_KERNELS_BENCH_FULL", "0") != "1"


def _cases():
    out = []
    for mod in discover(None):
        if mod.__name__.split(".bench_")[-1] in OPS:
            out.extend(mod.cases(QUICK))
    return out


CASES = _cases()


@pytest.mark.parametrize(
    "case", CASES, ids=[f"{c.kernel}-{c.mode}-{c.size}-{c.provider}".replace(" ", "") for c in CASES]
)
def test_case(benchmark, case):
    benchmark.group = f"{case.kernel} {case.mode} {case.size}"
    benchmark.extra_info.update(provider=case.provider, kernel=case.kernel, mode=case.mode, size=case.size)
    if case.setup is not None:
        case.setup()
    benchmark(case.fn)
