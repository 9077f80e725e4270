"""W&B's local copy of a run: its transaction logs (``wandb/*run-*/run-<id>.wandb``) read back.

Every W&B run, offline or online, writes what it is given to a ``.wandb`` file (a leveldb-style
log of protobuf records); ``wandb sync`` uploads exactly that. A resumed run writes one more
file, in a new ``offline-run-*`` (or ``run-*``) dir. W&B writes the log in 32 KiB blocks: a
SIGKILL loses the records still in its buffer, so after a crash the log may end some steps
before ``metrics.jsonl`` does. :func:`last_step` says how far the logs go, for a resumed
run to send W&B the steps it lacks and only those (:class:`dmtune.wandb_sink.WandbSink`).

:func:`read_offline_records` and :func:`read_offline_history` read records back with W&B's own
reader (``wandb leet inspect --json``, wandb ≥ 0.31): what the tests check W&B received.
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dmtune.jsonl import decode_nonfinite

_HEADER = b":W&B"  # then a 2-byte magic number and a version byte
_HEADER_LEN = 7  # the file header and every chunk header are 7 bytes
_BLOCK_LEN = 32768  # chunks never straddle a block; a block's tail under 7 bytes is padding
_FULL, _FIRST, _LAST = 1, 2, 4  # chunk kinds (3: a middle chunk)
_INSPECT_TIMEOUT_S = 120


def log_files(path: str | Path, run_id: str = "*") -> list[Path]:
    """The ``.wandb`` files under ``path`` (a run dir, its ``wandb/`` dir, one W&B run dir or a
    ``.wandb`` file), oldest segment first; ``run_id``: only that W&B run's."""
    path = Path(path)
    if path.is_file():
        return [path]
    base = path / "wandb" if (path / "wandb").is_dir() else path
    return sorted(base.glob(f"*run-*/run-{run_id}.wandb"), key=_natural_key) or sorted(
        base.glob(f"run-{run_id}.wandb")
    )


def _natural_key(path: Path) -> list[Any]:
    """Sort key putting ``...-id`` before ``...-id-1`` before ``...-id-10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.parent.name)]


def _payloads(data: bytes) -> Iterator[bytes]:
    """The serialized records of a ``.wandb`` file's bytes; a torn tail (a crash) ends them."""
    if not data.startswith(_HEADER):
        return
    at, pending = _HEADER_LEN, b""
    while at + _HEADER_LEN <= len(data):
        left_in_block = _BLOCK_LEN - at % _BLOCK_LEN
        if left_in_block < _HEADER_LEN:
            at += left_in_block
            continue
        length, kind = struct.unpack_from("<HB", data, at + 4)  # after a 4-byte checksum
        chunk = data[at + _HEADER_LEN : at + _HEADER_LEN + length]
        if kind == 0 or len(chunk) < length:  # zeros or a torn chunk: the end of what was written
            return
        at += _HEADER_LEN + length
        pending = chunk if kind in (_FULL, _FIRST) else pending + chunk
        if kind in (_FULL, _LAST):
            yield pending


def last_step(files: list[Path]) -> int:
    """The last history step (``_step``) the ``.wandb`` files hold; −1 when they hold none."""
    from wandb.proto import wandb_internal_pb2 as pb

    last = -1
    for file in files:
        for payload in _payloads(file.read_bytes()):
            record = pb.Record()
            record.ParseFromString(payload)
            if record.WhichOneof("record_type") == "history":
                last = max(last, record.history.step.num)
    return last


def read_offline_records(path: str | Path, kind: str) -> list[dict[str, Any]]:
    """The records of one kind (``history``, ``artifact``, ...) of the local W&B logs under
    ``path`` (see :func:`log_files`), in logging order, as ``wandb leet inspect --json`` prints
    them. Needs wandb ≥ 0.31 (the first with ``leet inspect --json``); dmtune itself runs on
    wandb ≥ 0.27."""
    from importlib.metadata import version

    installed = version("wandb")
    if tuple(int(p) for p in re.findall(r"\d+", installed)[:2]) < (0, 31):
        raise RuntimeError(
            f"reading W&B's local logs needs `wandb leet inspect --json` (wandb >= 0.31); "
            f"wandb {installed} is installed"
        )
    records = []
    for file in log_files(path):
        out = subprocess.run(
            [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(file)],
            capture_output=True,
            text=True,
            check=True,
            timeout=_INSPECT_TIMEOUT_S,
        ).stdout
        records += [r for r in map(json.loads, out.splitlines()) if r.get("type") == kind]
    return records


def read_offline_history(path: str | Path) -> list[dict[str, Any]]:
    """History rows of the local W&B logs under ``path``, in logging order (a resumed run has
    one log per segment). Rows hold the logged keys plus ``_step``, ``_runtime``,
    ``_timestamp``; nested values such as tables are flattened with dots (``samples._type``);
    non-finite values come back as floats."""
    return [
        decode_nonfinite(record["history"]["item"])
        for record in read_offline_records(path, "history")
    ]
