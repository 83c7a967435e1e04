"""Scale-out on ``torch.distributed``: the ranks of a ``torchrun`` share the shards of a run.

``torchrun --nproc_per_node=W -m flowaudit fit|scan|attack … --distributed`` starts ``W`` processes;
:func:`init_group` joins them (gloo on CPU, NCCL on GPU, each rank on ``cuda:LOCAL_RANK``). Shard ``i`` runs on
rank ``i mod W`` (:func:`~flowaudit.runs.shards.run_shards`) and its payload is all-gathered, so every rank merges
the same payloads in the same order as one process: Gaussian sums, layer sums and each input's records (its
latents come from its own seed) are bit for bit those of one process. Rank 0 writes the report.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import AuditError

__all__ = ["Group", "init_group"]


@dataclass
class Group:
    """This process's place in the run: ``rank`` of ``world``, and the device it samples on."""

    rank: int
    world: int
    device: torch.device

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def all_gather(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order (pickled through the process group)."""
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def init_group(device: str = "auto", timeout_s: float = 1800.0) -> Group:
    """Join the process group torchrun describes in the environment (``env://``)."""
    import torch.distributed as dist

    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise AuditError(
            f"--distributed needs torchrun (or {', '.join(missing)} set): "
            "torchrun --nproc_per_node=N -m flowaudit … --distributed"
        )
    local = int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    cuda = torch.cuda.is_available() and device != "cpu" and not str(device).startswith("cpu")
    dev = torch.device(f"cuda:{local % torch.cuda.device_count()}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if cuda else "gloo",
            init_method="env://",
            timeout=_dt.timedelta(seconds=timeout_s),
            **({"device_id": dev} if cuda else {}),
        )
    return Group(rank=dist.get_rank(), world=dist.get_world_size(), device=dev)
