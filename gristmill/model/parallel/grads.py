"""Gradient clipping and finiteness checks that see the whole model whatever the layout: a sharded
(DTensor) gradient's norm is reduced over its mesh, and stages' norms are summed over the pipeline."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def clip_grad_norm(params: list[torch.Tensor], max_norm: float | None, pipeline_group=None) -> torch.Tensor:
    """Scale the gradients so their global L2 norm is at most `max_norm` (as
    `torch.nn.utils.clip_grad_norm_`); returns the norm before clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    alike: dict[object, list[torch.Tensor]] = {}  # one norm per kind of split (2-D layouts mix several)
    for g in grads:
        alike.setdefault((g.device_mesh, g.placements) if isinstance(g, DTensor) else None, []).append(g)
    squares = torch.zeros((), dtype=torch.float32, device=grads[0].device if grads else "cpu")
    for kind, group in alike.items():
        norm = torch.nn.utils.get_total_norm(group)
        squares += (norm.full_tensor() if kind is not None else norm).float() ** 2
    if pipeline_group is not None:
        dist.all_reduce(squares, group=pipeline_group)
    norm = squares.sqrt()
    coef = (max_norm or math.inf) / (norm.item() + 1e-6)
    if coef < 1:
        for g in grads:
            g.mul_(coef)
    return norm


def local_finite(params) -> torch.Tensor:
    """Whether this process's share of every parameter is finite (one boolean per parameter)."""
    return torch.stack([torch.isfinite(p.to_local() if isinstance(p, DTensor) else p).all() for p in params])
