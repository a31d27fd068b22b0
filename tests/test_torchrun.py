"""Issue 25 item 5: ``oodforge bench`` under ``torchrun --nproc-per-node 2`` (gloo on the CPU) writes the scores
of a single-process run, bit for bit: each rank extracts a shard of every dataset into the cache, rank 0
concatenates the parts, fits and scores."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
from PIL import Image

from oodforge.models.backbones import build_model
from oodforge.models.checkpoint import save_checkpoint


def _folder(root, classes: dict[str, int], seed: int):
    rng = np.random.default_rng(seed)
    for c, n in classes.items():
        (root / c).mkdir(parents=True)
        for i in range(n):
            x = rng.integers(0, 256, size=(12, 12), dtype=np.uint8) // (1 + "abc".index(c[0]) if c[0] in "abc" else 1)
            Image.fromarray(x, "L").save(root / c / f"{i}.png")
    return root


def _bench(tmp_path, name, ckpt, data, nproc: int):
    env = {**os.environ, "OODFORGE_CACHE": str(tmp_path / f"cache-{name}"), "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    args = ["-m", "oodforge.cli", "--no-progress", "bench", "--id-train", str(data["train"]), "--id-test",
            str(data["test"]), "--ood", f"noise={data['ood']}", "--checkpoint", str(ckpt), "--methods",
            "msp,energy,knn:k=3,vim", "--no-heldout-val", "--out", str(tmp_path / name)]
    if nproc > 1:
        args = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)] + args
    # a session of its own: on a timeout the launcher and its workers are stopped together
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    return np.load(tmp_path / name / "scores.npz"), tmp_path / f"cache-{name}" / "features", out


def test_bench_under_torchrun_with_two_gloo_processes_gives_the_single_process_scores(tmp_path):
    data = {"train": _folder(tmp_path / "train", {"a": 40, "b": 40, "c": 40}, 0),
            "test": _folder(tmp_path / "test", {"a": 15, "b": 15, "c": 15}, 1),
            "ood": _folder(tmp_path / "ood", {"x": 30}, 2)}
    torch_model = build_model("small_resnet", 3, 1, (0.5,), (0.25,))
    ckpt = save_checkpoint(torch_model, tmp_path / "ckpt", {"class_names": ["a", "b", "c"]})
    one, _, _ = _bench(tmp_path, "one", ckpt, data, 1)
    two, cache, log = _bench(tmp_path, "two", ckpt, data, 2)
    assert "features of 4 dataset(s) extracted in 2 processes" in log  # train, val, test, noise: from the parts
    assert sorted(one.files) == sorted(two.files) and len(one.files) >= 8
    for k in one.files:
        np.testing.assert_array_equal(two[k], one[k], err_msg=k)
    entries = sorted(p.name for p in cache.iterdir())
    assert entries and all(e.endswith(".features") for e in entries)  # parts merged and removed, no temp folder
