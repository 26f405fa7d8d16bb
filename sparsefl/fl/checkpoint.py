"""Checkpoints: tensors in safetensors, the rest in JSON; written atomically, no pickle.

`ckpt-RRRRRR.safetensors` is written first, then `ckpt-RRRRRR.json` (which names the
round and the safetensors file's SHA-256): a checkpoint exists once its JSON does.  Each
file goes to a temporary name, is fsynced and renamed over, so a crash never leaves a
half-written checkpoint behind.  Only the newest `keep` checkpoints are kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from sparsefl.errors import CheckpointError

_NAME = re.compile(r"ckpt-(\d{6})\.json$")


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(run_dir: Path, rnd: int, tensors: dict[str, Tensor], meta: dict[str, Any],
         keep: int = 2) -> Path:
    blob = st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    tensor_file = run_dir / f"ckpt-{rnd:06d}.safetensors"
    atomic_write(tensor_file, blob)
    meta = dict(meta, round=rnd, tensors=tensor_file.name,
                sha256=hashlib.sha256(blob).hexdigest())
    json_file = run_dir / f"ckpt-{rnd:06d}.json"
    atomic_write(json_file, json.dumps(meta, indent=1).encode())
    for old in sorted(run_dir.glob("ckpt-*.json"))[:-keep]:
        old.unlink(missing_ok=True)
        (run_dir / old.name.replace(".json", ".safetensors")).unlink(missing_ok=True)
    return json_file


def _verified(js: Path) -> tuple[int, dict[str, Tensor], dict[str, Any]]:
    """One checkpoint, read and checked; ValueError/OSError say what is wrong with it."""
    meta = json.loads(js.read_text())
    if not isinstance(meta, dict) or not {"round", "tensors", "sha256"} <= meta.keys():
        raise ValueError("its JSON lacks round/tensors/sha256")
    blob = (js.parent / Path(str(meta["tensors"])).name).read_bytes()
    if hashlib.sha256(blob).hexdigest() != meta["sha256"]:
        raise ValueError("checkpoint tensors do not match their recorded hash")
    return int(meta["round"]), st_load(blob), meta


def latest(run_dir: Path, skipped: list[str] | None = None
           ) -> tuple[int, dict[str, Tensor], dict[str, Any]] | None:
    """The newest checkpoint that verifies against its recorded hash; None if the run has
    none.  A newer one that does not verify is passed over, and `skipped` (if given) gets
    one line per such checkpoint saying why.  If checkpoints exist but none verifies:
    CheckpointError naming each and its fault."""
    faults = []
    for js in sorted(run_dir.glob("ckpt-*.json"), reverse=True):
        if not _NAME.search(js.name):
            continue
        try:
            found = _verified(js)
        except (OSError, ValueError, SafetensorError) as e:  # JSONDecodeError is a ValueError
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            faults.append(f"{js.name}: {why}")
            continue
        if skipped is not None:
            skipped += faults
        return found
    if faults:
        raise CheckpointError(f"{run_dir}: no checkpoint verifies ({'; '.join(faults)})")
    return None
