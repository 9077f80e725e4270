"""The run dir's JSON: values made plain, non-finite floats spelled out, JSONL read and written.

Non-finite floats are written as the strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"``
(W&B's own spelling) so that every line is valid JSON; :func:`read_jsonl` turns them back into
floats.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def to_python(value: Any) -> Any:
    """Plain Python (float, int, str, list, dict) from tensors, numpy values and containers."""
    if isinstance(value, Mapping):
        return {str(k): to_python(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_python(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "tolist"):  # torch tensors and numpy arrays/scalars: a CPU sync point
        return to_python(value.tolist())
    return str(value)


def _map_leaves(value: Any, leaf: Callable[[Any], Any]) -> Any:
    """Apply ``leaf`` to every non-container value of nested dicts and lists."""
    if isinstance(value, dict):
        return {k: _map_leaves(v, leaf) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_leaves(v, leaf) for v in value]
    return leaf(value)


def _encode_nonfinite(value: Any) -> Any:
    """NaN/±inf floats as W&B spells them, so that the JSON is valid."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def _decode_nonfinite(value: Any) -> Any:
    """Inverse of :func:`_encode_nonfinite`."""
    return _NONFINITE.get(value, value) if isinstance(value, str) else value


def encode_nonfinite(value: Any) -> Any:
    """Non-finite floats anywhere in nested dicts and lists as ``"NaN"``, ``"Infinity"``,
    ``"-Infinity"``."""
    return _map_leaves(value, _encode_nonfinite)


def decode_nonfinite(value: Any) -> Any:
    """``"NaN"``, ``"Infinity"``, ``"-Infinity"`` anywhere in nested dicts and lists as floats."""
    return _map_leaves(value, _decode_nonfinite)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSONL file, non-finite strings back as floats; a torn last line is skipped."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(decode_nonfinite(json.loads(line)))
        except json.JSONDecodeError:
            continue
    return records


class JsonlWriter:
    """Appends one JSON object per line to a file, flushed at every write."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def write(self, record: Mapping[str, Any]) -> None:
        """Append ``record`` as one line (tensors and numpy values become Python numbers)."""
        line = json.dumps(encode_nonfinite(to_python(record)), allow_nan=False)
        self._file.write(line + "\n")
        self._file.flush()

    def truncate_after_step(self, step: int) -> int:
        """Drop the lines with ``step > step`` (and torn lines); return how many were dropped.

        Used on resume: what was logged after the checkpoint is logged again.
        """
        self._file.close()
        lines = self.path.read_text(encoding="utf-8").splitlines()
        kept = [line for line in lines if _step_of(line) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, self.path)
        self._file = self.path.open("a", encoding="utf-8")
        return len(lines) - len(kept)

    def close(self) -> None:
        """Close the file (idempotent)."""
        self._file.close()


def _step_of(line: str) -> float:
    """The ``step`` of a JSONL line; infinite when the line is torn or has none."""
    try:
        step = json.loads(line).get("step")
    except (json.JSONDecodeError, AttributeError):
        return math.inf
    return step if isinstance(step, int) else math.inf
