"""Pipeline parallelism: the layers split into `pipeline` consecutive stages, one per process of the
pipeline dimension, with activations sent forward and their gradients sent back between neighbours.

A batch is cut into `microbatches` so that stages work at the same time on different micro-batches:
GPipe runs every forward, then every backward (activations of all micro-batches held at once); 1F1B
alternates one forward and one backward after a warm-up (at most `pipeline` micro-batches held).
Stage 0 holds the embedding, the last stage the final norm, the LM head and the loss. A stage is the
GPT with the other stages' parts removed, so its parameter names are the full model's (checkpoints
move between layouts by name).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from gristmill.model.model import GPT, cross_entropy

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


def stage_layers(n_layer: int, stages: int, index: int) -> range:
    """The block indices of stage `index`: as even as possible, earlier stages one more."""
    size, extra = divmod(n_layer, stages)
    start = index * size + min(index, extra)
    return range(start, start + size + (index < extra))


class StageModel(nn.Module):
    """Blocks `layers` of `model`, with the embedding on the first stage and the head on the last."""

    def __init__(self, model: GPT, index: int, stages: int):
        super().__init__()
        self.config = model.config
        first, last = index == 0, index == stages - 1
        self.wte = model.wte if first else None
        self.wpe = model.wpe if first else None
        self.drop = model.drop
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in stage_layers(model.config.n_layer, stages, index)})
        self.norm_f = model.norm_f if last else None
        self.lm_head = model.lm_head if last else None
        if model.config.position == "rope":
            self.register_buffer("rope_cos", model.rope_cos, persistent=False)
            self.register_buffer("rope_sin", model.rope_sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids (first stage) or hidden states in; hidden states or logits (last stage) out."""
        T = x.size(1)
        if self.wte is not None:
            positions = self.wpe(torch.arange(T, device=x.device)) if self.wpe is not None else 0
            x = self.drop(self.wte(x) + positions)
        rotary = (self.rope_cos[:T], self.rope_sin[:T]) if self.config.position == "rope" else None
        for block in self.blocks.values():
            x = block(x, rotary)
        if self.lm_head is not None:
            x = self.lm_head(self.norm_f(x))
        return x


def pipeline_schedule(stage_model: nn.Module, mesh: DeviceMesh, device: torch.device, schedule: str,
                      microbatches: int, loss_scale: float):
    """The schedule that runs `stage_model` (maybe wrapped for data parallelism) as stage
    `mesh.get_local_rank()` of `mesh.size()`; its loss is the model's, times `loss_scale`."""

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return cross_entropy(logits.flatten(0, 1), targets.flatten()) * loss_scale

    stage = PipelineStage(stage_model, mesh.get_local_rank(), mesh.size(), device, group=mesh.get_group())
    return SCHEDULES[schedule](stage, microbatches, loss_fn=loss_fn)
