"""The pretraining loop, top to bottom: set-up, data, model, optimiser, loop, eval, checkpoints.

One process by default; under `torchrun` (RANK / WORLD_SIZE in the environment) it trains with the
`parallel` layout (data parallelism by default; sharding, tensor and pipeline parallelism in
`gristmill/model/parallel/`), nccl on CUDA, gloo on CPU, every data-parallel replica reading its own
disjoint slice of each global batch:

    torchrun --nproc_per_node 2 -m gristmill.model.train SHARDS_DIR --out DIR [options]   (see train.py)

The output folder holds `checkpoint/` (a DCP checkpoint: model, optimizer and step, which any layout
can resume), `checkpoint.pt` (its export: the whole model, RNG states, data position, config,
tokenizer; written atomically, loaded with `torch.load(weights_only=True)`; what sampling and the
export read), `metrics.jsonl` (one JSON object per logged step) and `samples.jsonl` (text from a
fixed prompt at each checkpoint). Resuming continues with exactly the losses an uninterrupted run
would have had (same device and layout; another layout agrees to rounding): the learning rate and
the batches are pure functions of the step.
"""

from __future__ import annotations

import io as bytes_io
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from tokenizers import Tokenizer

from gristmill.model import parallel
from gristmill.model.config import TrainConfig
from gristmill.model.data import ShardsInfo, TrainLoader, read_shards_info, val_batches
from gristmill.model.model import Transformer
from gristmill.model.objectives import make_objective
from gristmill.model.parallel import checkpoint as dcp_checkpoint
from gristmill.model.parallel.grads import local_finite
from gristmill.model.parallel.mesh import build_mesh, plan_layout
from gristmill.model.sample import CHECKPOINT_FILE, load_checkpoint, sample_text
from gristmill.pipeline.io import remove_temporaries, write_bytes_atomic

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
DCP_FOLDER = "checkpoint"

# Dense bf16 peak FLOP/s per device, for MFU; other devices need `peak_flops` in the config.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 70e12}


class NonFiniteLoss(RuntimeError):
    """Training diverged: the loss, the gradient norm or the weights are no longer finite."""


def stop_if_not_finite(step: int, values: dict[str, torch.Tensor], ddp: bool, last_finite: tuple[int, float] | None,
                       checkpoint: Path, saved_step: int | None) -> None:
    """Raise `NonFiniteLoss` (on every process alike) when any of `values` is NaN or infinite, naming
    the step, the last finite loss and the checkpoint that stays as the last good one."""
    finite = torch.stack([torch.isfinite(v).all() for v in values.values()])
    bad = (~finite).any().float()
    if ddp:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if not bad.item():
        return
    what = ", ".join(f"{name} {'finite' if ok else 'not finite'}" for name, ok in zip(values, finite.tolist()))
    last = f"last finite loss {last_finite[1]:.4f} at step {last_finite[0]}" if last_finite else "no finite loss yet"
    kept = f"{checkpoint} (step {saved_step}) is kept" if saved_step else "no checkpoint was written"
    raise NonFiniteLoss(
        f"training diverged at step {step} ({what}); {last}; {kept}. "
        "Lower learning_rate, lengthen warmup_steps or set grad_clip, then resume or start again."
    )


def learning_rate_at(step: int, config: TrainConfig) -> float:
    """Linear warmup to `learning_rate`, then cosine decay to `min_lr_ratio * learning_rate` at
    `max_steps`, or WSD: stable until the last `decay_fraction` of steps, then linear decay."""
    peak, floor = config.learning_rate, config.learning_rate * config.min_lr_ratio
    if step <= config.warmup_steps:
        return peak * step / config.warmup_steps
    if config.schedule == "cosine":
        progress = (step - config.warmup_steps) / (config.max_steps - config.warmup_steps)
        return floor + 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))) * (peak - floor)
    decay_start = max(config.warmup_steps, config.max_steps - round(config.decay_fraction * config.max_steps))
    if step <= decay_start:
        return peak
    return floor + (peak - floor) * (config.max_steps - step) / (config.max_steps - decay_start)


def peak_flops_per_device(config: TrainConfig, device: torch.device) -> float | None:
    if config.peak_flops is not None:
        return config.peak_flops
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)
    return None


def memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated, or the process's resident memory on CPU, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return psutil.Process().memory_info().rss / 2**20


def start_processes(device_setting: str) -> tuple[bool, int, int, int, torch.device]:
    """(ddp, rank, local_rank, world_size, device): DDP when torchrun set RANK and WORLD_SIZE (nccl
    on CUDA, gloo on CPU); `device_setting` auto means CUDA when available."""
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    use_cuda = device_setting.startswith("cuda") or (device_setting == "auto" and torch.cuda.is_available())
    if use_cuda:
        device = torch.device(f"cuda:{local_rank}" if ddp else (device_setting if device_setting != "auto" else "cuda"))
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_setting if device_setting != "auto" else "cpu")
    if ddp:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return ddp, rank, local_rank, world_size, device


def train(config: TrainConfig, shards_dir: str | Path, out_dir: str | Path, resume: bool = False) -> dict[str, Any]:
    """Train on the shards in `shards_dir`, writing into `out_dir`; with `resume`, continue from
    `out_dir/checkpoint.pt`. Returns a summary: steps, tokens, final loss, val loss, tokens/s, MFU."""
    # ---- processes and device
    ddp, rank, local_rank, world_size, device = start_processes(config.device)
    layout = plan_layout(config, world_size)
    mesh = build_mesh(layout, device.type) if ddp else None
    data_rank = mesh["data"].get_local_rank() if mesh is not None else 0
    master = rank == 0
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # ---- data
    info = read_shards_info(shards_dir)
    objective = make_objective(
        config, info.vocab_size, info.eos_id, info.mask_id, info.sentinel_ids, info.folder / "meta.json"
    )
    loader = TrainLoader(
        info.train, config.seq_len, config.batch_size, config.grad_accum, config.seed, data_rank, layout.data,
        objective,
    )
    val = (
        val_batches(info.val, config.seq_len, config.batch_size, config.eval_batches, data_rank, layout.data,
                    objective)
        if info.val
        else []
    )
    tokens_per_step = config.batch_size * config.grad_accum * layout.data * config.seq_len

    # ---- model and optimiser (same init on every process, then split by the layout)
    torch.manual_seed(config.seed)
    model_config = config.transformer_config(info.vocab_size, objective.decoder_start_id)
    model = Transformer(model_config).to(device)
    flops_per_token, num_params = model.flops_per_token(), model.num_params()
    run = parallel.Parallel(model, config, layout, mesh, device)
    del model  # a pipeline stage keeps only its own layers
    optimizer = run.optimizer
    torch.manual_seed(config.seed + rank)  # dropout differs per process
    checkpoint_file = out_dir / CHECKPOINT_FILE
    step = 0
    if resume:
        checkpoint = load_checkpoint(checkpoint_file, device)
        if checkpoint["model_config"] != asdict(model_config):
            raise ValueError(
                f"{checkpoint_file}: model {checkpoint['model_config']} does not match the settings {asdict(model_config)}"
            )
        step = dcp_checkpoint.load(out_dir / DCP_FOLDER, run.state_module, run.state_optimizer)
        rng = checkpoint["rng"]
        if len(rng["torch"]) == world_size and checkpoint["step"] == step:
            torch.set_rng_state(rng["torch"][rank].cpu())
            if device.type == "cuda" and rng["cuda"]:
                torch.cuda.set_rng_state(rng["cuda"][rank].cpu(), device)
    if master:
        remove_temporaries(out_dir)  # e.g. a checkpoint half-written when a previous run was killed
        keep_records(out_dir / METRICS_FILE, step)
        keep_records(out_dir / SAMPLES_FILE, step)

    # ---- the loop
    last_step = min(config.max_steps, config.stop_at or config.max_steps)
    peak_flops = peak_flops_per_device(config, device)
    summary: dict[str, Any] = {"params": num_params, "flops_per_token": flops_per_token, "layout": layout.describe()}
    interval_time, interval_steps, run_time, run_steps = 0.0, 0, 0.0, 0
    progress = make_progress(master and config.progress)
    task = progress.add_task("train", total=config.max_steps, completed=step, loss="")
    last_finite: tuple[int, float] | None = None  # (step, loss) for the divergence message
    saved_step = step or None  # the checkpoint a divergence leaves in place
    with progress:
        while step < last_step:
            step += 1
            lr = learning_rate_at(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            started = time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            for micro_step in range(config.grad_accum):
                inputs = loader.batch(step, micro_step).inputs(device)
                loss_sum += run.forward_backward(inputs, micro_step == config.grad_accum - 1, autocast)
            grad_norm = run.clip_grad_norm(config.grad_clip)
            # before the update: a NaN gradient never reaches the weights
            stop_if_not_finite(step, {"loss": loss_sum, "gradient norm": grad_norm}, ddp, last_finite,
                               checkpoint_file, saved_step)
            last_finite = (step, loss_sum.item())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - started
            interval_time, interval_steps = interval_time + elapsed, interval_steps + 1
            run_time, run_steps = run_time + elapsed, run_steps + 1

            is_last = step == last_step
            evaluate = bool(info.val) and (step % config.eval_every == 0 or is_last)
            val_loss, val_accuracy = validation_metrics(run, val, device, autocast, ddp) if evaluate else (None, None)
            if step % config.log_every == 0 or is_last or evaluate or step == 1:
                if ddp:  # pipeline stages before the last contribute zeros
                    dist.all_reduce(loss_sum)
                    loss_sum /= world_size // layout.pipeline
                tokens_per_sec = tokens_per_step * interval_steps / interval_time
                mfu = flops_per_token * tokens_per_sec / (peak_flops * world_size) if peak_flops else None
                record = {
                    "step": step,
                    "loss": loss_sum.item(),
                    "val_loss": val_loss,
                    "val_accuracy": val_accuracy,
                    "lr": lr,
                    "grad_norm": grad_norm.item(),
                    "tokens": step * tokens_per_step,
                    "tokens_per_sec": tokens_per_sec,
                    "mfu": mfu,
                    "memory_mb": memory_mb(device),
                    "memory_mb_per_rank": memory_per_rank(device, ddp, world_size),
                    "layout": layout.describe(),
                }
                interval_time, interval_steps = 0.0, 0
                summary.update(final_loss=record["loss"], mfu=mfu)
                if val_loss is not None:
                    summary.update(val_loss=val_loss, val_accuracy=val_accuracy)
                if master:
                    append_record(out_dir / METRICS_FILE, record)
                progress.update(task, loss=f"loss {record['loss']:.3f}")
            if step % config.checkpoint_every == 0 or is_last:
                weights = {"weights": local_finite(run.state_module.parameters())}
                stop_if_not_finite(step, weights, ddp, last_finite, checkpoint_file, saved_step)
                saved_step = step
                rng_states = gather_rng_states(device, ddp, world_size)
                staged = dcp_checkpoint.save(out_dir / DCP_FOLDER, run.state_module, run.state_optimizer, step)
                if master:  # sample, then checkpoint: a kill between them redoes both on resume
                    whole = dcp_checkpoint.export_model(staged, model_config).to(device)
                    if info.tokenizer is not None and info.tokenizer.is_file():
                        text = sample_text(
                            whole,
                            Tokenizer.from_file(str(info.tokenizer)),
                            config.sample_prompt,
                            config.sample_tokens,
                            eos_id=info.eos_id,
                            seed=config.seed,
                        )
                        append_record(out_dir / SAMPLES_FILE, {"step": step, "prompt": config.sample_prompt, "text": text})
                    dcp_checkpoint.publish(out_dir / DCP_FOLDER)
                    save_checkpoint(checkpoint_file, whole, step, rng_states, config, info)
                if ddp:
                    dist.barrier()
            progress.update(task, completed=step)
    if ddp:
        dist.barrier()
        dist.destroy_process_group()
    summary.update(
        steps=step,
        tokens=step * tokens_per_step,
        tokens_per_sec=tokens_per_step * run_steps / run_time if run_time else None,
        checkpoint=str(checkpoint_file),
    )
    return summary


@torch.no_grad()
def validation_metrics(run: parallel.Parallel, batches, device: torch.device, autocast, ddp: bool) -> tuple[float, float]:
    """The objective's loss on its targets and the share of targets predicted exactly (top-1;
    for MLM the masked-token accuracy), over this process's val batches and then all processes,
    token-weighted (tensor-parallel copies count alike, pipeline stages without the head nothing)."""
    run.train(False)
    totals = torch.zeros(3, device=device, dtype=torch.float64)
    for batch in batches:
        inputs = batch.inputs(device)
        result = run.evaluate(inputs, autocast)
        if result is None:
            continue
        logits, loss = result
        scored = inputs["targets"] != -1
        if logits.dim() == 3:  # decoders return every position; the encoder only its scored ones
            logits = logits[scored]
        correct = (logits.argmax(-1) == inputs["targets"][scored]).sum()
        count = scored.sum()
        totals += torch.stack([loss.double() * count, correct.double(), count.double()])
    if ddp:
        dist.all_reduce(totals)
    run.train(True)
    return (totals[0] / totals[2]).item(), (totals[1] / totals[2]).item()


def memory_per_rank(device: torch.device, ddp: bool, world_size: int) -> list[float]:
    """`memory_mb` of every process, indexed by rank."""
    if not ddp:
        return [memory_mb(device)]
    values = torch.zeros(world_size, dtype=torch.float64, device=device)
    values[dist.get_rank()] = memory_mb(device)
    dist.all_reduce(values)
    return values.tolist()


def gather_rng_states(device: torch.device, ddp: bool, world_size: int) -> dict[str, list[torch.Tensor]]:
    """Every process's torch (and CUDA) RNG state, indexed by rank."""
    mine = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    states = [mine]
    if ddp:
        states = [None] * world_size
        dist.all_gather_object(states, mine)
    return {
        "torch": [s["torch"] for s in states],
        "cuda": [s["cuda"] for s in states] if device.type == "cuda" else [],
    }


def save_checkpoint(path: Path, model: Transformer, step: int, rng_states, config: TrainConfig, info: ShardsInfo):
    """Write the single-file export beside the DCP checkpoint: the whole model, what a same-layout
    resume restores exactly (RNG states, data position), and what sampling needs (config,
    tokenizer); tensors and plain containers only (weights_only load)."""
    tokenizer_json = info.tokenizer.read_text() if info.tokenizer is not None and info.tokenizer.is_file() else None
    state = {
        "model": model.state_dict(),
        "step": step,
        "data": {"seed": config.seed, "next_step": step + 1},
        "rng": rng_states,
        "config": config.model_dump(),
        "model_config": asdict(model.config),
        "eos_id": info.eos_id,
        "tokenizer_json": tokenizer_json,
        "shards_dir": str(info.folder),
    }
    buffer = bytes_io.BytesIO()
    torch.save(state, buffer)
    write_bytes_atomic(buffer.getvalue(), path)


def keep_records(path: Path, up_to_step: int) -> None:
    """Drop JSON-lines records after `up_to_step` (all of them for a fresh run), so a resumed run
    does not log a step twice. A torn last line (a kill mid-write) is dropped; a damaged line
    elsewhere is an error naming the file and line."""
    if not path.exists():
        return
    lines = path.read_bytes().decode("utf-8", "replace").splitlines()
    kept = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = record["step"]
        except (json.JSONDecodeError, TypeError, KeyError) as error:
            if number == len(lines):
                break
            raise ValueError(f"{path}, line {number}: not a record with a 'step' ({error}); fix or remove it") from None
        if step <= up_to_step:
            kept.append(line)
    write_bytes_atomic("".join(line + "\n" for line in kept).encode(), path)


def append_record(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def make_progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[loss]}"),
        TimeRemainingColumn(),
        disable=not enabled,
        console=Console(stderr=True),
    )

