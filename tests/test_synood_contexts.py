"""Context labelling (SynOOD Eq. 3) with a tiny random LLaVA built from configs; the resumable JSONL;
and the two SynOOD commands end to end through the ``oodforge`` CLI on tiny models."""

from __future__ import annotations

import json

import numpy as np
import pytest

from oodforge.data.base import ArrayDataset
from oodforge.hub import ModelUnavailableError
from oodforge.synood.contexts import (
    ContextFileError,
    ContextLabeller,
    ContextWriter,
    context_prompt,
    label_contexts,
    parse_context_list,
    read_contexts,
)


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    from oodforge.synood.tiny import build_tiny_vlm

    return str(build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "vlm", seed=0))


def _toy(n=5, channels=1):
    rng = np.random.default_rng(0)
    return ArrayDataset(rng.integers(0, 256, (n, channels, 28, 28), dtype=np.uint8), np.arange(n) % 3,
                        ["T-shirt", "boot", "bag"], identity=f"toy{n}x{channels}")


def test_parse_context_list_and_prompt():
    text = "1. Bamboo\n2. tourist, leaf; railing and Panda.\n- bamboo\n* sky"
    assert parse_context_list(text, exclude="panda") == ["Bamboo", "tourist", "leaf", "railing", "sky"]
    assert parse_context_list("", "x") == []
    assert context_prompt(["grass", "fence"]) == "A photo only remain grass, fence."
    assert context_prompt([]) == "A photo only remain background."
    long = ["x" * 50, "y" * 50]
    p = context_prompt(long)
    assert p == "A photo only remain " + ("x" * 50 + ", " + "y" * 50)[:73] + "."  # reference code: 73 chars


def test_writer_repairs_a_torn_tail_and_keeps_hand_written_lines(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text('{"index": 0, "contexts": ["a"]}\n{"index": 1, "contexts": "b, c"}\n{"index": 2, "conte')
    assert read_contexts(f) == {0: ["a"], 1: ["b", "c"]}
    with ContextWriter(f) as w:
        assert w.done == {0, 1}
        w.write({"index": 2, "contexts": ["d"]})
        with pytest.raises(ContextFileError, match="already labelled"):
            w.write({"index": 0, "contexts": ["e"]})
    assert read_contexts(f) == {0: ["a"], 1: ["b", "c"], 2: ["d"]}
    assert all(json.loads(line) for line in f.read_text().splitlines())
    g = tmp_path / "hand.jsonl"
    g.write_text('{"index": 5, "contexts": ["sky"]}')  # no trailing newline: a complete hand-written line
    with ContextWriter(g) as w:
        w.write({"index": 6, "contexts": ["sea"]})
    assert read_contexts(g) == {5: ["sky"], 6: ["sea"]}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"index": 0, "contexts": ["a"]}\nnot json\n{"index": 2, "contexts": ["b"]}\n')
    with pytest.raises(ContextFileError, match=r"bad.jsonl:2: not valid JSON"):
        read_contexts(bad)
    with pytest.raises(FileNotFoundError, match="oodforge contexts"):
        read_contexts(tmp_path / "missing.jsonl")


def test_missing_vlm_names_the_option():
    with pytest.raises(ModelUnavailableError, match="--vlm"):
        ContextLabeller(None)
    with pytest.raises(ModelUnavailableError, match="does not exist.*--vlm"):
        ContextLabeller("/nonexistent/vlm")


def test_label_contexts_with_a_tiny_vlm_resumes_after_a_kill(tiny_vlm, tmp_path):
    ds = _toy(5)
    labeller = ContextLabeller(tiny_vlm, max_new_tokens=12)
    assert "T-shirt" in labeller._text("T-shirt") and "<image>" in labeller._text("T-shirt")
    out = tmp_path / "contexts.jsonl"
    full = label_contexts(ds, out, labeller, indices=[0, 2, 3, 4], batch_size=2, progress=False)
    assert sorted(full) == [0, 2, 3, 4]
    lines = [json.loads(s) for s in out.read_text().splitlines()]
    assert [e["index"] for e in lines] == [0, 2, 3, 4]
    assert lines[1]["label"] == 2 and lines[1]["class_name"] == "bag" and lines[1]["vlm"] == tiny_vlm
    assert all(isinstance(e["raw"], str) and len(e["raw"]) > 0 for e in lines)  # gibberish, but generated
    assert lines[0]["contexts"] == parse_context_list(lines[0]["raw"], "T-shirt")
    # greedy decoding is deterministic, and an image's answer does not depend on its batch mates
    again = labeller.answer(ds.images[[2]], ["bag"])
    assert again == [lines[1]["raw"]]

    # kill in the middle of writing the third line, then resume
    data = out.read_bytes()
    cut = data.index(b"\n", data.index(b"\n") + 1) + 1 + 10
    out.write_bytes(data[:cut])
    assert sorted(read_contexts(out)) == [0, 2]
    resumed = label_contexts(ds, out, labeller, indices=[0, 1, 2, 3, 4], batch_size=2, progress=False)
    assert sorted(resumed) == [0, 1, 2, 3, 4]
    lines2 = [json.loads(s) for s in out.read_text().splitlines()]
    assert sorted(e["index"] for e in lines2) == [0, 1, 2, 3, 4]  # every image exactly once
    assert {e["index"]: e["raw"] for e in lines2 if e["index"] != 1} == {e["index"]: e["raw"] for e in lines}


def test_cli_contexts_then_synth_synood_on_tiny_models(tiny_vlm, tmp_path):
    """`oodforge contexts` and `oodforge synth synood` end to end (tiny VLM, tiny SD inpainting, a small
    oodforge classifier checkpoint, an .npz dataset)."""
    from typer import testing as typer_testing

    from oodforge.cli import app
    from oodforge.models.backbones import build_model
    from oodforge.models.checkpoint import save_checkpoint
    from oodforge.outliers.store import OutlierStore
    from oodforge.synood.tiny import build_tiny_inpaint_pipeline

    ds = _toy(6)
    data = tmp_path / "toy.npz"
    np.savez(data, images=ds.images.numpy(), labels=ds.labels.numpy(), class_names=np.array(ds.class_names))
    ckpt = save_checkpoint(build_model("small_resnet", 3, 1), tmp_path / "clf")
    sd = build_tiny_inpaint_pipeline(tmp_path / "sd")
    runner = typer_testing.CliRunner()
    ctx_file = tmp_path / "ctx.jsonl"
    r = runner.invoke(app, ["contexts", "--data", str(data), "--out", str(ctx_file), "--vlm", tiny_vlm,
                            "--per-class", "1", "--max-new-tokens", "8", "--no-progress"])
    assert r.exit_code == 0, r.output
    from oodforge.synood.generate import jpeg_bytes_per_pixel, select_complex_images

    chosen = select_complex_images(ds, 1)
    bpp = jpeg_bytes_per_pixel(ds.images.numpy())
    assert [int(np.argmax(np.where(ds.labels.numpy() == c, bpp, -1))) for c in range(3)] == chosen.tolist()
    assert sorted(read_contexts(ctx_file)) == chosen.tolist()  # the most complex image of each class
    r = runner.invoke(app, ["synth", "synood", "--data", str(data), "--contexts", str(ctx_file), "--out",
                            str(tmp_path / "store"), "--sd-model", str(sd), "--checkpoint", str(ckpt), "--per-class",
                            "1", "--resolution", "32", "--steps", "5", "--iterations", "1", "--no-progress"])
    assert r.exit_code == 0, r.output
    store = OutlierStore(tmp_path / "store")
    out = store.load()
    assert len(out) == 3 and out.images.shape[1:] == (1, 28, 28)
    assert store.config["per_class"] == 1 and store.config["classifier"].startswith("weights:")
    r = runner.invoke(app, ["synth", "synood", "--data", str(data), "--contexts", str(ctx_file), "--out",
                            str(tmp_path / "s2"), "--checkpoint", str(ckpt), "--no-progress"])
    assert r.exit_code != 0 and "--sd-model" in r.output
