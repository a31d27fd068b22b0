"""Every ``oodforge ...`` command in the README's code blocks runs, in order, in a fresh folder.

As the README says, ``--quick`` is added to the commands that take it (the suites' small subsets and short
training), so the whole list runs in a few minutes; the inputs a user would bring (``some_image.png``,
``my_images/``) are made from the suite's test images first.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from oodforge.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
TAKES_QUICK = ("bench", "train", "export", "synth shift", "synth mix", "synth jigsaw", "demo")

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not os.path.exists("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"),
    reason="Debian's dataset-fashion-mnist is not installed")]


def readme_commands(text: str) -> list[list[str]]:
    """The ``oodforge`` command lines of the README's bash blocks, comments removed, as argv lists."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.strip()
            if line.startswith("oodforge "):
                argv = shlex.split(line, comments=True)[1:]
                sub = " ".join(argv[:2]) if argv[0] == "synth" else argv[0]
                if sub in TAKES_QUICK and "--quick" not in argv:
                    argv.append("--quick")
                commands.append(argv)
    return commands


def test_the_readme_lists_the_main_commands():
    cmds = {" ".join(c[:2]) if c[0] == "synth" else c[0] for c in readme_commands(README.read_text())}
    assert {"bench", "train", "synth shift", "export", "predict", "explain", "detectors"} <= cmds


def test_every_readme_command_runs_in_order(tmp_path, monkeypatch, capsys):
    from oodforge.data.suites import load_suite

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OODFORGE_CACHE", str(tmp_path / "cache"))
    scenes = load_suite("scenes", quick=True).id_test.images[:4].permute(0, 2, 3, 1).numpy()
    Image.fromarray(scenes[0]).save("some_image.png")
    fashion6 = load_suite("fashion6", quick=True).id_test.images[:3, 0].numpy()
    Path("my_images").mkdir()
    for i, img in enumerate(fashion6):
        Image.fromarray(np.asarray(img, np.uint8)).save(f"my_images/{i}.png")
    commands = readme_commands(README.read_text())
    assert len(commands) >= 10
    for argv in commands:
        rc = main(argv)
        out = capsys.readouterr()
        assert rc == 0, f"oodforge {' '.join(argv)} exited {rc}: {out.err[-2000:]}"
    assert Path("explain.png").is_file() and Path("runs/guard.oodf/guard.json").is_file()
    assert Path("runs/mine/results.json").is_file() and Path("runs/my-outliers/store.json").is_file()


def test_the_readme_python_example_runs(tmp_path, monkeypatch):
    """The Python block of "Your own data and model", on the folders ``oodforge suites --example`` writes."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OODFORGE_CACHE", str(tmp_path / "cache"))
    assert main(["suites", "--example", "my-data"]) == 0
    section = README.read_text().split("## Your own data and model", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert namespace["scores"].shape == (200,)
