"""Turning a checkpoint file into a ViT to analyse.

Understands (1) checkpoints written by the training driver (``python -m fastmask.train``: the run's
config plus the method's state dict; the student backbone is taken by default, any other
sub-module with a ``prefix`` such as ``teacher.`` or ``teacher.backbone.``), and (2) plain
timm-style state dicts or the files ``fastmask.models.load_checkpoint`` reads (DeiT/MAE ``model``,
DINO/iBOT ``teacher``).  The architecture is read off the weights' shapes (width, depth, patch size,
resolution, MLP ratio, classifier); the number of heads, which shapes do not show, comes from
``num_heads=``, the run's config, or the ViT convention of 64 channels per head.
"""
from __future__ import annotations

import os
import re
from typing import Any, Dict, NamedTuple, Optional, Tuple

import torch
from torch import nn

from ..models.vit import _NAME_RE, _STATE_KEYS, _is_state_dict, _read_file, is_driver_checkpoint, select_backbone_state

__all__ = ["load_backbone", "backbone_from_args", "CommandInputs", "load_vit_for_analysis", "infer_vit_kwargs",
           "select_backbone_state"]

# Methods whose evaluated network is an EMA teacher (kept in the checkpoint as ``teacher.``).
_EMA_METHODS = ("dino", "ibot")


def infer_vit_kwargs(sd: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """timm ``VisionTransformer`` arguments read off a state dict's shapes (all but num_heads)."""
    proj = sd["patch_embed.proj.weight"]  # [D, 3, p, p]
    embed_dim, patch = int(proj.shape[0]), int(proj.shape[-1])
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    kw: Dict[str, Any] = dict(embed_dim=embed_dim, depth=depth, patch_size=patch)
    prefix = 1 + (1 if "dist_token" in sd else 0) + (int(sd["reg_token"].shape[1]) if "reg_token" in sd else 0)
    if "pos_embed" in sd:
        n = int(sd["pos_embed"].shape[1])

        def square(v):
            return v > 0 and int(round(v ** 0.5)) ** 2 == v

        if square(n - prefix):
            n_patches = n - prefix
        elif square(n):  # positions for the patches only (timm's no_embed_class)
            n_patches = n
            kw["no_embed_class"] = True
        else:
            raise ValueError(f"pos_embed has {n} positions: not a square grid (+{prefix} prefix tokens)")
        kw["img_size"] = int(round(n_patches ** 0.5)) * patch
    if "reg_token" in sd:
        kw["reg_tokens"] = int(sd["reg_token"].shape[1])
    fc1 = sd.get("blocks.0.mlp.fc1.weight")
    if fc1 is not None:
        kw["mlp_ratio"] = fc1.shape[0] / embed_dim
    kw["qkv_bias"] = "blocks.0.attn.qkv.bias" in sd
    if "blocks.0.attn.q_norm.weight" in sd:
        kw["qk_norm"] = True
    if "norm_pre.weight" in sd:
        kw["pre_norm"] = True  # CLIP-style ViTs normalise before the blocks
    if "blocks.0.ls1.gamma" in sd:
        kw["init_values"] = 1e-5  # LayerScale present; its values come from the checkpoint
    head = sd.get("head.weight")
    kw["num_classes"] = int(head.shape[0]) if head is not None and head.dim() == 2 else 0
    if "fc_norm.weight" in sd:
        kw["global_pool"] = "avg"
    return kw


def _read(path: str):
    """The file's object; a missing file is FileNotFoundError, an unreadable one a ValueError
    that says why (empty, cut off, not a checkpoint)."""
    try:
        # Driver checkpoints hold plain Python objects (config dicts, RNG states) next to tensors;
        # the file is the user's own.
        return _read_file(path, full_pickle=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # torch and safetensors raise several types for a cut-off or foreign file
        from .._cli import unreadable_checkpoint

        raise ValueError(unreadable_checkpoint(path, e)) from e


def load_vit_for_analysis(
    path: str,
    *,
    prefix: Optional[str] = None,
    arch: Optional[str] = None,
    num_heads: Optional[int] = None,
    model_kwargs: Optional[Dict[str, Any]] = None,
    key: Optional[str] = None,
    ckpt: Any = None,
) -> Tuple[nn.Module, Dict[str, Any]]:
    """A ``MaskedViT`` with the weights of ``path`` (eval mode, CPU) and a description of what was loaded.

    ``arch`` sets the architecture instead of shape inference: a preset (``vit_small``) or any timm
    ViT/DeiT name (``vit_small_patch14_dinov2``; only patch size, resolution, depth and classifier then come from the
    weights' shapes); ``model_kwargs`` override any architecture argument either way.  ``key`` picks the
    entry of a non-driver checkpoint dict (DINO/iBOT ``teacher`` / ``student``); ``ckpt`` is the
    already-read file, if the caller has it.
    """
    from ..models import MaskedViTDistilled, create_vit

    if ckpt is None:
        ckpt = _read(path)
    info: Dict[str, Any] = {"checkpoint": os.path.abspath(path)}
    run_cfg = None
    if is_driver_checkpoint(ckpt):
        run_cfg = ckpt["config"]
        info["format"] = f"fastmask driver checkpoint ({run_cfg.get('method')}, step {ckpt.get('step')})"
        sd, used = select_backbone_state(ckpt["method"], prefix)
    else:
        if key is not None:
            if not isinstance(ckpt, dict) or not _is_state_dict(ckpt.get(key)):
                have = sorted(ckpt)[:12] if isinstance(ckpt, dict) else type(ckpt).__name__
                raise ValueError(f"{path}: no state dict under {key!r} (keys: {have})")
            full = ckpt[key]
        elif _is_state_dict(ckpt):
            full = ckpt
        elif isinstance(ckpt, dict):
            full = next((ckpt[k] for k in _STATE_KEYS
                         if k in ckpt and _is_state_dict(ckpt[k])), None)
            if full is None:
                raise ValueError(f"{path}: no state dict found (keys: {sorted(ckpt)[:12]})")
        else:
            raise ValueError(f"{path}: expected a state dict or a checkpoint dict, got {type(ckpt).__name__}")
        info["format"] = "state dict" + (f" [{key}]" if key else "")
        # DDP's module. prefix (DINO/iBOT files: module.backbone.*) sits above any sub-module prefix.
        full = {k[len("module."):] if k.startswith("module.") else k: v for k, v in full.items()}
        sd, used = select_backbone_state(full, prefix)
    sd = {k.replace("module.", "", 1) if k.startswith("module.") else k: v for k, v in sd.items()}
    if "masked_embed" in sd and "mask_token" not in sd:  # iBOT's name for the mask token
        sd["mask_token"] = sd.pop("masked_embed").reshape(1, 1, -1)
    info["prefix"] = used

    kw = infer_vit_kwargs(sd)
    if arch is not None and _NAME_RE.match(arch) is None:
        # A timm name fixes the architecture (activation, norms, LayerScale, ...); what the weights
        # show unambiguously (patch size, resolution, depth, classifier) still comes from them.
        seen = {k: kw[k] for k in ("patch_size", "img_size", "depth", "num_classes") if k in kw}
        model = create_vit(arch, **{**seen, **(model_kwargs or {})})
        img, num_classes = int(model.patch_embed.img_size[0]), int(model.num_classes)
        kw = dict(embed_dim=int(model.embed_dim), depth=len(model.blocks))
        heads = int(model.blocks[0].attn.num_heads)
        patch = int(model.patch_size[0])
    else:
        model, heads, patch, img, num_classes = _build_inferred(kw, sd, run_cfg, used, arch, num_heads, model_kwargs)
    own = model.state_dict()
    missing = [k for k in own if k not in sd and k != "mask_token"]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit the inferred ViT ({kw}): missing {missing[:6]}, "
                         f"unexpected {unexpected[:6]}; pass --arch / --model-arg to fix the architecture")
    model.load_state_dict(sd, strict=False)
    model.eval()
    info.update(arch=arch or "inferred", num_heads=int(heads), img_size=img, patch_size=patch, num_classes=num_classes,
                **{k: v for k, v in kw.items() if k in ("embed_dim", "depth")})
    if isinstance(model, MaskedViTDistilled):
        info["distilled"] = True
    return model, info


def _build_inferred(kw, sd, run_cfg, used, arch, num_heads, model_kwargs):
    """The ViT whose arguments are read off the weights (heads from the run's config or 64 per head)."""
    from ..models import create_vit

    heads = num_heads
    if heads is None and run_cfg is not None:
        m = run_cfg.get("model", {})
        t_heads = _run_teacher(run_cfg).get("num_heads")
        if used.startswith("teacher") and t_heads:
            heads = int(t_heads)
        elif not used.startswith("teacher") and m.get("num_heads"):
            heads = int(m["num_heads"])
        elif m.get("arch"):
            from ..models import VIT_CONFIGS

            base = VIT_CONFIGS.get(re.sub(r"_patch.*$", "", str(m["arch"])), {})
            if base.get("embed_dim") == kw["embed_dim"]:
                heads = base["num_heads"]
    if heads is None:
        heads = max(1, kw["embed_dim"] // 64)  # the ViT convention (Tiny 3, Small 6, Base 12, Large 16)
    kw["num_heads"] = int(heads)
    if arch is not None:
        from ..models import VIT_CONFIGS

        base = VIT_CONFIGS.get(re.sub(r"_patch.*$", "", arch))
        if base is None:
            raise ValueError(f"unknown arch {arch!r}; known: {sorted(VIT_CONFIGS)}")
        kw.update(base)
    kw.update(model_kwargs or {})
    distilled = "dist_token" in sd
    patch, img = kw.pop("patch_size"), kw.pop("img_size", 224)
    num_classes = kw.pop("num_classes")
    model = create_vit(arch or "vit_tiny", patch_size=patch, img_size=img, num_classes=num_classes,
                       distilled=distilled, **kw)
    return model, heads, patch, img, num_classes


def load_backbone(path: str, which: Optional[str] = None, *, arch: Optional[str] = None,
                  model_kwargs: Optional[Dict[str, Any]] = None) -> Tuple[nn.Module, Dict[str, Any]]:
    """(MaskedViT in eval mode, info) from a driver checkpoint (``which`` = student / teacher / any
    sub-module prefix; default: the network the method evaluates, DINO/iBOT's EMA teacher, else the
    student) or a timm/DeiT/DINO/iBOT file (``which`` = its entry, e.g. ``teacher``).  ``info``
    carries ``run_config`` (the driver's config dict) when the file has one."""
    ckpt = _read(path)
    run_cfg = ckpt["config"] if is_driver_checkpoint(ckpt) else None
    key, prefix = None, which
    if run_cfg is not None:
        if which is None:  # the network the method evaluates: DINO/iBOT's EMA teacher, else the student
            prefix = "teacher" if run_cfg.get("method") in _EMA_METHODS else None
    elif which is not None and isinstance(ckpt, dict) and which in ckpt:
        key, prefix = which, None  # DINO/iBOT files: {'teacher': {...}, 'student': {...}, ...}
    if prefix is not None and not prefix.endswith("."):
        prefix += "."
    if arch is None and run_cfg is not None:
        name = _run_arch(run_cfg, prefix)
        if name is not None and _is_timm_name(name):
            arch = name
            model_kwargs = {**_run_sizes(run_cfg, prefix), **(model_kwargs or {})}
    model, info = load_vit_for_analysis(path, prefix=prefix, arch=arch, model_kwargs=model_kwargs, key=key, ckpt=ckpt)
    info["run_config"] = run_cfg
    info["which"] = key or (prefix or "").rstrip(".") or ("student" if run_cfg is not None else "model")
    return model, info


class CommandInputs(NamedTuple):
    """What a command that reads a checkpoint works on (``backbone_from_args``)."""

    model: nn.Module  # the backbone, eval mode, CPU
    info: Dict[str, Any]  # load_backbone's description (which, format, run_config, ...)
    data: str  # --data, else the run's data, else builtin:shapes
    image_size: int  # --image-size, else the run's, else the model's own input size


def backbone_from_args(args) -> CommandInputs:
    """``load_backbone`` of a command line's CHECKPOINT / ``--which`` / ``--arch``
    (``fastmask._cli.add_checkpoint_arguments``), and the data and input size to run it on:
    ``--data`` / ``--image-size`` where the command has them, else the run's (the driver
    checkpoint's config), else builtin:shapes and the model's own size."""
    model, info = load_backbone(args.checkpoint, args.which, arch=args.arch)
    run_data = (info.get("run_config") or {}).get("data") or {}
    data = getattr(args, "data", None) or run_data.get("data") or "builtin:shapes"
    size = getattr(args, "image_size", None) or int(run_data.get("image_size") or model.patch_embed.img_size[0])
    return CommandInputs(model, info, data, size)


def _run_teacher(run_cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The run's teacher section: ``method_cfg.teacher``, or the flat ``teacher_*`` keys of older runs."""
    mcfg = run_cfg.get("method_cfg") or {}
    if isinstance(mcfg.get("teacher"), dict):
        return mcfg["teacher"]
    return {k[len("teacher_"):]: v for k, v in mcfg.items() if k.startswith("teacher_")}


def _run_arch(run_cfg: Dict[str, Any], prefix: Optional[str]) -> Optional[str]:
    teacher = _run_teacher(run_cfg)
    if prefix and prefix.startswith("teacher") and teacher.get("arch"):
        return str(teacher["arch"])
    return (run_cfg.get("model") or {}).get("arch")


def _run_sizes(run_cfg: Dict[str, Any], prefix: Optional[str]) -> Dict[str, Any]:
    m = run_cfg.get("model") or {}
    teacher = _run_teacher(run_cfg)
    teacher_own = bool(prefix and prefix.startswith("teacher") and teacher.get("arch"))
    src = {k: teacher.get(k) for k in ("depth", "embed_dim", "num_heads", "patch_size")} if teacher_own \
        else {k: m.get(k) for k in ("depth", "embed_dim", "num_heads", "patch_size")}
    return {k: int(v) for k, v in src.items() if v}


def _is_timm_name(name: str) -> bool:
    from timm.models import split_model_name_tag

    from ..models.vit import vit_names

    return _NAME_RE.match(name) is None and split_model_name_tag(name)[0] in vit_names()
