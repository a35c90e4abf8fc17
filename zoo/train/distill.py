"""Knowledge distillation (`train.distill`): the student also matches a frozen teacher's next-token
distribution, loss = CE + weight · T² · KL(softmax(teacher/T) ‖ softmax(student/T)), the KL averaged
over tokens. T² keeps the gradient's scale independent of T (Hinton et al., 2015)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zoo.errors import CheckpointError
from zoo.io.checkpoint import load


def kl_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · mean over tokens of KL(softmax(teacher/T) ‖ softmax(student/T)); logits [..., V], computed in fp32."""
    s = F.log_softmax(student.float().flatten(0, -2) / temperature, dim=-1)
    t = F.log_softmax(teacher.float().flatten(0, -2) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


def load_teacher(cfg, model, device) -> torch.nn.Module:
    """The frozen teacher of `cfg` (a DistillConfig), checked to share the student's vocabulary."""
    teacher = load(cfg.teacher, device=device).eval().requires_grad_(False)
    if teacher.config.vocab_size != model.config.vocab_size:
        raise CheckpointError(f"train.distill.teacher {cfg.teacher}: vocabulary of {teacher.config.vocab_size} "
                              f"tokens, the student has {model.config.vocab_size}")
    return teacher
