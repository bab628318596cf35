"""Text from a trained model: load a checkpoint and its tokenizer, continue a prompt (decoders and
encoder-decoders) or fill its mask tokens (encoders).

A checkpoint carries the tokenizer it was trained with (the `tokenizer.json` text from the shards'
meta.json), so sampling needs nothing but the checkpoint file.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer

from gristmill.model.model import ModelConfig, Transformer
from gristmill.tokenize.recipes import objective_token_ids

CHECKPOINT_FILE = "checkpoint.pt"


def checkpoint_path(path: str | Path) -> Path:
    """A checkpoint file, or the `checkpoint.pt` inside a training folder."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint here (expected a .pt file or a folder holding {CHECKPOINT_FILE})")
    return path


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> dict:
    """The checkpoint dictionary, loaded with `weights_only=True` (tensors and plain containers)."""
    return torch.load(checkpoint_path(path), map_location=device, weights_only=True)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Transformer, Tokenizer | None, dict]:
    """The trained model (eval mode), its tokenizer (None when the shards named none) and the
    checkpoint dictionary."""
    checkpoint = load_checkpoint(path, device)
    model = Transformer(ModelConfig(**checkpoint["model_config"]))
    model.load_state_dict(checkpoint["model"])
    model.to(device).eval()
    tokenizer_json = checkpoint.get("tokenizer_json")
    tokenizer = Tokenizer.from_str(tokenizer_json) if tokenizer_json else None
    return model, tokenizer, checkpoint


def sample_text(
    model: Transformer,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = 0.95,
    eos_id: int | None = None,
    seed: int = 0,
) -> str:
    """The prompt followed by sampled text, decoded (an encoder-decoder's sample is its decoder's
    answer to the prompt; an encoder fills the prompt's mask tokens, or one appended to it).
    Seeded through its own generator, so it neither depends on nor disturbs the global RNG
    (training calls it at checkpoints)."""
    if model.config.architecture == "encoder":
        mask = objective_token_ids(tokenizer)["mask_token"]
        return filled_text(model, tokenizer, prompt if mask in prompt else f"{prompt} {mask}")
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids or ([eos_id] if eos_id is not None else [0])
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    out = model.generate(
        torch.tensor([ids], dtype=torch.long, device=device),
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_id=eos_id,
        generator=generator,
    )
    model.train(was_training)
    if model.config.architecture == "encoder_decoder":  # the answer after the start token, sentinels shown
        return f"{prompt} => {tokenizer.decode(out[0, 1:].tolist(), skip_special_tokens=False)}"
    return tokenizer.decode(out[0].tolist(), skip_special_tokens=True)


@torch.no_grad()
def fill_mask(model: Transformer, tokenizer: Tokenizer, text: str, top_k: int = 5) -> tuple[list[int], list[list[tuple[str, float]]]]:
    """The ids of `text` and, for each mask token in it, the `top_k` likeliest tokens with their
    probabilities. Errors when the text holds no mask token."""
    if model.config.architecture != "encoder":
        raise ValueError(f"fill-mask needs an encoder; this checkpoint is a {model.config.architecture}")
    mask = objective_token_ids(tokenizer)
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    positions = [i for i, token in enumerate(ids) if token == mask["mask_id"]]
    if not positions:
        raise ValueError(f"no {mask['mask_token']} token in {text!r}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    logits, _ = model(torch.tensor([ids[-model.config.seq_len :]], device=device))
    model.train(was_training)
    probs = logits[0].float().softmax(-1)
    offset = max(0, len(ids) - model.config.seq_len)
    choices = []
    for position in positions:
        if position < offset:
            raise ValueError(f"a mask token lies more than seq_len={model.config.seq_len} tokens before the end of the text")
        top = probs[position - offset].topk(top_k)
        choices.append([(tokenizer.id_to_token(i), p) for p, i in zip(top.values.tolist(), top.indices.tolist())])
    return ids, choices


def filled_text(model: Transformer, tokenizer: Tokenizer, text: str) -> str:
    """`text` with each mask token replaced by the encoder's likeliest token, decoded."""
    ids, choices = fill_mask(model, tokenizer, text, top_k=1)
    mask_id = objective_token_ids(tokenizer)["mask_id"]
    fills = iter(tokenizer.token_to_id(options[0][0]) for options in choices)
    return tokenizer.decode([next(fills) if i == mask_id else i for i in ids], skip_special_tokens=True)
