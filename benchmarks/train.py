"""Training throughput: gristmill's Transformer vs Hugging Face `transformers` GPT2LMHeadModel.

Both models get the same width, depth, heads, context and batch, SDPA attention and a plain AdamW
loop (forward, cross-entropy, backward, clip, step) on the same batches from the same token shards
(the bundled sample site, encoded with a byte-level BPE trained on it). They run step by step
alternately in one process (each going first on every other step) so machine noise hits both
alike; tokens/s is batch tokens over the median step time (robust to the spikes of a shared
machine), after untimed warm-up steps, and the ratio is the median over steps of the reference's
step time over gristmill's on the same batch.

On CUDA both run in bf16 autocast (and `--compile` compiles both) and MFU is reported from
gristmill's FLOPs formula (`Transformer.flops_per_token`: 6N + 12·L·H·Q·T) and the GPU's peak bf16 rate.

    python benchmarks/train.py --quick
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from benchmarks.sample_pages import sample_pages
from gristmill.model.config import TrainConfig
from gristmill.model.data import TrainLoader
from gristmill.model.loop import PEAK_BF16_FLOPS
from gristmill.model.model import Transformer
from gristmill.tokenize.recipes import train_byte_bpe
from gristmill.tokenize.shards import token_dtype, write_shard

SEED = 1234


def build_shards(folder: Path, vocab_size: int) -> Path:
    """Every bundled sample page as text, a byte-level BPE trained on it, one EOS-separated shard."""
    texts = [p.text for p in sample_pages(main_content=False)]
    tokenizer = train_byte_bpe(texts, vocab_size)
    eos = tokenizer.token_to_id("<|endoftext|>")
    ids = np.concatenate([np.array(tokenizer.encode(t).ids + [eos]) for t in texts])
    write_shard(folder / "train_000000.bin", ids, token_dtype(tokenizer.get_vocab_size()))
    return folder / "train_000000.bin"


def hf_model(config: TrainConfig, vocab_size: int) -> GPT2LMHeadModel:
    gpt2 = GPT2Config(
        vocab_size=vocab_size,
        n_positions=config.seq_len,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel._from_config(gpt2, attn_implementation="sdpa")


def hf_loss(model: GPT2LMHeadModel, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=x).logits
    return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), y.view(-1))


def timed_step(step_fn, loader: TrainLoader, step: int, device: torch.device) -> float:
    """Seconds spent on one optimiser step (the batch is fetched inside, as in training)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    batch = loader.batch(step, 0)
    step_fn(batch.x.to(device), batch.y.to(device))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def make_step(model, loss_of, optimizer, autocast):
    def step(x, y):
        with autocast:
            loss = loss_of(model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps (under a minute on 2 CPU cores)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models (CUDA default: on)")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":  # Transformer-2 small: 124M parameters, bf16, compiled
        config = TrainConfig(n_layer=12, n_head=12, n_embd=768, seq_len=1024, batch_size=16)
        vocab_size, warmup, steps = 50257, 5, (20 if args.quick else 60)
        use_compile = True
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        config = TrainConfig(n_layer=4, n_head=4, n_embd=256, seq_len=256, batch_size=8)
        vocab_size, warmup, steps = 4096, 2, (12 if args.quick else 40)
        use_compile = args.compile
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    with tempfile.TemporaryDirectory() as tmp:
        shard = build_shards(Path(tmp), vocab_size)
        loader = TrainLoader([shard], config.seq_len, config.batch_size, 1, seed=SEED)

        torch.manual_seed(SEED)
        ours = Transformer(config.transformer_config(vocab_size)).to(device)
        ours_optimizer = ours.configure_optimizers(0.1, 3e-4, (0.9, 0.95), device.type)
        theirs = hf_model(config, vocab_size).to(device)
        theirs_optimizer = torch.optim.AdamW(
            theirs.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=device.type == "cuda"
        )
        ours_forward, theirs_forward = ours, theirs
        if use_compile:
            ours_forward, theirs_forward = torch.compile(ours), torch.compile(theirs)
        runs = {
            "gristmill": make_step(ours_forward, lambda m, x, y: m(x, y)[1], ours_optimizer, autocast),
            "transformers": make_step(theirs_forward, hf_loss, theirs_optimizer, autocast),
        }
        seconds: dict[str, list[float]] = {name: [] for name in runs}
        for step in range(1, warmup + steps + 1):  # alternate step by step: noise hits both alike
            order = list(runs.items()) if step % 2 else list(runs.items())[::-1]  # neither always goes first
            for name, step_fn in order:
                elapsed = timed_step(step_fn, loader, step, device)
                if step > warmup:  # the first steps (and compilation) are not timed
                    seconds[name].append(elapsed)

    tokens_per_step = config.batch_size * config.seq_len
    tokens_per_s = tokens_per_step / float(np.median(seconds["gristmill"]))
    reference = tokens_per_step / float(np.median(seconds["transformers"]))
    # the ratio pairs each step with the reference's step of the same batch, run right beside it,
    # so a load change on a shared machine between pairs cancels out
    ratio = float(np.median(np.array(seconds["transformers"]) / np.array(seconds["gristmill"])))
    peak = next((f for k, f in PEAK_BF16_FLOPS.items() if k in torch.cuda.get_device_name()), None) if device.type == "cuda" else None
    mfu = ours.flops_per_token() * tokens_per_s / peak if peak else None
    print(
        f"model: {config.n_layer} layers, {config.n_head} heads, width {config.n_embd}, context {config.seq_len}, "
        f"batch {config.batch_size}, vocab {vocab_size}; params gristmill {ours.num_params():,}, "
        f"transformers {sum(p.numel() for p in theirs.parameters()):,}; compile {use_compile}"
    )
    print(f"gristmill    {tokens_per_s:10.0f} tokens/s")
    print(f"transformers {reference:10.0f} tokens/s")
    if device.type == "cpu":
        print("MFU is not reported on CPU (no known peak FLOP/s); on CUDA it uses the bf16 peak of the GPU.")
    result = {
        "benchmark": "train",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "tokens_per_s": round(tokens_per_s, 1),
        "reference_tokens_per_s": round(reference, 1),
        "ratio": round(ratio, 3),
        "mfu": None if mfu is None or math.isnan(mfu) else round(mfu, 4),
        "target": 1.2,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
