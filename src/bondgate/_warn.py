"""Warnings attributed to the user's line: the first caller outside bondgate and the libraries it runs inside
(torch's module calls, transformers' ``from_pretrained``, the import system), however deep the call (fixed
``stacklevel`` values pointed into bondgate's own decorators and callers)."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
import warnings


def _skipped() -> tuple[str, ...]:
    dirs = [os.path.dirname(__file__)]
    for name in ("torch", "transformers", "sentence_transformers", "peft", "accelerate"):
        module = sys.modules.get(name)
        if module is not None and getattr(module, "__file__", None):
            dirs.append(os.path.dirname(module.__file__))
    return (*(d + os.sep for d in dirs), contextlib.__file__, functools.__file__, threading.__file__,
            "<frozen importlib")


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` reported at the first frame outside bondgate and the libraries above
    (the outermost frame if every one is theirs)."""
    skip = _skipped()
    frame = sys._getframe(1)
    while frame.f_back is not None and frame.f_code.co_filename.startswith(skip):
        frame = frame.f_back
    glob = frame.f_globals
    # no module_globals: under `python -c` and the REPL, __main__'s loader raises when asked for the source
    warnings.warn_explicit(message, category, frame.f_code.co_filename, frame.f_lineno,
                           module=glob.get("__name__", "<string>"), registry=glob.setdefault("__warningregistry__", {}))
