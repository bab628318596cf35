"""Tensor parallelism: every matmul of a block split across the `tensor` dimension of the mesh.

Megatron-LM's pairing (Shoeybi et al. 2019): the first matmul of attention and of the MLP is split by
output columns (each process computes its own heads, its own hidden units), the second by input rows,
and one all-reduce per pair sums the partial outputs. The token embedding is split by vocabulary rows
(each process looks up the ids it holds, an all-reduce fills in the rest) and the LM head by vocabulary
columns, its logits gathered before the loss (the model computes its loss inside `forward`).

The fused projections (q|k|v in `attn.qkv`, k|v in `cross_attn.kv`, gate|value in a SwiGLU `mlp.up`)
are split with a stride, so each process holds the matching rows of every part: its heads' q, k and v.
Position biases follow the heads: each process keeps its own heads' ALiBi slopes and T5 relative-bias
columns. Norm weights, learned positions and the encoder's MLM transform stay whole on every process;
their gradients are equal there. Every architecture splits this way.
"""

from __future__ import annotations

import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.distributed.tensor.placement_types import _StridedShard

from gristmill.model.model import Stack, Transformer


class FusedColwiseParallel(ColwiseParallel):
    """Column-wise split of a Linear whose output is `parts` projections side by side: process i
    holds the i-th slice of each part, so `chunk(parts)` of its local output is still meaningful."""

    def __init__(self, parts: int):
        super().__init__(output_layouts=_StridedShard(-1, split_factor=parts))
        self.parts = parts

    def _partition_linear_fn(self, name, module, device_mesh):
        for param_name, param in module.named_parameters():
            placement = _StridedShard(0, split_factor=self.parts)
            module.register_parameter(param_name, nn.Parameter(distribute_tensor(param, device_mesh, [placement])))


def block_plan(model: Transformer, cross: bool) -> dict[str, ColwiseParallel | RowwiseParallel]:
    """What each block's submodules split, by their names in model.py."""
    plan = {
        "attn.qkv": FusedColwiseParallel(3),
        "attn.proj": RowwiseParallel(),
        "mlp.up": FusedColwiseParallel(2) if model.config.mlp == "swiglu" else ColwiseParallel(),
        "mlp.down": RowwiseParallel(),
    }
    if cross:
        plan |= {"cross_attn.q": ColwiseParallel(), "cross_attn.kv": FusedColwiseParallel(2),
                 "cross_attn.proj": RowwiseParallel()}
    return plan


def parallelize_tensor(model: Transformer, mesh: DeviceMesh) -> None:
    """Split `model` in place over `mesh` (the 1-D tensor dimension)."""
    tied = model.config.tie_weights
    parallelize_module(model, mesh, {
        "wte": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "lm_head": ColwiseParallel(output_layouts=Replicate()),
    })
    if tied:  # both are split by vocabulary rows (Shard(0)), so they can stay one parameter
        model.lm_head.weight = model.wte.weight
    for stack in (model.encoder, model.decoder):
        if stack is not None:
            parallelize_stack(stack, model, mesh)


def parallelize_stack(stack: Stack, model: Transformer, mesh: DeviceMesh) -> None:
    rank, size = mesh.get_local_rank(), mesh.size()
    for block in stack.blocks:
        parallelize_module(block, mesh, block_plan(model, cross=block.cross_attn is not None))
    if hasattr(stack, "slopes"):  # ALiBi: each process keeps its own heads' slopes
        stack.slopes = stack.slopes.chunk(size)[rank].clone()
    if stack.relative is not None:  # T5 bias: its (bucket, head) table split by head columns
        parallelize_module(stack.relative, mesh, {"embedding": ColwiseParallel()})
