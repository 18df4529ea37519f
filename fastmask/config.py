"""Training configuration: dataclasses, YAML recipes and ``key=value`` overrides.

A run is described by one :class:`TrainConfig`::

    method: dino                # the method's name (fastmask.methods registry)
    epochs: 100
    model:   {arch: vit_small, patch_size: 16, img_size: 224, drop_path_rate: 0.1}
    data:    {...}              # fastmask.data.DataConfig fields
    optim:   {lr: 0.0005, warmup_epochs: 10, ...}
    method_cfg: {...}           # the method's own Config dataclass (e.g. DINOConfig)

Everything is checked before training starts: unknown keys (with a "did you mean" hint), values of
the wrong type and values out of range raise :class:`ConfigError` (a ``ValueError``) naming the
offending key.  CLI overrides use dotted keys, ``optim.lr=1e-3``, ``method.student_mask_ratio=0.3``
(``method.`` and ``method_cfg.`` both address the method's options); values are parsed as YAML.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import yaml

__all__ = [
    "ConfigError",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "RECIPE_DIR",
    "config_to_dict",
    "find_recipe",
    "load_config",
]

RECIPE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes")
DEFAULT_METHOD = "dino"
DEFAULT_RECIPE = "dino_tiny_builtin.yaml"


class ConfigError(ValueError):
    """A bad recipe, an unknown key or a value of the wrong type/range."""


@dataclass
class ModelConfig:
    arch: str = "vit_small"  # fastmask.models.create_vit name: vit_tiny / vit_small / vit_base / vit_large
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

    def __post_init__(self):
        from .engine.optim import CLIP_MODES, DECAY_GROUPS

        if self.clip_mode not in CLIP_MODES:
            raise ValueError(f"clip_mode must be one of {CLIP_MODES}, got {self.clip_mode!r}")
        if self.decay_groups not in DECAY_GROUPS:
            raise ValueError(f"decay_groups must be one of {DECAY_GROUPS}, got {self.decay_groups!r}")


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
    amp: str = "auto"  # auto (bf16 on GPU, off on CPU) / bf16 / fp16 / off
    compile: bool = False
    log_every: int = 10
    eval_every: int = 1  # epochs between k-NN evaluations (0: only at the end)
    knn_k: int = 20
    knn_temperature: float = 0.07
    knn_max_train: int = 0  # >0: cap on the number of train images used as the k-NN memory bank
    attn_images: int = 4  # validation images in the attention-map grid (0 disables)
    save_every: int = 1  # epochs between checkpoints
    resume: str = ""  # "" (fresh run), "auto" (output_dir/checkpoint.pt if present) or a path
    progress_bar: bool = True
    tensorboard: bool = True
    deterministic: bool = False
    # fastmask.ops value checks (index range, NaN scores) sync with the device: keep them for the
    # first step (inputs are checked once), then follow this setting.
    value_checks: bool = False


_TOP_LEVEL_ALIASES = {"method": "method_name", "method_cfg": "method"}
_SECTION_ALIASES = {"method_cfg": "method"}


# ------------------------------------------------------------------------------------- helpers

def _data_config_cls():
    try:
        from .data import DataConfig
    except ImportError as e:  # pragma: no cover - only while fastmask.data is missing
        raise ConfigError(f"fastmask.data.DataConfig is not importable ({e})") from e
    return DataConfig


def _suggest(key: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{hint} (known keys: {', '.join(sorted(known))})"


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, where: str):
    """Check ``value`` against the annotation ``tp``; convert the harmless cases (int -> float,
    list -> tuple, "1e-3" -> 1e-3).  Raises ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any or tp is typing.Any:
        return value
    if origin is Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin in (tuple, list, Tuple, List):
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin in (tuple, Tuple) and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)} ({value!r})")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin in (tuple, Tuple) else out
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (bool, int, float)) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, bool):  # `amp: off` parses as False in YAML
            return "on" if value else "off"
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build_dataclass(tp, value, where)
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


def _hints(cls) -> Dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # unresolvable annotations: fall back to raw ones
        return {f.name: f.type for f in dataclasses.fields(cls)}


def _build_dataclass(cls, values: Dict[str, Any], where: str):
    """Instantiate dataclass ``cls`` from a mapping, rejecting unknown keys."""
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    obj = cls()
    for key, value in (values or {}).items():
        if key not in names:
            raise ConfigError(f"unknown key {where + '.' if where else ''}{key}{_suggest(key, names)}")
        setattr(obj, key, _coerce(value, hints.get(key, Any), f"{where}.{key}" if where else key))
    # re-run the dataclass' own validation (if any) on the final values
    post = getattr(obj, "__post_init__", None)
    if post is not None:
        try:
            post()
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{where or cls.__name__}: {e}") from e
    return obj


def _set_dotted(obj, dotted: str, raw, full_key: str):
    parts = dotted.split(".")
    target = obj
    for i, part in enumerate(parts[:-1]):
        if not dataclasses.is_dataclass(target):
            raise ConfigError(f"unknown key {full_key}: {'.'.join(parts[:i])} has no sub-keys")
        names = [f.name for f in dataclasses.fields(target)]
        if part not in names:
            raise ConfigError(f"unknown key {full_key}{_suggest(part, names)}")
        target = getattr(target, part)
    last = parts[-1]
    if not dataclasses.is_dataclass(target):
        raise ConfigError(f"unknown key {full_key}")
    names = [f.name for f in dataclasses.fields(target)]
    if last not in names:
        raise ConfigError(f"unknown key {full_key}{_suggest(last, names)}")
    hint = _hints(type(target)).get(last, Any)
    value = yaml.safe_load(raw) if isinstance(raw, str) else raw
    if isinstance(raw, str) and raw.strip().lower() == "none" and type(None) in typing.get_args(hint):
        value = None  # `key=none` clears an Optional field; for a string field "none" stays a word
    setattr(target, last, _coerce(value, hint, full_key))


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
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: a recipe must be a YAML mapping, got {type(doc).__name__}")
    return doc


def _validate(cfg: TrainConfig) -> None:
    def bad(key, msg):
        raise ConfigError(f"{key}: {msg}")

    if cfg.epochs < 1:
        bad("epochs", f"must be >= 1, got {cfg.epochs}")
    if cfg.max_steps < 0:
        bad("max_steps", f"must be >= 0, got {cfg.max_steps}")
    o = cfg.optim
    if o.optimizer.lower() not in ("adamw", "lamb"):
        bad("optim.optimizer", f"must be 'adamw' or 'lamb', got {o.optimizer!r}")
    if not o.lr > 0:
        bad("optim.lr", f"must be > 0, got {o.lr}")
    if o.min_lr < 0 or o.min_lr > o.lr:
        bad("optim.min_lr", f"must be in [0, lr={o.lr}], got {o.min_lr}")
    if o.warmup_epochs < 0 or o.warmup_epochs > cfg.epochs:
        bad("optim.warmup_epochs", f"must be in [0, epochs={cfg.epochs}], got {o.warmup_epochs}")
    if o.weight_decay < 0 or o.weight_decay_end < 0:
        bad("optim.weight_decay", "must be >= 0")
    if o.clip_grad < 0:
        bad("optim.clip_grad", f"must be >= 0 (0 disables), got {o.clip_grad}")
    if o.freeze_last_layer_epochs < 0:
        bad("optim.freeze_last_layer_epochs", f"must be >= 0, got {o.freeze_last_layer_epochs}")
    for k in ("teacher_momentum", "teacher_momentum_end"):
        v = getattr(o, k)
        if not 0.0 <= v <= 1.0:
            bad(f"optim.{k}", f"must be in [0, 1], got {v}")
    for i, b in enumerate(o.betas):
        if not 0.0 <= b < 1.0:
            bad(f"optim.betas[{i}]", f"must be in [0, 1), got {b}")
    m = cfg.model
    if m.patch_size < 1:
        bad("model.patch_size", f"must be >= 1, got {m.patch_size}")
    if m.img_size % m.patch_size:
        bad("model.img_size", f"{m.img_size} is not divisible by model.patch_size={m.patch_size}")
    if not 0.0 <= m.drop_path_rate < 1.0:
        bad("model.drop_path_rate", f"must be in [0, 1), got {m.drop_path_rate}")
    if m.drop_path_schedule not in ("linear", "constant"):
        bad("model.drop_path_schedule", f"must be 'linear' or 'constant', got {m.drop_path_schedule!r}")
    if m.checkpoint and not os.path.isfile(m.checkpoint):
        bad("model.checkpoint", f"file not found: {m.checkpoint}")
    if cfg.amp.lower() not in ("auto", "bf16", "fp16", "off", "on"):
        bad("amp", f"must be one of auto, bf16, fp16, off; got {cfg.amp!r}")
    dev = cfg.device.lower()
    if not (dev in ("auto", "cpu", "cuda") or dev.startswith("cuda:")):
        bad("device", f"must be auto, cpu, cuda or cuda:N; got {cfg.device!r}")
    if cfg.knn_k < 1:
        bad("knn_k", f"must be >= 1, got {cfg.knn_k}")
    if not cfg.knn_temperature > 0:
        bad("knn_temperature", f"must be > 0, got {cfg.knn_temperature}")
    for k in ("log_every", "save_every"):
        if getattr(cfg, k) < 1:
            bad(k, f"must be >= 1, got {getattr(cfg, k)}")
    if cfg.eval_every < 0:
        bad("eval_every", f"must be >= 0, got {cfg.eval_every}")
    d = cfg.data
    img = getattr(d, "image_size", None)
    if img is not None and img != m.img_size:
        bad("data.image_size", f"{img} differs from model.img_size={m.img_size}; set both to the same value")
    if cfg.resume not in ("", "auto") and not os.path.isfile(cfg.resume):
        bad("resume", f"checkpoint not found: {cfg.resume!r} (use resume=auto to resume from output_dir if present)")


# ------------------------------------------------------------------------------------- public

def load_config(method: Optional[str] = None, config: Optional[str] = None,
                overrides: Sequence[str] = (), data: Optional[str] = None) -> TrainConfig:
    """Build a validated :class:`TrainConfig`.

    Order: dataclass defaults < the method's default recipe (only when neither ``method`` nor
    ``config`` is given) < the ``config`` YAML < ``method`` < ``data`` < ``overrides``.
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
        raise ConfigError(str(e)) from e
    if method_cls.Config is None or not dataclasses.is_dataclass(method_cls.Config):
        raise ConfigError(f"method {method_name!r} has no Config dataclass")

    data_cls = _data_config_cls()
    cfg = TrainConfig()
    cfg.method_name = method_cls.name
    cfg.data = data_cls()
    cfg.method = method_cls.Config()

    top_names = [f.name for f in dataclasses.fields(TrainConfig)] + list(_TOP_LEVEL_ALIASES)
    hints = _hints(TrainConfig)
    for key, value in doc.items():
        name = _TOP_LEVEL_ALIASES.get(key, key)
        if key not in top_names:
            raise ConfigError(f"{src}: unknown key {key}{_suggest(key, top_names)}")
        if name == "method_name":
            continue
        if name == "model":
            cfg.model = _build_dataclass(ModelConfig, value, "model")
        elif name == "optim":
            cfg.optim = _build_dataclass(OptimConfig, value, "optim")
        elif name == "data":
            cfg.data = _build_dataclass(data_cls, value, "data")
        elif name == "method":
            cfg.method = _build_dataclass(method_cls.Config, value, "method_cfg")
        else:
            setattr(cfg, name, _coerce(value, hints[name], name))

    if data is not None:
        _set_data_source(cfg, data)

    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. optim.lr=1e-3)")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        head, _, rest = key.partition(".")
        if head in _SECTION_ALIASES and rest:
            head = _SECTION_ALIASES[head]
        elif head == "method" and not rest:
            raise ConfigError("the method is chosen with --method NAME, not method=...")
        dotted = f"{head}.{rest}" if rest else head
        _set_dotted(cfg, dotted, raw, key)

    # dataclass-level validation for sections changed by overrides
    for section in (cfg.model, cfg.optim, cfg.data, cfg.method):
        post = getattr(section, "__post_init__", None)
        if post is not None:
            try:
                post()
            except (ValueError, TypeError) as e:
                raise ConfigError(f"{type(section).__name__}: {e}") from e
    _validate(cfg)
    try:
        method_cls.check_config(cfg)
    except (ValueError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"method {method_cls.name}: {e}") from e
    return cfg


def _set_data_source(cfg: TrainConfig, data: str) -> None:
    """``--data`` sets the dataset field of the DataConfig, whatever the data module calls it."""
    names = [f.name for f in dataclasses.fields(cfg.data)]
    for cand in ("data", "dataset", "root", "source", "path"):
        if cand in names:
            setattr(cfg.data, cand, data)
            return
    raise ConfigError(f"DataConfig has no dataset/root field to receive --data {data!r}")


def config_to_dict(cfg: TrainConfig) -> Dict[str, Any]:
    """A YAML-able mapping in recipe layout (method name + method_cfg section)."""
    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        if isinstance(v, list):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    out = {"method": cfg.method_name}
    for f in dataclasses.fields(cfg):
        if f.name in ("method_name",):
            continue
        key = "method_cfg" if f.name == "method" else f.name
        out[key] = conv(getattr(cfg, f.name))
    return out
