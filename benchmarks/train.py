"""Training throughput: gristmill's Transformer vs the Hugging Face `transformers` model of the same shape.

`--architecture decoder` (default) compares against GPT2LMHeadModel, `encoder` (MLM) against
BertForMaskedLM, `encoder_decoder` (span corruption) against T5ForConditionalGeneration. gristmill's
model takes the settings that export onto that architecture (`gristmill.model.export`), and the
reference is built from the exported config and weights, so both have the same shape, biases,
parameters and initial values; both use the same AdamW decay groups (no decay on norms, biases and
embeddings) and compute the loss on float32 logits. They train on the same batches from the same
token shards (the bundled sample site, encoded with a byte-level BPE trained on it), step by step
alternately in one process (each going first on every other step) so machine noise hits both
alike; tokens/s is batch tokens over the median step time (robust to the spikes of a shared
machine), after untimed warm-up steps, and the ratio is the median over steps of the reference's
step time over gristmill's on the same batch. For MLM, gristmill projects only the selected
positions to the vocabulary (the only ones scored); `transformers` projects every position.

On CUDA both run in bf16 autocast (and `--compile` compiles both) and MFU is reported from
gristmill's FLOPs formula (`Transformer.flops_per_token`: 6N + 12·L·H·Q·T) and the GPU's peak bf16 rate.

    python -m benchmarks.train --quick [--architecture encoder]
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
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from benchmarks.sample_pages import sample_pages
from gristmill.model.config import TrainConfig
from gristmill.model.data import TrainLoader
from gristmill.model.export import TARGETS, target_of
from gristmill.model.loop import PEAK_BF16_FLOPS
from gristmill.model.model import Transformer
from gristmill.model.objectives import make_objective
from gristmill.tokenize.recipes import objective_token_ids, train_byte_bpe
from gristmill.tokenize.shards import token_dtype, write_shard

# Per architecture: the settings that export onto the reference, and the reference's Auto class.
SHAPES = {
    "decoder": (dict(position="learned", mlp="gelu", norm="layernorm", bias=True), AutoModelForCausalLM),
    "encoder": (dict(position="learned", mlp="gelu", norm="layernorm", norm_placement="post", bias=True), AutoModelForMaskedLM),
    "encoder_decoder": (dict(position="relative"), AutoModelForSeq2SeqLM),
}
SEED = 1234


def build_shards(folder: Path, vocab_size: int) -> tuple[Path, dict]:
    """Every bundled sample page as text, a byte-level BPE trained on it, one EOS-separated shard;
    returns the shard and the tokenizer's special ids (EOS, mask, sentinels)."""
    texts = [p.text for p in sample_pages(main_content=False)]
    tokenizer = train_byte_bpe(texts, vocab_size)
    eos = tokenizer.token_to_id("<|endoftext|>")
    ids = np.concatenate([np.array(tokenizer.encode(t).ids + [eos]) for t in texts])
    write_shard(folder / "train_000000.bin", ids, token_dtype(tokenizer.get_vocab_size()))
    return folder / "train_000000.bin", {"eos_id": eos, **objective_token_ids(tokenizer)}


def reference_model(ours: Transformer, objective: str, auto) -> torch.nn.Module:
    """The `transformers` model gristmill's exports to, built from the exported config and weights."""
    config = ours.config
    hf_config, weights = TARGETS[target_of(config, objective)](config, {k: v.float() for k, v in ours.state_dict().items()})
    model_type = hf_config.pop("model_type")
    hf_config.pop("architectures")
    theirs = auto.from_config(CONFIG_MAPPING[model_type](vocab_size=config.vocab_size, **hf_config), attn_implementation="sdpa")
    missing, _ = theirs.load_state_dict(weights, strict=False)
    assert not [k for k in missing if "embed_tokens" not in k], missing
    return theirs


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """gristmill's rule for any model: decay matrices, not norms, biases or embeddings."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    params = list(dict.fromkeys(p for p in model.parameters() if p.requires_grad))
    return [
        {"params": [p for p in params if p.dim() >= 2 and id(p) not in embeddings], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2 or id(p) in embeddings], "weight_decay": 0.0},
    ]


def hf_loss(model, inputs: dict) -> torch.Tensor:
    if inputs["decoder_idx"] is not None:
        logits = model(input_ids=inputs["idx"], decoder_input_ids=inputs["decoder_idx"]).logits
    else:
        logits = model(input_ids=inputs["idx"]).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), inputs["targets"].reshape(-1), ignore_index=-1)


def timed_step(step_fn, loader: TrainLoader, step: int, device: torch.device) -> float:
    """Seconds spent on one optimiser step (the batch is fetched inside, as in training)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    step_fn(loader.batch(step, 0).inputs(device))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def make_step(model, loss_of, optimizer, autocast):
    def step(inputs):
        with autocast:
            loss = loss_of(model, inputs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps (under a minute on 2 CPU cores)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models (CUDA default: on)")
    parser.add_argument("--architecture", choices=list(SHAPES), default="decoder")
    args = parser.parse_args()
    shape, auto = SHAPES[args.architecture]

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":  # Transformer-2 small: 124M parameters, bf16, compiled
        config = TrainConfig(n_layer=12, n_head=12, n_embd=768, seq_len=1024, batch_size=16, architecture=args.architecture, **shape)
        vocab_size, warmup, steps = 50257, 5, (20 if args.quick else 60)
        use_compile = True
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        config = TrainConfig(n_layer=4, n_head=4, n_embd=256, seq_len=256, batch_size=8, architecture=args.architecture, **shape)
        vocab_size, warmup, steps = 4096, 2, (12 if args.quick else 40)
        use_compile = args.compile
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    with tempfile.TemporaryDirectory() as tmp:
        shard, special = build_shards(Path(tmp), vocab_size)
        objective = make_objective(config, vocab_size, special["eos_id"], special["mask_id"], special["sentinel_ids"], shard)
        loader = TrainLoader([shard], config.seq_len, config.batch_size, 1, seed=SEED, objective=objective)

        torch.manual_seed(SEED)
        ours = Transformer(config.transformer_config(vocab_size, objective.decoder_start_id)).to(device)
        ours_optimizer = ours.configure_optimizers(0.1, 3e-4, (0.9, 0.95), device.type)
        theirs = reference_model(ours, config.objective, auto).to(device)
        theirs_optimizer = torch.optim.AdamW(decay_groups(theirs, 0.1), lr=3e-4, betas=(0.9, 0.95), fused=True)
        ours_forward, theirs_forward = ours, theirs
        if use_compile:
            ours_forward, theirs_forward = torch.compile(ours), torch.compile(theirs)
        runs = {
            "gristmill": make_step(ours_forward, lambda m, inputs: m(**inputs)[1], ours_optimizer, autocast),
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
    params = {"gristmill": ours.num_params(non_embedding=False), "transformers": sum(p.numel() for p in theirs.parameters())}
    print(
        f"{config.architecture} ({config.objective}) vs {type(theirs).__name__}: {config.n_layer} layers, "
        f"{config.n_head} heads, width {config.n_embd}, context {config.seq_len}, batch {config.batch_size}, "
        f"vocab {vocab_size}; params gristmill {params['gristmill']:,}, transformers {params['transformers']:,}; "
        f"compile {use_compile}"
    )
    print(f"gristmill    {tokens_per_s:10.0f} tokens/s")
    print(f"transformers {reference:10.0f} tokens/s")
    if device.type == "cpu":
        print("MFU is not reported on CPU (no known peak FLOP/s); on CUDA it uses the bf16 peak of the GPU.")
    result = {
        "benchmark": "train",
        "architecture": config.architecture,
        "params": params,
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
