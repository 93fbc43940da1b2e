"""DoRA loss: DINO cross-entropy with centering, applied per object and per frame (spec section b "Loss"); and
DINO's multi-crop loss for the ``method: dino`` baseline on the same frames."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from dora.schedules import teacher_temp_schedule

LOSS_VARIANTS = ("reference", "clean")


class CentredDistillation(nn.Module):
    """What DINO-style losses share: the centre buffer (1, D), the teacher temperature schedule and the student
    temperature; ``teacher_targets`` gives the centred, sharpened teacher distribution of an epoch."""

    def __init__(
        self,
        out_dim,
        warmup_teacher_temp,
        teacher_temp,
        warmup_teacher_temp_epochs,
        nepochs,
        student_temp,
        center_momentum,
    ) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temps = teacher_temp_schedule(
            warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs
        )

    def teacher_targets(self, teacher_out: torch.Tensor, epoch: int) -> torch.Tensor:
        """softmax((teacher - centre) / T_epoch), detached, in float32."""
        temp = float(self.teacher_temps[min(epoch, len(self.teacher_temps) - 1)])
        return F.softmax((teacher_out.float() - self.center) / temp, dim=-1).detach()

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        """c <- m c + (1 - m) mean of the raw teacher outputs (..., D) over all leading axes and processes."""
        flat = teacher_out.detach().float().reshape(-1, teacher_out.shape[-1])
        total = flat.sum(dim=0, keepdim=True)
        count = torch.tensor(float(flat.shape[0]), device=flat.device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(total)
            dist.all_reduce(count)
        self.center.mul_(self.center_momentum).add_(total / count, alpha=1 - self.center_momentum)


class DoRALoss(CentredDistillation):
    """Cross-entropy between the centred, sharpened teacher on the unmasked frame and the student on the K
    object-masked views and L local crops of the same frame.

    ``loss_variant="reference"`` reproduces the official reduction exactly: local crop 0 is skipped, and the
    per-object accumulator is carried over, F_j = (F_{j-1} + sum_t l_jt) / T, loss = sum_j F_j / K, with
    l_jt = (masked term + local term) / 2. ``"clean"`` averages l_jt over all objects and frames with every local
    crop included. The centre is updated after the loss, averaged over all processes when a process group exists.
    """

    def __init__(
        self,
        out_dim: int,
        num_local_crops: int,
        warmup_teacher_temp: float = 0.04,
        teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 0,
        nepochs: int = 100,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        loss_variant: str = "reference",
    ) -> None:
        super().__init__(
            out_dim,
            warmup_teacher_temp,
            teacher_temp,
            warmup_teacher_temp_epochs,
            nepochs,
            student_temp,
            center_momentum,
        )
        if loss_variant not in LOSS_VARIANTS:
            raise ValueError(f"loss_variant={loss_variant!r}; expected one of {LOSS_VARIANTS}")
        if loss_variant == "reference" and num_local_crops < 2:
            raise ValueError("the reference loss skips local crop 0, so it needs num_local_crops >= 2")
        if num_local_crops < 1:
            raise ValueError(f"num_local_crops must be >= 1, got {num_local_crops}")
        self.num_local_crops = num_local_crops
        self.loss_variant = loss_variant

    def forward(
        self,
        student_local: torch.Tensor,
        student_masked: torch.Tensor,
        teacher_global: torch.Tensor,
        epoch: int,
    ) -> torch.Tensor:
        """student_local (T, L*B, D) crop-major, student_masked (K, T, B, D), teacher_global (T, B, D) -> scalar."""
        T, B, _ = teacher_global.shape
        K = student_masked.shape[0]
        L = self.num_local_crops
        if student_local.shape[:2] != (T, L * B):
            raise ValueError(f"student_local has shape {tuple(student_local.shape)}, expected ({T}, {L * B}, D)")
        teacher = self.teacher_targets(teacher_global, epoch)  # (T, B, D)
        log_masked = F.log_softmax(student_masked.float() / self.student_temp, dim=-1)  # (K, T, B, D)
        log_local = F.log_softmax(student_local.float() / self.student_temp, dim=-1).reshape(T, L, B, -1)
        masked_ce = -(teacher.unsqueeze(0) * log_masked).sum(-1).mean(-1)  # (K, T)
        local_ce = -(teacher.unsqueeze(1) * log_local).sum(-1).mean(-1)  # (T, L)
        first = 1 if self.loss_variant == "reference" else 0
        local_term = local_ce[:, first:].mean(-1)  # (T,)
        per_frame = 0.5 * (masked_ce + local_term.unsqueeze(0))  # (K, T) = l_jt
        if self.loss_variant == "clean":
            loss = per_frame.mean()
        else:
            acc = per_frame.new_zeros(())
            total = per_frame.new_zeros(())
            for j in range(K):
                acc = (acc + per_frame[j].sum()) / T
                total = total + acc
            loss = total / K
        self.update_center(teacher_global)
        return loss


class DINOLoss(CentredDistillation):
    """DINO's multi-crop loss (Caron et al. 2021): the centred, sharpened teacher on each of the G global views
    supervises the student on every other view (the other globals and all L local crops); the cross-entropies,
    each a mean over the batch, are averaged over the G (G + L) - G pairs. The centre is updated after the loss
    from the teacher's global outputs, averaged over all processes when a process group exists.
    """

    def __init__(
        self,
        out_dim: int,
        num_global_crops: int = 2,
        warmup_teacher_temp: float = 0.04,
        teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 0,
        nepochs: int = 100,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
    ) -> None:
        super().__init__(
            out_dim,
            warmup_teacher_temp,
            teacher_temp,
            warmup_teacher_temp_epochs,
            nepochs,
            student_temp,
            center_momentum,
        )
        if num_global_crops < 2:
            raise ValueError(
                f"DINO needs num_global_crops >= 2 (each global view teaches the others): {num_global_crops}"
            )
        self.num_global_crops = num_global_crops

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor, epoch: int) -> torch.Tensor:
        """student_out (V, N, D) with the G global views first, teacher_out (G, N, D) -> scalar."""
        G = self.num_global_crops
        if teacher_out.shape[0] != G or student_out.shape[0] < G or student_out.shape[1:] != teacher_out.shape[1:]:
            raise ValueError(
                f"student_out {tuple(student_out.shape)} and teacher_out {tuple(teacher_out.shape)}: expected "
                f"(V >= {G}, N, D) and ({G}, N, D)"
            )
        teacher = self.teacher_targets(teacher_out, epoch)  # (G, N, D)
        log_student = F.log_softmax(student_out.float() / self.student_temp, dim=-1)  # (V, N, D)
        ce = -torch.einsum("gnd,vnd->gv", teacher, log_student) / teacher.shape[1]  # (G, V): batch-mean CE
        same = torch.eye(G, student_out.shape[0], dtype=torch.bool, device=ce.device)
        loss = ce.masked_fill(same, 0.0).sum() / (G * student_out.shape[0] - G)
        self.update_center(teacher_out)
        return loss
