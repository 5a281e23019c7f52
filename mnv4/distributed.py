"""torchrun: one process per GPU, and the collectives the run needs (all of them no-ops in a single process)."""

from __future__ import annotations

import os

import torch


class Distributed:
    """What torchrun tells a process (RANK, WORLD_SIZE, LOCAL_RANK) and the few collectives a run needs.
    With no torchrun launch it is a world of one and every method is a no-op."""

    def __init__(self, environ=None):
        env = os.environ if environ is None else environ
        self.world_size = int(env.get("WORLD_SIZE", "1"))
        self.rank = int(env.get("RANK", "0"))
        self.local_rank = int(env.get("LOCAL_RANK", "0"))
        self.is_main = self.rank == 0

    def __bool__(self):
        return self.world_size > 1

    def init(self, device: torch.device):
        """nccl on CUDA, told its device up front (it then binds the communicator to it at once rather than
        guessing at the first collective); gloo on CPU. Rendezvous from torchrun's MASTER_ADDR / MASTER_PORT."""
        if self and not torch.distributed.is_initialized():
            if device.type == "cuda":
                torch.distributed.init_process_group("nccl", device_id=device)
            else:
                torch.distributed.init_process_group("gloo")

    def close(self):
        if self and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def shard(self, n: int) -> slice:
        """This rank's contiguous part of n items; the last shards may be shorter (no item twice)."""
        per = -(-n // self.world_size)
        return slice(min(n, self.rank * per), min(n, (self.rank + 1) * per))

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self:
            tensor = tensor.clone()
            torch.distributed.all_reduce(tensor)
        return tensor

    def all_max(self, tensor: torch.Tensor) -> torch.Tensor:
        if self:
            tensor = tensor.clone()
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        return tensor

    def gather_shards(self, local: torch.Tensor, n: int) -> torch.Tensor:
        """Concatenate every rank's shard (see `shard`) back into the n items, in order."""
        if not self:
            return local
        per = -(-n // self.world_size)
        padded = local.new_zeros(per)
        padded[: local.numel()] = local
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, padded)
        return torch.cat(parts)[:n]

    def average_buffers(self, *modules):
        """Average BatchNorm running statistics over ranks. DDP keeps parameters identical but each rank's
        running stats follow its own batches; averaging makes evaluation and checkpoints agree on every rank."""
        for module in modules:
            if self and module is not None:
                for buffer in module.buffers():
                    if buffer.is_floating_point():
                        torch.distributed.all_reduce(buffer)
                        buffer.div_(self.world_size)

    def barrier(self):
        if self:
            torch.distributed.barrier()

    def gather(self, obj) -> list:
        """Every rank's value of a picklable object, in rank order, on every rank."""
        if not self:
            return [obj]
        box = [None] * self.world_size
        torch.distributed.all_gather_object(box, obj)
        return box

    def broadcast(self, obj):
        """Rank 0's value of a picklable object, on every rank."""
        if not self:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]
