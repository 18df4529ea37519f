"""Masked Distillation (MaskDistill; Peng et al., "A Unified View of Masked Image Modeling", and
"Towards Understanding Masked Distillation").

Per batch (images only; labels are ignored):

1. a frozen teacher (any ViT loadable by ``fastmask.models.load_checkpoint``: CLIP, DINO, DeiT
   weights in timm layout) runs on the clean image; the output of block ``teacher_layer`` (patch
   tokens) is whitened by a LayerNorm without affine parameters: that is the target;
2. BEiT block-wise masking hides about 40% of the patches (``fastmask.masking`` 'block' policy);
3. the student runs on the corrupted image, hidden patches replaced by its ``mask_token``
   (``fastmask.ops.apply_mask_token`` inside ``MaskedViT.embed``);
4. a decoder head (linear, or a small transformer) maps the student's patch tokens to the
   teacher's width (the two may differ);
5. the loss (smooth-L1 by default; MSE or cosine) is taken over the masked positions only.

The linear decoder is per token, so it runs on the masked positions alone (``ops.gather_tokens``;
block masking hides exactly ``floor(mask_ratio * N)`` patches per image, a count known on the host:
no device sync): the same loss and gradients for ~40% of the decoder's work.  The transformer
decoder mixes tokens, so it sees all of them.

The teacher's patch grid must match the student's; a teacher with another patch size gets the
image resized so that its grid does (e.g. a /14 teacher at 196 px for a /16 student at 224 px).
Teacher blocks after ``teacher_layer`` are never run, so they are dropped at construction.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..config import TeacherConfig
from .base import Method, StepState, build_teacher

__all__ = ["METHOD", "MaskDistill", "MaskDistillConfig", "LOSSES", "DECODERS", "distill_loss", "whiten"]

LOSSES = ("smooth_l1", "mse", "cosine")
DECODERS = ("linear", "transformer")
INPUT_NORMS = ("same", "clip")

# ImageNet statistics (what fastmask.data normalises with) and OpenAI CLIP's.
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_CLIP_MEAN, _CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@dataclass
class MaskDistillConfig:
    """MaskDistill options; defaults follow the paper's ViT-B/16 <- CLIP-B/16 setting."""

    # teacher: the frozen model (CLIP-B/16 converted to timm layout), then how it is used
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    teacher_layer: int = -1  # block whose output is distilled (negative: from the end)
    teacher_input_norm: str = "same"  # "clip": re-normalise the ImageNet-normalised input with CLIP's mean/std
    # student
    student_layer_scale: float = 0.1  # LayerScale init of the student's blocks (0 = none)
    # masking (BEiT block-wise)
    mask_ratio: float = 0.4
    mask_min_patches: int = 16
    # decoder head
    decoder: str = "linear"
    decoder_depth: int = 2  # transformer decoder only
    decoder_embed_dim: int = 0  # 0: the student's width
    decoder_num_heads: int = 0  # 0: width // 64
    # loss
    loss: str = "smooth_l1"
    smooth_l1_beta: float = 1.0
    whiten_eps: float = 1e-6

    def __post_init__(self):
        check_maskdistill_config(self)


def check_maskdistill_config(cfg: MaskDistillConfig) -> None:
    if cfg.loss not in LOSSES:
        raise ValueError(f"method.loss must be one of {LOSSES}, got {cfg.loss!r}")
    if cfg.decoder not in DECODERS:
        raise ValueError(f"method.decoder must be one of {DECODERS}, got {cfg.decoder!r}")
    if cfg.teacher_input_norm not in INPUT_NORMS:
        raise ValueError(f"method.teacher_input_norm must be one of {INPUT_NORMS}, got {cfg.teacher_input_norm!r}")
    if not 0.0 < cfg.mask_ratio < 1.0:
        raise ValueError(f"method.mask_ratio must lie in (0, 1), got {cfg.mask_ratio}")
    if isinstance(cfg.mask_min_patches, bool) or not isinstance(cfg.mask_min_patches, int) or cfg.mask_min_patches < 1:
        raise ValueError(f"method.mask_min_patches must be an int >= 1, got {cfg.mask_min_patches!r}")
    for k in ("decoder_embed_dim", "decoder_num_heads"):
        if getattr(cfg, k) < 0:
            raise ValueError(f"method.{k} must be >= 0 (0 = default), got {getattr(cfg, k)}")
    if cfg.decoder_depth < 1:
        raise ValueError(f"method.decoder_depth must be >= 1, got {cfg.decoder_depth}")
    if cfg.student_layer_scale < 0:
        raise ValueError(f"method.student_layer_scale must be >= 0, got {cfg.student_layer_scale}")
    if not cfg.smooth_l1_beta > 0 or not cfg.whiten_eps > 0:
        raise ValueError("method.smooth_l1_beta and method.whiten_eps must be > 0")


def whiten(features: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm without affine parameters over the channels, in float32 (the target normalisation)."""
    return F.layer_norm(features.float(), (features.shape[-1],), eps=eps)


def distill_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, kind: str = "smooth_l1",
                 beta: float = 1.0) -> torch.Tensor:
    """Mean loss over the masked positions: ``pred``/``target`` [B, N, D], ``mask`` [B, N] bool
    (True = hidden).  smooth-L1 and MSE average over channels too; cosine is 1 - cos per token."""
    if mask.dtype != torch.bool or mask.shape != pred.shape[:2] or target.shape != pred.shape:
        raise ValueError(f"pred {tuple(pred.shape)}, target {tuple(target.shape)} and mask {tuple(mask.shape)} (bool) "
                         "must be [B, N, D], [B, N, D] and [B, N]")
    # Per-token losses over every position, then the mean over the hidden ones: no boolean indexing
    # (its output size would need a device sync every step).  Nothing hidden (possible with
    # mask_prob < 1 policies) gives a zero that keeps the graph.
    p, t = pred.float(), target.float()
    if kind == "smooth_l1":
        per_token = F.smooth_l1_loss(p, t, beta=beta, reduction="none").mean(-1)
    elif kind == "mse":
        per_token = F.mse_loss(p, t, reduction="none").mean(-1)
    elif kind == "cosine":
        per_token = 1.0 - F.cosine_similarity(p, t, dim=-1)
    else:
        raise ValueError(f"kind must be one of {LOSSES}, got {kind!r}")
    return masked_mean(per_token, mask)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` [B, N] where ``mask`` is True (0 where it is nowhere True), without a sync."""
    hidden = mask.sum()
    return torch.where(mask, values, 0.0).sum() / hidden.clamp(min=1)


def _autocast(device, amp_dtype):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=amp_dtype)


class MaskDistill(Method):
    name = "maskdistill"
    Config = MaskDistillConfig
    pipeline = "supervised"  # (images, labels); labels are ignored
    manual_backward = False

    def __init__(self, cfg, num_classes: int, *, student: Optional[nn.Module] = None,
                 teacher: Optional[nn.Module] = None):
        super().__init__(cfg, num_classes)
        from ..masking import build_mask_policy
        from ..models import LinearDecoder, TransformerDecoder, create_vit, load_checkpoint

        mcfg: MaskDistillConfig = self.mcfg
        m = cfg.model
        if student is None:
            sizes = {k: getattr(m, k) for k in ("depth", "embed_dim", "num_heads") if getattr(m, k, 0)}
            if mcfg.student_layer_scale > 0:
                sizes["init_values"] = mcfg.student_layer_scale
            student = create_vit(m.arch, patch_size=m.patch_size, img_size=m.img_size, num_classes=0,
                                 drop_path_rate=m.drop_path_rate, **sizes)
            if getattr(m, "checkpoint", None):
                load_checkpoint(student, os.path.expanduser(m.checkpoint), strict=False)
        self.student = student
        grid = tuple(student.grid_size)

        if teacher is None:  # a teacher with another patch size sees the image resized to the student's grid
            teacher = build_teacher(mcfg.teacher, m.patch_size, grid, method="MaskDistill")
        depth = len(teacher.blocks)
        layer = mcfg.teacher_layer + depth if mcfg.teacher_layer < 0 else mcfg.teacher_layer
        if not 0 <= layer < depth:
            raise ValueError(f"method.teacher_layer={mcfg.teacher_layer} is outside the teacher's {depth} blocks")
        # Blocks after the distilled one never run: drop them (memory, and checkpoints stay small).
        teacher.blocks = teacher.blocks[: layer + 1]
        teacher.requires_grad_(False)
        teacher.eval()
        self.teacher = teacher
        self.teacher_layer = layer
        t_patch = tuple(teacher.patch_size)
        self.teacher_img_size = (grid[0] * t_patch[0], grid[1] * t_patch[1])
        if tuple(teacher.grid_for(self.teacher_img_size)) != grid:
            raise ValueError(f"the teacher's grid {tuple(teacher.grid_for(self.teacher_img_size))} cannot match "
                             f"the student's {grid}")

        s_dim, t_dim = int(student.embed_dim), int(teacher.embed_dim)
        if mcfg.decoder == "linear":
            self.decoder = LinearDecoder(s_dim, t_dim)
        else:
            self.decoder = TransformerDecoder(
                s_dim, t_dim, embed_dim=mcfg.decoder_embed_dim or None, depth=mcfg.decoder_depth,
                num_heads=mcfg.decoder_num_heads or None,
            )
        n = grid[0] * grid[1]
        self.mask_policy = build_mask_policy("block", ratio=mcfg.mask_ratio,
                                             min_num_patches=min(mcfg.mask_min_patches, max(1, int(mcfg.mask_ratio * n))))
        if mcfg.teacher_input_norm == "clip":
            scale = torch.tensor(_IMAGENET_STD) / torch.tensor(_CLIP_STD)
            shift = (torch.tensor(_IMAGENET_MEAN) - torch.tensor(_CLIP_MEAN)) / torch.tensor(_CLIP_STD)
        else:
            scale, shift = torch.ones(3), torch.zeros(3)
        # x_teacher = x * scale + shift turns ImageNet-normalised pixels into the teacher's normalisation.
        self.register_buffer("teacher_in_scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("teacher_in_shift", shift.view(1, 3, 1, 1), persistent=False)

    # ------------------------------------------------------------------ protocol
    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # frozen: dropout / drop-path never run in the teacher
        return self

    def trainable_modules(self) -> Dict[str, nn.Module]:
        return {"student": self.student, "decoder": self.decoder}

    # ------------------------------------------------------------------ pieces
    @torch.no_grad()
    def teacher_targets(self, images: torch.Tensor) -> torch.Tensor:
        """Whitened patch features [B, N, D_teacher] (float32) of block ``teacher_layer``."""
        x = images * self.teacher_in_scale.to(images.dtype) + self.teacher_in_shift.to(images.dtype)
        if tuple(x.shape[-2:]) != self.teacher_img_size:
            x = F.interpolate(x, size=self.teacher_img_size, mode="bicubic", align_corners=False)
        tokens = self.teacher.embed(x)
        for blk in self.teacher.blocks:
            tokens = blk(tokens)
        return whiten(tokens[:, self.teacher.num_prefix_tokens:], self.mcfg.whiten_eps)

    def student_predictions(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Decoder output [B, N, D_teacher] for the student's view with ``mask`` hidden."""
        feats = self.student.forward_features(images, mask=mask)
        return self.decoder(feats.patch)

    def masked_ids(self, mask: torch.Tensor) -> torch.Tensor:
        """Hidden positions [B, floor(mask_ratio * N)] (ascending) of a block mask, without a sync."""
        count = int(self.mcfg.mask_ratio * mask.shape[1])  # what the block policy hides per row
        if ops._value_checks_on() and not bool((mask.sum(dim=1) == count).all()):
            raise ValueError(f"every mask row must hide exactly {count} patches")
        # A stable sort of ~mask puts the hidden positions first, in their original order.
        return torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices[:, :count]

    def training_step(self, batch, state: StepState) -> Tuple[torch.Tensor, Dict[str, float]]:
        images = batch[0]
        if isinstance(images, (list, tuple)):  # a multi-crop loader: distil on the first global view
            images = images[0]
        mcfg: MaskDistillConfig = self.mcfg
        b = images.shape[0]
        grid = tuple(self.student.grid_size)
        mask = self.mask_policy(b, grid, generator=state.generator, device=images.device)
        with _autocast(state.device, state.amp_dtype):
            target = self.teacher_targets(images)
            if mcfg.decoder == "linear":
                # Per-token decoder: only the positions the loss reads are decoded.
                ids = self.masked_ids(mask)
                tokens = self.student.forward_features(images, mask=mask).patch
                pred = self.decoder(ops.gather_tokens(tokens, ids))
                target = ops.gather_tokens(target, ids)
                loss_mask = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
            else:
                pred, loss_mask = self.student_predictions(images, mask), mask
        loss = distill_loss(pred, target, loss_mask, mcfg.loss, mcfg.smooth_l1_beta)
        with torch.no_grad():
            cos = masked_mean(F.cosine_similarity(pred.float(), target.float(), dim=-1), loss_mask)
        # Tensors: the driver reads them back only on logging steps.  (It logs the loss itself.)
        metrics = {"mask_ratio": mask.float().mean(), "cos_masked": cos}
        return loss, metrics


METHOD = MaskDistill
