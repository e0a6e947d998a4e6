"""Warnings attributed to the user's line: the first caller outside bondgate and the libraries it runs inside
(torch's module calls, transformers' ``from_pretrained``), however deep the call (fixed ``stacklevel`` values pointed
into bondgate's own decorators and callers)."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import warnings


def _prefixes() -> tuple[str, ...]:
    dirs = [os.path.dirname(__file__)]
    for name in ("torch", "transformers", "sentence_transformers"):
        module = sys.modules.get(name)
        if module is not None and getattr(module, "__file__", None):
            dirs.append(os.path.dirname(module.__file__))
    return (*(d + os.sep for d in dirs), contextlib.__file__, functools.__file__)


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` at the first frame outside bondgate, torch and transformers."""
    skip = _prefixes()
    level, frame = 2, sys._getframe(1)
    while frame.f_back is not None and frame.f_code.co_filename.startswith(skip):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
