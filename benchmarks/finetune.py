"""Fine-tuning throughput: gristmill's `finetune` (sft, dpo) vs TRL's `SFTTrainer` and `DPOTrainer`.

Same data (the bundled `sft.jsonl` and `dpo.jsonl`), same tokenizer (a byte-level BPE trained on
those texts, with gristmill's chat template), same model: TRL trains a `LlamaForCausalLM` of the
same shape whose weights are copied from gristmill's randomly initialised decoder (the layouts match:
RMSNorm, rotary halves, SwiGLU, tied embeddings), so both start from the very same function and the
first losses agree. Same steps, batch, learning rate, AdamW, gradient clipping; one process, CPU.

Measured: examples per second over the whole call (ours: `finetune()`, which encodes the data and,
for DPO, computes the reference log-probs; TRL: building the trainer, which tokenizes, plus
`train()`, which computes the reference log-probs with `precompute_ref_log_probs`). gristmill packs
SFT examples several to a row (its default, attention kept inside each example); TRL pads each
batch to its longest example. The sides run alternately, `--rounds` times each, and each side's
fastest run counts (the losses are the same every round); on a shared machine the ratio is noisy. TRL's SFT completion loss also covers the newline after the EOS token.

    python -m benchmarks.finetune --quick
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from gristmill import DATA_DIR
from gristmill.model.finetune.config import FinetuneConfig
from gristmill.model.finetune.data import CHAT_TEMPLATE, Removed, read_records, to_messages
from gristmill.model.finetune.loop import finetune
from gristmill.model.model import ModelConfig, Transformer
from gristmill.tokenize.recipes import train_byte_bpe

DATA = DATA_DIR / "finetune"
SEED = 1234
SIZE = dict(n_layer=4, n_head=4, n_embd=128, seq_len=128)  # the quickstart model's shape
EOS = "<|endoftext|>"


def load(name: str) -> list[dict]:
    return [record for _, record in read_records([DATA / f"{name}.jsonl"], Removed())]


def base_checkpoint(folder: Path, vocab_size: int) -> tuple[Path, Transformer, object]:
    """A byte-level BPE on the bundled texts and a seeded random decoder, saved as a checkpoint."""
    texts = [m["content"] for r in load("sft") for m in to_messages(r)] + [r["rejected"] for r in load("dpo")]
    tokenizer = train_byte_bpe(texts, vocab_size)
    torch.manual_seed(SEED)
    model = Transformer(ModelConfig(vocab_size=tokenizer.get_vocab_size(), **SIZE))
    path = folder / "base.pt"
    torch.save({"model": model.state_dict(), "model_config": asdict(model.config),
                "eos_id": tokenizer.token_to_id(EOS), "tokenizer_json": tokenizer.to_str()}, path)
    return path, model, tokenizer


def llama_copy(model: Transformer):
    """A `LlamaForCausalLM` computing the same function as `model`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.config
    blocks = model.decoder.blocks
    hidden = blocks[0].mlp.down.in_features
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=hidden, num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head, num_key_value_heads=c.n_head, max_position_embeddings=c.seq_len,
        rms_norm_eps=1e-6, rope_theta=c.rope_base, tie_word_embeddings=True, attention_bias=False,
        mlp_bias=False, attn_implementation="sdpa",
    ))
    state = {"model.embed_tokens.weight": model.wte.weight, "model.norm.weight": model.decoder.norm.weight,
             "lm_head.weight": model.wte.weight}
    for i, block in enumerate(blocks):
        q, k, v = block.attn.qkv.weight.chunk(3)
        gate, up = block.mlp.up.weight.chunk(2)
        prefix = f"model.layers.{i}."
        state |= {prefix + "input_layernorm.weight": block.norm1.weight,
                  prefix + "post_attention_layernorm.weight": block.norm2.weight,
                  prefix + "self_attn.q_proj.weight": q, prefix + "self_attn.k_proj.weight": k,
                  prefix + "self_attn.v_proj.weight": v, prefix + "self_attn.o_proj.weight": block.attn.proj.weight,
                  prefix + "mlp.gate_proj.weight": gate, prefix + "mlp.up_proj.weight": up,
                  prefix + "mlp.down_proj.weight": block.mlp.down.weight}
    llama.load_state_dict({k: v.detach().clone() for k, v in state.items()})
    return llama


def hf_tokenizer(tokenizer):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=EOS, chat_template=CHAT_TEMPLATE)


def run_ours(method: str, base: Path, out: Path, steps: int, batch: int, lr: float) -> dict:
    config = FinetuneConfig(method=method, max_steps=steps, batch_size=batch, learning_rate=lr, warmup_steps=0,
                            weight_decay=0.0, holdout_fraction=0.0, log_every=1, eval_every=10**6,
                            checkpoint_every=10**6, progress=False, device="cpu")
    started = time.perf_counter()
    summary = finetune(config, base, [DATA / f"{method}.jsonl"], out)
    wall = time.perf_counter() - started
    return {"examples_per_s": summary["examples_seen"] / wall, "final_loss": summary["final_loss"],
            "first_loss": json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"]}


def trl_args(config_class, out: Path, steps: int, batch: int, lr: float, **extra):
    return config_class(output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr,
                        lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0, adam_beta2=0.95,
                        max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                        disable_tqdm=True, seed=SEED, dataloader_num_workers=0, **extra)


def run_trl(method: str, model: Transformer, tokenizer, out: Path, steps: int, batch: int, lr: float, seq_len: int) -> dict:
    from datasets import Dataset, disable_progress_bars
    from transformers import PrinterCallback
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    disable_progress_bars()

    llama, processing = llama_copy(model), hf_tokenizer(tokenizer)
    started = time.perf_counter()
    if method == "sft":
        rows = [to_messages(r) for r in load("sft")]
        data = Dataset.from_list([{"prompt": m[:-1], "completion": m[-1:]} for m in rows])
        args = trl_args(SFTConfig, out, steps, batch, lr, max_length=seq_len, packing=False)
        trainer = SFTTrainer(model=llama, args=args, train_dataset=data, processing_class=processing)
    else:
        data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                                   "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                   "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in load("dpo")])
        args = trl_args(DPOConfig, out, steps, batch, lr, beta=0.1, max_length=seq_len, precompute_ref_log_probs=True)
        trainer = DPOTrainer(model=llama, args=args, train_dataset=data, processing_class=processing)
    trainer.remove_callback(PrinterCallback)  # its per-step prints; the losses are read from log_history
    trainer.train()
    wall = time.perf_counter() - started
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"examples_per_s": steps * batch / wall, "final_loss": losses[-1], "first_loss": losses[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps (about two minutes on 2 CPU cores)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of each side; the fastest counts")
    args = parser.parse_args()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.set_num_threads(1)  # small models on a shared CPU: one thread each, both sides alike
    steps, batch, lr = (10 if args.quick else 40), 8, 3e-4
    result: dict[str, object] = {"benchmark": "finetune", "steps": steps, "batch": batch, "rounds": args.rounds}
    with tempfile.TemporaryDirectory() as tmp:
        base, model, tokenizer = base_checkpoint(Path(tmp), vocab_size=2000)
        for method in ("sft", "dpo"):
            runs: dict[str, list[dict]] = {"ours": [], "theirs": []}
            for round_ in range(args.rounds):  # alternating, so a change in the machine's load hits both
                runs["ours"].append(run_ours(method, base, Path(tmp) / f"ours-{method}-{round_}", steps, batch, lr))
                runs["theirs"].append(run_trl(method, model, tokenizer, Path(tmp) / f"trl-{method}-{round_}", steps,
                                              batch, lr, SIZE["seq_len"]))
            ours, theirs = (max(r, key=lambda run: run["examples_per_s"]) for r in (runs["ours"], runs["theirs"]))
            print(f"{method}: first loss gristmill {ours['first_loss']:.4f} TRL {theirs['first_loss']:.4f}; "
                  f"final loss gristmill {ours['final_loss']:.4f} TRL {theirs['final_loss']:.4f}; "
                  f"examples/s gristmill {ours['examples_per_s']:.1f} TRL {theirs['examples_per_s']:.1f}")
            result |= {f"{method}_examples_per_s": round(ours["examples_per_s"], 2),
                       f"{method}_reference_examples_per_s": round(theirs["examples_per_s"], 2),
                       f"{method}_ratio": round(ours["examples_per_s"] / theirs["examples_per_s"], 2),
                       f"{method}_final_loss": round(ours["final_loss"], 4),
                       f"{method}_reference_final_loss": round(theirs["final_loss"], 4)}
    result["target"] = 1.2
    print(json.dumps(result))


if __name__ == "__main__":
    main()
