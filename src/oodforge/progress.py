"""Progress bars and the resume hint, shared by every long loop.

Bars are shown only when standard error is a terminal and ``--no-progress`` (or ``OODFORGE_NO_PROGRESS=1``)
is not set: in a log file a bar rewritten ten times a second floods the log, so there a long run prints
only its own summary lines. Loops call :func:`progress_bar` exactly like ``tqdm`` (a ``disable=`` they pass
is kept and combined with this switch).

:func:`note_resume` records what a killed or interrupted run keeps (the training state, the outlier store)
so that ``cli.main`` can say where the run stopped and how to resume it.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

from tqdm.auto import tqdm

_enabled: bool = True
_resume: list[str] = []


def set_progress(enabled: bool) -> None:
    """Turn every progress bar on or off for this process (``--no-progress``)."""
    global _enabled
    _enabled = bool(enabled)


@contextmanager
def bars(enabled: bool):
    """Within the block, bars are shown only if ``enabled`` (and they were on): a function given
    ``progress=False`` silences every bar below it, the detectors' own included."""
    global _enabled
    before = _enabled
    _enabled = before and bool(enabled)
    try:
        yield
    finally:
        _enabled = before


def progress_on() -> bool:
    if not _enabled or os.environ.get("OODFORGE_NO_PROGRESS", "") not in ("", "0"):
        return False
    return sys.stderr.isatty()


def progress_bar(iterable=None, **kwargs):
    """``tqdm(iterable, **kwargs)``, disabled when bars are off (see the module docstring)."""
    kwargs["disable"] = bool(kwargs.get("disable", False)) or not progress_on()
    return tqdm(iterable, **kwargs)


def note_resume(text: str) -> None:
    """Record what the running command keeps if it is stopped now (e.g. 'training state in runs/x')."""
    if text not in _resume:
        _resume.append(text)


def resume_notes() -> list[str]:
    return list(_resume)


__all__ = ["set_progress", "bars", "progress_on", "progress_bar", "note_resume", "resume_notes"]
