"""A decoder-only transformer in one file: config, blocks, model, optimiser groups, generation.

Pre-norm blocks (RMSNorm or LayerNorm), attention through `F.scaled_dot_product_attention` (flash
attention on CUDA when the mask allows it), rotary position embeddings by default with ALiBi and
learned absolute positions as options, SwiGLU or GELU MLP, optional weight tying, optional
sliding-window attention, and a prefix-LM mask (bidirectional attention over a prefix).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

NORMS = ("rmsnorm", "layernorm")
POSITIONS = ("rope", "alibi", "learned")
MLPS = ("swiglu", "gelu")


@dataclass
class GPTConfig:
    vocab_size: int
    seq_len: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    norm: str = "rmsnorm"
    position: str = "rope"
    mlp: str = "swiglu"
    tie_weights: bool = True
    sliding_window: int | None = None  # attend to at most this many most recent tokens (self included)
    bias: bool = False
    dropout: float = 0.0
    rope_base: float = 10000.0

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, not {self.norm!r}")
        if self.position not in POSITIONS:
            raise ValueError(f"position must be one of {POSITIONS}, not {self.position!r}")
        if self.mlp not in MLPS:
            raise ValueError(f"mlp must be one of {MLPS}, not {self.mlp!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.position == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError("rotary embeddings need an even head size (n_embd / n_head)")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head


def make_norm(config: GPTConfig) -> nn.Module:
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
    T: int, device: torch.device, sliding_window: int | None, prefix_len: torch.Tensor | None
) -> torch.Tensor:
    """Boolean mask, True where query q may attend to key k: causal (k <= q), within the sliding
    window (q - k < window), and bidirectional inside each row's prefix (q, k < prefix_len).
    Shape (T, T), or (B, 1, T, T) with a prefix."""
    q = torch.arange(T, device=device)[:, None]
    k = torch.arange(T, device=device)[None, :]
    allowed = k <= q
    if sliding_window is not None:
        allowed = allowed & (q - k < sliding_window)
    if prefix_len is not None:
        in_prefix = (k < prefix_len[:, None, None, None]) & (q < prefix_len[:, None, None, None])
        allowed = allowed | in_prefix
    return allowed


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.proj.residual = True
        if config.position == "alibi":
            self.register_buffer("slopes", alibi_slopes(config.n_head), persistent=False)

    def forward(self, x: torch.Tensor, rotary=None, prefix_len: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.qkv(x)
        C, D = qkv.size(-1) // 3, self.config.head_size  # under tensor parallelism: this process's heads
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
        plain_causal = self.config.sliding_window is None and prefix_len is None
        if plain_causal and self.config.position != "alibi":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        else:
            mask = attention_mask(T, x.device, self.config.sliding_window, prefix_len)
            if self.config.position == "alibi":
                pos = torch.arange(T, device=x.device)
                distance = (pos[None, :] - pos[:, None]).abs().to(q.dtype)  # symmetric, so a prefix works too
                bias = -self.slopes.to(q.dtype)[:, None, None] * distance  # (H, T, T)
                mask = bias.masked_fill(~mask, float("-inf"))
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020), hidden 8/3 * n_embd rounded up to 64, or GELU with hidden 4 * n_embd."""

    def __init__(self, config: GPTConfig):
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
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.norm1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.norm2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rotary=None, prefix_len: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rotary, prefix_len)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.seq_len, config.n_embd) if config.position == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight
        if config.position == "rope":
            cos, sin = rotary_tables(config.head_size, config.seq_len, config.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2 init: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * n_layer)."""
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

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        prefix_len: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for every position and the mean cross-entropy against `targets` (ids of -1 are
        ignored); without targets, logits of the last position only (B, 1, vocab).
        `prefix_len` (B,) gives each row a bidirectional prefix (prefix-LM)."""
        B, T = idx.shape
        if T > self.config.seq_len:
            raise ValueError(f"sequence of {T} tokens is longer than seq_len={self.config.seq_len}")
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(T, device=idx.device))
        x = self.drop(x)
        rotary = (self.rope_cos[:T], self.rope_sin[:T]) if self.config.position == "rope" else None
        for block in self.blocks:
            x = block(x, rotary, prefix_len)
        x = self.norm_f(x)
        if targets is None:
            return self.lm_head(x[:, -1:, :]), None
        logits = self.lm_head(x)
        loss = cross_entropy(logits.view(B * T, -1), targets.reshape(-1))
        return logits, loss

    def flops_per_token(self) -> float:
        """Training FLOPs per token, 6N + 12 * L * H * Q * T (PaLM appendix B, as in nanoGPT):
        6N for the forward and backward matmuls over the N parameters, plus the attention
        score and value products (L layers, H heads, head size Q, context T). Sliding windows
        and masks are not discounted."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_head * c.head_size * c.seq_len

    def configure_optimizers(
        self, weight_decay: float, learning_rate: float, betas: tuple[float, float], device_type: str
    ) -> torch.optim.AdamW:
        """AdamW with decoupled weight decay on the matmul weights only: norms, biases and
        embeddings (the token embedding is tied to the LM head by default) are not decayed."""
        embeddings = {id(self.wte.weight)} | ({id(self.wpe.weight)} if self.wpe is not None else set())
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
        """Continue (B, T) ids by sampling `max_new_tokens` tokens: temperature 0 is greedy,
        top-k keeps the k likeliest, top-p the smallest set with probability >= p. The context is
        cropped to the last seq_len tokens. Stops early once every row has produced `eos_id`."""
        finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.seq_len :])
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
