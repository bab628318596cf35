"""The fine-tuning loop: the pre-training loop's machinery (processes, learning-rate schedule,
divergence check, metrics JSONL, RNG states, atomic checkpoints, exact resume) around a method.

    input checkpoint + JSONL/Parquet records
      -> encode and split (data.py; bad records counted in removed.json, never a crash)
      -> method (methods.py: sft / dpo / classify) -> loop -> OUT/checkpoint.pt, metrics.jsonl

The output checkpoint has the keys `gristmill sample` reads (model, model_config, tokenizer_json,
eos_id) plus the chat template, the method, and for `classify` the head and its labels; beside it
`tokenizer.json` and `tokenizer_config.json` (with `chat_template`), as `gristmill export` writes them.
"""

from __future__ import annotations

import io as bytes_io
import json
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from gristmill.model.export import write_tokenizer
from gristmill.model.finetune.config import FinetuneConfig
from gristmill.model.finetune.data import (
    CHAT_TEMPLATE,
    Removed,
    encode_records,
    make_split,
    read_records,
    row_indices,
)
from gristmill.model.finetune.methods import DPO, SFT, Classify, classifier_head
from gristmill.model.loop import (
    METRICS_FILE,
    append_record,
    gather_rng_states,
    keep_records,
    learning_rate_at,
    make_progress,
    memory_mb,
    start_processes,
    stop_if_not_finite,
)
from gristmill.model.sample import CHECKPOINT_FILE, checkpoint_path, load_checkpoint, load_model
from gristmill.pipeline.io import write_bytes_atomic

REMOVED_FILE = "removed.json"


def finetune(config: FinetuneConfig, input_checkpoint: str | Path, data: list[Path], out_dir: str | Path,
             resume: bool = False) -> dict[str, Any]:
    """Fine-tune the model of `input_checkpoint` on the records in `data` files, writing into
    `out_dir`; with `resume`, continue from `out_dir/checkpoint.pt`. Returns a summary."""
    ddp, rank, local_rank, world_size, device = start_processes(config.device)
    master = rank == 0
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    # ---- input model and data
    net, tokenizer, source = load_model(input_checkpoint, device)
    if tokenizer is None or source.get("eos_id") is None:
        raise ValueError(f"{checkpoint_path(input_checkpoint)}: fine-tuning needs a checkpoint with a tokenizer and an EOS id")
    if source.get("method") == "classify":
        raise ValueError(f"{checkpoint_path(input_checkpoint)}: a classifier checkpoint cannot be fine-tuned further")
    if config.method != "classify" and net.config.architecture != "decoder":
        raise ValueError(f"{checkpoint_path(input_checkpoint)}: {config.method} needs a decoder checkpoint, "
                         f"this one is an {net.config.architecture}")
    eos_id, seq_len = source["eos_id"], net.config.seq_len
    removed = Removed()
    train_examples, holdout_examples = encode_records(
        config.method, read_records(data, removed), tokenizer, eos_id, seq_len, config.holdout_fraction, removed,
        config.label_key,
    )
    if not train_examples:
        raise ValueError(f"no usable {config.method} records in {', '.join(map(str, data))} ({dict(removed.counts)})")
    labels = sorted({label for _, label in train_examples}) if config.method == "classify" else []
    train_split = make_split(config.method, train_examples, seq_len, eos_id, config.pack, labels)
    holdout_split = make_split(config.method, holdout_examples, seq_len, eos_id, config.pack, labels, removed)
    if master:
        write_bytes_atomic(json.dumps({"removed": removed.total, "reasons": dict(removed.counts),
                                       "examples": removed.examples}, indent=1).encode(), out_dir / REMOVED_FILE)

    # ---- method, optimiser, resume
    net.train()
    torch.manual_seed(config.seed)  # the classification head's initial weights
    if config.method == "sft":
        method = SFT(net, train_split, holdout_split, device)
    elif config.method == "dpo":
        method = DPO(net, train_split, holdout_split, device, config.beta)  # reference: input model
    else:
        method = Classify(net, train_split, holdout_split, device, labels, config.pooling)
    optimizer = net.configure_optimizers(config.weight_decay, config.learning_rate, (config.beta1, config.beta2),
                                         device.type)
    if method.module is not net:
        optimizer.add_param_group({"params": list(method.module.head.parameters()), "weight_decay": 0.0})
    torch.manual_seed(config.seed + rank)
    checkpoint_file = out_dir / CHECKPOINT_FILE
    step = 0
    if resume:
        state = load_checkpoint(checkpoint_file, device)
        net.load_state_dict(state["model"])
        if state.get("classifier") is not None:
            method.module.head.load_state_dict(state["classifier"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        if len(state["rng"]["torch"]) == world_size:
            torch.set_rng_state(state["rng"]["torch"][rank].cpu())
            if device.type == "cuda" and state["rng"]["cuda"]:
                torch.cuda.set_rng_state(state["rng"]["cuda"][rank].cpu(), device)
    if master:
        keep_records(out_dir / METRICS_FILE, step)
    model = DistributedDataParallel(method.module) if ddp else method.module

    # ---- the loop
    last_step = min(config.max_steps, config.stop_at or config.max_steps)
    rows_per_step = config.batch_size * config.grad_accum * world_size
    summary: dict[str, Any] = {"method": config.method, "train_examples": len(train_examples),
                               "holdout_examples": len(holdout_examples), "removed": removed.total,
                               "train_rows": len(train_split.rows)} | ({"labels": labels} if labels else {})
    progress = make_progress(master and config.progress)
    task = progress.add_task(config.method, total=config.max_steps, completed=step, loss="")
    last_finite, saved_step = None, step or None
    run_time, run_examples = 0.0, 0
    with progress:
        while step < last_step:
            step += 1
            lr = learning_rate_at(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            started = time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            metric_sums: dict[str, torch.Tensor] = {}
            examples = 0  # this process's examples (sequences, pairs or texts) in this step
            for micro_step in range(config.grad_accum):
                first = (micro_step * world_size + rank) * config.batch_size
                indices = row_indices(len(train_split.rows), step, rows_per_step, first, config.batch_size, config.seed)
                examples += int(train_split.examples[indices].sum())
                if ddp:
                    model.require_backward_grad_sync = micro_step == config.grad_accum - 1
                with autocast:
                    loss, metrics = method.loss(model, indices)
                    loss = loss / config.grad_accum
                loss_sum += loss.detach()
                for key, value in metrics.items():
                    metric_sums[key] = metric_sums.get(key, torch.zeros((), device=device)) + value / config.grad_accum
                loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(method.module.parameters(), config.grad_clip or math.inf)
            stop_if_not_finite(step, {"loss": loss_sum, "gradient norm": grad_norm}, ddp, last_finite,
                               checkpoint_file, saved_step)
            last_finite = (step, loss_sum.item())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - started
            run_time, run_examples = run_time + elapsed, run_examples + examples * world_size

            is_last = step == last_step
            evaluation = method.evaluate(model) if step % config.eval_every == 0 or is_last else {}
            if step % config.log_every == 0 or is_last or evaluation or step == 1:
                if ddp:  # every process's average, not rank 0's alone
                    for value in [loss_sum, *metric_sums.values()]:
                        dist.all_reduce(value)
                        value /= world_size
                record = {"step": step, "loss": loss_sum.item(), "lr": lr, "grad_norm": grad_norm.item(),
                          "examples_per_sec": examples * world_size / elapsed, "memory_mb": memory_mb(device)}
                record |= {key: value.item() for key, value in metric_sums.items()} | evaluation
                summary |= {"final_loss": record["loss"]} | evaluation
                if master:
                    append_record(out_dir / METRICS_FILE, record)
                progress.update(task, loss=f"loss {record['loss']:.3f}")
            if step % config.checkpoint_every == 0 or is_last:
                saved_step = step
                rng_states = gather_rng_states(device, ddp, world_size)
                if master:
                    save_checkpoint(checkpoint_file, method, optimizer, step, rng_states, config, source)
            progress.update(task, completed=step)
    if master:  # what `transformers` reads, the chat template included (the export writes the same)
        write_tokenizer(tokenizer, eos_id, seq_len, out_dir, CHAT_TEMPLATE if config.method != "classify" else None)
    if ddp:
        dist.barrier()
        dist.destroy_process_group()
    summary.update(steps=step, examples_seen=run_examples, examples_per_sec=run_examples / run_time if run_time else None,
                   checkpoint=str(checkpoint_file))
    return summary


def save_checkpoint(path: Path, method, optimizer, step: int, rng_states, config: FinetuneConfig, source: dict) -> None:
    """What `gristmill sample` and a resume need, as tensors and plain containers (weights_only load)."""
    state = {
        "model": method.net.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "rng": rng_states,
        "config": config.model_dump(),
        "method": config.method,
        "model_config": source["model_config"],
        "eos_id": source["eos_id"],
        "tokenizer_json": source["tokenizer_json"],
        "chat_template": CHAT_TEMPLATE if config.method != "classify" else source.get("chat_template"),
        "classifier": classifier_head(method.module),
        "labels": getattr(method, "labels", None),
    }
    buffer = bytes_io.BytesIO()
    torch.save(state, buffer)
    write_bytes_atomic(buffer.getvalue(), path)
