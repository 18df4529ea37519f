"""One error path for every fastmask command line: a user mistake is one line on stderr,
``<prog>: <what is wrong and how to fix it>``, and exit status 2 (argparse's convention), found
before anything is written to disk.  ``FASTMASK_DEBUG=1`` shows the traceback instead.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable, Iterator, Optional, Sequence


class UsageError(Exception):
    """A mistake in what the user asked for (arguments, config, paths, data); the message says how
    to fix it."""


def _user_error_types():
    # Imported lazily: each module is only needed by the commands that raise it.
    from .data.folder import DatasetError

    types = [UsageError, DatasetError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError]
    try:
        from .config import ConfigError

        types.append(ConfigError)
    except ImportError:  # pragma: no cover - config is always there
        pass
    return tuple(types)


# What goes wrong while reading a checkpoint and the data a command runs on: each is the user's file
# or choice (eval, export and attention_maps say so in one line).
CHECKPOINT_ERRORS = (FileNotFoundError, ValueError, KeyError, RuntimeError)


@contextlib.contextmanager
def as_usage_errors(types: tuple = CHECKPOINT_ERRORS) -> Iterator[None]:
    """Inside the block, ``types`` are user mistakes: raised again as a one-line UsageError."""
    try:
        yield
    except types as exc:
        raise UsageError(one_line(exc)) from exc


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (multi-line messages are joined with ' | ')."""
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, (FileNotFoundError, PermissionError)) and exc.filename and exc.strerror:
        text = f"{exc.strerror}: {exc.filename!r}"
    return " | ".join(line.strip() for line in text.splitlines() if line.strip())


def run(prog: str, main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None,
        extra_user_errors: tuple = ()) -> int:
    """Call ``main(argv)``; user errors become one line and exit status 2."""
    try:
        return main(argv)
    except _user_error_types() + tuple(extra_user_errors) as exc:
        if os.environ.get("FASTMASK_DEBUG", "0") not in ("", "0"):
            raise
        # engine.distributed.EveryRankUsageError: a mistake all ranks of a torchrun job found
        # together; rank 0 says it once, then every rank exits together.
        if getattr(exc, "report_here", True):
            print(f"{prog}: {one_line(exc)}", file=sys.stderr, flush=True)
        finish = getattr(exc, "finish", None)
        if finish is not None:
            finish(2)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def add_checkpoint_arguments(parser, which_help: str = "student / teacher (default: the network the method evaluates)"):
    """CHECKPOINT, ``--which`` and ``--arch``: what the commands that read a checkpoint's backbone
    take (``fastmask.analysis.loading.backbone_from_args`` reads them)."""
    parser.add_argument("checkpoint", help="driver checkpoint.pt or a timm/DeiT/DINO/iBOT weights file")
    parser.add_argument("--which", default=None, help=which_help)
    parser.add_argument("--arch", default=None, help="architecture of a plain weights file (preset or timm name)")
    return parser


def unreadable_checkpoint(path: str, exc: BaseException) -> str:
    """Why ``torch.load(path)`` failed, in words a user can act on (torch's own messages for an
    empty or cut-off file are "Ran out of input" and a zip-reader error without the file name)."""
    try:
        size = os.path.getsize(path)
    except OSError:
        size = None
    if size == 0:
        return f"checkpoint {path!r} is empty (0 bytes): the write that made it was cut off"
    text = str(exc)
    if "zip archive" in text or "central directory" in text or isinstance(exc, EOFError) or "unpickl" in text.lower():
        return (f"checkpoint {path!r} ({size} bytes) is truncated or corrupt and cannot be read "
                f"({type(exc).__name__}: {text.splitlines()[0][:120] if text else 'no message'})")
    return f"cannot read checkpoint {path!r}: {type(exc).__name__}: {text.splitlines()[0] if text else ''}"
