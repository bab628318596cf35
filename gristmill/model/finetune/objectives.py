"""Fine-tuning losses: masked next-token loss (sft), DPO against a frozen reference, and a
classification head on the pooled final hidden states.

A decoder's `Transformer.forward` without targets computes logits for the last position only, so
the full final hidden states are caught with a forward hook on the decoder stack's output: the
model file stays as it is. An encoder's come from `Transformer.encode`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from gristmill.model.model import Transformer


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return getattr(model, "module", model)


def final_hidden_states(model: nn.Module, net: Transformer, idx: torch.Tensor, document_ids: torch.Tensor | None = None
                        ) -> torch.Tensor:
    """(B, T, n_embd) output of decoder `net`'s last layer and norm for `idx`, running the forward
    through `model` (`net` itself or its DDP wrapper, so gradients are synchronised)."""
    captured: list[torch.Tensor] = []
    handle = net.decoder.register_forward_hook(lambda module, inputs, output: captured.append(output))
    try:
        model(idx, document_ids=document_ids)
    finally:
        handle.remove()
    return captured[0]


def sft_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, document_ids: torch.Tensor | None) -> torch.Tensor:
    """Mean cross-entropy over the assistant tokens (targets of -1 carry no loss)."""
    _, loss = model(x, y, document_ids=document_ids)
    return loss


def sequence_logps(model: nn.Module, net: Transformer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B,) summed log-probabilities of each row's scored targets (y != -1): a reply's log-likelihood.
    Logits are computed at the scored positions only (the replies), not over the prompts and padding."""
    hidden = final_hidden_states(model, net, x)
    scored = y != -1
    logits = net.lm_head(hidden[scored]).float()  # (N, vocab), N = scored tokens of the batch
    picked = logits.gather(-1, y[scored][:, None]).squeeze(-1) - logits.logsumexp(-1)
    return torch.zeros(x.size(0), device=x.device).index_add(0, scored.nonzero()[:, 0], picked)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO (Rafailov et al. 2023): -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), averaged
    over pairs, with the implicit rewards beta * (pi - ref), their accuracy (chosen above rejected)
    and margins, and the policy's chosen - rejected log-prob margin."""
    chosen_rewards = beta * (policy_chosen - reference_chosen)
    rejected_rewards = beta * (policy_rejected - reference_rejected)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    metrics = {
        "reward_accuracy": (chosen_rewards > rejected_rewards).float().mean(),
        "reward_margin": (chosen_rewards - rejected_rewards).mean(),
        "chosen_reward": chosen_rewards.mean(),
        "rejected_reward": rejected_rewards.mean(),
        "logp_margin": (policy_chosen - policy_rejected).mean(),
    }
    return loss, {k: v.detach() for k, v in metrics.items()}


class Classifier(nn.Module):
    """A pre-trained decoder or encoder plus a linear head on each row's pooled final hidden
    states: `mean` over the text's tokens, or `last`, the last real token's state (in a decoder it
    has seen the whole text, and padding after it cannot change it). An encoder's padding is
    attended to, like BERT without an attention mask; texts of a batch are of similar length."""

    def __init__(self, net: Transformer, num_labels: int, pooling: str = "mean"):
        super().__init__()
        if net.config.architecture == "encoder_decoder":
            raise ValueError("classify needs a decoder or an encoder checkpoint, not an encoder-decoder")
        self.net, self.pooling = net, pooling
        self.head = nn.Linear(net.config.n_embd, num_labels)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if self.net.config.architecture == "encoder":
            hidden = self.net.encode(idx)
        else:
            hidden = final_hidden_states(self.net, self.net, idx)
        if self.pooling == "last":
            pooled = hidden[torch.arange(idx.size(0), device=idx.device), lengths - 1]
        else:
            real = (torch.arange(idx.size(1), device=idx.device)[None, :] < lengths[:, None]).to(hidden.dtype)
            pooled = (hidden * real[..., None]).sum(1) / lengths[:, None].to(hidden.dtype)
        return self.head(pooled).float()
