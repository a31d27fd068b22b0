"""Killed and interrupted runs through the real command line, in fresh processes.

* ``oodforge train`` killed with SIGKILL after its first epoch resumes, when the same command is run again,
  to weights bit-identical to an uninterrupted run's;
* Ctrl-C (SIGINT) prints what was kept and how to resume, and exits 130;
* the same ``bench`` command in two fresh processes writes bit-identical scores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not os.path.exists("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"),
    reason="Debian's dataset-fashion-mnist is not installed")]

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OODFORGE_NO_PROGRESS": "1"}


def _train_cmd(out: Path) -> list[str]:
    return [sys.executable, "-m", "oodforge.cli", "train", "--suite", "fashion6", "--quick", "--max-train", "600",
            "--epochs", "4", "--seed", "3", "--out", str(out)]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {path} appeared: {proc.stderr.read()[-2000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.05)


def test_killed_training_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path):
    ref = subprocess.run(_train_cmd(tmp_path / "ref"), capture_output=True, text=True, env=ENV)
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    _wait_for(out / "train_state.pt", proc)  # written atomically after epoch 1
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "model.safetensors").exists()
    resumed = subprocess.run(_train_cmd(out), capture_output=True, text=True, env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    meta = [json.loads((d / "meta.json").read_text()) for d in (tmp_path / "ref", out)]
    assert meta[0]["weights_hash"] == meta[1]["weights_hash"]
    assert not (out / "train_state.pt").exists()


def _default_sigint() -> None:
    """Test workers (pytest-xdist) may ignore SIGINT, and a child inherits that: give the run the default a
    user's terminal gives it, so Python turns Ctrl-C into KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_says_what_was_kept_and_how_to_resume(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            preexec_fn=_default_sigint)
    _wait_for(out / "train_state.pt", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "train_state.pt" in err and "same command" in err
    assert "Traceback" not in err


def test_same_bench_command_gives_identical_scores_in_fresh_processes(tmp_path):
    ck, store = tmp_path / "ck", tmp_path / "store"
    train = [sys.executable, "-m", "oodforge.cli", "train", "--suite", "fashion6", "--quick", "--epochs", "1",
             "--max-train", "300", "--out", str(ck)]
    assert subprocess.run(train, capture_output=True, env=ENV).returncode == 0
    forge = [sys.executable, "-m", "oodforge.cli", "synth", "shift", "--data", "fashion6", "--quick", "--masker",
             "layercam", "--inpainter", "telea", "--checkpoint", str(ck), "--limit", "200", "--out", str(store)]
    r = subprocess.run(forge, capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    scores = []
    for run in ("a", "b"):
        cmd = [sys.executable, "-m", "oodforge.cli", "bench", "--suite", "fashion6", "--quick", "--checkpoint", str(ck),
               "--methods", "msp,knn,shift:epochs=3", "--seed", "2", "--outliers", str(store), "--out",
               str(tmp_path / run)]
        r = subprocess.run(cmd, capture_output=True, text=True, env={**ENV, "OODFORGE_CACHE": str(tmp_path / run)})
        assert r.returncode == 0, r.stderr[-2000:]
        scores.append(np.load(tmp_path / run / "scores.npz"))
    assert sorted(scores[0].files) == sorted(scores[1].files)
    for key in scores[0].files:
        np.testing.assert_array_equal(scores[0][key], scores[1][key], err_msg=key)
