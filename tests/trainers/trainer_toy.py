"""A small real trainer on the loop skeleton, for testing the skeleton without the MoE model.

A bigram LM (embedding -> linear) on a fixed, learnable token stream; the data position is an
integer cursor, the only data state. Dropout draws from torch's global RNG, so resume must
restore RNG streams to match bitwise.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from anymoe.trainers.loop import StepOutput, Trainer


class Bigram(nn.Module):
    def __init__(self, vocab: int = 32, dim: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.drop = nn.Dropout(0.1)
        self.out = nn.Linear(dim, vocab)

    def forward(self, ids):
        return self.out(self.drop(self.emb(ids)))


class ToyTrainer(Trainer):
    def __init__(self, run_dir, loop, poison_steps=(), spike_steps=(), **kw):
        super().__init__(run_dir, loop, **kw)
        self.poison_steps = set(poison_steps)  # steps whose loss becomes NaN
        self.spike_steps = set(spike_steps)  # batches (by data position) whose loss is multiplied by 100
        self.cursor = 0

    def build(self):
        torch.manual_seed(0)
        self.model = Bigram()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(1)
        noise = torch.randint(0, 3, (20_000,), generator=g).tolist()
        stream = [0]
        for i in range(1, 20_000):  # a learnable bigram: next = 5 * prev + small noise (mod 32)
            stream.append((5 * stream[-1] + noise[i]) % 32)
        self.stream = torch.tensor(stream)

    def train_step(self, step):
        ids = self.stream[self.cursor:self.cursor + 65]
        batch_index = self.cursor // 64
        self.cursor += 64
        logits = self.model(ids[:-1])
        loss = nn.functional.cross_entropy(logits, ids[1:])
        if step in self.poison_steps:
            loss = loss * float("nan")
        if batch_index in self.spike_steps:
            loss = loss * 100
        self.opt.zero_grad()
        loss.backward()
        if not torch.isfinite(loss):
            self.opt.zero_grad()
            return StepOutput(loss=loss.item(), tokens=64, skipped=True, reason="loss is nan")
        self.opt.step()
        return StepOutput(loss=loss.item(), tokens=64, metrics={"lr": 1e-2})

    def evaluate(self):
        with torch.no_grad():
            ids = self.stream[-257:]
            self.model.eval()
            loss = nn.functional.cross_entropy(self.model(ids[:-1]), ids[1:]).item()
            self.model.train()
        return {"eval_loss": loss}

    def checkpoint_files(self):
        if not self.dist.is_main:
            return {}
        return {"model.pt": self.model.state_dict(), "optim.pt": self.opt.state_dict()}

    def load_checkpoint(self, path: Path, restore_data=True):
        self.model.load_state_dict(self.ckpt.load(path, "model.pt"))
        self.opt.load_state_dict(self.ckpt.load(path, "optim.pt"))

    def data_state(self):
        return {"cursor": self.cursor}

    def load_data_state(self, state):
        self.cursor = int(state["cursor"])
