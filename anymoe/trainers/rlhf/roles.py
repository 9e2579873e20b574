"""The four RL roles, one small class each over a shared base.

Legend: B sequences, L = P + R tokens (P prompt, R response), D model dim, T = B*L tokens.

- Actor:       the policy being trained; token log-probs (and entropy) of the response.
- Reference:   a frozen copy of the initial policy; log-probs and router distributions
               for the KL and routing-consistency terms.
- Critic:      MoE backbone + value head; one value per response position (PPO/GAE).
- RewardModel: MoE backbone + scalar head; one score per sequence, read at its last token.

Response position r of a sequence is token P + r, predicted from position P + r - 1: the
log-prob and the value of that step both read the model output at P + r - 1.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from anymoe.trainers.rlhf.losses import entropy_from_logits, token_logprobs
from anymoe.trainers.rlhf.model_io import ForwardOut, forward_rl, hidden_size


class Role:
    """A model in one role: its module, whether it trains, and the shared forward."""

    def __init__(self, module: nn.Module, trainable: bool = True) -> None:
        self.module = module
        self.trainable = trainable
        if not trainable:
            module.eval()
            for p in module.parameters():
                p.requires_grad_(False)

    def forward(self, ids_BL: Tensor, replay_NTK: list[Tensor] | None = None) -> ForwardOut:
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            return forward_rl(self.backbone, ids_BL, replay_NTK)

    @property
    def backbone(self) -> nn.Module:
        return self.module

    def parameters(self):
        return (p for p in self.module.parameters() if p.requires_grad)


class Actor(Role):
    """The policy. Log-probs are of the model's own distribution (raw logits), like the
    generator's, so rollout and training log-probs compare whatever temperature sampled."""

    def __init__(self, module: nn.Module, trainable: bool = True) -> None:
        super().__init__(module, trainable)

    def logprobs(self, seq_BL: Tensor, prompt_len: int, replay_NTK: list[Tensor] | None = None,
                 entropy: bool = False) -> tuple[Tensor, Tensor | None, ForwardOut]:
        """log pi(token) for every response token [B, R], its entropy [B, R] if asked, the forward."""
        out = self.forward(seq_BL, replay_NTK)
        logits_BRV = out.logits_BLV[:, prompt_len - 1:-1]
        logp = token_logprobs(logits_BRV, seq_BL[:, prompt_len:])
        ent = entropy_from_logits(logits_BRV) if entropy else None
        return logp, ent, out


class Reference(Actor):
    """A frozen deep copy of the actor's module (taken before any update)."""

    def __init__(self, actor_module: nn.Module) -> None:
        super().__init__(copy.deepcopy(actor_module), trainable=False)

    @torch.no_grad()
    def logprobs(self, seq_BL, prompt_len, replay_NTK=None, entropy=False):
        return super().logprobs(seq_BL, prompt_len, replay_NTK, entropy)


class ScalarHeadModel(nn.Module):
    """An MoE LM backbone with a linear scalar head on its final hidden states."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(hidden_size(backbone), 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, ids_BL: Tensor, replay_NTK: list[Tensor] | None = None) -> tuple[Tensor, ForwardOut]:
        out = forward_rl(self.backbone, ids_BL, replay_NTK)
        return self.head(out.hidden_BLD.float()).squeeze(-1), out


class Critic(Role):
    """V(s) for every response position: the head read at position P + r - 1."""

    def __init__(self, module: ScalarHeadModel, trainable: bool = True) -> None:
        super().__init__(module, trainable)

    @property
    def backbone(self) -> nn.Module:
        return self.module.backbone

    def values(self, seq_BL: Tensor, prompt_len: int, replay_NTK: list[Tensor] | None = None) -> Tensor:
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            v_BL, _ = self.module(seq_BL, replay_NTK)
        return v_BL[:, prompt_len - 1:-1]


class RewardModel(Role):
    """r(x, y): the head read at each sequence's last real token (``last_B``)."""

    def __init__(self, module: ScalarHeadModel, trainable: bool = False) -> None:
        super().__init__(module, trainable)

    @property
    def backbone(self) -> nn.Module:
        return self.module.backbone

    def score(self, seq_BL: Tensor, last_B: Tensor) -> tuple[Tensor, ForwardOut]:
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            v_BL, out = self.module(seq_BL)
        return v_BL.gather(1, last_B.view(-1, 1)).squeeze(1), out


__all__ = ["Actor", "Critic", "Reference", "RewardModel", "Role", "ScalarHeadModel"]
