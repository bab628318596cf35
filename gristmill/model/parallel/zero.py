"""Optimizer-state sharding (ZeRO stage 1, Rajbhandari et al. 2020) on top of DDP.

Every process keeps the whole model and DDP still all-reduces every gradient, but AdamW's two
moment buffers (twice the model's size, more than the weights themselves) exist once across the
`data` processes: each process updates only the parameters it owns and broadcasts them to the others.
PyTorch's `ZeroRedundancyOptimizer` does exactly this around any optimizer class.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.optim import ZeroRedundancyOptimizer


def shard_optimizer(optimizer: torch.optim.AdamW, mesh: DeviceMesh) -> ZeroRedundancyOptimizer:
    """The same AdamW (its groups and settings) with its state split over `mesh`, the data dimension.
    `.optim` is this process's local AdamW over the parameters it owns (what a checkpoint saves)."""
    groups = [{"params": group["params"], "weight_decay": group["weight_decay"]} for group in optimizer.param_groups]
    settings = {key: optimizer.defaults[key] for key in ("lr", "betas", "eps", "fused")}
    return ZeroRedundancyOptimizer(
        groups, optimizer_class=torch.optim.AdamW, process_group=mesh.get_group(), **settings
    )
