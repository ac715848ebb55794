"""Data-parallel training under ``torchrun`` (``torch.distributed``), generic for any trainer.

``torchrun`` (or ``srun`` starting one process per task with the same variables) sets ``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`setup` reads them,
joins the process group (NCCL on GPUs, gloo on CPUs) and picks this process's device. Without
them everything here is a no-op for a single process, so a trainer written with these helpers
runs unchanged without torchrun::

    ctx = setup("auto")                       # DistContext(rank, local_rank, world_size, device, ...)
    try:
        net = wrap_model(build_net().to(ctx.device), ctx)
        sampler = shard_sampler(dataset, ctx)  # None for one process
        loader = DataLoader(dataset, sampler=sampler, ...)
        ...
        loss_for_log = all_reduce_mean(running_loss)
        if is_main():
            save(unwrap(net).state_dict())
        barrier()
    finally:
        teardown(ctx)

Only the main process (rank 0) should validate and write; :func:`main_first` lets rank 0 build a
cache the others then read.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)

TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: object = None  # torch.device
    backend: str | None = None  # "nccl", "gloo" or None (one process)
    owns_group: bool = False  # setup() created the process group (teardown destroys it)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun(env=None) -> bool:
    """Whether the torchrun variables (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT) are set."""
    env = os.environ if env is None else env
    return all(v in env for v in TORCHRUN_VARS)


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def setup(device: str = "auto", timeout_s: float = 1800.0) -> DistContext:
    """Join the process group when launched by torchrun; pick the device either way.

    ``device`` is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``, as for one process; under torchrun
    a CUDA device becomes ``cuda:LOCAL_RANK`` and the backend NCCL, otherwise gloo. A process
    group that already exists is used as it is (and left for its owner to destroy).
    """
    import datetime

    import torch
    import torch.distributed as dist

    from volseg.device import pick_device

    dev = pick_device(device)
    if _initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank % max(1, torch.cuda.device_count() or 1)))
        if dev.type == "cuda":
            dev = torch.device("cuda", local)
        return DistContext(rank, local, world, dev, dist.get_backend(), owns_group=False)
    if not launched_by_torchrun():
        return DistContext(device=dev)
    rank, local, world = (int(os.environ[v]) for v in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if dev.type == "cuda":
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs are visible; "
                               "start at most one process per GPU (torchrun --nproc_per_node)")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    log.info("rank %d/%d (local %d) joined the %s process group on %s", rank, world, local, backend, dev)
    return DistContext(rank, local, world, dev, backend, owns_group=True)


def teardown(ctx: DistContext | None = None) -> None:
    """Leave the process group if :func:`setup` created it (``ctx=None``: whenever one exists)."""
    import torch.distributed as dist

    if _initialized() and (ctx is None or ctx.owns_group):
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed(device: str = "auto"):
    """``with distributed("auto") as ctx:`` — :func:`setup`, then :func:`teardown` on exit."""
    ctx = setup(device)
    try:
        yield ctx
    finally:
        teardown(ctx)


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if _initialized() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if _initialized() else 1


def is_main() -> bool:
    """True on rank 0, and in a process that is not part of a group."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op for one process)."""
    import torch.distributed as dist

    if _initialized():
        dist.barrier()


@contextlib.contextmanager
def main_first():
    """Run the block on rank 0 first, then on the others (e.g. rank 0 fills a cache the others
    then read)."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def wrap_model(net, ctx: DistContext):
    """``DistributedDataParallel(net)`` when there are several ranks, else ``net`` itself."""
    if not ctx.distributed:
        return net
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.device.index] if getattr(ctx.device, "type", "cpu") == "cuda" else None
    return DistributedDataParallel(net, device_ids=ids, output_device=ids[0] if ids else None)


def unwrap(net):
    """The module inside a DistributedDataParallel (or DataParallel) wrapper, else ``net``."""
    return getattr(net, "module", net)


def shard_sampler(dataset, ctx: DistContext, shuffle: bool = False, seed: int = 0,
                  drop_last: bool = False):
    """A ``DistributedSampler`` giving each rank its own part of ``dataset``, or ``None`` for one
    process (the DataLoader's own order). Without shuffling rank ``r`` takes ``r, r+W, r+2W, ...``;
    with ``shuffle=True`` call ``sampler.set_epoch(epoch)`` every epoch."""
    if not ctx.distributed:
        return None
    from torch.utils.data.distributed import DistributedSampler

    return DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=shuffle,
                              seed=seed, drop_last=drop_last)


def shard_indices(n: int, rank_: int, world: int) -> range:
    """Indices ``rank, rank+world, ...`` of ``n`` items: a partition over the ranks (the
    unshuffled sampler's split, except that the sampler also pads the ranks to equal lengths)."""
    if not 0 <= rank_ < world:
        raise ValueError(f"rank must satisfy 0 <= rank < world size ({world}), got {rank_}")
    return range(rank_, n, world)


def all_reduce_mean(value) -> float:
    """The mean of a number (or 0-d tensor) over all ranks; the value itself for one process."""
    import torch
    import torch.distributed as dist

    if not _initialized():
        return float(value)
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.as_tensor(float(value), dtype=torch.float64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / dist.get_world_size()


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank (picklable objects; returns ``obj`` for one process)."""
    import torch.distributed as dist

    if not _initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


__all__ = ["DistContext", "setup", "teardown", "distributed", "launched_by_torchrun", "rank",
           "world_size", "is_main", "barrier", "main_first", "wrap_model", "unwrap", "shard_sampler",
           "shard_indices", "all_reduce_mean", "broadcast_object"]
