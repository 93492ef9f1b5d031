"""Triton kernels, one module per op (kernels, launchers), imported lazily by the ops.

Importing this package (or any module in it) freezes whether the kernels run under the Triton
interpreter: ``TRITON_INTERPRET=1`` must be set before that first import.
"""

from __future__ import annotations

import os

_INTERPRET_AT_IMPORT = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    """Whether the kernels of this process were defined under the Triton interpreter."""
    return _INTERPRET_AT_IMPORT
