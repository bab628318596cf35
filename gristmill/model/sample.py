"""Text from a trained model: load a checkpoint and its tokenizer, continue a prompt.

A checkpoint carries the tokenizer it was trained with (the `tokenizer.json` text from the shards'
meta.json), so sampling needs nothing but the checkpoint file.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer

from gristmill.model.model import GPT, GPTConfig

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


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer | None, dict]:
    """The trained model (eval mode), its tokenizer (None when the shards named none) and the
    checkpoint dictionary."""
    checkpoint = load_checkpoint(path, device)
    model = GPT(GPTConfig(**checkpoint["gpt_config"]))
    model.load_state_dict(checkpoint["model"])
    model.to(device).eval()
    tokenizer_json = checkpoint.get("tokenizer_json")
    tokenizer = Tokenizer.from_str(tokenizer_json) if tokenizer_json else None
    return model, tokenizer, checkpoint


def sample_text(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = 0.95,
    eos_id: int | None = None,
    seed: int = 0,
) -> str:
    """The prompt followed by sampled text, decoded. Seeded through its own generator, so it
    neither depends on nor disturbs the global RNG (training calls it at checkpoints)."""
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
    return tokenizer.decode(out[0].tolist(), skip_special_tokens=True)
