"""Pipeline parallelism: the layers split into `pipeline` consecutive stages, one per process of the
pipeline dimension, with activations sent forward and their gradients sent back between neighbours.

A batch is cut into `microbatches` so that stages work at the same time on different micro-batches:
GPipe runs every forward, then every backward (activations of all micro-batches held at once); 1F1B
alternates one forward and one backward after a warm-up (at most `pipeline` micro-batches held).
Stage 0 holds the embedding, the last stage the final norm, the LM head and the loss (a post-norm
stack's norm opens it, so stage 0 holds it then). A stage is the decoder-only Transformer with the
other stages' parts removed, so its parameter names are the full model's (checkpoints move between
layouts by name). Encoders and encoder-decoders are not split into stages (see `mesh.plan_layout`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from gristmill.model.model import Transformer, cross_entropy

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


def stage_layers(n_layer: int, stages: int, index: int) -> range:
    """The block indices of stage `index`: as even as possible, earlier stages one more."""
    size, extra = divmod(n_layer, stages)
    start = index * size + min(index, extra)
    return range(start, start + size + (index < extra))


class StageModel(nn.Module):
    """Blocks `layers` of a decoder `model`, with the embedding on the first stage and the head on
    the last."""

    def __init__(self, model: Transformer, index: int, stages: int):
        super().__init__()
        self.config = model.config
        stack = model.decoder
        first, last = index == 0, index == stages - 1
        pre_norm = self.config.norm_placement == "pre"
        self.wte = model.wte if first else None
        self.wpe = model.wpe if first else None
        self.drop = model.drop
        self.decoder = nn.Module()  # the stack's parts this stage holds, under the stack's names
        self.decoder.blocks = nn.ModuleDict({str(i): stack.blocks[i] for i in stage_layers(self.config.n_layer, stages, index)})
        self.decoder.norm = stack.norm if (last if pre_norm else first) else None
        self.lm_head = model.lm_head if last else None
        self.attention_mask = stack.self_attention_mask  # ALiBi slopes and sliding windows; no parameters
        if self.config.position == "rope":
            self.register_buffer("rope_cos", stack.rope_cos, persistent=False)
            self.register_buffer("rope_sin", stack.rope_sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids (first stage) or hidden states in; hidden states or logits (last stage) out."""
        if self.wte is not None:
            positions = self.wpe(torch.arange(x.size(1), device=x.device)) if self.wpe is not None else 0
            x = self.drop(self.wte(x) + positions)
        T = x.size(1)
        rotary = (self.rope_cos[:T], self.rope_sin[:T]) if self.config.position == "rope" else None
        mask = self.attention_mask(T, x.device, None)
        pre_norm = self.config.norm_placement == "pre"
        if self.decoder.norm is not None and not pre_norm:
            x = self.decoder.norm(x)
        for block in self.decoder.blocks.values():
            x = block(x, rotary, mask, True)
        if self.decoder.norm is not None and pre_norm:
            x = self.decoder.norm(x)
        if self.lm_head is not None:
            x = self.lm_head(x)
        return x


def pipeline_schedule(stage_model: nn.Module, mesh: DeviceMesh, device: torch.device, schedule: str,
                      microbatches: int, loss_scale: float):
    """The schedule that runs `stage_model` (maybe wrapped for data parallelism) as stage
    `mesh.get_local_rank()` of `mesh.size()`; its loss is the model's, times `loss_scale`."""

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return cross_entropy(logits.flatten(0, 1), targets.flatten()) * loss_scale

    stage = PipelineStage(stage_model, mesh.get_local_rank(), mesh.size(), device, group=mesh.get_group())
    return SCHEDULES[schedule](stage, microbatches, loss_fn=loss_fn)
