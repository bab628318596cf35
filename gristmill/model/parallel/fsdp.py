"""Fully sharded data parallelism (FSDP2, `fully_shard`; ZeRO-3): parameters, gradients and optimizer
state are each split across the `data` dimension, every process holding 1/data of each.

Each block is its own unit: its parameters are all-gathered just before its forward (and again before
its backward) and freed after, and its gradients are reduce-scattered so each process keeps the
slice it updates. The embeddings, the stacks' norms and position biases and the heads form the root
unit. Memory per process falls to about 1/data of the model plus one block at a time; the price is an
all-gather per block per pass.
"""

from __future__ import annotations

import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard


def shard_fully(model: nn.Module, mesh: DeviceMesh) -> None:
    """Shard `model` (a Transformer, a tensor-parallel one or a pipeline stage) in place over `mesh`,
    the 1-D data dimension: each block of each stack is a unit."""
    for stack in (getattr(model, "encoder", None), model.decoder):
        for block in stack.blocks.children() if stack is not None else ():
            fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
