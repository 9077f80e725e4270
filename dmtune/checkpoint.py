"""Checkpoints that are atomic and safe to open.

Atomic: written to a temporary file beside the target, flushed to disk, then renamed over it,
so a crash, SIGKILL or full disk mid-write leaves the previous checkpoint as it was.
Safe: a checkpoint holds tensors and plain values only (weights, optimizer state, RNG states,
counters) and is read with ``torch.load(weights_only=True)``, which refuses any pickled object
that could run code: run dirs are shared between colleagues and copied from clusters.
"""

from __future__ import annotations

import errno
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

_TMP_SUFFIX = ".tmp"
# what torch.load(weights_only=True) says when a file needs more than tensors and plain values
_REFUSED = "Weights only load failed"


class CheckpointError(ValueError):
    """A checkpoint that is missing or cannot be read."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write to a temporary file in the same directory, then rename over ``path``.

    A write that fails (a full disk: ``ENOSPC``) is one :class:`CheckpointError` line and the
    previous checkpoint at ``path`` is left intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=_TMP_SUFFIX)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError):
            reason = error.strerror or errno.errorcode.get(error.errno or 0, type(error).__name__)
            raise CheckpointError(
                f"cannot write checkpoint {path} ({reason}); "
                "the previous checkpoint there is intact"
            ) from error
        raise
    # temporary files of writes that a SIGKILL cut short
    for stale in path.parent.glob(f"{path.name}*{_TMP_SUFFIX}"):
        stale.unlink(missing_ok=True)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint, or raise a one-line :class:`CheckpointError` saying what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint at {path}: the run never reached its first checkpoint"
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if _REFUSED not in str(error):
            raise _corrupt(path, error) from error
        raise CheckpointError(
            f"checkpoint {path} holds pickled objects besides tensors and plain values; refused: "
            "loading it could run code (dmtune writes none: where did this file come from?)"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as error:
        raise _corrupt(path, error) from error


def _corrupt(path: Path, error: BaseException) -> CheckpointError:
    text = str(error).strip()
    reason = text.splitlines()[0].split(". ")[0][:120] if text else type(error).__name__
    return CheckpointError(
        f"checkpoint {path} is corrupt or truncated ({reason}); restore a copy or start a new run"
    )
