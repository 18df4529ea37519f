"""Training configuration: dataclasses, YAML recipes and ``key=value`` overrides.

A run is described by one :class:`TrainConfig`::

    method: dino                # the method's name (fastmask.methods registry)
    epochs: 100
    model:   {arch: vit_small, patch_size: 16, img_size: 224, drop_path_rate: 0.1}
    data:    {...}              # fastmask.data.DataConfig fields
    optim:   {lr: 0.0005, warmup_epochs: 10, ...}
    method_cfg: {...}           # the method's own Config dataclass (e.g. DINOConfig); a frozen
                                # teacher (MaskedKD, MaskDistill) is its nested ``teacher:`` section

The dataclasses are OmegaConf structured configs: the recipe and the CLI overrides (dotted keys,
``optim.lr=1e-3``, ``method.teacher.arch=vit_base``; ``method.`` and ``method_cfg.`` both address
the method's options; values parsed as YAML) are merged into them, so unknown keys and values of
the wrong type fail with a one-line :class:`ConfigError` naming the key.  Each check has one place:
a section's own ranges in its ``__post_init__`` (run once, when the section object is built), the
checks across sections in :func:`check_train_config` and the method's ``check_config``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

__all__ = [
    "ConfigError",
    "ModelConfig",
    "OptimConfig",
    "TeacherConfig",
    "TrainConfig",
    "RECIPE_DIR",
    "check_train_config",
    "config_to_dict",
    "find_recipe",
    "load_config",
]

RECIPE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes")
DEFAULT_METHOD = "dino"
DEFAULT_RECIPE = "dino_tiny_builtin.yaml"
SECTIONS = ("model", "optim", "data", "method")
PARALLEL_MODES = ("ddp", "fsdp")


class ConfigError(ValueError):
    """A bad recipe, an unknown key or a value of the wrong type/range."""


@dataclass
class ModelConfig:
    arch: str = "vit_small"  # fastmask.models.create_vit name: vit_tiny/small/base/large or any timm ViT/DeiT name
    patch_size: int = 16
    img_size: int = 224  # resolution of the global crops / training images
    drop_path_rate: float = 0.1
    # "linear": timm's rule (rising to drop_path_rate in the last block); "constant": every block
    # (DeiT-III's models_v2.py, MaskSub's DeiT-III recipes).
    drop_path_schedule: str = "linear"
    # No position embedding on the class token (timm's no_embed_class; DeiT-III's ViT adds pos_embed
    # [1, N, D] to the patches only, then prepends the class token).
    no_embed_class: bool = False
    checkpoint: Optional[str] = None  # optional local checkpoint to initialise the backbone from
    # Overrides of the architecture's size (0 = the arch's own value); used by the tiny CPU recipes.
    depth: int = 0
    embed_dim: int = 0
    num_heads: int = 0

    def __post_init__(self):
        if self.patch_size < 1:
            raise ValueError(f"model.patch_size: must be >= 1, got {self.patch_size}")
        if self.img_size % self.patch_size:
            raise ValueError(f"model.img_size: {self.img_size} is not divisible by model.patch_size={self.patch_size}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"model.drop_path_rate: must be in [0, 1), got {self.drop_path_rate}")
        if self.drop_path_schedule not in ("linear", "constant"):
            raise ValueError(f"model.drop_path_schedule: must be 'linear' or 'constant', got {self.drop_path_schedule!r}")
        if self.checkpoint and not os.path.isfile(os.path.expanduser(self.checkpoint)):
            raise ValueError(f"model.checkpoint: file not found: {self.checkpoint}")


@dataclass
class TeacherConfig:
    """A frozen teacher ViT (MaskedKD, MaskDistill), built by ``fastmask.methods.base.build_teacher``.

    Its patch grid is the student's: the teacher runs at ``student grid * patch_size`` pixels."""

    arch: str = "vit_base"  # fastmask.models.create_vit name
    # local timm-layout file; None = random init (tests / throughput only); "auto": a teacher trained once
    # on the run's data by the driver and cached under data.cache_dir (fastmask.engine.auto_teacher)
    checkpoint: Optional[str] = None
    auto_epochs: int = 10  # epochs of that teacher's supervised run (checkpoint: auto)
    checkpoint_key: Optional[str] = None  # entry of the checkpoint dict holding the weights
    patch_size: int = 0  # 0: the student's
    # Overrides of the architecture's size (0 = the arch's own), for tiny recipes.
    depth: int = 0
    embed_dim: int = 0
    num_heads: int = 0
    pre_norm: bool = False  # CLIP ViTs have a LayerNorm before the blocks (ln_pre)
    act_layer: str = ""  # "" = the arch's GELU; OpenAI CLIP weights need "quick_gelu"

    def __post_init__(self):
        for k in ("patch_size", "depth", "embed_dim", "num_heads"):
            if getattr(self, k) < 0:
                raise ValueError(f"method.teacher.{k} must be >= 0 (0 = default), got {getattr(self, k)}")
        if self.checkpoint and self.checkpoint != "auto" and not os.path.isfile(os.path.expanduser(self.checkpoint)):
            raise ValueError(f"method.teacher.checkpoint: file not found: {self.checkpoint!r} "
                             "(or 'auto': train one once on the run's data and cache it)")
        if self.auto_epochs < 1:
            raise ValueError(f"method.teacher.auto_epochs must be >= 1, got {self.auto_epochs}")


@dataclass
class OptimConfig:
    optimizer: str = "adamw"  # adamw | lamb (DeiT-III / MaskSub's fusedlamb, fastmask.engine.optim.lamb)
    lr: float = 5e-4  # base lr for a global batch of 256; the driver scales it by batch/256
    min_lr: float = 1e-6
    warmup_epochs: float = 10.0
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4  # cosine schedule of the weight decay (DINO/iBOT)
    betas: Tuple[float, float] = (0.9, 0.999)
    clip_grad: float = 3.0  # max grad norm (per parameter or global, see clip_mode); 0 disables clipping
    # DINO/iBOT/AttMask clip each parameter's gradient on its own (utils.clip_gradients); "global":
    # torch.nn.utils.clip_grad_norm_ over all of them (timm/DeiT/BEiT).  fastmask.engine.optim.
    clip_mode: str = "per_param"
    # "dino": decay every parameter but biases and 1-D ones (DINO/iBOT utils.get_params_groups);
    # "timm": also exempt tokens and position embeddings (timm's no_weight_decay, DeiT/MaskSub/MaskedKD).
    decay_groups: str = "dino"
    freeze_last_layer_epochs: int = 1
    teacher_momentum: float = 0.996  # EMA momentum, cosine schedule to teacher_momentum_end
    teacher_momentum_end: float = 1.0
    scale_lr_by_batch: bool = True
    # min_lr scaled by batch/256 as well (fastmask's earlier behaviour); false: min_lr is absolute, as
    # in DINO/iBOT/AttMask (cosine_scheduler(lr * batch / 256, min_lr, ...)) and DeiT/MaskSub/MaskedKD.
    scale_min_lr: bool = True
    # Gradient accumulation: an optimizer step every accum_steps loader batches (global batch =
    # data.batch_size x world size x accum_steps).  Equal to the large batch except where a method
    # uses batch statistics (DINO/iBOT centre updates per micro-batch, BatchNorm heads).
    accum_steps: int = 1

    def __post_init__(self):
        from .engine.optim import CLIP_MODES, DECAY_GROUPS, OPTIMIZERS

        if self.optimizer.lower() not in OPTIMIZERS:
            raise ValueError(f"optim.optimizer: must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.clip_mode not in CLIP_MODES:
            raise ValueError(f"optim.clip_mode: must be one of {CLIP_MODES}, got {self.clip_mode!r}")
        if self.decay_groups not in DECAY_GROUPS:
            raise ValueError(f"optim.decay_groups: must be one of {DECAY_GROUPS}, got {self.decay_groups!r}")
        if not self.lr > 0:
            raise ValueError(f"optim.lr: must be > 0, got {self.lr}")
        if self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"optim.min_lr: must be in [0, lr={self.lr}], got {self.min_lr}")
        if self.warmup_epochs < 0:
            raise ValueError(f"optim.warmup_epochs: must be >= 0, got {self.warmup_epochs}")
        if self.weight_decay < 0 or self.weight_decay_end < 0:
            raise ValueError("optim.weight_decay: must be >= 0")
        if self.clip_grad < 0:
            raise ValueError(f"optim.clip_grad: must be >= 0 (0 disables), got {self.clip_grad}")
        if self.accum_steps < 1:
            raise ValueError(f"optim.accum_steps: must be >= 1, got {self.accum_steps}")
        if self.freeze_last_layer_epochs < 0:
            raise ValueError(f"optim.freeze_last_layer_epochs: must be >= 0, got {self.freeze_last_layer_epochs}")
        for k in ("teacher_momentum", "teacher_momentum_end"):
            if not 0.0 <= getattr(self, k) <= 1.0:
                raise ValueError(f"optim.{k}: must be in [0, 1], got {getattr(self, k)}")
        for i, b in enumerate(self.betas):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"optim.betas[{i}]: must be in [0, 1), got {b}")


@dataclass
class TrainConfig:
    method_name: str = DEFAULT_METHOD
    model: ModelConfig = field(default_factory=ModelConfig)
    data: Any = None  # fastmask.data.DataConfig
    optim: OptimConfig = field(default_factory=OptimConfig)
    method: Any = None  # the method's Config instance
    epochs: int = 100
    max_steps: int = 0  # >0: stop after this global step (checkpointing there); schedules still follow `epochs`
    seed: int = 0
    output_dir: str = "runs/fastmask"
    device: str = "auto"  # auto / cpu / cuda / cuda:N
    amp: str = "auto"  # auto / bf16 / fp16 / off: see fastmask.engine.guard.amp_policy (bf16 on native-bf16 GPUs, fp16 + loss scaling on older ones, off on CPU)
    compile: str = "none"  # none | blocks | step (true = step): fastmask/engine/compile.py
    compile_mode: str = ""  # torch.compile mode: "" (default), reduce-overhead, max-autotune, ...
    # Data parallelism under torchrun: "ddp" (replicas, bucketed all-reduce overlapped with the
    # backward) or "fsdp" (FSDP2 fully_shard per block of every network, teachers included).
    parallel: str = "ddp"
    fsdp_mixed_precision: bool = True  # fsdp: bf16 parameters in compute, float32 gradient reduction
    ddp_bucket_mb: float = 25.0
    log_every: int = 10
    eval_every: int = 1  # epochs between k-NN evaluations (0: only at the end)
    knn_k: int = 20
    knn_temperature: float = 0.07
    knn_max_train: int = 0  # >0: cap on the number of train images used as the k-NN memory bank
    attn_images: int = 4  # validation images in the attention-map grid (0 disables)
    save_every: int = 1  # epochs between checkpoints
    resume: str = ""  # "" (fresh run), "auto" (output_dir/checkpoint.pt if present) or a path
    overwrite: bool = False  # a fresh run into a directory holding another run replaces it (else: refused)
    progress_bar: bool = True
    tensorboard: bool = True
    deterministic: bool = False
    # fastmask.ops value checks (index range, NaN scores) sync with the device: keep them for the
    # first step (inputs are checked once), then follow this setting.
    value_checks: bool = False
    # Numerical safety (fastmask/engine/guard.py): a non-finite loss or gradient norm skips the
    # step; this many in a row stop the run.
    skip_nonfinite: bool = True
    nonfinite_max_consecutive: int = 10
    # Optional Weights & Biases logging (fastmask/engine/loggers.py), rank 0, beside JSONL/TensorBoard.
    wandb: bool = False
    wandb_project: str = "fastmask"
    wandb_entity: str = ""
    wandb_mode: str = "online"  # online / offline (wandb sync later) / disabled
    # Online linear probe at each evaluation (fastmask.eval.linear_probe on the k-NN features): epochs, 0 = off.
    linear_probe_epochs: int = 0


def check_train_config(cfg: TrainConfig) -> None:
    """The checks across sections and of the top-level fields (each section checks its own
    ranges in ``__post_init__``).  Raises :class:`ConfigError`."""
    def bad(key, msg):
        raise ConfigError(f"{key}: {msg}")

    if cfg.epochs < 1:
        bad("epochs", f"must be >= 1, got {cfg.epochs}")
    if cfg.max_steps < 0:
        bad("max_steps", f"must be >= 0, got {cfg.max_steps}")
    if cfg.optim.warmup_epochs > cfg.epochs:
        # A short run of a longer recipe (epochs=1, the natural smoke test): warm up for half of it.
        if os.environ.get("RANK", "0") == "0":
            print(f"[fastmask] notice: optim.warmup_epochs={cfg.optim.warmup_epochs:g} does not fit epochs={cfg.epochs}; "
                  f"warm-up shortened to {cfg.epochs / 2:g} epochs", flush=True)
        cfg.optim.warmup_epochs = cfg.epochs / 2
    if cfg.amp.lower() not in ("auto", "bf16", "fp16", "off", "on"):
        bad("amp", f"must be one of auto, bf16, fp16, off; got {cfg.amp!r}")
    if cfg.parallel not in PARALLEL_MODES:
        bad("parallel", f"must be one of {', '.join(PARALLEL_MODES)}; got {cfg.parallel!r}")
    if cfg.parallel == "fsdp" and cfg.amp.lower() == "fp16":
        bad("amp", "fp16 loss scaling is not supported with parallel=fsdp; use amp=bf16")
    if not cfg.ddp_bucket_mb > 0:
        bad("ddp_bucket_mb", f"must be > 0, got {cfg.ddp_bucket_mb}")
    dev = cfg.device.lower()
    if not (dev in ("auto", "cpu", "cuda") or dev.startswith("cuda:")):
        bad("device", f"must be auto, cpu, cuda or cuda:N; got {cfg.device!r}")
    from .engine.compile import resolve_compile_mode

    try:
        cfg.compile = resolve_compile_mode(cfg.compile)
    except ValueError:
        bad("compile", f"must be none, blocks or step (or true/false), got {cfg.compile!r}")
    if cfg.knn_k < 1:
        bad("knn_k", f"must be >= 1, got {cfg.knn_k}")
    if not cfg.knn_temperature > 0:
        bad("knn_temperature", f"must be > 0, got {cfg.knn_temperature}")
    for k in ("log_every", "save_every"):
        if getattr(cfg, k) < 1:
            bad(k, f"must be >= 1, got {getattr(cfg, k)}")
    if cfg.eval_every < 0:
        bad("eval_every", f"must be >= 0, got {cfg.eval_every}")
    spelled = re.search(r"_patch(\d+)", cfg.model.arch)
    if spelled and int(spelled.group(1)) != cfg.model.patch_size:
        bad("model.patch_size", f"{cfg.model.patch_size} differs from the patch size {spelled.group(1)} that "
            f"model.arch={cfg.model.arch!r} names; set model.patch_size={spelled.group(1)} (or name the size you mean)")
    if cfg.nonfinite_max_consecutive < 1:
        bad("nonfinite_max_consecutive", f"must be >= 1, got {cfg.nonfinite_max_consecutive}")
    if cfg.wandb_mode not in ("online", "offline", "disabled"):
        bad("wandb_mode", f"must be online, offline or disabled; got {cfg.wandb_mode!r}")
    if cfg.linear_probe_epochs < 0:
        bad("linear_probe_epochs", f"must be >= 0, got {cfg.linear_probe_epochs}")
    img = getattr(cfg.data, "image_size", None)
    if img is not None and img != cfg.model.img_size:
        bad("data.image_size", f"{img} differs from model.img_size={cfg.model.img_size}; set both to the same value")
    if cfg.resume not in ("", "auto") and not os.path.isfile(cfg.resume):
        bad("resume", f"checkpoint not found: {cfg.resume!r} (use resume=auto to resume from output_dir if present)")


# ------------------------------------------------------------------------------------- merging

def _data_config_cls():
    from .data import DataConfig

    return DataConfig


def _schema(method_cls) -> DictConfig:
    """The structured config of a run of ``method_cls``: TrainConfig with the data and method
    sections typed by their dataclasses; struct mode rejects unknown keys."""
    schema = OmegaConf.structured(TrainConfig(method_name=method_cls.name))
    schema.data = OmegaConf.structured(_data_config_cls())
    schema.method = OmegaConf.structured(method_cls.Config)
    OmegaConf.set_struct(schema, True)
    return schema


def _expected(ref_type) -> str:
    names = {int: "an integer", float: "a number", bool: "true/false", str: "a string"}
    if ref_type in names:
        return names[ref_type]
    if typing.get_origin(ref_type) is tuple:
        return f"a list of {len(typing.get_args(ref_type))} values"
    if dataclasses.is_dataclass(ref_type):
        return f"a mapping of {ref_type.__name__} fields"
    return getattr(ref_type, "__name__", None) or str(ref_type).replace("typing.", "")


def _leaves(doc: Dict[str, Any], prefix: str = ""):
    """(dotted key, value) of every leaf of a nested mapping (lists are leaves)."""
    for key, value in doc.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            yield from _leaves(value, dotted)  # an empty section sets nothing
        else:
            yield dotted, value


def _set(cfg: DictConfig, dotted: str, value, shown: str) -> None:
    """``cfg[dotted] = value`` with OmegaConf's type checking; errors name ``shown`` (the key as
    the user wrote it) in one line."""
    parts = dotted.split(".")
    node = cfg
    for i, part in enumerate(parts):
        if not isinstance(node, DictConfig):
            raise ConfigError(f"unknown key {shown}: {'.'.join(parts[:i])} has no sub-keys")
        known = [k for k in node.keys()]
        if part not in known:
            close = difflib.get_close_matches(part, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown key {shown}{hint} (known keys: {', '.join(sorted(known))})")
        if i < len(parts) - 1:
            node = node[part]
    last = parts[-1]
    ref_type = node._get_node(last)._metadata.ref_type
    if isinstance(value, bool) and ref_type is str:
        value = "on" if value else "off"  # `amp: off` is YAML's False
    elif isinstance(value, float) and ref_type is int and value.is_integer():
        value = int(value)
    elif isinstance(value, int) and ref_type is float:
        value = float(value)
    elif isinstance(value, str) and ref_type is float:
        with contextlib.suppress(ValueError):
            value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
    elif isinstance(value, list) and typing.get_origin(ref_type) is tuple:
        value = tuple(value)  # YAML has no tuples
    elif isinstance(value, str) and value.strip().lower() == "none" and _optional(node, last):
        value = None  # `key=none` clears an Optional field; for a string field "none" stays a word
    try:
        node[last] = value
    except OmegaConfBaseException as e:
        first = str(e).splitlines()[0]
        raise ConfigError(f"{shown}: expected {_expected(ref_type)}, got {value!r} ({first})") from None


def _optional(node: DictConfig, key: str) -> bool:
    return bool(node._get_node(key)._metadata.optional)


def _build(merged: DictConfig) -> TrainConfig:
    """Instantiate the dataclasses, section by section so that a section's ``__post_init__``
    error names the section."""
    sections = {}
    for name in SECTIONS:
        try:
            sections[name] = OmegaConf.to_object(merged[name])
        except (ValueError, TypeError) as e:
            msg = str(e).splitlines()[0]
            raise ConfigError(msg if msg.startswith(f"{name}.") else f"{name}: {msg}") from None
    top = {k: merged[k] for k in merged.keys() if k not in SECTIONS}
    return TrainConfig(**top, **sections)


def find_recipe(name_or_path: str) -> str:
    """A recipe path as given, or a file name/stem under ``fastmask/recipes``."""
    if os.path.isfile(name_or_path):
        return name_or_path
    for cand in (name_or_path, name_or_path + ".yaml"):
        p = os.path.join(RECIPE_DIR, cand)
        if os.path.isfile(p):
            return p
    available = sorted(f for f in os.listdir(RECIPE_DIR) if f.endswith(".yaml")) if os.path.isdir(RECIPE_DIR) else []
    raise ConfigError(f"config file {name_or_path!r} not found (neither a path nor a recipe in {RECIPE_DIR}; "
                      f"available recipes: {', '.join(available) or 'none'})")


def _read_yaml(path: str) -> Dict[str, Any]:
    with open(path) as f:
        try:
            doc = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: a recipe must be a YAML mapping, got {type(doc).__name__}")
    return doc


def _override_pair(item: str) -> Tuple[str, str, Any]:
    """(key in the schema, key as written, value) of a ``key=value`` override."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. optim.lr=1e-3)")
    key, raw = item.split("=", 1)
    key = key.strip().lstrip("-")
    head, _, rest = key.partition(".")
    if head == "method" and not rest:
        raise ConfigError("the method is chosen with --method NAME, not method=...")
    if head == "method_cfg":
        head = "method"
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        value = raw
    return (f"{head}.{rest}" if rest else head), key, value


def load_config(method: Optional[str] = None, config: Optional[str] = None,
                overrides: Sequence[str] = (), data: Optional[str] = None) -> TrainConfig:
    """Build a checked :class:`TrainConfig`.

    Order: dataclass defaults < the default recipe (only when neither ``method`` nor ``config`` is
    given) < the ``config`` YAML < ``method`` < ``data`` < ``overrides``.
    """
    from .methods import get_method

    if config is None and method is None:
        config = DEFAULT_RECIPE
    doc: Dict[str, Any] = _read_yaml(find_recipe(config)) if config is not None else {}
    src = config or "<defaults>"

    method_name = method or doc.get("method") or DEFAULT_METHOD
    if not isinstance(method_name, str):
        raise ConfigError(f"{src}: method must be a string, got {method_name!r}")
    if method and doc.get("method") and doc["method"] != method:
        raise ConfigError(f"--method {method} contradicts method: {doc['method']} in {src}")
    try:
        method_cls = get_method(method_name)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if method_cls.Config is None or not dataclasses.is_dataclass(method_cls.Config):
        raise ConfigError(f"method {method_name!r} has no Config dataclass")

    merged = _schema(method_cls)
    for key, value in _leaves({k: v for k, v in doc.items() if k not in ("method", "method_name")}):
        head, _, rest = key.partition(".")
        _set(merged, f"method.{rest}" if head == "method_cfg" else key, value, key)
    if data is not None:
        _set(merged, "data.data", data, "--data")
    for item in overrides:
        target, shown, value = _override_pair(item)
        if isinstance(value, dict) and value:  # e.g. model={depth: 2}
            for sub, v in _leaves(value, target):
                _set(merged, sub, v, shown + sub[len(target):])
        else:
            _set(merged, target, value, shown)

    cfg = _build(merged)
    check_train_config(cfg)
    try:
        method_cls.check_config(cfg)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"method {method_cls.name}: {e}") from None
    return cfg


def config_to_dict(cfg: TrainConfig) -> Dict[str, Any]:
    """A YAML-able mapping in recipe layout (method name + method_cfg section)."""
    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (tuple, list)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    out = {"method": cfg.method_name}
    for f in dataclasses.fields(cfg):
        if f.name == "method_name":
            continue
        out["method_cfg" if f.name == "method" else f.name] = conv(getattr(cfg, f.name))
    return out
