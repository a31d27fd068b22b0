"""Output folders (``--out``): oodforge writes only into folders it owns and never deletes what it did not write.

An output folder may be

* **new**: it is created at once (so an unwritable place such as ``/proc/x`` is refused before any work);
* **empty**;
* **oodforge's**: it holds the marker file :data:`MARKER` (``.oodforge-out``), written by every command into
  every output folder it creates or takes over, or it is an output of an oodforge that predates the marker
  (a guard's ``guard.json``, a benchmark's ``results.json``, a checkpoint's ``meta.json``, an outlier store's
  ``store.json``, recognised by their content).

Anything else is refused with one line naming the folder. While a command runs it holds an exclusive lock on
the marker (``flock``), so a second run on the same folder is refused instead of mixing two runs' files; the
lock ends with the process (or :func:`release_out_dirs`, which ``oodforge.cli.main`` calls after every
command). A command that fails removes the folders it created as long as they hold nothing but the marker,
so refused input leaves no trace. Deleting stale files (e.g. old plots) is allowed only in folders
:func:`is_ours` says oodforge owns.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

try:  # POSIX; on other systems concurrent runs are not detected
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = ["MARKER", "OutDirError", "is_ours", "claim_out_dir", "mark_out_dir", "release_out_dirs"]

MARKER = ".oodforge-out"

#: folders this process holds: resolved path -> (lock file descriptor or None, folders it created)
_HELD: dict[Path, tuple[int | None, list[Path]]] = {}


class OutDirError(ValueError):
    """An output folder oodforge may not use (the message names it and says what to do); the command line
    prints it as one ``error:`` line with exit code 2, like :class:`oodforge.checks.InputError`."""


def _json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _legacy_output(folder: Path) -> bool:
    """An output folder written by oodforge before the marker existed, recognised by its manifest's content."""
    if _json(folder / "guard.json").get("format") == "oodforge-guard":
        return True
    if {"suite", "methods"} <= set(_json(folder / "results.json")):
        return True
    if {"arch", "class_names"} <= set(_json(folder / "meta.json")):
        return True
    return "config" in _json(folder / "store.json")


def is_ours(folder: str | os.PathLike) -> bool:
    """True when ``folder`` is an oodforge output folder (it has the marker, or is a pre-marker output)."""
    folder = Path(folder)
    return folder.is_dir() and ((folder / MARKER).is_file() or _legacy_output(folder))


def _write_marker(folder: Path, command: str) -> None:
    from . import __version__

    doc = {"written_by": f"oodforge {__version__}", "command": command, "pid": os.getpid(),
           "note": "oodforge writes into and replaces files only in folders holding this file"}
    with open(folder / MARKER, "a+") as f:
        f.seek(0)
        f.truncate()
        f.write(json.dumps(doc) + "\n")


def _lock(fd: int, folder: Path, option: str) -> None:
    """An exclusive, non-blocking lock on the marker's open file ``fd``: a second run on the folder is refused."""
    if fcntl is None:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        pid = _json(folder / MARKER).get("pid")
        raise OutDirError(f"{option} {folder}: another oodforge run{f' (pid {pid})' if pid else ''} is writing to "
                         "this folder; wait for it to finish or give another folder") from None


def claim_out_dir(path: str | os.PathLike, option: str = "--out", command: str | None = None) -> Path:
    """Make ``path`` this run's output folder: refuse a file, a folder holding files oodforge did not write, an
    uncreatable or unwritable place, and a folder another run holds; create it, mark it and lock it."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise OutDirError(f"{option} {p} is a file; give a folder path (it is created if missing)")
    if p.exists() and p.resolve() in _HELD:
        return p
    if p.is_dir() and not is_ours(p):
        try:
            names = sorted(q.name for q in p.iterdir())
        except OSError as e:
            raise OutDirError(f"{option} {p}: cannot read the folder ({e.strerror}); choose another folder") from None
        if names:
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            raise OutDirError(f"{option} {p} already holds files oodforge did not write ({shown}); give a new or "
                             "empty folder (oodforge never overwrites or deletes what it did not write)")
    missing = [q for q in (p.absolute(), *p.absolute().parents) if not q.exists()]
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd = os.open(p / MARKER, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        _remove_created(missing)
        raise OutDirError(f"{option} {p}: cannot create or write this folder ({e.strerror or e}); choose another "
                         "folder") from None
    try:
        _lock(fd, p, option)
    except OutDirError:
        _remove_created(missing)
        raise
    _write_marker(p, command or "oodforge " + " ".join(sys.argv[1:]))  # with the lock holder's pid
    if fcntl is None:
        os.close(fd)
        fd = None
    _HELD[p.resolve()] = (fd, missing)
    return p


def mark_out_dir(folder: str | os.PathLike, command: str = "oodforge (Python API)") -> Path:
    """Create ``folder`` if needed and mark it as oodforge's when it is new or empty (an API caller's output
    folder, e.g. ``run_bench(out=...)``); a folder that already holds other files is left unmarked."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / MARKER).exists() and not any(folder.iterdir()):
        _write_marker(folder, command)
    return folder


def _remove_created(created: list[Path]) -> None:
    """Remove the folders a run created (deepest first) when they hold nothing but the marker."""
    for q in created:  # ordered deepest first
        try:
            if (q / MARKER).is_file() and [c.name for c in q.iterdir()] == [MARKER]:
                (q / MARKER).unlink()
            q.rmdir()  # only an empty folder
        except OSError:
            return


def release_out_dirs(failed: bool = False) -> None:
    """Unlock every folder this process claimed; after a failed run, remove those it created and left empty."""
    for _, (fd, created) in list(_HELD.items()):
        if fd is not None:
            os.close(fd)
        if failed:
            _remove_created(created)
    _HELD.clear()
