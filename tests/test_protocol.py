"""The protocol cannot leak: attempts to fit or validate on test data are refused whatever they are called, and
no pick (protocol, report recommendation, demo summary, benchmark summary) reads an OOD test number."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from toy_problems import features_of, make_toy_problem

from oodforge.bench import BenchJob, run_bench
from oodforge.data.base import ArrayDataset, Suite, row_fingerprints
from oodforge.detectors import FitContext
from oodforge.outliers.heldout import HeldoutOutliers, class_mix
from oodforge.protocol import ProtocolViolation, check_fit_inputs, pick, ranking, validation_numbers

ROOT = Path(__file__).resolve().parent.parent
FORGED = ROOT / "benchmarks" / "results" / "forged"


def _suite(p, **changes) -> Suite:
    fields = dict(name="toy", id_train=p.id_train, id_test=p.id_test, ood={"near": p.ood_near, "far": p.ood_far},
                  groups={"near": ["near"], "far": ["far"]}, class_names=["c0", "c1", "c2", "c3"], id_val=p.id_val)
    return Suite(**{**fields, **changes})


def test_row_fingerprints_compare_content_not_names():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (20, 1, 4, 4), dtype=np.uint8)
    a, b = ArrayDataset(imgs, identity="a"), ArrayDataset(imgs[::-1].copy(), identity="another-name")
    assert set(a.fingerprints()) == set(b.fingerprints()) and len(set(a.fingerprints())) == 20
    changed = imgs.copy()
    changed[3, 0, 0, 0] ^= 1  # one pixel, one bit
    assert row_fingerprints(changed)[3] != a.fingerprints()[3] and (row_fingerprints(changed)[4:] == a.fingerprints()[4:]).all()
    sub = a.subset([5, 2])  # a subset inherits its parent's fingerprints, in its own order
    assert (sub.fingerprints() == a.fingerprints()[[5, 2]]).all()


def test_a_validation_split_made_from_id_test_is_refused():
    p = make_toy_problem()
    suite = _suite(p, id_val=p.id_test.subset(np.arange(0, 400, 4), "val-standin"))
    with pytest.raises(ProtocolViolation, match=r"shares 100 image\(s\) with the ID test"):
        run_bench(suite, [BenchJob(p.model, ["msp"])], progress=False, log=None)


def test_a_shuffled_copy_of_an_ood_test_set_as_outliers_is_refused():
    p = make_toy_problem()
    perm = np.random.default_rng(1).permutation(len(p.ood_far))
    disguised = ArrayDataset(p.ood_far.images[perm].clone(), None, None, "my-forged-outliers")
    ctx = FitContext(model=p.model, train=p.train, outliers=features_of(p.model, disguised))
    with pytest.raises(ProtocolViolation, match=r"FitContext.outliers \(my-forged-outliers\) shares 400 .*'far'"):
        check_fit_inputs(ctx, _suite(p))


def test_an_ood_test_set_passed_through_extra_is_refused():
    p = make_toy_problem()
    sneaky = p.ood_near.subset(np.arange(7), "reference")
    ctx = FitContext(model=p.model, train=p.train, extra={"class_names": ["a"], "refs": [features_of(p.model, sneaky)]})
    with pytest.raises(ProtocolViolation, match=r"FitContext.extra\['refs'\]\[0\] .* shares 7 .*'near'"):
        check_fit_inputs(ctx, _suite(p))
    with pytest.raises(ProtocolViolation, match="shares 7"):  # the same through run_bench's extra
        run_bench(_suite(p), [BenchJob(p.model, ["msp"])], extra={"gallery": sneaky}, progress=False, log=None)


def test_id_val_with_a_few_id_test_rows_appended_is_refused():
    p = make_toy_problem()
    mixed = ArrayDataset(torch.cat([p.id_val.images, p.id_test.images[:3]]),
                         torch.cat([p.id_val.labels, p.id_test.labels[:3]]), p.id_val.class_names, "val+3")
    with pytest.raises(ProtocolViolation, match=r"Suite.id_val \(val\+3\) shares 3 image\(s\) with the ID test"):
        run_bench(_suite(p, id_val=mixed), [BenchJob(p.model, ["msp"])], progress=False, log=None)


def test_replacing_a_suites_test_set_after_it_was_built_does_not_hide_it():
    p = make_toy_problem()
    suite = _suite(p)
    suite.id_test = p.id_test.subset(np.arange(100, 400))  # the first 100 rows are no longer "ID test"
    suite.id_val = p.id_test.subset(np.arange(100))  # ... and become validation data
    with pytest.raises(ProtocolViolation, match="shares 100"):
        run_bench(suite, [BenchJob(p.model, ["msp"])], progress=False, log=None)


def test_heldout_outliers_made_from_test_images_are_refused():
    p = make_toy_problem()
    n = 50
    mixes = class_mix(p.id_val.images[::8][:n], p.id_val.labels[::8][:n])  # honest mixes, made from ID val
    held = HeldoutOutliers(torch.cat([p.ood_far.images[:n], mixes]), {"jigsaw": slice(0, n), "mix": slice(n, 2 * n)},
                           "held")
    with pytest.raises(ProtocolViolation, match=r"BenchJob.val_heldout .* shares 50 .*'far'"):
        run_bench(_suite(p), [BenchJob(p.model, ["msp"], val_heldout=held)], progress=False, log=None)


def test_duplicates_inside_the_source_data_are_not_a_leak():
    """An OOD test image that the training set itself holds (a duplicate in the source data) may be fitted on:
    the classifier has seen it anyway. The honest toy bench runs."""
    p = make_toy_problem()
    ood = ArrayDataset(torch.cat([p.ood_far.images, p.id_train.images[:2]]), None, None, "far+2-train-dups")
    res = run_bench(_suite(p, ood={"near": p.ood_near, "far": ood}), [BenchJob(p.model, ["msp", "knn"])],
                    progress=False, log=None)
    assert set(res["methods"]) == {"msp", "knn"}


def test_fingerprints_cost_little_beside_a_run():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (20000, 1, 28, 28), dtype=np.uint8)
    import time

    t0 = time.perf_counter()
    row_fingerprints(imgs)
    assert time.perf_counter() - t0 < 1.0  # measured 0.05 s per 20 k (0.25 s per 100 k) on one core


# ------------------------------------------------------------------------------------------- invariance
def _randomised_test_numbers(res: dict, seed: int) -> dict:
    """``res`` with every OOD test number (``methods``) replaced by a random one; validation untouched."""
    rng = np.random.default_rng(seed)
    out = copy.deepcopy(res)
    for per_set in out["methods"].values():
        for metrics in per_set.values():
            for k in metrics:
                metrics[k] = float(rng.uniform())
    return out


def _bench_forged():
    spec = importlib.util.spec_from_file_location("bench_forged", ROOT / "benchmarks" / "bench_forged.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _script_over(bench_forged, name: str, monkeypatch):
    """``benchmarks/<name>.py``, a script that imports ``bench_forged``, loaded over this ``bench_forged`` copy."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.setitem(__import__("sys").modules, "bench_forged", bench_forged)
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def committed_runs():
    bench_forged = _bench_forged()
    return bench_forged, bench_forged.load_runs(FORGED)


def _every_pick(bench_forged, runs: dict) -> dict:
    from oodforge.demo import suite_summary
    from oodforge.report import export_hint

    labels, r0 = bench_forged.FORGED_LABELS, runs[min(runs)]
    demo = suite_summary(r0)
    return {"protocol": pick(list(runs.values()), backbones=labels),
            "ranking": [x.key for x in ranking(list(runs.values()), backbones=labels)],
            "all": pick(r0, among="all"), "post-hoc": pick(r0, among="post-hoc", backbones=labels),
            "forger": pick(r0, source="forger:mix"), "hint": export_hint(r0),
            "demo": {k: demo[k] for k in ("pick", "pick_validation", "per_group_picks")}}


def test_no_pick_reads_an_ood_test_number(committed_runs, tmp_path):
    """Every OOD test number of the committed benchmark runs replaced by a random one: the protocol's pick, its
    whole ranking, report.md's recommendation, the demo summary's pick and the benchmark summary's picks stay."""
    bench_forged, all_runs = committed_runs
    fake_all = {}
    for suite, runs in all_runs.items():
        fake = fake_all[suite] = {k: _randomised_test_numbers(r, k) for k, r in runs.items()}
        before, after = _every_pick(bench_forged, runs), _every_pick(bench_forged, fake)
        assert before["protocol"] is not None and before["all"] is not None and after == before
    bench_forged.summarise(fake_all, tmp_path)
    real = json.loads((FORGED / "summary.json").read_text())["picks"]
    fake = json.loads((tmp_path / "summary.json").read_text())["picks"]
    assert {s: v["picks"] for s, v in fake.items()} == {s: v["picks"] for s, v in real.items()}
    assert {s: v["pick"] for s, v in fake.items()} == {s: v["pick"] for s, v in real.items()}


def test_the_committed_benchmark_summary_rebuilds_byte_for_byte(committed_runs, tmp_path):
    """``bench_forged.py --summarise`` reads the committed results.json files only (no scores.npz) and
    reproduces the committed summary.md and summary.json exactly."""
    bench_forged, runs = committed_runs
    bench_forged.summarise(copy.deepcopy(runs), tmp_path)
    assert (tmp_path / "summary.md").read_text() == (FORGED / "summary.md").read_text()
    assert (tmp_path / "summary.json").read_text() == (FORGED / "summary.json").read_text()


def test_the_committed_plain_seeds_summary_rebuilds_byte_for_byte(monkeypatch, tmp_path):
    """``bench_plain_seeds.py --summarise`` rebuilds its committed summary from the committed runs, which carry
    no validation numbers (it picks nothing): bench_forged.load_runs must not ask it for them (session 16)."""
    bench_forged = _bench_forged()
    plain_seeds = _script_over(bench_forged, "bench_plain_seeds", monkeypatch)
    committed = ROOT / "benchmarks" / "results" / "plain_seeds"
    plain_seeds.summarise(bench_forged.load_runs(committed, required=plain_seeds.PLAIN_SEEDS_REQUIRED), tmp_path)
    assert "## clipart (seeds 0, 1, 2)" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "summary.md").read_text() == (committed / "summary.md").read_text()
    assert (tmp_path / "summary.json").read_text() == (committed / "summary.json").read_text()
    with pytest.raises(SystemExit, match="lacks validation_heldout"):  # the protocol's default still asks for them
        bench_forged.load_runs(committed)


def test_a_plain_seeds_rerun_that_would_drop_committed_rows_is_refused_before_any_work(monkeypatch):
    """Re-running a seed of bench_plain_seeds.py rewrites its results.json whole: a committed run made with
    ``--oe-variant`` (scenes) re-made without it would lose its OE rows, so the script refuses before training."""
    plain_seeds = _script_over(_bench_forged(), "bench_plain_seeds", monkeypatch)
    committed = ROOT / "benchmarks" / "results" / "plain_seeds"
    oe = "energy-paper-lr1e-2"
    assert plain_seeds.rows_a_rerun_would_drop(committed, "scenes", 1, None, False) == [oe]
    assert plain_seeds.rows_a_rerun_would_drop(committed, "scenes", 1, oe, False) == []
    assert plain_seeds.rows_a_rerun_would_drop(committed, "scenes", 1, None, True) == []  # its fusion part: plain
    assert plain_seeds.rows_a_rerun_would_drop(committed, "no-such-suite", 1, None, False) == []
    monkeypatch.setattr(plain_seeds, "run_seed", lambda *a, **k: pytest.fail("trained before refusing"))
    monkeypatch.setattr("sys.argv", ["bench_plain_seeds.py", "--suites", "scenes", "--seeds", "2",
                                     "--out", str(committed)])
    with pytest.raises(SystemExit, match=f"holds the backbone.s. {oe}, which this re-run would drop; pass "
                                         f"--oe-variant {oe}"):
        plain_seeds.main()


def test_the_demo_runs_the_backbone_of_each_committed_pick():
    """oodforge.demo.DEMO_RECIPES follows the benchmark: each recipe is the plan of its bench_forged label, and that
    label is the backbone of the suite's committed pick (fashion's pick is on the OE backbone, which the demo runs
    anyway). A pick that moves to another backbone fails here until the demo and the zoo follow it."""
    from oodforge.demo import DEMO_RECIPES, OE_METHODS
    from oodforge.keys import split_key
    from oodforge.workflows import FUSIONS

    bench_forged = _bench_forged()
    picks = json.loads((FORGED / "summary.json").read_text())["picks"]
    for suite, recipe in DEMO_RECIPES.items():
        if recipe.finetune_epochs is None:
            assert bench_forged.SCRATCH_VARIANTS[recipe.label] == (recipe.method, 1), suite
        else:
            assert bench_forged.RECIPE_VARIANTS[recipe.label] == (recipe.method, None, recipe.finetune_epochs), suite
        detector, _, label = split_key(picks[suite]["pick"])
        if suite == "fashion":
            assert label == bench_forged.FUSION_VARIANT  # the zoo's OE recipe, the demo's "oe" backbone
            continue
        assert label == recipe.label, suite
        assert detector in OE_METHODS + FUSIONS + list(recipe.detectors), suite  # the demo runs the pick's detector


def test_selection_gap_is_built_from_the_committed_runs_and_the_protocols_pick(committed_runs, monkeypatch):
    """benchmarks/selection_gap.py: its pick is the summary's pick, its baseline the summary's best post-hoc
    detector, its best candidate is at least as good on test as the pick (the pick is a candidate), and the
    committed selection_gap.md is what it writes from the committed runs."""
    bench_forged, runs = committed_runs
    gap = _script_over(bench_forged, "selection_gap", monkeypatch)
    summary = json.loads((FORGED / "summary.json").read_text())["picks"]
    for suite, by_seed in runs.items():
        for row in gap.gaps(copy.deepcopy(by_seed)):
            assert row["pick"][0] == summary[suite]["pick"]
            assert row["baseline"][0] == summary[suite]["best_post_hoc_on_test"][row["group"]]
            assert row["best candidate"][1][0] >= row["pick"][1][0]
            assert row["best candidate"][1][0] >= row["best single"][1][0]
    assert gap.table(copy.deepcopy(runs)) == (FORGED / "selection_gap.md").read_text()


def test_the_scorecard_is_the_done_when_rule_over_the_committed_runs(committed_runs, monkeypatch):
    """benchmarks/scorecard.py: a metric wins only by more than the larger seed std (a tie inside it, a loss beyond
    it the other way; FPR95 lower is better), its pick and zoo baseline are the summary's, a group meets the
    done-when only when every verdict is a win, and the committed scorecard.md is what it writes."""
    bench_forged, runs = committed_runs
    card = _script_over(bench_forged, "scorecard", monkeypatch)
    spread = np.array([0.90, 0.92, 0.94])  # std 0.0163
    assert card.verdict(spread, np.array([0.90]), True) == "win"
    assert card.verdict(spread, np.array([0.91]), True) == "tie"
    assert card.verdict(spread, np.array([0.95]), True) == "loss"
    assert card.verdict(np.array([0.10]), np.array([0.20]), False) == "win"
    assert card.verdict(np.array([0.10, 0.40]), np.array([0.05]), False) == "loss"  # std 0.15, 0.20 worse
    assert card.verdict(np.array([0.10, 0.40]), np.array([0.15]), False) == "tie"
    plain = json.loads((ROOT / "benchmarks" / "results" / "plain_seeds" / "summary.json").read_text())
    summary = json.loads((FORGED / "summary.json").read_text())["picks"]
    for suite, by_seed in runs.items():
        for row in card.rows(copy.deepcopy(by_seed), suite, plain):
            assert row["pick"][0] == summary[suite]["pick"]
            assert row["zoo"][0] == summary[suite]["best_post_hoc_on_test"][row["group"]]
            verdicts = [v for v in (row["zoo verdict"], row["seeds verdict"]) if v]
            assert row["meets"] == all(v == ("win", "win") for v in verdicts)
    assert card.table(copy.deepcopy(runs), plain) == (FORGED / "scorecard.md").read_text()


def test_the_committed_heldout_proxy_table_is_what_the_script_writes(committed_runs, monkeypatch, tmp_path):
    """benchmarks/heldout_proxy.py rebuilds its committed rank correlations from the committed (merged) runs, over
    every method of seed 0 with per-forger numbers (more than the main run's alone)."""
    bench_forged, _ = committed_runs
    proxy = _script_over(bench_forged, "heldout_proxy", monkeypatch)
    for f in FORGED.glob("*/seed*/**/results.json"):  # the runs, not the tables, into a scratch OUT
        (tmp_path / f.relative_to(FORGED)).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f.relative_to(FORGED)).write_bytes(f.read_bytes())
    monkeypatch.setattr("sys.argv", ["heldout_proxy.py", "--out", str(tmp_path)])
    proxy.main()
    rebuilt = json.loads((tmp_path / "heldout_proxy.json").read_text())
    assert rebuilt == json.loads((FORGED / "heldout_proxy.json").read_text())
    main_run = json.loads((FORGED / "scenes" / "seed0" / "results.json").read_text())
    assert rebuilt["scenes"]["near"]["both"][1] > len(main_run["methods"])  # the part runs' methods too


def test_a_run_without_the_fields_the_pick_reads_is_refused(tmp_path):
    bench_forged = _bench_forged()
    run = tmp_path / "s" / "seed0"
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({"methods": {}, "groups": {}, "models": {"plain": {}}}))
    with pytest.raises(SystemExit, match=r"lacks validation_heldout, models.plain.id_val_accuracy"):
        bench_forged.load_runs(tmp_path)


def test_unseen_forgers_mean_equals_the_pooled_heldout_number_on_a_real_run():
    """One outlier per ID val image per forger: the pooled AUROC / FPR95 is the mean over forgers, which is why
    runs without per-forger numbers can still be read (protocol.validation_numbers)."""
    res = json.loads((FORGED / "scenes" / "seed1" / "results.json").read_text())
    numbers = validation_numbers(res)
    for m, v in res["validation_heldout"].items():
        assert numbers[m]["auroc"] == pytest.approx(v["auroc"], abs=1e-12)
        assert numbers[m]["fpr95"] == pytest.approx(v["fpr95"], abs=1e-12)


def test_a_dataset_cleared_once_is_checked_again_when_the_test_sets_change():
    """The guard remembers datasets it found clean, but only against the test sets it checked them with."""
    p = make_toy_problem()
    suite = _suite(p)
    val = p.id_val
    ctx = FitContext(model=p.model, train=p.train, val=features_of(p.model, val))
    check_fit_inputs(ctx, suite)  # clean, and remembered
    check_fit_inputs(ctx, suite)
    suite.ood = {**suite.ood, "leak": val.subset(np.arange(5))}  # a new OOD test set holding 5 val images
    with pytest.raises(ProtocolViolation, match=r"FitContext.val .* shares 5 .*'leak'"):
        check_fit_inputs(ctx, suite)


def test_export_from_a_run_without_validation_numbers_or_with_method_too_is_refused(tmp_path, capsys):
    """`export --from-run` ships only a validation pick: a run without validation numbers, --method beside it,
    and neither option are each one error line, exit 2, before any data is loaded and with no guard written."""
    from oodforge.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"suite": "fashion", "methods": {"msp": {"x": {"auroc": 0.9}}},
                                                  "groups": {}, "models": {"plain": {}}}))
    cases = [(["--from-run", str(run)], "no validation numbers"),
             (["--from-run", str(run), "--method", "msp"], "not both"),
             ([], "--from-run RUN"),
             (["--from-run", str(tmp_path / "nowhere")], "cannot read")]
    for extra, message in cases:
        rc = main(["export", "--suite", "fashion", *extra, "--out", str(tmp_path / "guard")])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and err.count("error") == 1, (extra, err)
        assert not (tmp_path / "guard").exists()
