"""Export a trained checkpoint to the Hugging Face layout: `config.json`, `model.safetensors` and the
tokenizer files, loadable by `transformers` (`AutoModelFor...` and `AutoTokenizer`) without
gristmill installed.

Each architecture maps onto the `transformers` model of the same shape, weight by weight:

- decoder, RoPE + SwiGLU + RMSNorm (pre-norm)       -> Llama (`LlamaForCausalLM`)
- decoder, learned positions + GELU + LayerNorm (pre) -> GPT-2 (`GPT2LMHeadModel`)
- encoder, learned positions + GELU + LayerNorm, post-norm -> BERT (`BertForMaskedLM`)
- encoder_decoder, relative positions + RMSNorm (pre), no biases -> T5 (`T5ForConditionalGeneration`)

A setting the target cannot express (ALiBi, sliding windows, a prefix-LM mask, ...) is an error
naming the setting; no silent approximation. Biases gristmill left out are written as zeros.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from gristmill.model.model import MLP, ModelConfig
from gristmill.model.sample import load_checkpoint
from gristmill.tokenize.recipes import objective_token_ids

RMS_EPS, LAYERNORM_EPS = 1e-6, 1e-5  # gristmill's RMSNorm and torch's LayerNorm defaults


class NotExportable(ValueError):
    """The checkpoint uses a setting the target architecture has no equivalent for."""


# What each target needs, setting by setting; any other value is a NotExportable naming it.
REQUIREMENTS = {
    "llama": {"position": "rope", "mlp": "swiglu", "norm": "rmsnorm", "norm_placement": "pre", "sliding_window": None},
    "gpt2": {"position": "learned", "mlp": "gelu", "norm": "layernorm", "norm_placement": "pre", "sliding_window": None},
    "bert": {"position": "learned", "mlp": "gelu", "norm": "layernorm", "norm_placement": "post", "sliding_window": None},
    # tied: transformers 5 always ties T5's output projection to its embeddings
    "t5": {"position": "relative", "norm": "rmsnorm", "norm_placement": "pre", "sliding_window": None, "bias": False,
           "tie_weights": True},
}


def target_of(config: ModelConfig, objective: str) -> str:
    """The `transformers` architecture a model exports to, or NotExportable naming the setting."""
    if config.architecture == "decoder":
        if objective == "prefix_lm":
            raise NotExportable("objective prefix_lm: transformers' causal LMs have no bidirectional-prefix mask")
        target = "gpt2" if config.position == "learned" else "llama"
    else:
        target = {"encoder": "bert", "encoder_decoder": "t5"}[config.architecture]
    for setting, wanted in REQUIREMENTS[target].items():
        value = getattr(config, setting)
        if value != wanted:
            raise NotExportable(
                f"{setting}={value!r}: a {config.architecture} exports to {target} only with {setting}={wanted!r} "
                f"(needs {REQUIREMENTS[target]})"
            )
    return target


def export_hf(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write `out_dir` (config.json, model.safetensors, tokenizer files); returns it."""
    state = load_checkpoint(checkpoint)
    config = ModelConfig(**state["model_config"])
    target = target_of(config, state["config"].get("objective") or "causal")
    weights = {k: v.float() for k, v in state["model"].items()}
    hf_config, hf_weights = TARGETS[target](config, weights)
    eos_id = state.get("eos_id")
    hf_config |= {"vocab_size": config.vocab_size, "torch_dtype": "float32", "eos_token_id": eos_id, "bos_token_id": eos_id}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # safetensors stores no shared or strided storage: one contiguous copy per name
    save_file({k: v.contiguous().clone() for k, v in hf_weights.items()}, str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2))
    if state.get("tokenizer_json"):
        write_tokenizer(Tokenizer.from_str(state["tokenizer_json"]), state.get("eos_id"), config.seq_len, out_dir)
    return out_dir


def write_tokenizer(tokenizer: Tokenizer, eos_id: int | None, max_length: int, out_dir: Path) -> None:
    """tokenizer.json plus the config `AutoTokenizer` reads (the fast tokenizer class, its roles)."""
    tokenizer.save(str(out_dir / "tokenizer.json"))
    roles = {"eos_token": tokenizer.id_to_token(eos_id) if eos_id is not None else None,
             "mask_token": objective_token_ids(tokenizer)["mask_token"]}
    roles = {k: v for k, v in roles.items() if v is not None}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
              "clean_up_tokenization_spaces": False, **roles}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "special_tokens_map.json").write_text(json.dumps(roles, indent=2))


def mlp_hidden(config: ModelConfig) -> int:
    return MLP(config).down.in_features


def bias_or_zeros(weights: dict, name: str, size: int) -> torch.Tensor:
    return weights.get(name, torch.zeros(size))


def llama(config: ModelConfig, w: dict) -> tuple[dict, dict]:
    C, hidden = config.n_embd, mlp_hidden(config)
    out = {"model.embed_tokens.weight": w["wte.weight"], "model.norm.weight": w["decoder.norm.weight"]}
    for i in range(config.n_layer):
        ours, theirs = f"decoder.blocks.{i}.", f"model.layers.{i}."
        for kind in ("weight", "bias"):
            if f"{ours}attn.qkv.{kind}" not in w:
                continue
            q, k, v = w[f"{ours}attn.qkv.{kind}"].split(C)
            gate, up = w[f"{ours}mlp.up.{kind}"].split(hidden)
            out |= {
                f"{theirs}self_attn.q_proj.{kind}": q,
                f"{theirs}self_attn.k_proj.{kind}": k,
                f"{theirs}self_attn.v_proj.{kind}": v,
                f"{theirs}self_attn.o_proj.{kind}": w[f"{ours}attn.proj.{kind}"],
                f"{theirs}mlp.gate_proj.{kind}": gate,
                f"{theirs}mlp.up_proj.{kind}": up,
                f"{theirs}mlp.down_proj.{kind}": w[f"{ours}mlp.down.{kind}"],
            }
        out |= {f"{theirs}input_layernorm.weight": w[f"{ours}norm1.weight"],
                f"{theirs}post_attention_layernorm.weight": w[f"{ours}norm2.weight"]}
    if not config.tie_weights:
        out["lm_head.weight"] = w["lm_head.weight"]
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": C,
        "intermediate_size": hidden,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_head,
        "head_dim": config.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": config.seq_len,
        "rms_norm_eps": RMS_EPS,
        "rope_theta": config.rope_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_base},
        "attention_bias": config.bias,
        "mlp_bias": config.bias,
        "tie_word_embeddings": config.tie_weights,
    }
    return hf, out


def layernorm(w: dict, ours: str, theirs: str, size: int) -> dict:
    return {f"{theirs}.weight": w[f"{ours}.weight"], f"{theirs}.bias": bias_or_zeros(w, f"{ours}.bias", size)}


def linear(w: dict, ours: str, theirs: str, transpose: bool = False) -> dict:
    weight = w[f"{ours}.weight"]
    bias = bias_or_zeros(w, f"{ours}.bias", weight.size(0))
    return {f"{theirs}.weight": weight.T if transpose else weight, f"{theirs}.bias": bias}


def gpt2(config: ModelConfig, w: dict) -> tuple[dict, dict]:
    C = config.n_embd
    out = {"transformer.wte.weight": w["wte.weight"], "transformer.wpe.weight": w["wpe.weight"]}
    out |= layernorm(w, "decoder.norm", "transformer.ln_f", C)
    for i in range(config.n_layer):
        ours, theirs = f"decoder.blocks.{i}.", f"transformer.h.{i}."
        out |= layernorm(w, f"{ours}norm1", f"{theirs}ln_1", C) | layernorm(w, f"{ours}norm2", f"{theirs}ln_2", C)
        out |= linear(w, f"{ours}attn.qkv", f"{theirs}attn.c_attn", transpose=True)  # GPT-2's Conv1D is (in, out)
        out |= linear(w, f"{ours}attn.proj", f"{theirs}attn.c_proj", transpose=True)
        out |= linear(w, f"{ours}mlp.up", f"{theirs}mlp.c_fc", transpose=True)
        out |= linear(w, f"{ours}mlp.down", f"{theirs}mlp.c_proj", transpose=True)
    out["lm_head.weight"] = w["lm_head.weight"]
    hf = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_embd": C,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": mlp_hidden(config),
        "n_positions": config.seq_len,
        "activation_function": "gelu_new",  # the tanh approximation gristmill uses
        "layer_norm_epsilon": LAYERNORM_EPS,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "tie_word_embeddings": config.tie_weights,
    }
    return hf, out


def bert(config: ModelConfig, w: dict) -> tuple[dict, dict]:
    C = config.n_embd
    out = {
        "bert.embeddings.word_embeddings.weight": w["wte.weight"],
        "bert.embeddings.position_embeddings.weight": w["wpe.weight"],
        "bert.embeddings.token_type_embeddings.weight": torch.zeros(1, C),  # one segment type, adding nothing
        "cls.predictions.decoder.weight": w["lm_head.weight"],
        "cls.predictions.bias": torch.zeros(config.vocab_size),
        "cls.predictions.decoder.bias": torch.zeros(config.vocab_size),
    }
    out |= layernorm(w, "encoder.norm", "bert.embeddings.LayerNorm", C)  # post-norm: the norm opens the stack
    out |= linear(w, "mlm_transform.0", "cls.predictions.transform.dense")
    out |= layernorm(w, "mlm_transform.2", "cls.predictions.transform.LayerNorm", C)
    for i in range(config.n_layer):
        ours, theirs = f"encoder.blocks.{i}.", f"bert.encoder.layer.{i}."
        qkv_weight = w[f"{ours}attn.qkv.weight"].split(C)
        qkv_bias = bias_or_zeros(w, f"{ours}attn.qkv.bias", 3 * C).split(C)
        for name, weight, bias in zip(("query", "key", "value"), qkv_weight, qkv_bias):
            out |= {f"{theirs}attention.self.{name}.weight": weight, f"{theirs}attention.self.{name}.bias": bias}
        out |= linear(w, f"{ours}attn.proj", f"{theirs}attention.output.dense")
        out |= layernorm(w, f"{ours}norm1", f"{theirs}attention.output.LayerNorm", C)
        out |= linear(w, f"{ours}mlp.up", f"{theirs}intermediate.dense")
        out |= linear(w, f"{ours}mlp.down", f"{theirs}output.dense")
        out |= layernorm(w, f"{ours}norm2", f"{theirs}output.LayerNorm", C)
    hf = {
        "architectures": ["BertForMaskedLM"],
        "model_type": "bert",
        "hidden_size": C,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "intermediate_size": mlp_hidden(config),
        "hidden_act": "gelu_new",  # the tanh approximation gristmill uses
        "max_position_embeddings": config.seq_len,
        "type_vocab_size": 1,
        "layer_norm_eps": LAYERNORM_EPS,
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
        "position_embedding_type": "absolute",
        "tie_word_embeddings": config.tie_weights,
    }
    return hf, out


def t5_attention(w: dict, ours: str, theirs: str, C: int, scale: float, cross: bool) -> dict:
    """q, k, v, o; T5 does not divide scores by sqrt(head size), so the queries carry it."""
    if cross:
        q, (k, v) = w[f"{ours}.q.weight"], w[f"{ours}.kv.weight"].split(C)
    else:
        q, k, v = w[f"{ours}.qkv.weight"].split(C)
    return {f"{theirs}.q.weight": q * scale, f"{theirs}.k.weight": k, f"{theirs}.v.weight": v,
            f"{theirs}.o.weight": w[f"{ours}.proj.weight"]}


def t5_mlp(config: ModelConfig, w: dict, ours: str, theirs: str) -> dict:
    if config.mlp == "swiglu":
        gate, value = w[f"{ours}.up.weight"].split(mlp_hidden(config))
        return {f"{theirs}.wi_0.weight": gate, f"{theirs}.wi_1.weight": value, f"{theirs}.wo.weight": w[f"{ours}.down.weight"]}
    return {f"{theirs}.wi.weight": w[f"{ours}.up.weight"], f"{theirs}.wo.weight": w[f"{ours}.down.weight"]}


def t5(config: ModelConfig, w: dict) -> tuple[dict, dict]:
    C, scale = config.n_embd, 1 / math.sqrt(config.head_size)
    out = {
        "shared.weight": w["wte.weight"],
        "encoder.embed_tokens.weight": w["wte.weight"],
        "decoder.embed_tokens.weight": w["wte.weight"],
        "lm_head.weight": w["lm_head.weight"],
        "encoder.final_layer_norm.weight": w["encoder.norm.weight"],
        "decoder.final_layer_norm.weight": w["decoder.norm.weight"],
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": w["encoder.relative.embedding.weight"],
        "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": w["decoder.relative.embedding.weight"],
    }
    for stack in ("encoder", "decoder"):
        for i in range(config.n_layer):
            ours, theirs = f"{stack}.blocks.{i}.", f"{stack}.block.{i}.layer."
            out |= t5_attention(w, f"{ours}attn", f"{theirs}0.SelfAttention", C, scale, cross=False)
            out[f"{theirs}0.layer_norm.weight"] = w[f"{ours}norm1.weight"]
            mlp = 1
            if stack == "decoder":
                out |= t5_attention(w, f"{ours}cross_attn", f"{theirs}1.EncDecAttention", C, scale, cross=True)
                out[f"{theirs}1.layer_norm.weight"] = w[f"{ours}norm_cross.weight"]
                mlp = 2
            out |= t5_mlp(config, w, f"{ours}mlp", f"{theirs}{mlp}.DenseReluDense")
            out[f"{theirs}{mlp}.layer_norm.weight"] = w[f"{ours}norm2.weight"]
    hf = {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "d_model": C,
        "d_kv": config.head_size,
        "d_ff": mlp_hidden(config),
        "num_layers": config.n_layer,
        "num_decoder_layers": config.n_layer,
        "num_heads": config.n_head,
        "relative_attention_num_buckets": config.relative_buckets,
        "relative_attention_max_distance": config.relative_max_distance,
        "feed_forward_proj": "gated-silu" if config.mlp == "swiglu" else "gelu_new",
        "layer_norm_epsilon": RMS_EPS,
        "dropout_rate": 0.0,
        "is_encoder_decoder": True,
        # False tells T5 not to rescale the decoder output by d_model ** -0.5 (gristmill does not);
        # the weights are tied all the same (lm_head is the embedding)
        "tie_word_embeddings": False,
        "decoder_start_token_id": config.decoder_start_id,
        "pad_token_id": config.decoder_start_id,
    }
    return hf, out


TARGETS = {"llama": llama, "gpt2": gpt2, "bert": bert, "t5": t5}

