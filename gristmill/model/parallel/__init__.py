"""Every way to split training across the processes `torchrun` starts, composed on one DeviceMesh:

    mesh.py        the layout (pipeline x data x tensor) and its checks
    tensor.py      tensor parallelism: each matmul split by columns then rows (DTensor)
    fsdp.py        shard: full, parameters + gradients + optimizer state split over data (FSDP2)
    zero.py        shard: optimizer, AdamW state split over data (ZeRO-1)
    pipeline.py    pipeline parallelism: layers split into stages, micro-batches in flight
    checkpoint.py  DCP checkpoints any layout can resume, and the export to one plain model
    grads.py       clipping and finiteness over sharded gradients

`parallelize` applies them in the order torchtitan does (tensor, pipeline split, then data
parallelism per stage) and returns what the loop drives. The model file knows none of this.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from gristmill.model.config import TrainConfig
from gristmill.model.model import Transformer
from gristmill.model.parallel.fsdp import shard_fully
from gristmill.model.parallel.grads import clip_grad_norm
from gristmill.model.parallel.mesh import Layout
from gristmill.model.parallel.pipeline import StageModel, pipeline_schedule
from gristmill.model.parallel.tensor import parallelize_tensor
from gristmill.model.parallel.zero import shard_optimizer


class Parallel:
    """The model as this process runs it, its optimizer, and one training / evaluation step."""

    def __init__(self, model: Transformer, config: TrainConfig, layout: Layout, mesh: DeviceMesh | None,
                 device: torch.device):
        self.layout, self.mesh, self.grad_accum = layout, mesh, config.grad_accum
        self.schedule = None
        self.first = self.last = True
        if layout.tensor > 1:
            parallelize_tensor(model, mesh["tensor"])
        module: nn.Module = model
        if layout.pipeline > 1:
            index = mesh["pipeline"].get_local_rank()
            self.first, self.last = index == 0, index == layout.pipeline - 1
            module = StageModel(model, index, layout.pipeline)
        if layout.shard == "full":
            shard_fully(module, mesh["data"])
        optimizer = model.configure_optimizers(
            config.weight_decay, config.learning_rate, (config.beta1, config.beta2), device.type
        )
        optimizer = mine_and_alike(optimizer, set(map(id, module.parameters()))) if mesh is not None else optimizer
        self.state_module = module  # what checkpoints read and write (parameter names as in the Transformer)
        self.state_optimizer = optimizer
        if config.compile:
            module = torch.compile(module)
        if mesh is not None and layout.data > 1 and layout.shard != "full":
            module = DistributedDataParallel(module, process_group=mesh["data"].get_group(),
                                             device_ids=[device.index] if device.type == "cuda" else None)
        if layout.shard == "optimizer" and layout.data > 1:
            optimizer = shard_optimizer(optimizer, mesh["data"])
            self.state_optimizer = optimizer.optim  # this process's share
        self.module, self.optimizer = module, optimizer
        if layout.pipeline > 1:
            self.schedule = pipeline_schedule(module, mesh["pipeline"], device, config.parallel.schedule,
                                              config.parallel.microbatches, 1 / config.grad_accum)

    def forward_backward(self, inputs: dict, sync: bool, autocast) -> torch.Tensor:
        """Loss / grad_accum of one micro-batch (`inputs`: the model's keyword arguments; zero on
        pipeline stages before the last), gradients accumulated; `sync` on the last micro-batch of a
        step lets data parallelism reduce them."""
        if isinstance(self.module, DistributedDataParallel):
            self.module.require_backward_grad_sync = sync
        if isinstance(self.module, FSDPModule):
            self.module.set_requires_gradient_sync(sync)
        with autocast:
            if self.schedule is None:
                _, loss = self.module(**inputs)
                loss = loss / self.grad_accum
                loss.backward()
                return loss.detach()
            return self._pipeline_step(self.schedule.step, inputs)[1]

    @torch.no_grad()
    def evaluate(self, inputs: dict, autocast) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Logits and mean loss of one batch, or None on a pipeline stage without the head."""
        with autocast:
            if self.schedule is None:
                return self.module(**inputs)
            logits, loss = self._pipeline_step(self.schedule.eval, inputs)
            return (logits, loss * self.grad_accum) if self.last else None

    def _pipeline_step(self, run, inputs: dict) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The last stage's logits (None elsewhere) and loss (zero elsewhere); pipelines run
        decoders with the causal objective only, so token ids and targets are all there is."""
        x, y = inputs["idx"], inputs["targets"]
        losses: list[torch.Tensor] = []
        logits = run(*([x] if self.first else []), **({"target": y, "losses": losses} if self.last else {}))
        if not self.last:
            return None, torch.zeros((), device=x.device)
        return logits, torch.stack(losses).mean().detach()

    def clip_grad_norm(self, max_norm: float | None) -> torch.Tensor:
        group = self.mesh["pipeline"].get_group() if self.layout.pipeline > 1 else None
        return clip_grad_norm(list(self.state_module.parameters()), max_norm, group)

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)


def mine_and_alike(optimizer: torch.optim.AdamW, mine: set[int]) -> torch.optim.AdamW:
    """The optimizer over this process's parameters only (a pipeline stage's), each group split into
    sharded (DTensor) and whole parameters: one fused update cannot mix the two kinds."""
    groups = []
    for group in optimizer.param_groups:
        params = [p for p in group["params"] if id(p) in mine]
        for sharded in (True, False):
            kind = [p for p in params if isinstance(p, DTensor) == sharded]
            if kind:
                groups.append({"params": kind, "weight_decay": group["weight_decay"]})
    defaults = {key: optimizer.defaults[key] for key in ("lr", "betas", "eps", "fused")}
    return torch.optim.AdamW(groups, **defaults)
