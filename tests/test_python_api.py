"""The short Python path (oodforge.api): the README's "Python API" example runs verbatim and writes a guard that
``oodforge predict`` serves; the three calls agree with the library's own parts."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"


def python_api_blocks() -> list[str]:
    section = README.read_text().split("## Python API\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_import_oodforge_stays_cheap():
    code = "import sys, oodforge; assert 'torch' not in sys.modules and 'fit' in dir(oodforge)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_readme_example_runs_verbatim_and_predict_serves_its_guard(tmp_path, monkeypatch, capsys):
    from oodforge.cli import main
    from oodforge.deploy import GuardedClassifier
    from oodforge.metrics import evaluate

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    module, script = python_api_blocks()[:2]
    assert module.startswith("# my_nets.py")
    Path("my_nets.py").write_text(module)
    namespace: dict = {}
    exec(compile(script, "README.md", "exec"), namespace)
    table, detector = namespace["table"], namespace["detector"]
    assert list(table) == ["digits 5-9"] and 0 <= table["digits 5-9"]["auroc"] <= 1
    assert table["digits 5-9"] == evaluate(table.scores["id"], table.scores["digits 5-9"])
    assert "AUROC" in capsys.readouterr().out and detector.fitted_ and detector.name == "vim"

    guard = GuardedClassifier.load("guard.oodf")
    assert guard.image_shape == (1, 16, 16) and guard.class_names == [str(i) for i in range(5)]
    # the deployment's calibration rule (split conformal) on the calibration loader's scores, saved with them
    from oodforge.deploy.conformal import calibrate

    calib = detector.score(namespace["calib"])
    assert guard.threshold == pytest.approx(calibrate(calib, 0.95).threshold)
    assert guard.calibration["rule"] == "split-conformal" and guard.calibration["n"] == 100
    np.testing.assert_allclose(guard.calibration_scores, np.sort(calib))
    # images as files: the loaders' pixels before Normalize (the transform without its last step)
    digits, test_idx = namespace["digits"], namespace["known"][300:306]
    Path("my_images").mkdir()
    x = namespace["transform"](digits.images[test_idx[0]])
    pixels = []
    for k, i in enumerate(test_idx):
        p = (namespace["transform"](digits.images[i]) * 0.25 + 0.5).clamp(0, 1)
        u8 = np.round(p[0].numpy() * 255).astype(np.uint8)
        Image.fromarray(u8).save(f"my_images/{k}.png")
        pixels.append(u8)
    assert x.shape == (1, 16, 16)
    rc = main(["--no-progress", "predict", "guard.oodf", "my_images", "--json"])
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert rc == 0 and lines[-1]["summary"]["images"] == 6
    import torch

    want = guard.predict(torch.from_numpy(np.stack(pixels)[:, None]).float().div(255))
    got = {Path(r["file"]).name: r for r in lines[:-1]}
    for k in range(6):
        r = got[f"{k}.png"]
        assert r["id_score"] == pytest.approx(float(want.id_score[k]), abs=1e-9)
        assert r["accepted"] == bool(want.accepted[k]) and r["class_index"] == int(want.classes[k])


def test_the_api_agrees_with_the_parts_and_refuses_bad_input(tmp_path):
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    import oodforge
    from oodforge.data.base import ArrayDataset
    from oodforge.detectors import FitContext, create
    from oodforge.models.features import extract_features
    from oodforge.models.wrap import wrap

    torch.manual_seed(0)
    net = torch.nn.Module()
    net.layer4 = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU())
    net.avgpool, net.fc = torch.nn.AdaptiveAvgPool2d(1), torch.nn.Linear(8, 3)
    net.forward = lambda x: net.fc(net.avgpool(net.layer4(x)).flatten(1))
    model = wrap(net.eval(), input_size=(8, 8))
    x = torch.randint(0, 256, (60, 3, 8, 8), dtype=torch.uint8)
    y = torch.arange(60) % 3
    loader = DataLoader(TensorDataset(x, y), batch_size=16)  # uint8 tensors: raw pixels
    det = oodforge.fit(model, loader, method="knn:k=5")
    ref = create("knn", k=5).fit(FitContext(model=model, train=extract_features(model, ArrayDataset(x, y),
                                                                                 progress=False)))
    np.testing.assert_array_equal(det.score(loader), ref.score(extract_features(model, ArrayDataset(x, y),
                                                                                progress=False)))
    with pytest.raises(ValueError, match="non-empty dict"):
        oodforge.evaluate(det, loader, [loader])
    with pytest.raises(ValueError, match="not fitted"):
        oodforge.guard(model, create("msp"), loader)
    with pytest.raises(ValueError, match="calibration"):  # 60 images cannot give a PAC guarantee at 0.999
        oodforge.guard(model, det, loader, target=0.999, confidence=0.99)
    with pytest.raises(ValueError, match="factory"):  # wrapped in Python without a factory: cannot be rebuilt
        oodforge.guard(model, det, loader, target=0.9).save(tmp_path / "g.oodf")
    assert not (tmp_path / "g.oodf").exists()
    with pytest.raises(KeyError, match="unknown detector"):
        oodforge.fit(model, loader, method="nope")
