"""Distillation: the KD term against a float64 per-token loop (value and gradient), and a
smaller dense student trained on an MoE teacher's logits gets closer to it (lower KL)."""

import math

import pytest
import torch

from anymoe.core.config import ConfigError
from anymoe.models import MoETransformer, preset
from anymoe.trainers.distill import DistillConfig, Distiller, kd_kl_sum, student_kl

V = 256


def test_kd_term_matches_float64_loop_forward_and_backward():
    torch.manual_seed(0)
    B, S, T = 2, 5, 2.5
    student = torch.randn(B, S, V, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(B, S, V, dtype=torch.float64)
    labels = torch.randint(0, V, (B, S))
    labels[0, 1] = labels[1, 4] = -100
    got = kd_kl_sum(student, teacher, labels != -100, T)
    # Reference: per token, T^2 * sum_v p_v (log p_v - log q_v) with p, q softmax at T.
    ref = torch.zeros((), dtype=torch.float64)
    for b in range(B):
        for s in range(S):
            if labels[b, s] == -100:
                continue
            zp, zq = teacher[b, s] / T, student[b, s] / T
            lp = zp - math.log(sum(math.exp(v) for v in zp.tolist()))
            lq = zq - torch.logsumexp(zq, 0)
            ref = ref + T * T * (lp.exp() * (lp - lq)).sum()
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)  # kd_kl_sum runs in float32
    g_got, = torch.autograd.grad(got, student)
    g_ref, = torch.autograd.grad(ref, student)
    torch.testing.assert_close(g_got.double(), g_ref, rtol=1e-4, atol=1e-6)
    # Hinton's gradient: T * (q - p) / ... per logit; check the closed form on one token too.
    p = torch.softmax(teacher[0, 0] / T, -1)
    q = torch.softmax(student[0, 0].detach() / T, -1)
    torch.testing.assert_close(g_ref[0, 0], T * (q - p))


def test_distillation_lowers_the_students_kl_to_an_moe_teacher():
    torch.manual_seed(0)
    teacher = MoETransformer(preset("tiny")).eval()
    torch.manual_seed(1)
    student = MoETransformer(preset("tiny", moe=None, n_layers=1, d_model=32, n_heads=2, n_kv_heads=1,
                                                dense_hidden=64))
    assert student.num_parameters() < teacher.num_parameters()
    gen = torch.Generator().manual_seed(2)
    held_out = [torch.randint(0, V, (4, 16), generator=gen) for _ in range(2)]
    before = student_kl(student, teacher, held_out)
    distiller = Distiller(teacher, DistillConfig(teacher="-", temperature=2.0, alpha=1.0))
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    for _ in range(25):
        ids = torch.randint(0, V, (4, 16), generator=gen)
        labels = torch.roll(ids, -1, 1)
        logits = student(ids)
        ce = torch.nn.functional.cross_entropy(logits.view(-1, V), labels.view(-1), reduction="sum")
        loss = distiller.mix(ce, ids, labels, logits) / ids.numel()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert distiller.take_kl() > 0 and distiller.kl_sum == 0
    after = student_kl(student, teacher, held_out)
    assert after < 0.5 * before, (before, after)
    assert all(not p.requires_grad for p in teacher.parameters())


def test_alpha_zero_is_plain_ce_and_bad_teacher_is_named(tmp_path):
    d = Distiller(MoETransformer(preset("tiny")), DistillConfig(teacher="-", alpha=0.0))
    ce = torch.tensor(3.0)
    assert d.mix(ce, None, None, None) is ce
    with pytest.raises(ConfigError, match="distill.teacher"):
        Distiller.from_config(DistillConfig(teacher=str(tmp_path / "nope")), torch.device("cpu"), V)
