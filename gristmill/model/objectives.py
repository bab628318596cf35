"""Training objectives: how a window of seq_len + 1 shard tokens becomes model inputs and targets.

- `causal` (decoder): predict every next token.
- `prefix_lm` (decoder): a random prefix per row is seen both ways and not scored; the rest is
  causal. For an encoder-decoder, the encoder reads a prefix (one random length per step, so the
  batch keeps one shape) and the decoder writes the rest.
- `mlm` (encoder, BERT): select `mask_fraction` of the tokens; of those 80 % become the mask token,
  10 % a random token, 10 % stay; the loss is on the selected tokens only.
- `span_corruption` (encoder-decoder, T5): drop `noise_density` of the tokens in spans of mean
  length `mean_span`, each span replaced by a sentinel in the encoder input; the decoder writes
  each sentinel followed by the tokens it stands for. Every row has the same number of dropped
  tokens and spans, so inputs and targets have one length per batch.

All randomness comes from the generators the loader passes in (one per global row, one per
step), so batches stay a pure function of (seed, step) and independent of the process count.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Batch:
    x: torch.Tensor  # (B, T) input ids (the encoder's, for an encoder-decoder)
    y: torch.Tensor  # (B, T) target ids, -1 where no loss is taken ((B, S) for an encoder-decoder)
    prefix_len: torch.Tensor | None = None  # (B,) for a decoder's prefix-LM
    decoder_x: torch.Tensor | None = None  # (B, S) decoder input ids of an encoder-decoder

    def inputs(self, device: torch.device | str) -> dict[str, torch.Tensor | None]:
        """The model's keyword arguments, on `device`."""
        def move(t):
            return None if t is None else t.to(device, non_blocking=True)

        return {"idx": move(self.x), "targets": move(self.y), "prefix_len": move(self.prefix_len),
                "decoder_idx": move(self.decoder_x)}


@dataclass(frozen=True)
class Objective:
    name: str = "causal"
    architecture: str = "decoder"
    vocab_size: int = 0
    mask_id: int | None = None
    sentinel_ids: tuple[int, ...] = ()
    decoder_start_id: int = 0
    mask_fraction: float = 0.15
    noise_density: float = 0.15
    mean_span: float = 3.0

    def batch(self, tokens: np.ndarray, row_rngs: list[np.random.Generator], step_rng: np.random.Generator) -> Batch:
        """Inputs and targets from (B, seq_len + 1) windows."""
        if self.name == "causal":
            return causal_batch(tokens)
        if self.name == "mlm":
            return mlm_batch(tokens[:, :-1], row_rngs, self.mask_id, self.vocab_size, self.mask_fraction)
        if self.name == "span_corruption":
            return span_corruption_batch(
                tokens[:, :-1], row_rngs, self.sentinel_ids, self.decoder_start_id, self.noise_density, self.mean_span
            )
        seq_len = tokens.shape[1] - 1
        if self.architecture == "encoder_decoder":
            return seq2seq_batch(tokens, int(step_rng.integers(1, seq_len)), self.decoder_start_id)
        return prefix_lm_batch(tokens, np.array([rng.integers(1, seq_len) for rng in row_rngs]))


def make_objective(config, vocab_size: int, eos_id: int | None, mask_id: int | None, sentinel_ids: list[int], where: str) -> Objective:
    """The objective of `config` (a TrainConfig) for shards with these special ids; `where` (the
    meta.json path) names the file in the error when a needed token is missing."""
    if config.objective == "mlm" and mask_id is None:
        raise ValueError(f"{where}: no mask_id; objective mlm needs a tokenizer with a mask token ([MASK] or <mask>)")
    if config.objective == "span_corruption":
        n_noise, n_spans = span_counts(config.seq_len, config.noise_density, config.mean_span)
        if len(sentinel_ids) < n_spans:
            raise ValueError(
                f"{where}: {len(sentinel_ids)} sentinel tokens, but span_corruption of seq_len={config.seq_len} "
                f"(noise_density={config.noise_density}, mean_span={config.mean_span}) needs {n_spans}; "
                "reserve more (`sentinels` of the tokenizer) or shorten seq_len"
            )
    return Objective(
        name=config.objective,
        architecture=config.architecture,
        vocab_size=vocab_size,
        mask_id=mask_id,
        sentinel_ids=tuple(sentinel_ids),
        decoder_start_id=eos_id if eos_id is not None else 0,
        mask_fraction=config.mask_fraction,
        noise_density=config.noise_density,
        mean_span=config.mean_span,
    )


def causal_batch(tokens: np.ndarray) -> Batch:
    """Inputs are tokens[:, :-1], targets tokens[:, 1:]."""
    return Batch(torch.from_numpy(tokens[:, :-1].copy()), torch.from_numpy(tokens[:, 1:].copy()))


def prefix_lm_batch(tokens: np.ndarray, prefix_len: np.ndarray) -> Batch:
    """Causal, but with a prefix of length P the targets of positions before P - 1 are dropped
    (those tokens are visible inside the bidirectional prefix)."""
    batch = causal_batch(tokens)
    prefix = torch.from_numpy(prefix_len.astype(np.int64))
    positions = torch.arange(batch.x.size(1))[None, :]
    return Batch(batch.x, batch.y.masked_fill(positions < prefix[:, None] - 1, -1), prefix)


def seq2seq_batch(tokens: np.ndarray, split: int, start_id: int) -> Batch:
    """Encoder input tokens[:, :split]; the decoder predicts tokens[:, split:] after a start token."""
    targets = tokens[:, split:]
    decoder_x = np.concatenate([np.full((len(tokens), 1), start_id), targets[:, :-1]], axis=1)
    return Batch(torch.from_numpy(tokens[:, :split].copy()), torch.from_numpy(targets.copy()),
                 decoder_x=torch.from_numpy(decoder_x))


def mlm_batch(tokens: np.ndarray, row_rngs, mask_id: int, vocab_size: int, fraction: float) -> Batch:
    """BERT's masking: each token selected with probability `fraction` (at least one per row);
    selected tokens become the mask (80 %), a random token (10 %) or stay (10 %)."""
    x, y = tokens.copy(), np.full_like(tokens, -1)
    for row, rng in enumerate(row_rngs):
        selected = rng.random(tokens.shape[1]) < fraction
        if not selected.any():
            selected[rng.integers(tokens.shape[1])] = True
        action = rng.random(tokens.shape[1])
        y[row, selected] = tokens[row, selected]
        x[row, selected & (action < 0.8)] = mask_id
        random = selected & (action >= 0.8) & (action < 0.9)
        x[row, random] = rng.integers(0, vocab_size, int(random.sum()))
    return Batch(torch.from_numpy(x), torch.from_numpy(y))


def span_counts(length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """Dropped tokens and spans in a sequence of `length` (T5's rounding; at least one of each)."""
    n_noise = min(max(1, round(length * noise_density)), length - 1)
    n_spans = min(max(1, round(n_noise / mean_span)), n_noise, length - n_noise)
    return n_noise, n_spans


def random_partition(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """`parts` positive integers summing to `total`, uniformly among such compositions."""
    cuts = np.sort(rng.choice(np.arange(1, total), parts - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [total]]))


def span_corruption_batch(
    tokens: np.ndarray, row_rngs, sentinel_ids, start_id: int, noise_density: float, mean_span: float
) -> Batch:
    """T5's span corruption: kept and dropped spans alternate (a kept span first); the encoder
    reads kept spans each followed by its sentinel, the decoder writes each sentinel followed by
    its dropped span."""
    length = tokens.shape[1]
    n_noise, n_spans = span_counts(length, noise_density, mean_span)
    inputs = np.empty((len(tokens), length - n_noise + n_spans), dtype=np.int64)
    targets = np.empty((len(tokens), n_noise + n_spans), dtype=np.int64)
    for row, rng in enumerate(row_rngs):
        kept, dropped = random_partition(length - n_noise, n_spans, rng), random_partition(n_noise, n_spans, rng)
        encoder, decoder, position = [], [], 0
        for span in range(n_spans):
            encoder += [tokens[row, position : position + kept[span]], [sentinel_ids[span]]]
            position += kept[span]
            decoder += [[sentinel_ids[span]], tokens[row, position : position + dropped[span]]]
            position += dropped[span]
        inputs[row], targets[row] = np.concatenate(encoder), np.concatenate(decoder)
    decoder_x = np.concatenate([np.full((len(tokens), 1), start_id), targets[:, :-1]], axis=1)
    return Batch(torch.from_numpy(inputs), torch.from_numpy(targets), decoder_x=torch.from_numpy(decoder_x))
