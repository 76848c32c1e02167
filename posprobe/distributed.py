"""Data-parallel runs on torch.distributed: one process per device, each doing its share of the batches.

A run is distributed when torch.distributed is already initialised (``accelerate launch``, your own
``init_process_group``), or when a launcher set ``WORLD_SIZE`` > 1 in the environment (``torchrun``,
``srun`` around ``torchrun``): posprobe then initialises the default process group itself from the
launcher's variables (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``), with gloo for
CPU tensors and, when CUDA is present, nccl for CUDA tensors. Everything goes through
torch.distributed's public API. ``POSPROBE_DIST_TIMEOUT`` (seconds, default 1800) bounds how long a
rank waits for the others before it names the ranks that did not arrive.

Store rules (``extract``): every rank gets the same tokens (checked), the store folder lies on a
filesystem every rank reaches, shard ``i`` is written by rank ``i % world_size`` alone, and rank 0
alone writes the manifest.
"""

from __future__ import annotations

import atexit
import datetime
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["RankError", "Ranks", "current_ranks", "is_main_process"]

DEFAULT_TIMEOUT_S = 1800.0


class RankError(RuntimeError):
    """Another rank of a distributed run failed (or never arrived); the message names it and says why."""


def _timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=float(os.environ.get("POSPROBE_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))


def is_main_process() -> bool:
    """True outside a distributed run and on rank 0 of one (read from the launcher's environment)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


@dataclass(frozen=True)
class Ranks:
    """This process's place in a run: ``rank`` of ``world`` (1 outside a distributed run)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mine(self, indices: Sequence[int]) -> list[int]:
        """The shard indices this rank writes: ``i % world == rank``."""
        return [i for i in indices if i % self.world == self.rank]

    def device(self, device: str | torch.device) -> str | torch.device:
        """``"auto"`` / ``"cuda"`` become this rank's own GPU (``cuda:<LOCAL_RANK>``) in a run on CUDA."""
        if self.active and str(device) in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return device

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order (a picklable object)."""
        if not self.active:
            return [value]
        found: list[Any] = [None] * self.world
        dist.all_gather_object(found, value, group=_object_group())
        return found

    def agree(self, what: str, value: Any, advice: str) -> None:
        """Raise on every rank (one message) unless every rank holds the same ``value`` of ``what``."""
        values = self.gather(value)
        groups: dict[str, list[int]] = {}
        for rank, v in enumerate(values):
            groups.setdefault(repr(v), []).append(rank)
        if len(groups) > 1:
            parts = "; ".join(f"ranks {ranks} have {v[:80]}" for v, ranks in groups.items())
            raise ValueError(f"the ranks of this run were given different {what} ({parts}); {advice}")

    def settle(self, error: BaseException | None, stage: str) -> None:
        """Wait for every rank at the end of ``stage``; if one failed, every rank raises, naming it.

        The failing rank raises its own error; the others a ``RankError`` (or the same type, for the
        errors a user fixes: a store that holds another run, a bad value) with the same message. A rank
        that never arrives (killed) is named after ``POSPROBE_DIST_TIMEOUT`` seconds.
        """
        if not self.active:
            if error is not None:
                raise error
            return
        self._wait_for_all(stage)
        failures = [(r, s) for r, s in enumerate(self.gather(_status(error))) if s is not None]
        if error is not None:
            raise error
        if failures:
            rank, (kind, message) = failures[0]
            raise _rebuilt().get(kind, RankError)(f"rank {rank} of {self.world} failed while {stage}: {message}")

    def _wait_for_all(self, stage: str) -> None:
        group = _object_group()
        try:
            dist.monitored_barrier(group=group, timeout=_timeout(), wait_all_ranks=True)
        except RuntimeError as err:  # a rank died or hangs: gloo names the ranks that did not arrive
            raise RankError(
                f"not every rank reached the end of {stage} within {_timeout().total_seconds():g} s "
                f"({' '.join(str(err).split())[:300]}); the store keeps what was written: rerun with resume=True "
                "(--resume)"
            ) from None

    def shards(self, n_shards: int, what: str) -> list[int]:
        """This rank's shards of ``what`` (a store of ``n_shards``) read by every rank (``i % world == rank``)."""
        if self.world > n_shards:
            raise ValueError(
                f"{self.world} ranks but {what} has only {n_shards} shard(s): every rank needs at least one; use "
                "fewer processes"
            )
        return self.mine(range(n_shards))

    def all_reduce(self, tensors: Iterable[Tensor]) -> None:
        """Sum each tensor over the ranks, in place (every rank passes the same tensors in the same order)."""
        if not self.active:
            return
        for t in tensors:
            group = _object_group() if t.device.type == "cpu" else None  # gloo for host tensors, nccl for CUDA
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)

    def barrier(self) -> None:
        if self.active:
            dist.barrier(group=_object_group())


def _status(error: BaseException | None) -> tuple[str, str] | None:
    return None if error is None else (type(error).__name__, " ".join(str(error).split()))


def _rebuilt() -> dict[str, type[Exception]]:
    """The errors a user fixes, raised on every rank with the failing rank's type (others: RankError)."""
    from posprobe.store import StoreError

    return {"StoreError": StoreError, "ValueError": ValueError, "FileExistsError": FileExistsError}


_GROUP: list[Any] = []


def _object_group() -> Any:
    """A gloo group for objects and barriers (nccl moves CUDA tensors only)."""
    if not _GROUP:
        _GROUP.append(dist.new_group(backend="gloo", timeout=_timeout()) if dist.get_backend() != "gloo" else None)
    return _GROUP[0]


def current_ranks(device: str | torch.device = "auto") -> Ranks:
    """This process's ``Ranks``; initialises torch.distributed from a launcher's environment when it set
    ``WORLD_SIZE`` > 1 and nothing initialised it yet. Outside a distributed run: ``Ranks()``."""
    if not dist.is_available():
        return Ranks()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(), local)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT", "RANK") if v not in os.environ]
    if missing:
        raise ValueError(
            f"WORLD_SIZE={world} is set but {', '.join(missing)} is not: launch with torchrun (or accelerate "
            "launch), which sets them, or unset WORLD_SIZE for a single-process run"
        )
    cuda = torch.cuda.is_available() and str(device) != "cpu"
    dist.init_process_group(backend="cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=_timeout())
    atexit.register(_shut_down)  # we opened it, we close it: a group left to the interpreter's exit can abort
    return Ranks(dist.get_rank(), dist.get_world_size(), local)


def _shut_down() -> None:
    """Destroy the process group posprobe initialised (and its object group), before the interpreter exits."""
    if dist.is_available() and dist.is_initialized():
        _GROUP.clear()
        dist.destroy_process_group()
