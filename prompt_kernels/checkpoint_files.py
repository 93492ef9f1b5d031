"""A run's checkpoint files replaced all together: a crash leaves either the old set or the new one.

The new files are written into ``out/.staging``, the set is marked complete (``COMPLETE``, which lists
them), then each is moved into place with ``os.replace``. A set that was marked complete but not
wholly moved is finished by the next reader (:func:`recover_checkpoint`); one that was not marked is
dropped.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil

STAGING_DIR = ".staging"
COMPLETE_MARK = "COMPLETE"


def _fsync(path: str) -> None:
    with contextlib.suppress(OSError):  # directories cannot be opened everywhere (Windows)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _commit(out: str) -> None:
    staging = os.path.join(out, STAGING_DIR)
    with open(os.path.join(staging, COMPLETE_MARK)) as f:
        mark = json.load(f)
    for name in mark["files"]:
        src = os.path.join(staging, name)
        if os.path.exists(src):  # else moved before a crash
            os.replace(src, os.path.join(out, name))
    for name in mark.get("remove", []):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out, name))
    _fsync(out)
    shutil.rmtree(staging)


def recover_checkpoint(out: str) -> None:
    """Finish moving a checkpoint that was completely written into ``out/.staging`` (a crash while its
    files were being moved into place), or drop one that was not (a crash while it was written)."""
    staging = os.path.join(out, STAGING_DIR)
    if not os.path.isdir(staging):
        return
    if os.path.exists(os.path.join(staging, COMPLETE_MARK)):
        _commit(out)
    else:
        shutil.rmtree(staging)


def write_checkpoint(out: str, writers: dict, remove=()) -> None:
    """Replace the files named by ``writers`` (name -> ``write(path)``) in ``out`` all together: each is
    written into ``out/.staging``, the set is marked complete, then moved into place (``os.replace``);
    ``remove`` names files that no longer belong (deleted after the move)."""
    os.makedirs(out, exist_ok=True)
    recover_checkpoint(out)
    staging = os.path.join(out, STAGING_DIR)
    os.makedirs(staging)
    for name, write in writers.items():
        write(os.path.join(staging, name))
    # Files a writer added (save_prompts writes config.json next to prompts.safetensors) move first,
    # the named ones after them in order: the last one named (state.json) is the last to change.
    names = [n for n in sorted(os.listdir(staging)) if n not in writers] + [
        n for n in writers if os.path.exists(os.path.join(staging, n))
    ]
    for name in names:
        _fsync(os.path.join(staging, name))
    mark = os.path.join(staging, COMPLETE_MARK)
    with open(mark + ".tmp", "w") as f:
        json.dump({"files": names, "remove": list(remove)}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(mark + ".tmp", mark)
    _fsync(staging)
    _commit(out)
