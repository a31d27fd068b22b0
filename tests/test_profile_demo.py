"""benchmarks/profile_demo.py reads the timings run_bench records and tabulates them, cold beside warm."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "profile_demo.py"


def _module():
    spec = importlib.util.spec_from_file_location("profile_demo", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(folder: Path, scale: float) -> None:
    (folder / "fashion").mkdir(parents=True)
    res = {"suite": "fashion", "timings": {"msp": 3.0 * scale, "knn": 1.5 * scale, "job": 5.0 * scale,
                                           "energy@oe": 0.5 * scale, "job@oe": 2.0 * scale},
           "models": {"plain": {"train_seconds": None}, "oe": {"train_seconds": 40.0 * scale}},
           "config": {"shift_synthesis": {"seconds": 10.0 * scale}}}
    (folder / "fashion" / "results.json").write_text(json.dumps(res))


def test_profile_table_cold_and_warm(tmp_path, capsys):
    _run(tmp_path / "cold", 1.0)
    _run(tmp_path / "warm", 0.1)
    mod = _module()
    assert mod.main([str(tmp_path / "cold"), "--warm", str(tmp_path / "warm")]) == 0
    out = capsys.readouterr().out
    assert "| stage | forge SHIFT outliers | 10.0 | 1.0 |" in out
    assert "| stage | train oe | 40.0 | 4.0 |" in out
    assert "| stage | detectors on oe (features included) | 2.0 | 0.2 |" in out
    assert "| detector | `msp` | 3.0 | 0.3 |" in out
    assert "| total | stages | 57.0 | 5.7 |" in out  # 10 + 40 + 5 + 2: the stages, not the detectors twice
    rows = [ln for ln in out.splitlines() if ln.startswith("| detector")]
    assert [r.split("`")[1] for r in rows] == ["msp", "knn", "energy@oe"]  # slowest first
    with pytest.raises(SystemExit, match="no results.json"):
        mod.load_runs(tmp_path / "nothing-here")
