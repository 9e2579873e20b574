"""Knowledge distillation: a trained (MoE) teacher's logits teach a smaller dense or MoE student.

Hinton, Vinyals & Dean 2015 ("Distilling the knowledge in a neural network"), per token t
over the vocabulary v, with temperature T and the softened distributions
p^T = softmax(z_teacher / T), q^T = softmax(z_student / T):

    KD_t = T^2 * KL(p^T || q^T) = T^2 * sum_v p^T_v (log p^T_v - log q^T_v)

(the T^2 keeps the gradient's size independent of T, sec. 2 of the paper), mixed with the
usual next-token cross-entropy on the labels:

    loss = (1 - alpha) * CE + alpha * KD.

Both terms are sums over the loss tokens (labels != -100) that the trainer divides by the
global token count, so the mix is a per-token mean whatever the split into ranks and
micro-batches. The teacher runs in eval mode under no_grad; its weights are never touched.
Distillation across MoE sizes is a common way to ship a smaller model (Switch Transformer
sec. 5.1 distils sparse into dense); the teacher and student share a tokenizer (same vocab).

Legend: B batch, S sequence, V vocabulary, T temperature.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anymoe.core.config import ConfigError, param

IGNORE = -100


@dataclass(frozen=True)
class DistillConfig:
    teacher: str = param(doc="the teacher: a run dir (newest checkpoint), a checkpoint or model folder")
    temperature: float = param(2.0, gt=0, doc="softening temperature T of both distributions")
    alpha: float = param(0.5, ge=0, le=1.0, doc="weight of the KD term; 1 - alpha weighs the label CE")


def kd_kl_sum(student_BSV: Tensor, teacher_BSV: Tensor, mask_BS: Tensor, temperature: float) -> Tensor:
    """T^2 * sum over masked tokens of KL(softmax(teacher/T) || softmax(student/T)), in float32."""
    s = student_BSV.float() / temperature
    t = teacher_BSV.float() / temperature
    log_q = F.log_softmax(s, dim=-1)
    log_p = F.log_softmax(t, dim=-1)
    kl_BS = (log_p.exp() * (log_p - log_q)).sum(-1)
    return kl_BS.masked_select(mask_BS).sum() * temperature ** 2


class Distiller:
    """Holds the frozen teacher; mixes CE with the KD term for each micro-batch."""

    def __init__(self, teacher: nn.Module, cfg: DistillConfig) -> None:
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.cfg = cfg
        # Sum of KD terms (without alpha) since the last take_kl(), kept on the device: one host
        # read per step (take_kl), not one per micro-batch.
        self.kl_sum: Tensor | float = 0.0

    @classmethod
    def from_config(cls, cfg: DistillConfig, device: torch.device, vocab_size: int) -> Distiller:
        from anymoe.models.io import from_pretrained
        from anymoe.trainers.finetune import resolve_weights

        try:
            folder = resolve_weights(cfg.teacher)
        except ConfigError as err:
            raise ConfigError("distill.teacher", err.args[0].split(": ", 1)[-1]) from None
        try:
            teacher = from_pretrained(Path(folder))
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError("distill.teacher", f"cannot load a model from {folder}: {err}") from None
        if teacher.cfg.vocab_size != vocab_size:
            raise ConfigError("distill.teacher", f"the teacher's vocabulary ({teacher.cfg.vocab_size}) "
                              f"differs from the student's model.vocab_size ({vocab_size}); they must share "
                              "a tokenizer")
        return cls(teacher.to(device), cfg)

    @torch.no_grad()
    def teacher_logits(self, ids_BS: Tensor) -> Tensor:
        return self.teacher(ids_BS)

    def mix(self, ce_sum: Tensor, ids_BS: Tensor, labels_BS: Tensor, student_BSV: Tensor) -> Tensor:
        """(1 - alpha) * ce_sum + alpha * KD_sum for this micro-batch (sums over its loss tokens)."""
        a = self.cfg.alpha
        if a == 0:
            return ce_sum
        kd = kd_kl_sum(student_BSV, self.teacher_logits(ids_BS), labels_BS != IGNORE, self.cfg.temperature)
        self.kl_sum = self.kl_sum + kd.detach().double()
        return (1.0 - a) * ce_sum + a * kd

    def take_kl(self) -> float:
        out, self.kl_sum = self.kl_sum, 0.0
        return float(out)


def student_kl(student: nn.Module, teacher: nn.Module, batches: list[Tensor],
               temperature: float = 1.0) -> float:
    """Mean per-token KL(teacher || student) over ``batches`` of ids (an evaluation helper)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in batches:
            mask = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
            total += float(kd_kl_sum(student(ids), teacher(ids), mask, temperature)) / temperature ** 2
            count += ids.numel()
    return total / max(count, 1)


__all__ = ["DistillConfig", "Distiller", "kd_kl_sum", "student_kl"]
