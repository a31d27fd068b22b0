"""Profile of a demo (or any bench) run: seconds per stage and per detector, cold and warm, as markdown.

A thin reader of the timings that :func:`oodforge.bench.run_bench` already records in ``results.json``
(no timing logic of its own): ``timings[method]`` (fit and score, including the feature passes the method
was the first to need), ``timings["job[@label]"]`` (a whole backbone), ``models[label]["train_seconds"]``
(classifier training, absent when the zoo's checkpoint was used) and ``config["shift_synthesis"]["seconds"]``
(the demo's outlier forging). Give a run folder (``runs/demo``: one ``<suite>/results.json`` each) or
``results.json`` files; ``--warm`` the same for a second run (features, models and stores cached):

    .venv/bin/python benchmarks/profile_demo.py runs/demo-cold --warm runs/demo-warm [--out profile.md]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load_runs(path: str | Path) -> dict[str, dict]:
    """``{suite: results}`` of a results.json file or of every ``*/results.json`` (and ``results.json``) in a folder."""
    p = Path(path)
    files = [p] if p.is_file() else sorted([*p.glob("results.json"), *p.glob("*/results.json")])
    if not files:
        raise SystemExit(f"error: {path}: no results.json there (give a bench/demo output folder or the file)")
    out = {}
    summary = p / "summary.json" if p.is_dir() else None  # the demo's: each suite's wall clock ("seconds")
    walls = {n: v.get("seconds") for n, v in json.loads(summary.read_text()).items()} if summary and summary.exists() else {}
    for f in files:
        res = json.loads(f.read_text())
        if "timings" not in res:
            raise SystemExit(f"error: {f} has no 'timings' (written by an oodforge older than the timings field)")
        name = res.get("suite", f.parent.name)
        out[name] = {**res, "seconds": walls[name]} if walls.get(name) is not None else res
    return out


def stage_rows(res: dict) -> list[tuple[str, str, float]]:
    """``(kind, name, seconds)``: synthesis, training per backbone, each job, each detector."""
    rows = []
    synth = (res.get("config") or {}).get("shift_synthesis") or {}
    if "seconds" in synth:
        rows.append(("stage", "forge SHIFT outliers", float(synth["seconds"])))
    for label, info in (res.get("models") or {}).items():
        if isinstance(info, dict) and info.get("train_seconds") is not None and not info.get("zoo"):
            rows.append(("stage", f"train {label}", float(info["train_seconds"])))  # the zoo's were not run here
    timings = res["timings"]
    for key, sec in timings.items():
        if key == "job" or key.startswith("job@"):
            rows.append(("stage", f"detectors on {key.partition('@')[2] or 'plain'} (features included)", float(sec)))
    if "seconds" in res:  # the demo's wall clock per suite (summary.json): what the stages above leave out
        staged = sum(s for k, _, s in rows if k == "stage")
        rows.append(("stage", "the rest (loading, held-out outliers, report: intervals and plots)",
                     float(res["seconds"]) - staged))
    for key, sec in sorted(timings.items(), key=lambda kv: -kv[1]):
        if not (key == "job" or key.startswith("job@")):
            rows.append(("detector", key, float(sec)))
    return rows


def table(cold: dict[str, dict], warm: dict[str, dict] | None) -> str:
    lines = []
    for suite, res in cold.items():
        w = {(k, n): s for k, n, s in stage_rows(warm[suite])} if warm and suite in warm else {}
        lines += [f"### {suite}", "", "| | | cold s | warm s |" if warm else "| | | s |",
                  "|---|---|---:|---:|" if warm else "|---|---|---:|"]
        total = 0.0
        for kind, name, sec in stage_rows(res):
            total += sec if kind == "stage" else 0.0
            cells = [kind, f"`{name}`" if kind == "detector" else name, f"{sec:.1f}"]
            if warm:
                cells.append(f"{w[(kind, name)]:.1f}" if (kind, name) in w else "-")
            lines.append("| " + " | ".join(cells) + " |")
        wt = sum(s for (k, _), s in w.items() if k == "stage")
        lines += [f"| total | stages | {total:.1f} |" + (f" {wt:.1f} |" if warm else ""), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cold", help="run folder or results.json of the cold run")
    ap.add_argument("--warm", help="run folder or results.json of a warm run (same command again)")
    ap.add_argument("--out", type=Path, help="write the markdown here (default: print it)")
    a = ap.parse_args(argv)
    text = table(load_runs(a.cold), load_runs(a.warm) if a.warm else None)
    if a.out:
        a.out.write_text(text + "\n")
    else:
        sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
