"""Checkpoints that outlive their layout: `torch.distributed.checkpoint` (DCP) writes every process's
own shards in parallel, each tensor under its full-model name with its place in the whole, so any
other layout (other process counts, sharding, tensor or pipeline degrees, or one process) reads back
exactly the pieces it holds. `export_model` turns one into a plain single-process Transformer.

Optimizer state is stored flattened (`state.<parameter>.exp_avg`, ...), so a pipeline stage saves and
loads only its own parameters' state. Tensors split with a stride (the fused projections under tensor
parallelism) are written whole: DCP addresses contiguous chunks only, and DTensor cannot gather
a stride nested under FSDP's split by itself.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard

from gristmill.model.model import ModelConfig, Transformer

# A single process passes `no_dist=True`, which already says what torch then warns about on every save
# and load; the warning would print at each checkpoint of every single-process run.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def _fused(value) -> bool:
    """A fused projection under tensor parallelism (split with a stride on the tensor dimension)."""
    return isinstance(value, DTensor) and isinstance(value.placements[-1], _StridedShard)


def _whole(value: DTensor) -> torch.Tensor:
    """A fused DTensor gathered whole: first FSDP's rows of this process's tensor share (when the
    mesh is data x tensor), then the strided tensor split."""
    mesh, local = value.device_mesh, value.to_local()
    if mesh.ndim == 2:
        data = mesh[mesh.mesh_dim_names[0]]
        rows = value.shape[0] // mesh.size(1)  # this tensor process's share, as FSDP split it
        per = -(-rows // data.size())  # torch.chunk's size: every chunk but the tail ones
        padded = torch.nn.functional.pad(local, (0, 0) * (local.dim() - 1) + (0, per - local.size(0)))
        local = DTensor.from_local(padded, data, [Shard(0)], run_check=False).full_tensor()[:rows]
    tensor = mesh[mesh.mesh_dim_names[-1]] if mesh.ndim == 2 else mesh
    return DTensor.from_local(local, tensor, [value.placements[-1]], run_check=False).full_tensor()


def _split(whole: torch.Tensor, like: DTensor) -> DTensor:
    """The inverse of `_whole`: this process's part of `whole`, laid out as `like`."""
    mesh = like.device_mesh
    tensor = mesh[mesh.mesh_dim_names[-1]] if mesh.ndim == 2 else mesh
    local = distribute_tensor(whole, tensor, [like.placements[-1]]).to_local()
    if mesh.ndim == 2:
        data = mesh[mesh.mesh_dim_names[0]]
        chunks = local.chunk(data.size())
        rank = data.get_local_rank()
        local = chunks[rank] if rank < len(chunks) else local[:0]
    return DTensor.from_local(local, mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride())


def _writable(state: dict) -> dict:
    """`state` with fused tensor-parallel DTensors gathered whole."""
    return {key: _whole(value) if _fused(value) else value for key, value in state.items()}


def staging(folder: Path) -> Path:
    """Where `save` writes before `publish` renames it to `folder`."""
    return folder.with_name(folder.name + ".partial")


def save(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> Path:
    """Write model, optimizer and step into `staging(folder)` (every process calls this) and return
    it; until `publish`, a kill leaves the previous checkpoint in `folder` intact."""
    model_state, optim_state = get_state_dict(model, optimizer, options=OPTIONS)
    staged = staging(folder)
    distributed = dist.is_initialized()
    if (not distributed or dist.get_rank() == 0) and staged.exists():
        shutil.rmtree(staged)
    state = {"model": _writable(model_state), "optimizer": _writable(optim_state), "step": torch.tensor(step)}
    dcp.save(state, checkpoint_id=staged, no_dist=not distributed)
    if distributed:
        dist.barrier()
    return staged


def publish(folder: Path) -> None:
    """Replace `folder` with the complete checkpoint in `staging(folder)` (one process calls this)."""
    if folder.exists():
        shutil.rmtree(folder)
    staging(folder).rename(folder)


def load(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Fill `model` and `optimizer` (any layout) from `folder`; returns the step it was saved at."""
    if not (folder / ".metadata").is_file():
        raise FileNotFoundError(f"{folder}: no distributed checkpoint here (its .metadata file is missing)")
    model_state, optim_state = get_state_dict(model, optimizer, options=OPTIONS)
    state = {"model": _writable(model_state), "optimizer": _writable(optim_state), "step": torch.tensor(0)}
    dcp.load(state, checkpoint_id=folder, no_dist=not dist.is_initialized())
    for loaded, original in ((state["model"], model_state), (state["optimizer"], optim_state)):
        for key, value in original.items():
            if _fused(value):
                loaded[key] = _split(loaded[key], value)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=OPTIONS)
    return int(state["step"])


def export_model(folder: Path, config: ModelConfig) -> Transformer:
    """The whole model from `folder` as a plain Transformer in this process (no process group needed)."""
    model = Transformer(config)
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=folder, no_dist=True)
    model.load_state_dict(state["model"])
    return model
