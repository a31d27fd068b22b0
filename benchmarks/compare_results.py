"""Compare two benchmark / demo output folders number by number (issue 13's demo-identical check).

    .venv/bin/python benchmarks/compare_results.py BEFORE_DIR AFTER_DIR [--out FILE]

Every ``results.json`` under ``BEFORE_DIR`` (``<suite>/results.json`` of a demo, or one run's) is compared
with the file at the same place under ``AFTER_DIR``: every number must be equal (exactly; NaN equals NaN),
except the ones that measure time (``timings`` and any ``*seconds`` / ``images_per_second`` field), which are
listed but not compared. Method keys are compared without their outlier source (``oodforge.keys``):
``shift[layercam+telea]`` after = ``shift`` before, since naming the source is the one intended change.
Strings that differ (cache paths, the run's time stamp) are listed, not counted as differences. The
``scores.npz`` next to each file is compared too: same arrays, bit for bit. Exit status 1 on any difference.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from oodforge.keys import split_key

TIMING_FIELDS = ("timings",)


def plain_key(key: str) -> str:
    """A result key without its outlier source: ``shift[layercam+telea]@oe`` -> ``shift@oe``."""
    spec, _, label = split_key(key)
    return f"{spec}@{label}" if label else spec


def is_timing(path: tuple[str, ...]) -> bool:
    """Whether a field measures time (wall-clock numbers differ between any two runs)."""
    return (bool(path) and path[0] in TIMING_FIELDS) or any(
        p.endswith("seconds") or p == "images_per_second" for p in path)


def walk(a, b, path: tuple[str, ...], report: dict) -> None:
    """Compare ``a`` (before) with ``b`` (after), collecting into ``report``."""
    if isinstance(a, dict) and isinstance(b, dict):
        na, nb = {plain_key(k): v for k, v in a.items()}, {plain_key(k): v for k, v in b.items()}
        renamed = [(k, plain_key(k)) for k in b if plain_key(k) != k]
        report["renamed"].update(renamed)
        for k in sorted(set(na) | set(nb)):
            if k not in na or k not in nb:
                report["missing"].append(("/".join(path + (k,)), "after only" if k in nb else "before only"))
            else:
                walk(na[k], nb[k], path + (k,), report)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            walk(x, y, path + (str(i),), report)
    elif isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        if is_timing(path):
            report["timing"] += 1
            return
        report["numbers"] += 1
        same = (math.isnan(a) and math.isnan(b)) if isinstance(a, float) and math.isnan(a) else a == b
        if not same:
            report["different"].append(("/".join(path), a, b))
    elif a != b:
        (report["strings"] if isinstance(a, str) and isinstance(b, str) else report["different"]).append(
            ("/".join(path), a, b))
    else:
        report["other_equal"] += 1


def compare_scores(before: Path, after: Path, report: dict) -> None:
    """The score arrays of both runs, under keys without the outlier source."""
    with np.load(before) as za, np.load(after) as zb:
        a = {f"{plain_key(k.rpartition('/')[0])}/{k.rpartition('/')[2]}": za[k] for k in za.files}
        b = {f"{plain_key(k.rpartition('/')[0])}/{k.rpartition('/')[2]}": zb[k] for k in zb.files}
    for k in sorted(set(a) | set(b)):
        if k not in a or k not in b:
            report["missing"].append((f"scores.npz/{k}", "after only" if k in b else "before only"))
        elif a[k].shape != b[k].shape or not np.array_equal(a[k], b[k], equal_nan=True):
            report["different"].append((f"scores.npz/{k}", "array", "array"))
        else:
            report["arrays"] += 1
            report["array_values"] += a[k].size


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    p.add_argument("--out", type=Path, default=None, help="also write the report to this file")
    args = p.parse_args(argv)
    lines = [f"before: {args.before}", f"after:  {args.after}", ""]
    failed = False
    files = sorted(args.before.rglob("results.json"))
    if not files:
        lines.append(f"no results.json under {args.before}")
        failed = True
    for fa in files:
        rel = fa.relative_to(args.before)
        fb = args.after / rel
        report = {"numbers": 0, "timing": 0, "other_equal": 0, "arrays": 0, "array_values": 0, "different": [],
                  "missing": [], "strings": [], "renamed": set()}
        if not fb.is_file():
            lines += [f"{rel}: missing after", ""]
            failed = True
            continue
        walk(json.loads(fa.read_text()), json.loads(fb.read_text()), (), report)
        if (fa.parent / "scores.npz").is_file():
            compare_scores(fa.parent / "scores.npz", fb.parent / "scores.npz", report)
        ok = not report["different"] and not report["missing"]
        failed |= not ok
        lines.append(f"{rel}: {'IDENTICAL' if ok else 'DIFFERENT'} -- {report['numbers']} numbers equal of "
                     f"{report['numbers'] + len([d for d in report['different'] if d[1] != 'array'])}; "
                     f"{report['arrays']} score arrays ({report['array_values']} values) bit-identical; "
                     f"{report['timing']} timing numbers not compared")
        for old_new in sorted(report["renamed"]):
            lines.append(f"  renamed key (compared as the old one): {old_new[1]} -> {old_new[0]}")
        for path, a, b in report["different"]:
            lines.append(f"  DIFFERENT {path}: {a!r} before, {b!r} after")
        for path, where in report["missing"]:
            lines.append(f"  MISSING {path}: {where}")
        for path, a, b in report["strings"]:
            lines.append(f"  string differs (not a number; listed only): {path}: {a!r} -> {b!r}")
        lines.append("")
    lines.append("RESULT: " + ("DIFFERENT" if failed else "every number identical (timings excepted)"))
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
