"""Training checkpoints: atomic writes and exact resume.

A training checkpoint is our model format (``format``, ``config``, ``model``; loadable by
:func:`dabdetr.models.load_checkpoint`) plus ``optimizer``, ``scheduler``, ``scaler``, ``epoch``
and ``iteration`` (the next batch of that epoch to run; 0 = the epoch starts from its beginning),
``rng`` (the RNG states of every rank: Python, NumPy, torch CPU and CUDA), ``train`` (the training
settings) and ``world_size``. Everything is plain tensors/containers, read with
``torch.load(weights_only=True)``.

:func:`atomic_save` writes to a temporary file in the same folder, fsyncs it, renames it over the
target (``os.replace``) and fsyncs the folder: a reader (or a run killed at any point) sees either
the previous complete file or the new complete file, never a partial one. Stale ``*.tmp*`` files of
a killed writer are ignored and removed.
"""

from __future__ import annotations

import glob
import os
import random
import tempfile
from typing import Any, Dict, List, Optional

import numpy as np
import torch

__all__ = ["atomic_save", "capture_rng_state", "restore_rng_state", "save_training_checkpoint",
           "load_training_checkpoint", "find_resume_checkpoint", "unwrap"]

# Test hook: kill the process (SIGKILL) in the middle of writing the N-th checkpoint of this process.
_KILL_IN_SAVE = int(os.environ.get("DABDETR_DEBUG_KILL_IN_SAVE", "0") or 0)
_saves = 0


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to ``path`` atomically (temp file + fsync + ``os.replace`` + folder fsync)."""
    global _saves
    _saves += 1
    folder = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            if _KILL_IN_SAVE and _saves == _KILL_IN_SAVE:
                import signal

                buf = __import__("io").BytesIO()
                torch.save(obj, buf)
                f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                f.flush()
                os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # pragma: no cover - some filesystems refuse directory fsync
        pass


def capture_rng_state() -> Dict[str, Any]:
    """Python, NumPy and torch (CPU, CUDA) RNG states as weights_only-loadable values."""
    ver, state, gauss = random.getstate()
    np_state = np.random.get_state()
    out = {
        "python": [ver, torch.tensor(state, dtype=torch.int64), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng_state(s: Dict[str, Any]) -> None:
    ver, state, gauss = s["python"]
    random.setstate((ver, tuple(int(v) for v in state.tolist()), gauss))
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _all_rng_states() -> List[Dict[str, Any]]:
    import torch.distributed as dist

    mine = capture_rng_state()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: List[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        return gathered
    return [mine]


def save_training_checkpoint(path: str, model, optimizer=None, scheduler=None, scaler=None, epoch: int = 0,
                             iteration: int = 0, train_settings: Optional[Dict[str, Any]] = None,
                             is_main: bool = True, **extra: Any) -> None:
    """Write a full training checkpoint (every rank must call it under DDP: the RNG states of all
    ranks are gathered; only ``is_main`` writes)."""
    from .models.checkpoint import FORMAT

    rng = _all_rng_states()
    if not is_main:
        return
    m = unwrap(model)
    obj = {
        "format": FORMAT,
        "config": m.config.replace(backend=None).to_dict(),
        "model": {k: v.detach().cpu() for k, v in m.state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "epoch": int(epoch),
        "iteration": int(iteration),
        "rng": rng,
        "world_size": len(rng),
        "train": dict(train_settings or {}),
        **extra,
    }
    atomic_save(obj, path)


def load_training_checkpoint(path: str, model, optimizer=None, scheduler=None, scaler=None, rank: int = 0,
                             restore_rng: bool = True) -> Dict[str, Any]:
    """Restore everything saved by :func:`save_training_checkpoint`; returns the checkpoint dict
    (``epoch``, ``iteration`` ... ). The RNG state of ``rank`` is restored (rank 0's when the
    checkpoint came from fewer processes)."""
    from .models.checkpoint import CheckpointError, safe_load

    obj = safe_load(path)
    if not isinstance(obj, dict) or "model" not in obj:
        raise CheckpointError(f"{path} is not a dabdetr training checkpoint")
    m = unwrap(model)
    m.load_state_dict(obj["model"])
    if optimizer is not None and obj.get("optimizer") is not None:
        optimizer.load_state_dict(obj["optimizer"])
    if scheduler is not None and obj.get("scheduler") is not None:
        scheduler.load_state_dict(obj["scheduler"])
    if scaler is not None and obj.get("scaler") is not None:
        scaler.load_state_dict(obj["scaler"])
    if restore_rng and obj.get("rng"):
        states = obj["rng"]
        restore_rng_state(states[rank] if rank < len(states) else states[0])
    return obj


def find_resume_checkpoint(out_dir: str) -> Optional[str]:
    """``out_dir/checkpoint.pth`` if present (stale temp files of a killed writer are removed)."""
    for tmp in glob.glob(os.path.join(out_dir, "*.tmp")):
        try:
            os.unlink(tmp)
        except OSError:
            pass
    path = os.path.join(out_dir, "checkpoint.pth")
    return path if os.path.exists(path) else None
