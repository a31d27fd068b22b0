"""The one training loop: schedules, the loss hook (plain, SSOD, OE share everything else),
resumption after an interruption, and bit-identical reruns from a fresh process."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from oodforge.data.base import ArrayDataset
from oodforge.models import build_model
from oodforge.models.checkpoint import weights_hash
from oodforge.models.train import CrossEntropy, TrainConfig, lr_factor, run_training
from oodforge.ssod.train import SSODObjective


def _toy_images(n=96, size=12, seed=0):
    """Two classes: a bright square top-left vs bottom-right on a noisy background."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 60, (n, 1, size, size))
    y = np.arange(n) % 2
    for i in range(n):
        r = slice(1, 6) if y[i] == 0 else slice(6, 11)
        x[i, 0, r, r] = 230
    return ArrayDataset(x.astype(np.uint8), y, ["a", "b"], f"toy-squares/n{n}/seed{seed}")


def test_onecycle_schedule_shape():
    cfg = TrainConfig(epochs=1, schedule="onecycle", pct_start=0.2)
    f = [lr_factor(cfg, s, 100, 0) for s in range(100)]
    assert f[0] == pytest.approx(1 / 25)
    assert max(f) == pytest.approx(1.0) and int(np.argmax(f)) == 20  # peak at the end of the warm-up
    assert f[-1] < 1e-3 and all(a >= b for a, b in zip(f[20:], f[21:]))  # then monotone decay
    step = TrainConfig(epochs=1, schedule="step", step_epochs=30)
    assert [lr_factor(step, 0, 100, e) for e in (0, 29, 30, 60)] == [1, 1, 0.5, 0.25]  # SSOD App. A.4
    cos = TrainConfig(epochs=1, schedule="cosine")
    assert lr_factor(cos, 50, 100, 0) == pytest.approx(0.5) and lr_factor(cos, 0, 100, 0) == 1.0


@pytest.mark.parametrize("bad, match", [({"epochs": 0}, "epochs"), ({"optimizer": "rmsprop"}, "optimizer"),
                                        ({"schedule": "linear"}, "schedule"), ({"lr": 0}, "lr")])
def test_config_validation_names_the_setting(bad, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**bad).validate()


def test_ssod_with_alpha_zero_is_exactly_the_plain_loop():
    """The SSOD-vs-plain comparison changes only the loss: with alpha = 0 the backbone ends bit-equal."""
    data = _toy_images()
    torch.manual_seed(0)
    start = build_model("small_resnet", 2, 1)
    plain = build_model("small_resnet", 2, 1)
    plain.load_state_dict(start.state_dict())
    ssod = build_model("ssod:small_resnet", 2, 1)
    ssod.backbone.load_state_dict(start.state_dict())
    cfg = TrainConfig(epochs=2, batch_size=32, optimizer="adamw", lr=1e-3, schedule="cosine", seed=3)
    run_training(plain, data, CrossEntropy(), cfg, progress=False)
    hist = run_training(ssod, data, SSODObjective(alpha=0.0, gamma=0.7), cfg, progress=False)
    for (k, a), b in zip(plain.state_dict().items(), ssod.backbone.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=k)
    assert hist["ood_loss"][-1] > 0 and sum(hist["n_ood"]) + sum(hist["n_id"]) > 0  # the term was computed


class _Interrupting(CrossEntropy):
    """Cross-entropy that raises KeyboardInterrupt at one step (a user's Ctrl-C, a killed job)."""

    def __init__(self, at_step: int | None):
        self.at_step, self.step = at_step, 0

    def loss(self, model, x, y, augment):
        self.step += 1
        if self.at_step is not None and self.step == self.at_step:
            raise KeyboardInterrupt
        return super().loss(model, x, y, augment)


def test_interrupted_training_resumes_to_the_same_weights(tmp_path):
    data = _toy_images()
    cfg = TrainConfig(epochs=3, batch_size=32, seed=1, lr=0.05)

    def fresh():
        torch.manual_seed(0)
        return build_model("small_resnet", 2, 1)

    ref = fresh()
    run_training(ref, data, _Interrupting(None), cfg, progress=False)
    model = fresh()
    with pytest.raises(KeyboardInterrupt):  # dies in epoch 3 (3 batches per epoch: step 8)
        run_training(model, data, _Interrupting(8), cfg, progress=False, state_dir=tmp_path)
    assert (tmp_path / "train_state.pt").is_file()
    lines: list[str] = []
    resumed = fresh()
    hist = run_training(resumed, data, _Interrupting(None), cfg, progress=False, state_dir=tmp_path,
                        log=lines.append)
    assert any("after epoch 2/3" in line for line in lines)
    assert len(hist["loss"]) == 3 and not (tmp_path / "train_state.pt").exists()
    assert weights_hash(resumed) == weights_hash(ref)
    other = TrainConfig(epochs=3, batch_size=16, seed=1, lr=0.05)
    (tmp_path / "x").mkdir()
    with pytest.raises(KeyboardInterrupt):
        run_training(fresh(), data, _Interrupting(4), cfg, progress=False, state_dir=tmp_path / "x")
    with pytest.raises(ValueError, match="another training run"):
        run_training(fresh(), data, CrossEntropy(), other, progress=False, state_dir=tmp_path / "x")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_same_command_gives_bit_identical_weights_in_fresh_processes(tmp_path):
    hashes = []
    for run in ("a", "b"):
        out = tmp_path / run
        cmd = [sys.executable, "-m", "oodforge.cli", "train", "--suite", "fashion6", "--quick", "--max-train", "400",
               "--epochs", "1", "--seed", "5", "--out", str(out)]
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr[-2000:]
        import json

        hashes.append(json.loads((out / "meta.json").read_text())["weights_hash"])
    assert hashes[0] == hashes[1]


def test_lr_is_applied_per_step():
    data = _toy_images(n=64)
    torch.manual_seed(0)
    model = build_model("small_resnet", 2, 1)
    hist = run_training(model, data, CrossEntropy(), TrainConfig(epochs=2, batch_size=32, lr=0.1,
                                                                 schedule="cosine"), progress=False)
    # 4 steps; the lr at the end of epoch 1 is the factor of step 1, at the end of epoch 2 of step 3
    assert hist["lr"][0] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 1 / 4)))
    assert hist["lr"][1] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 3 / 4)))
