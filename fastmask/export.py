"""``python -m fastmask.export``: a trained backbone as a timm checkpoint (safetensors).

    python -m fastmask.export runs/dino/checkpoint.pt --which teacher --out dino_teacher.safetensors

writes ``OUT`` (the ViT's timm state dict: the same keys as ``timm.create_model(name)``, without
fastmask's ``mask_token`` and without projection heads) and ``OUT.json`` (the timm model name, the
``model_args`` that rebuild the architecture, and a timm ``pretrained_cfg``: input size,
normalisation, crop), also stored in the safetensors metadata.  Load it in plain timm with::

    timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file="OUT"), **model_args)

(``num_classes`` is in ``model_args``; a classifier also needs ``num_classes`` in the overlay, which
``OUT.json``'s ``pretrained_cfg`` carries).  After writing, the export builds exactly that timm model
and checks that its outputs equal fastmask's (``--no-verify`` skips it).

CHECKPOINT is a driver checkpoint (``--which student|teacher``; default: the network the method
evaluates, DINO/iBOT's EMA teacher, else the student) or any file ``fastmask.models.load_checkpoint`` reads.  The
timm name is the run's ``model.arch`` when that is a timm name, else the timm name of the preset's
size (``vit_tiny`` -> ``vit_tiny_patch16_224``); ``--name`` sets it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, Optional

import torch
from torch import nn

from ._cli import add_checkpoint_arguments, as_usage_errors, run
from .analysis.loading import _is_timm_name, backbone_from_args, load_backbone  # noqa: F401 (load_backbone: part of this module's API)

__all__ = ["export_timm", "load_exported", "timm_model_args", "main"]


def timm_model_args(model: nn.Module) -> Dict[str, Any]:
    """timm ``VisionTransformer`` arguments that rebuild ``model``'s architecture exactly (read off
    its modules, so they hold for presets with overridden sizes too)."""
    blk = model.blocks[0]
    attn = blk.attn
    args: Dict[str, Any] = dict(
        img_size=int(model.patch_embed.img_size[0]),
        patch_size=int(model.patch_size[0]),
        embed_dim=int(model.embed_dim),
        depth=len(model.blocks),
        num_heads=int(attn.num_heads),
        mlp_ratio=blk.mlp.fc1.out_features / model.embed_dim,
        qkv_bias=attn.qkv.bias is not None,
        num_classes=int(model.num_classes),
        global_pool=model.global_pool,
        no_embed_class=bool(model.no_embed_class),
        reg_tokens=int(getattr(model, "num_reg_tokens", 0)),
        pre_norm=not isinstance(model.norm_pre, nn.Identity),
        fc_norm=not isinstance(model.fc_norm, nn.Identity),
    )
    if not isinstance(attn.q_norm, nn.Identity):
        args["qk_norm"] = True
    if not isinstance(blk.ls1, nn.Identity):
        args["init_values"] = 1e-5  # LayerScale present; the values are in the weights
    act = type(blk.mlp.act).__name__.lower()
    if act in ("quickgelu",):
        args["act_layer"] = "quick_gelu"
    elif act not in ("gelu",):
        args["act_layer"] = act
    if getattr(model, "dist_token", None) is not None:
        args.pop("reg_tokens")  # timm's DeiT has no register argument
    return args


def _timm_name_for(model: nn.Module, arch: Optional[str]) -> str:
    if arch and _is_timm_name(arch):
        return arch
    size = {192: "tiny", 384: "small", 768: "base", 1024: "large"}.get(int(model.embed_dim), "base")
    if getattr(model, "dist_token", None) is not None:
        return f"deit_{size if size != 'large' else 'base'}_distilled_patch16_224"
    return f"vit_{size}_patch16_224"


def _pretrained_cfg(name: str, args: Dict[str, Any], run_cfg: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    from .data.augment import IMAGENET_MEAN, IMAGENET_STD

    data = (run_cfg or {}).get("data") or {}
    img = int(args["img_size"])
    return dict(
        architecture=name.split(".")[0],
        tag="fastmask",
        input_size=[3, img, img],
        fixed_input_size=not args.get("dynamic_img_size", False),
        interpolation="bicubic",
        crop_pct=float(data.get("eval_crop_pct", 0.875)),
        crop_mode="center",
        mean=list(IMAGENET_MEAN),
        std=list(IMAGENET_STD),
        num_classes=int(args["num_classes"]),
        first_conv="patch_embed.proj",
        classifier=["head", "head_dist"] if "distilled" in name else "head",
    )


def timm_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``model``'s weights under timm's keys (fastmask's ``mask_token`` left out), contiguous."""
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items() if k != "mask_token"}


def export_timm(model: nn.Module, out: str, *, name: Optional[str] = None, info: Optional[Dict[str, Any]] = None,
                verify: bool = True) -> Dict[str, Any]:
    """Write ``model`` (a MaskedViT) to ``out`` (.safetensors) and ``out.json``; returns the metadata
    (``name``, ``model_args``, ``pretrained_cfg``, and ``max_abs_diff`` of the timm round trip when
    verified)."""
    from safetensors.torch import save_file

    if not out.endswith(".safetensors"):
        raise ValueError(f"--out must end in .safetensors (timm reads the format from the name), got {out!r}")
    info = info or {}
    timm_name = _timm_name_for(model, name or info.get("arch"))
    args = timm_model_args(model)
    cfg = _pretrained_cfg(timm_name, args, info.get("run_config"))
    meta = dict(name=timm_name, model_args=args, pretrained_cfg=cfg,
                source=dict(checkpoint=info.get("checkpoint"), which=info.get("which"), format=info.get("format")))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_file(timm_state_dict(model), out,
              metadata={"format": "pt", "fastmask": json.dumps(meta)})
    if verify:
        meta["max_abs_diff"] = verify_export(model, out, meta)
    with open(out + ".json", "w") as f:
        json.dump(meta, f, indent=2)
    return meta


def load_exported(path: str, meta: Optional[Dict[str, Any]] = None) -> nn.Module:
    """The plain timm model an export describes, loaded by timm itself from the file."""
    import timm

    if meta is None:
        with open(path + ".json") as f:
            meta = json.load(f)
    overlay = dict(file=os.path.abspath(path), num_classes=meta["pretrained_cfg"]["num_classes"])
    return timm.create_model(meta["name"], pretrained=True, pretrained_cfg_overlay=overlay, **meta["model_args"])


@torch.no_grad()
def verify_export(model: nn.Module, path: str, meta: Dict[str, Any]) -> float:
    """Largest |timm - fastmask| output on a random batch; raises if it is not at float32 rounding."""
    ref = load_exported(path, meta).eval()
    model = model.eval()
    img = int(meta["model_args"]["img_size"])
    x = torch.randn(2, 3, img, img, generator=torch.Generator().manual_seed(0))
    a, b = ref(x).float(), model(x).float()
    diff = float((a - b).abs().max())
    scale = float(b.abs().max()) + 1e-6
    if diff > 1e-4 * scale + 1e-5:
        raise RuntimeError(f"exported {path}: timm's outputs differ from fastmask's by {diff:.3g} (scale {scale:.3g})")
    return diff


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastmask.export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    add_checkpoint_arguments(p, which_help="student or teacher (driver checkpoints: default DINO/iBOT's teacher, "
                                            "else the student; DINO/iBOT files: the entry)")
    p.add_argument("--out", required=True, help="output .safetensors path (OUT.json is written next to it)")
    p.add_argument("--name", default=None, help="timm model name to export as (default: from the run's model.arch)")
    p.add_argument("--no-verify", action="store_true", help="skip the timm round-trip check")
    return p


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    with as_usage_errors():  # fastmask._cli.run: one line, exit status 2
        model, info = backbone_from_args(args)[:2]
        meta = export_timm(model, args.out, name=args.name, info=info, verify=not args.no_verify)
    margs = ", ".join(f"{k}={v!r}" for k, v in meta["model_args"].items())
    print(f"wrote {args.out} ({info.get('which')} of {info.get('format')}) as timm {meta['name']!r}")
    if "max_abs_diff" in meta:
        print(f"verified: timm.create_model loads it; max |timm - fastmask| = {meta['max_abs_diff']:.3g}")
    print(f"load: timm.create_model({meta['name']!r}, pretrained=True, pretrained_cfg_overlay=dict(file={args.out!r}, "
          f"num_classes={meta['pretrained_cfg']['num_classes']}), {margs})")
    return 0


def main(argv=None) -> int:
    """The command line; a user mistake is one line ``fastmask.export: ...`` and exit status 2."""
    return run("fastmask.export", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
