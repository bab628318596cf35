"""The layout: how `world_size` processes factor into pipeline x data x tensor, checked against the
model before anything is built, and the `DeviceMesh` whose dimensions the other modules split over.

Ranks are laid out pipeline-major, tensor-minor (as in torchtitan): the processes of one tensor group
are neighbours (on one machine, where the fastest links are), a pipeline stage spans the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from gristmill.model.config import TrainConfig

DIMS = ("pipeline", "data", "tensor")


@dataclass(frozen=True)
class Layout:
    pipeline: int
    data: int
    tensor: int
    shard: str  # none | optimizer | full

    @property
    def shape(self) -> dict[str, int]:
        return {"pipeline": self.pipeline, "data": self.data, "tensor": self.tensor}

    def describe(self) -> dict[str, object]:
        """What the metrics and the dashboard show."""
        return {**self.shape, "shard": self.shard}


def plan_layout(config: TrainConfig, world_size: int) -> Layout:
    """The layout for `world_size` processes, or a ValueError naming the settings that cannot hold."""
    p = config.parallel
    inner = p.tensor * p.pipeline
    if world_size % inner:
        raise ValueError(
            f"parallel: tensor ({p.tensor}) x pipeline ({p.pipeline}) = {inner} does not divide the "
            f"{world_size} processes started"
        )
    data = world_size // inner
    if p.data is not None and p.data != data:
        raise ValueError(
            f"parallel: data ({p.data}) x tensor ({p.tensor}) x pipeline ({p.pipeline}) = {p.data * inner}, "
            f"but {world_size} processes were started"
        )
    problems = []
    if p.shard == "optimizer" and inner > 1:
        problems.append("shard: optimizer (ZeRO-1) shards plain replicas only; use shard: full with tensor or pipeline")
    if p.shard == "none" and data > 1 and inner > 1:
        problems.append(
            f"data ({data}) with tensor ({p.tensor}) x pipeline ({p.pipeline}) needs shard: full "
            "(FSDP over the data dimension)"
        )
    if config.n_head % p.tensor:
        problems.append(f"tensor ({p.tensor}) must divide n_head ({config.n_head})")
    if p.pipeline > 1:
        if p.pipeline > config.n_layer:
            problems.append(f"pipeline ({p.pipeline}) cannot exceed n_layer ({config.n_layer})")
        if config.tie_weights:
            problems.append("pipeline > 1 needs tie_weights: false (the embedding and the LM head sit on different stages)")
        if config.architecture != "decoder":
            problems.append(
                f"pipeline > 1 supports architecture: decoder only, not architecture: {config.architecture} "
                "(its stages would have to pass the encoder's output along)"
            )
        elif config.objective != "causal":
            problems.append(f"pipeline > 1 supports objective: causal only, not {config.objective}")
        if config.position == "relative":
            problems.append("pipeline > 1 does not support position: relative (its bias table is shared by every stage)")
        if config.batch_size % p.microbatches:
            problems.append(f"microbatches ({p.microbatches}) must divide batch_size ({config.batch_size})")
        if p.schedule == "1f1b" and p.microbatches < p.pipeline:
            problems.append(f"schedule: 1f1b needs microbatches ({p.microbatches}) >= pipeline ({p.pipeline})")
    if problems:
        raise ValueError("parallel: " + "; ".join(problems))
    return Layout(pipeline=p.pipeline, data=data, tensor=p.tensor, shard=p.shard)


def build_mesh(layout: Layout, device_type: str) -> DeviceMesh:
    """One mesh over all processes, dimensions named pipeline, data, tensor (size-1 ones included,
    so every module can ask for its dimension by name)."""
    return init_device_mesh(device_type, tuple(layout.shape[d] for d in DIMS), mesh_dim_names=DIMS)
