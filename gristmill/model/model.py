"""The transformer family in one file: config, blocks, the three architectures, optimiser groups,
generation.

- `decoder` (Transformer-style): one causal stack (or a prefix-LM mask, bidirectional over a prefix).
- `encoder` (BERT-style): one bidirectional stack and an MLM head (dense, GELU, norm, then the
  output projection), trained to predict masked tokens.
- `encoder_decoder` (T5-style): a bidirectional encoder and a causal decoder whose blocks also
  cross-attend to every encoder position.

Every stack is built from the same `Block` (attention, MLP, norms; pre-norm or post-norm), and all
attention goes through `F.scaled_dot_product_attention` (flash attention on CUDA when no explicit
mask is needed). Positions are rotary (default), ALiBi, learned absolute, or T5's bucketed relative
bias; any stack may use sliding-window attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

ARCHITECTURES = ("decoder", "encoder", "encoder_decoder")
NORMS = ("rmsnorm", "layernorm")
NORM_PLACEMENTS = ("pre", "post")
POSITIONS = ("rope", "alibi", "learned", "relative")
MLPS = ("swiglu", "gelu")


@dataclass
class ModelConfig:
    vocab_size: int
    seq_len: int = 256  # longest sequence of each stack (encoder input, decoder input)
    n_layer: int = 4  # layers of each stack (an encoder-decoder has n_layer of each)
    n_head: int = 4
    n_embd: int = 128
    architecture: str = "decoder"
    norm: str = "rmsnorm"
    norm_placement: str = "pre"  # pre: x + f(norm(x)) (Transformer-2 on); post: norm(x + f(x)) (BERT)
    position: str = "rope"
    mlp: str = "swiglu"
    tie_weights: bool = True
    sliding_window: int | None = None  # attend only to keys less than this many positions away
    bias: bool = False
    dropout: float = 0.0
    rope_base: float = 10000.0
    relative_buckets: int = 32  # T5's relative position bias: buckets and the distance of the last
    relative_max_distance: int = 128
    decoder_start_id: int = 0  # the encoder-decoder's first decoder input (gristmill uses EOS)

    def __post_init__(self) -> None:
        for name, allowed in (
            ("architecture", ARCHITECTURES),
            ("norm", NORMS),
            ("norm_placement", NORM_PLACEMENTS),
            ("position", POSITIONS),
            ("mlp", MLPS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, not {getattr(self, name)!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.position == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError("rotary embeddings need an even head size (n_embd / n_head)")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


class RMSNorm(nn.Module):
    """x / rms(x) * weight (Zhang & Sennrich 2019): LayerNorm without centring or bias."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            return RMSNormFunction.apply(x, self.weight, self.eps)
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm with a hand-written backward for CPU, where `F.rms_norm` is a composite of about
    sixteen full-size kernels (forward and autograd backward) and this takes ten: on a shared
    CPU every elementwise kernel waits for all threads, so the kernel count is the cost."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        mean_square = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.size(-1))
        rstd = mean_square.add_(eps).rsqrt_()
        normed = x * rstd
        ctx.save_for_backward(normed, weight, rstd)
        return normed * weight

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, None]:
        normed, weight, rstd = ctx.saved_tensors
        grad_normed = grad * weight
        grad_weight = (grad * normed).flatten(0, -2).sum(0) if ctx.needs_input_grad[1] else None
        # d(x * rstd)/dx projects out the component along x: (g - xhat * mean(g * xhat)) * rstd
        mean_dot = (grad_normed * normed).mean(-1, keepdim=True)
        grad_x = torch.addcmul(grad_normed, normed, mean_dot, value=-1).mul_(rstd)
        return grad_x, grad_weight, None


class CrossEntropyFunction(torch.autograd.Function):
    """Mean cross-entropy of (N, V) logits against (N,) targets (-1 ignored), with a hand-written
    backward for CPU: the gradient is softmax minus one-hot, computed in one new (N, V) buffer.
    `F.cross_entropy` allocates three logits-sized tensors (log-softmax, a zero-filled gradient,
    the log-softmax gradient), and on CPU each fresh one past malloc's mmap threshold (32 MiB:
    8 x 256 tokens x 4096 vocabulary) is page-faulted in, which costs as much as the arithmetic."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # in blocks of ~1M logits: logsumexp's full-size temporary would be another fresh buffer
        rows = max(1, (1 << 20) // logits.size(-1))
        log_norm = torch.cat([torch.logsumexp(block, dim=-1) for block in logits.split(rows)])
        valid = targets != -1
        safe_targets = targets.clamp(min=0)
        picked = logits.gather(-1, safe_targets[:, None]).squeeze(-1)
        count = valid.sum()
        ctx.save_for_backward(logits, log_norm, safe_targets, valid, count)
        return torch.where(valid, log_norm - picked, 0.0).sum() / count

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, log_norm, safe_targets, valid, count = ctx.saved_tensors
        grad_logits = torch.sub(logits, log_norm[:, None]).exp_()  # softmax
        grad_logits.scatter_add_(-1, safe_targets[:, None], torch.full_like(log_norm[:, None], -1.0))
        return grad_logits.mul_((valid * (grad / count))[:, None]), None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the targets that are not -1, in float32."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        return CrossEntropyFunction.apply(logits, targets)
    return F.cross_entropy(logits.float(), targets, ignore_index=-1)


def rotary_tables(head_size: int, length: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding tables (Su et al. 2021), shape (length, head_size): cos of position *
    frequency, each frequency written for both halves, and sin with its first half negated."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return torch.cat((angles.cos(), angles.cos()), dim=-1), torch.cat((-angles.sin(), angles.sin()), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[i], x[i + D/2]) of (..., D) by its position's angle (cos and sin
    broadcast against x): three kernels, x * cos + (x2, x1) * sin with the last two fused in one
    addcmul, which matters on CPU where every elementwise op costs."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.addcmul(x * cos.to(x.dtype), torch.cat((x2, x1), dim=-1), sin.to(x.dtype))


def alibi_slopes(n_head: int) -> torch.Tensor:
    """The geometric head slopes of ALiBi (Press et al. 2022), including non-power-of-2 counts."""

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(n_head))
    slopes = power_of_two(closest)
    if closest < n_head:
        slopes += power_of_two(2 * closest)[0::2][: n_head - closest]
    return torch.tensor(slopes)


def attention_mask(
    T: int,
    device: torch.device,
    causal: bool,
    sliding_window: int | None,
    prefix_len: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Boolean mask, True where query q may attend to key k: causal (k <= q) or not, within the
    sliding window (|q - k| < window), bidirectional inside each row's prefix (q, k < prefix_len),
    and only inside the same packed example when (B, T) `document_ids` are given. Shape (T, T),
    or (B, 1, T, T) with a prefix or document ids; None when every pair may attend (no mask needed)."""
    q = torch.arange(T, device=device)[:, None]
    k = torch.arange(T, device=device)[None, :]
    allowed = k <= q if causal else None
    if sliding_window is not None:
        window = (q - k).abs() < sliding_window
        allowed = window if allowed is None else allowed & window
    if prefix_len is not None and allowed is not None:
        in_prefix = (k < prefix_len[:, None, None, None]) & (q < prefix_len[:, None, None, None])
        allowed = allowed | in_prefix
    if document_ids is not None:
        same = document_ids[:, None, :, None] == document_ids[:, None, None, :]
        allowed = same if allowed is None else allowed & same
    return allowed


def relative_position_bucket(relative: torch.Tensor, bidirectional: bool, buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bucket of each key-minus-query distance (Raffel et al. 2020, as in `transformers`):
    half the buckets for exact small distances, the rest log-spaced up to `max_distance`; a
    bidirectional stack spends half of them on keys after the query."""
    bucket = torch.zeros_like(relative)
    if bidirectional:
        buckets //= 2
        bucket += (relative > 0).long() * buckets
        relative = relative.abs()
    else:
        relative = -torch.clamp(relative, max=0)
    exact = buckets // 2
    is_small = relative < exact
    large = exact + (
        torch.log(relative.float() / exact) / math.log(max_distance / exact) * (buckets - exact)
    ).long()
    large = torch.clamp(large, max=buckets - 1)
    return bucket + torch.where(is_small, relative, large)


class RelativePositionBias(nn.Module):
    """One learned scalar per head and distance bucket, added to the attention scores of every
    layer of a stack (T5 computes it in the first layer and shares it)."""

    def __init__(self, config: ModelConfig, bidirectional: bool):
        super().__init__()
        self.bidirectional = bidirectional
        self.buckets, self.max_distance = config.relative_buckets, config.relative_max_distance
        self.embedding = nn.Embedding(config.relative_buckets, config.n_head)

    def forward(self, T: int, device: torch.device) -> torch.Tensor:
        pos = torch.arange(T, device=device)
        bucket = relative_position_bucket(pos[None, :] - pos[:, None], self.bidirectional, self.buckets, self.max_distance)
        return self.embedding(bucket).permute(2, 0, 1)  # (H, T, T)


class Attention(nn.Module):
    """Multi-head attention: self-attention over x, or cross-attention from x to `memory` (the
    encoder's output). Rotary embeddings turn self-attention queries and keys only."""

    def __init__(self, config: ModelConfig, cross: bool = False):
        super().__init__()
        self.config, self.cross = config, cross
        C = config.n_embd
        if cross:
            self.q = nn.Linear(C, C, bias=config.bias)
            self.kv = nn.Linear(C, 2 * C, bias=config.bias)
        else:
            self.qkv = nn.Linear(C, 3 * C, bias=config.bias)
        self.proj = nn.Linear(C, C, bias=config.bias)
        self.proj.residual = True

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
        is_causal: bool = False,
        memory: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`mask` is boolean (True: may attend) or additive float, broadcast to (B, H, T, S);
        `is_causal` asks SDPA for its causal kernel when there is no mask."""
        B, T, _ = x.shape
        D = self.config.head_size
        # the width and head count come from the projection: under tensor parallelism each
        # process computes only its own heads
        if self.cross:
            q = self.q(x)
            C = q.size(-1)
            H = C // D
            q = q.view(B, T, H, D).transpose(1, 2)
            k, v = self.kv(memory).view(B, -1, 2, H, D).permute(2, 0, 3, 1, 4)
        else:
            qkv = self.qkv(x)
            C = qkv.size(-1) // 3
            H = C // D
            # split, not slicing a permuted view: its backward is one cat instead of zero-filled
            # buffers, copies and an add, and the gradient reaches the projection contiguous
            qk, v = qkv.split((2 * C, C), dim=-1)
            qk = qk.view(B, T, 2, H, D)
            if rotary is not None:
                cos, sin = rotary
                qk = apply_rotary(qk, cos[:, None, None], sin[:, None, None])  # queries and keys in one pass
            q, k = qk.unbind(2)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        dropout = self.config.dropout if self.training else 0.0
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(q.dtype)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None, dropout_p=dropout)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020), hidden 8/3 * n_embd rounded up to 64, or GELU with hidden 4 * n_embd."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        if self.swiglu:
            hidden = 64 * math.ceil(8 * config.n_embd / 3 / 64)
            self.up = nn.Linear(config.n_embd, 2 * hidden, bias=config.bias)  # gate and value, fused
        else:
            hidden = 4 * config.n_embd
            self.up = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.down = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.down.residual = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            gate, value = self.up(x).chunk(2, dim=-1)
            h = F.silu(gate) * value
        else:
            h = F.gelu(self.up(x), approximate="tanh")
        return self.dropout(self.down(h))


class Block(nn.Module):
    """Self-attention, cross-attention to the encoder (decoders of an encoder-decoder only) and
    MLP, each a residual sub-layer with its own norm, pre-norm or post-norm."""

    def __init__(self, config: ModelConfig, cross: bool = False):
        super().__init__()
        self.pre_norm = config.norm_placement == "pre"
        self.norm1 = make_norm(config)
        self.attn = Attention(config)
        self.norm_cross = make_norm(config) if cross else None
        self.cross_attn = Attention(config, cross=True) if cross else None
        self.norm2 = make_norm(config)
        self.mlp = MLP(config)

    def residual(self, x: torch.Tensor, norm: nn.Module, sublayer) -> torch.Tensor:
        return x + sublayer(norm(x)) if self.pre_norm else norm(x + sublayer(x))

    def forward(self, x, rotary=None, mask=None, is_causal=False, memory=None) -> torch.Tensor:
        x = self.residual(x, self.norm1, lambda h: self.attn(h, rotary, mask, is_causal))
        if self.cross_attn is not None:
            x = self.residual(x, self.norm_cross, lambda h: self.cross_attn(h, memory=memory))
        return self.residual(x, self.norm2, self.mlp)


class Stack(nn.Module):
    """n_layer blocks with their masks and positions: causal (a decoder) or bidirectional (an
    encoder), optionally cross-attending to an encoder's output. Its norm closes the stack
    (pre-norm) or opens it, normalising the embeddings as BERT does (post-norm)."""

    def __init__(self, config: ModelConfig, causal: bool, cross: bool = False):
        super().__init__()
        self.config, self.causal = config, causal
        self.blocks = nn.ModuleList(Block(config, cross) for _ in range(config.n_layer))
        self.norm = make_norm(config)
        self.relative = RelativePositionBias(config, bidirectional=not causal) if config.position == "relative" else None
        if config.position == "alibi":
            self.register_buffer("slopes", alibi_slopes(config.n_head), persistent=False)
        if config.position == "rope":
            cos, sin = rotary_tables(config.head_size, config.seq_len, config.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    def self_attention_mask(
        self, T: int, device: torch.device, prefix_len: torch.Tensor | None, document_ids: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """The boolean mask, with the ALiBi or relative position bias folded in as additive
        scores; None when SDPA needs none (its causal kernel, or full bidirectional attention)."""
        if self.config.position == "alibi":
            pos = torch.arange(T, device=device)
            distance = (pos[None, :] - pos[:, None]).abs().float()  # symmetric, so prefixes and encoders work
            bias = -self.slopes[:, None, None] * distance  # (H, T, T)
        elif self.relative is not None:
            bias = self.relative(T, device)
        else:
            bias = None
        if bias is None and self.config.sliding_window is None and prefix_len is None and document_ids is None:
            return None
        mask = attention_mask(T, device, self.causal, self.config.sliding_window, prefix_len, document_ids)
        if bias is None or mask is None:
            return bias if mask is None else mask
        return bias.masked_fill(~mask, float("-inf"))

    def forward(
        self,
        x: torch.Tensor,
        prefix_len: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        T = x.size(1)
        rotary = (self.rope_cos[:T], self.rope_sin[:T]) if self.config.position == "rope" else None
        mask = self.self_attention_mask(T, x.device, prefix_len, document_ids)
        pre_norm = self.config.norm_placement == "pre"
        if not pre_norm:
            x = self.norm(x)
        for block in self.blocks:
            x = block(x, rotary, mask, self.causal, memory)
        return self.norm(x) if pre_norm else x


class Transformer(nn.Module):
    """Token (and learned position) embeddings, the stacks of the architecture, the output head."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.seq_len, config.n_embd) if config.position == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        arch = config.architecture
        self.encoder = Stack(config, causal=False) if arch != "decoder" else None
        self.decoder = Stack(config, causal=True, cross=arch == "encoder_decoder") if arch != "encoder" else None
        # BERT's MLM head transforms the last hidden states before the output projection
        self.mlm_transform = (
            nn.Sequential(nn.Linear(config.n_embd, config.n_embd, bias=config.bias), nn.GELU("tanh"), make_norm(config))
            if arch == "encoder"
            else None
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """Transformer-2 init: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * n_layer)."""
        if isinstance(module, nn.Linear):
            std = 0.02 / math.sqrt(2 * self.config.n_layer) if getattr(module, "residual", False) else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; `non_embedding` leaves out learned position embeddings (the token
        embedding stays in: with tying it is the LM head's weight, which does matmul work)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.wpe is not None:
            n -= self.wpe.weight.numel()
        return n

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.size(1)
        if T > self.config.seq_len:
            raise ValueError(f"sequence of {T} tokens is longer than seq_len={self.config.seq_len}")
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(T, device=idx.device))
        return self.drop(x)

    def encode(self, idx: torch.Tensor) -> torch.Tensor:
        """The encoder's last hidden states (B, T, C)."""
        return self.encoder(self.embed(idx))

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        prefix_len: torch.Tensor | None = None,
        decoder_idx: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits and the mean cross-entropy against `targets` (ids of -1 are ignored).

        - decoder: `idx` (B, T); `prefix_len` (B,) gives each row a bidirectional prefix;
          `document_ids` (B, T) keep packed examples from attending to each other.
        - encoder: `idx` holds the masked input; with targets, logits only at the N positions
          that have one (N, vocab) in row-major order, since only they are scored.
        - encoder_decoder: `idx` goes to the encoder (or pass its output as `memory`),
          `decoder_idx` (B, S) to the decoder; targets are (B, S).
        Without targets, decoders return the logits of the last position only (B, 1, vocab)."""
        if self.config.architecture == "encoder":
            h = self.encode(idx)
            if targets is not None:
                scored = targets != -1
                logits = self.lm_head(self.mlm_transform(h[scored]))
                return logits, cross_entropy(logits, targets[scored])
            return self.lm_head(self.mlm_transform(h)), None
        if self.config.architecture == "encoder_decoder":
            if memory is None:
                memory = self.encode(idx)
            h = self.decoder(self.embed(decoder_idx), memory=memory)
        else:
            h = self.decoder(self.embed(idx), prefix_len, document_ids=document_ids)
        if targets is None:
            return self.lm_head(h[:, -1:, :]), None
        logits = self.lm_head(h)
        return logits, cross_entropy(logits.flatten(0, 1), targets.reshape(-1))

    def flops_per_token(self) -> float:
        """Training FLOPs per token, 6N + 12 * L * H * Q * T (PaLM appendix B, as in nanoGPT):
        6N for the forward and backward matmuls over the N parameters, plus the attention
        score and value products (L layers, H heads, head size Q, context T). Sliding windows
        and masks are not discounted; an encoder-decoder counts the layers of both stacks."""
        c = self.config
        stacks = 2 if c.architecture == "encoder_decoder" else 1
        return 6 * self.num_params() + 12 * stacks * c.n_layer * c.n_head * c.head_size * c.seq_len

    def configure_optimizers(
        self, weight_decay: float, learning_rate: float, betas: tuple[float, float], device_type: str
    ) -> torch.optim.AdamW:
        """AdamW with decoupled weight decay on the matmul weights only: norms, biases and
        embeddings (token, position, relative-position buckets; the token embedding is tied to
        the LM head by default) are not decayed."""
        embeddings = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2 and id(p) not in embeddings]
        no_decay = [p for p in params if p.dim() < 2 or id(p) in embeddings]
        groups = [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type in ("cuda", "cpu"))

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample `max_new_tokens` tokens: temperature 0 is greedy, top-k keeps the k likeliest,
        top-p the smallest set with probability >= p. A decoder continues (B, T) ids (cropped to
        the last seq_len); an encoder-decoder encodes them once and returns the decoder's ids,
        starting with `decoder_start_id`. Stops early once every row has produced `eos_id`."""
        if self.config.architecture == "encoder":
            raise ValueError("an encoder does not generate text; use fill-mask")
        memory = None
        if self.config.architecture == "encoder_decoder":
            memory = self.encode(idx[:, -self.config.seq_len :])
            idx = torch.full((idx.size(0), 1), self.config.decoder_start_id, dtype=idx.dtype, device=idx.device)
        finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.seq_len :]
            if memory is None:
                logits, _ = self(context)
            else:
                logits, _ = self(None, decoder_idx=context, memory=memory)
            logits = logits[:, -1, :].float()
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                probs = F.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat((idx, next_id), dim=1)
            if eos_id is not None:
                finished |= next_id.squeeze(1) == eos_id
                if bool(finished.all()):
                    break
        return idx


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set to -inf every logit outside the top k and outside the top-p nucleus."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = F.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative - F.softmax(sorted_logits, dim=-1) >= top_p  # mass before this token
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits
