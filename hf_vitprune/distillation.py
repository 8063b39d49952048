"""Knowledge distillation from the frozen dense model during fine-tuning."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's soft-target loss: KL(teacher || student) at ``temperature``, scaled by T^2 to keep gradients comparable."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True) * temperature**2


def classification_logits(outputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits for the label loss, logits to distil into).

    DeiT's ``...WithTeacher`` head has a class-token and a distillation-token classifier: as in
    DeiT, the label loss trains the first and distillation the second. Other models use one head.
    """
    cls_logits = getattr(outputs, "cls_logits", None)
    distillation_logits = getattr(outputs, "distillation_logits", None)
    if cls_logits is not None and distillation_logits is not None:
        return cls_logits, distillation_logits
    return outputs.logits, outputs.logits
