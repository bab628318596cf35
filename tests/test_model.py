"""The Transformer model: every architecture option trains, masks hold, sampling filters, schedules, config."""

from __future__ import annotations

import math

import pytest
import torch

from gristmill.model.config import TrainConfig, load_config
from gristmill.model.loop import learning_rate_at
from gristmill.model.model import (
    Attention,
    CrossEntropyFunction,
    ModelConfig,
    RMSNorm,
    RMSNormFunction,
    Transformer,
    alibi_slopes,
    apply_rotary,
    cross_entropy,
    filter_logits,
    rotary_tables,
)

VOCAB = 97


def tiny(**overrides) -> Transformer:
    torch.manual_seed(0)
    settings = dict(vocab_size=VOCAB, seq_len=64, n_layer=2, n_head=4, n_embd=64) | overrides
    return Transformer(ModelConfig(**settings))


def random_ids(batch: int = 2, length: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


OPTIONS = [
    dict(position=position, mlp=mlp, norm=norm)
    for position in ("rope", "alibi", "learned")
    for mlp in ("swiglu", "gelu")
    for norm in ("rmsnorm", "layernorm")
] + [
    dict(sliding_window=8),
    dict(sliding_window=8, position="alibi"),
    dict(tie_weights=False, bias=True, dropout=0.1),
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_every_option_runs_forward_and_backward(options):
    model = tiny(**options)
    ids = random_ids()
    logits, loss = model(ids, ids.roll(-1, dims=1))
    assert logits.shape == (2, 32, VOCAB)
    assert math.isclose(loss.item(), math.log(VOCAB), rel_tol=0.1)  # near-uniform at init
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0


@pytest.mark.parametrize("options", [dict(position=p) for p in ("rope", "alibi", "learned")] + [dict(sliding_window=5)])
def test_changing_a_future_token_leaves_earlier_logits_unchanged(options):
    model = tiny(**options).eval()
    ids = random_ids(batch=1, length=24)
    changed = ids.clone()
    changed[0, 15] = (changed[0, 15] + 1) % VOCAB
    with torch.no_grad():
        before, _ = model(ids, ids)
        after, _ = model(changed, changed)
    torch.testing.assert_close(before[:, :15], after[:, :15], rtol=0, atol=0)
    assert not torch.allclose(before[:, 15:], after[:, 15:])


def test_sliding_window_hides_tokens_beyond_the_window():
    model = tiny(n_layer=1, sliding_window=4).eval()
    ids = random_ids(batch=1, length=16)
    changed = ids.clone()
    changed[0, 2] = (changed[0, 2] + 1) % VOCAB
    with torch.no_grad():
        before, _ = model(ids, ids)
        after, _ = model(changed, changed)
    assert not torch.allclose(before[:, 2:6], after[:, 2:6])  # positions 2..5 see position 2
    torch.testing.assert_close(before[:, 6:], after[:, 6:], rtol=0, atol=0)  # 6 and later do not


@pytest.mark.parametrize("position", ["rope", "alibi", "learned"])
def test_prefix_lm_attends_both_ways_inside_the_prefix_only(position):
    model = tiny(position=position).eval()
    ids = random_ids(batch=1, length=20)
    prefix = torch.tensor([8])
    inside, outside = ids.clone(), ids.clone()
    inside[0, 5] = (inside[0, 5] + 1) % VOCAB  # a later token inside the prefix
    outside[0, 12] = (outside[0, 12] + 1) % VOCAB  # a token after the prefix
    with torch.no_grad():
        base, _ = model(ids, ids, prefix)
        with_inside, _ = model(inside, inside, prefix)
        with_outside, _ = model(outside, outside, prefix)
    assert not torch.allclose(base[:, :5], with_inside[:, :5])  # earlier prefix positions see position 5
    torch.testing.assert_close(base[:, :12], with_outside[:, :12], rtol=0, atol=0)  # still causal after it


def test_rotary_attention_scores_depend_only_on_relative_position():
    cos, sin = rotary_tables(head_size=16, length=32, base=10000.0)
    q, k = torch.randn(16), torch.randn(16)

    def score(m: int, n: int) -> float:
        rotated_q = apply_rotary(q[None, :], cos[m : m + 1], sin[m : m + 1])
        rotated_k = apply_rotary(k[None, :], cos[n : n + 1], sin[n : n + 1])
        return float((rotated_q * rotated_k).sum())

    assert score(7, 3) == pytest.approx(score(20, 16), rel=1e-5)
    assert score(7, 3) != pytest.approx(score(7, 5), rel=1e-3)
    assert float(apply_rotary(q[None, :], cos[9:10], sin[9:10]).norm()) == pytest.approx(float(q.norm()), rel=1e-5)


def test_cpu_rmsnorm_matches_the_formula_forward_and_backward():
    torch.manual_seed(0)
    norm = RMSNorm(48)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = (torch.randn(3, 5, 48) * 3 + 1).requires_grad_()
    upstream = torch.randn(3, 5, 48)
    out = norm(x)
    grad_x, grad_w = torch.autograd.grad((out * upstream).sum(), (x, norm.weight))
    plain = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight
    want_x, want_w = torch.autograd.grad((plain * upstream).sum(), (x, norm.weight))
    torch.testing.assert_close(out, plain)
    torch.testing.assert_close(grad_x, want_x)
    torch.testing.assert_close(grad_w, want_w)
    torch.testing.assert_close(out, torch.nn.functional.rms_norm(x, (48,), norm.weight, norm.eps))
    double = (torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True), torch.rand(8, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(lambda x, w: RMSNormFunction.apply(x, w, 1e-6), double)


@pytest.mark.parametrize("position", ["rope", "learned"])
def test_attention_matches_a_plain_per_head_computation(position):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=VOCAB, seq_len=16, n_head=2, n_embd=32, position=position)
    attention = Attention(config)
    x = torch.randn(2, 12, 32, requires_grad=True)
    cos, sin = rotary_tables(config.head_size, config.seq_len, config.rope_base)
    rotary = (cos[:12], sin[:12]) if position == "rope" else None
    out = attention(x, rotary, is_causal=True)

    def rotate(t: torch.Tensor) -> torch.Tensor:  # pair (t[i], t[i + 8]) turned by position * base^(-i/8)
        angle = torch.arange(12.0)[:, None] * 10000.0 ** (-torch.arange(8.0) / 8)
        a, b = t[..., :8], t[..., 8:]
        return torch.cat((a * angle.cos() - b * angle.sin(), b * angle.cos() + a * angle.sin()), dim=-1)

    q, k, v = (x @ attention.qkv.weight.T).split(32, dim=-1)
    heads = []
    for h in range(2):
        qh, kh, vh = (t[..., 16 * h : 16 * (h + 1)] for t in (q, k, v))
        if position == "rope":
            qh, kh = rotate(qh), rotate(kh)
        scores = (qh @ kh.transpose(1, 2) / 4.0).masked_fill(torch.ones(12, 12).triu(1).bool(), float("-inf"))
        heads.append(scores.softmax(-1) @ vh)
    plain = torch.cat(heads, dim=-1) @ attention.proj.weight.T
    torch.testing.assert_close(out, plain)
    upstream = torch.randn_like(out)
    got = torch.autograd.grad((out * upstream).sum(), (x, attention.qkv.weight))
    want = torch.autograd.grad((plain * upstream).sum(), (x, attention.qkv.weight))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_alibi_slopes_follow_the_paper():
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    six = alibi_slopes(6)  # not a power of two: 4 slopes of the 4-head series, 2 interleaved from 8 heads
    torch.testing.assert_close(six[:4], alibi_slopes(4))
    torch.testing.assert_close(six[4:], alibi_slopes(8)[0::2][:2])


def test_top_k_and_top_p_keep_the_likeliest_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    top2 = filter_logits(logits, top_k=2, top_p=None)
    assert torch.isfinite(top2).tolist() == [[True, True, False, False]]
    nucleus = filter_logits(logits, top_k=None, top_p=0.7)  # 0.5 + 0.25 reaches 0.7
    assert torch.isfinite(nucleus).tolist() == [[True, True, False, False]]
    shuffled = logits[:, [3, 0, 2, 1]]
    assert torch.isfinite(filter_logits(shuffled, None, 0.7)).tolist() == [[False, True, False, True]]


def test_generate_extends_the_prompt_and_greedy_is_deterministic():
    model = tiny().eval()
    prompt = random_ids(batch=1, length=5)
    first = model.generate(prompt, 10, temperature=0)
    second = model.generate(prompt, 10, temperature=0)
    assert first.shape == (1, 15) and torch.equal(first, second) and torch.equal(first[:, :5], prompt)
    sampled = model.generate(prompt, 70, temperature=1.0, top_k=10, top_p=0.9)  # longer than seq_len: cropped
    assert sampled.shape == (1, 75)


def test_no_weight_decay_on_norms_biases_and_embeddings():
    model = tiny(bias=True, tie_weights=False, position="learned")
    decay, no_decay = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu").param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "lm_head.weight" in decayed and "decoder.blocks.0.attn.qkv.weight" in decayed
    assert not any(n.startswith(("wte", "wpe")) or "norm" in n or n.endswith("bias") for n in decayed)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_flops_per_token_is_6n_plus_attention():
    model = tiny(position="learned")
    n = sum(p.numel() for p in model.parameters()) - model.wpe.weight.numel()
    assert model.flops_per_token() == 6 * n + 12 * 2 * 4 * 16 * 64


def test_schedules_warm_up_then_decay_to_the_floor():
    cosine = TrainConfig(max_steps=100, warmup_steps=10, learning_rate=1e-3, min_lr_ratio=0.1)
    lrs = [learning_rate_at(s, cosine) for s in range(1, 101)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    wsd = cosine.model_copy(update={"schedule": "wsd", "decay_fraction": 0.2})
    lrs = [learning_rate_at(s, wsd) for s in range(1, 101)]
    assert set(lrs[9:80]) == {1e-3}  # stable until the last 20 steps
    assert lrs[80] < 1e-3 and lrs[-1] == pytest.approx(1e-4)


def test_config_errors_name_the_key_and_the_file(tmp_path):
    with pytest.raises(ValueError, match="n_layr"):
        load_config(None, {"n_layr": 2})
    bad = tmp_path / "train.yaml"
    bad.write_text("position: sinusoidal\n")
    with pytest.raises(ValueError, match=r"train\.yaml(.|\n)*position"):
        load_config(bad)
    with pytest.raises(ValueError, match="multiple of n_head"):
        TrainConfig(n_embd=100, n_head=3)


def test_cpu_cross_entropy_matches_torch_forward_and_backward_with_ignored_targets():
    torch.manual_seed(0)
    logits = torch.randn(300, 37, requires_grad=True)
    targets = torch.randint(0, 37, (300,))
    targets[::7] = -1
    loss = cross_entropy(logits, targets)
    want = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-1)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(torch.autograd.grad(loss * 1.7, logits)[0], torch.autograd.grad(want * 1.7, logits)[0])
    wide = torch.randn(5000, 300)  # 1.5M logits: the forward's logsumexp runs in two blocks
    wide_targets = torch.randint(0, 300, (5000,))
    torch.testing.assert_close(cross_entropy(wide, wide_targets), torch.nn.functional.cross_entropy(wide, wide_targets))
    double = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: CrossEntropyFunction.apply(x, torch.tensor([0, 4, -1, 2, 2, 1])), (double,))

