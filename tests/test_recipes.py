"""The no-outlier training recipes (oodforge.recipes): each loss / augmentation against its paper's formula
computed here independently, RotPred's model and detector, the fractal pictures, composition with PixMix,
resumption after a kill, and `oodforge train --method <recipe>` on a tiny subset."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from oodforge.data.base import ArrayDataset
from oodforge.detectors import create
from oodforge.detectors.base import FitContext
from oodforge.models import build_model
from oodforge.models.checkpoint import weights_hash
from oodforge.models.featureset import FeatureSet
from oodforge.models.train import Augmented, TrainConfig, run_training
from oodforge.recipes import build_objective, parse_recipe, resolve_options
from oodforge.recipes.fractals import fractal_pictures, generate_fractals
from oodforge.recipes.logitnorm import LogitNorm, T2FNorm, logitnorm_loss, t2fnorm_logits
from oodforge.recipes.mixoe import MixOE, mix_batch, other_class_partners
from oodforge.recipes.pixmix import PixMix, add_mix, mixing_weights, multiply_mix
from oodforge.recipes.rotpred import RotPred, RotPredModel, rotations


def _images(n=32, size=12, channels=1, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, channels, size, size)).astype(np.uint8)
    return ArrayDataset(x, np.arange(n) % 3, ["a", "b", "c"], f"recipes-toy/{n}/{size}/{channels}/{seed}")


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_logitnorm_loss_is_the_papers_formula():
    rng = np.random.default_rng(0)
    f, y, tau = rng.normal(0, 3, (5, 4)), np.array([0, 3, 1, 1, 2]), 0.04
    z = f / (tau * (np.linalg.norm(f, axis=1, keepdims=True) + 1e-7))
    expected = -np.log(_softmax(z)[np.arange(5), y]).mean()
    got = logitnorm_loss(torch.tensor(f), torch.tensor(y), tau).item()
    assert got == pytest.approx(expected, rel=1e-9)
    # the loss only sees the direction of the logits: scaling them changes nothing
    assert logitnorm_loss(torch.tensor(7 * f), torch.tensor(y), tau).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="tau"):
        LogitNorm(tau=0)


def test_t2fnorm_normalises_features_in_training_only():
    torch.manual_seed(0)
    model = build_model("small_resnet", 3, 1).eval()
    x = torch.rand(4, 1, 12, 12)
    h = model.pool(model.feature_map(x)).detach().numpy()
    w, b = model.head.weight.detach().numpy(), model.head.bias.detach().numpy()
    expected = (h / (0.1 * np.linalg.norm(h, axis=1, keepdims=True))) @ w.T + b
    np.testing.assert_allclose(t2fnorm_logits(model, x, 0.1).detach().numpy(), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(model(x).detach().numpy(), h @ w.T + b, rtol=1e-4, atol=1e-5)  # plain at test
    step = T2FNorm().loss(model, x, torch.tensor([0, 1, 2, 0]), lambda v: v)
    assert step.total.item() == pytest.approx(F.cross_entropy(torch.tensor(expected), torch.tensor([0, 1, 2, 0])).item(),
                                              rel=1e-4)


def test_rotpred_loss_score_and_model():
    torch.manual_seed(0)
    model = build_model("rotpred:small_resnet", 3, 1)
    assert isinstance(model, RotPredModel) and model.arch == "rotpred:small_resnet"
    x, y = torch.rand(3, 1, 12, 12), torch.tensor([0, 2, 1])
    x_rot, y_rot = rotations(x)
    assert torch.equal(x_rot[3 + 1], torch.rot90(x[1], 1, dims=(1, 2))) and y_rot.tolist() == [0] * 3 + [1] * 3 + \
        [2] * 3 + [3] * 3
    model.eval()  # batch statistics would couple the images; eval makes the reference computation exact
    step = RotPred(rot_lambda=0.7).loss(model, x, y, lambda v: v)
    out = model.forward_all(x_rot)
    cls = F.cross_entropy(model(x), y)
    rot = F.cross_entropy(model.rot_head(out.penultimate), y_rot)
    assert step.total.item() == pytest.approx((cls + 0.7 * rot).item(), rel=1e-5)
    # the score: KL(U || p) - mean_r KL(onehot_r || q_r), base-2 logs (OpenOOD's RotPredPostprocessor)
    data = _images(6, 12)
    feats = FeatureSet(torch.zeros(6, 3), torch.zeros(6, 128), data.labels, images=data)
    det = create("rotpred", progress=False).fit(FitContext(model=model, train=feats))
    got = det.score(feats)
    xi = data.images.float() / 255
    with torch.no_grad():
        p = _softmax(model(xi).double().numpy())
        q = [_softmax(model.rot_head(model.forward_all(torch.rot90(xi, r, dims=(2, 3))).penultimate).double()
                      .numpy())[:, r] for r in range(4)]
    expected = (np.log2((1 / 3) / p) / 3).sum(1) - np.mean([-np.log2(qr) for qr in q], axis=0)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="rotpred recipe"):
        create("rotpred").fit(FitContext(model=build_model("small_resnet", 3, 1), train=feats))
    clone = build_model("rotpred:small_resnet", 3, 1)
    clone.load_state_dict(model.state_dict())  # the wrapper round-trips through build_model (checkpoints)
    assert weights_hash(clone) == weights_hash(model)


def test_pixmix_mixings_are_the_reference_formulas():
    rng = np.random.default_rng(0)
    x1, x2 = rng.uniform(0, 1, (1, 4, 4)), rng.uniform(0, 1, (1, 4, 4))
    a, b = 0.8, 0.3
    np.testing.assert_allclose(add_mix(torch.tensor(x1), torch.tensor(x2), a, b).numpy(),
                               (a * (2 * x1 - 1) + b * (2 * x2 - 1) + 1) / 2)
    np.testing.assert_allclose(multiply_mix(torch.tensor(x1), torch.tensor(x2), a, b).numpy(),
                               ((2 * x1) ** a) * ((2 * x2) ** b) / 2)
    ab = np.array([mixing_weights(rng, 3.0) for _ in range(400)])
    first = ab[:, 0] < 1  # (Beta(3,1), Beta(1,3)) or (1 + Beta(1,3), -Beta(1,3)), half each
    assert 0.4 < first.mean() < 0.6
    assert (ab[first, 1] > 0).all() and (ab[~first, 1] < 0).all() and (ab[~first, 0] < 2).all()
    assert ab[first, 0].mean() == pytest.approx(3 / 4, abs=0.05)  # E Beta(3, 1)


def test_pixmix_mixing_chain_matches_a_replay_of_its_draws():
    """With identity operators and one constant picture, the output is the chain of Algorithm 1 replayed here."""
    pic = ArrayDataset(np.full((1, 1, 8, 8), 153, np.uint8))
    pm = PixMix(pic, k=4, beta=3.0, seed=3)
    pm.ops = [lambda img, s, rng: img]
    x = torch.rand(1, 8, 8)
    x = (x * 255).round() / 255
    replay = np.random.default_rng([3, 7])
    got = pm.mix_one(x)
    replay.integers(1), replay.integers(2), replay.integers(2)  # picture index, crop top / left (9 px -> 8)
    if replay.random() < 0.5:
        replay.integers(1)  # the operator drawn for the augmented start
    mixed, p = x.double().numpy(), 0.6
    for _ in range(int(replay.integers(5))):
        other = mixed * 0 + x.double().numpy()
        if replay.random() < 0.5:
            replay.integers(1)
        else:
            other = np.full_like(mixed, p)
        op = int(replay.integers(2))
        a, b = mixing_weights(replay, 3.0)
        mixed = np.clip((a * (2 * mixed - 1) + b * (2 * other - 1) + 1) / 2 if op == 0 else
                        ((2 * mixed) ** a) * (np.maximum(2 * other, 1e-37) ** b) / 2, 0, 1)
    np.testing.assert_allclose(got.double().numpy(), mixed, atol=1e-5)


def test_pixmix_is_seeded_resumable_and_checks_shapes():
    data = _images(4, 12, 3)
    pics = fractal_pictures(6, (3, 12, 12), seed=0)
    x = data.images.float() / 255
    a = PixMix(pics, seed=1)
    first = a(x, data.labels)
    state = json.loads(json.dumps(a.state_dict()))  # survives the loop's state file
    second = a(x, data.labels)
    b = PixMix(pics, seed=1)
    assert torch.equal(b(x, data.labels), first)
    c = PixMix(pics, seed=1)
    c.load_state_dict(state)
    assert torch.equal(c(x, data.labels), second)
    assert first.shape == x.shape and 0 <= first.min() and first.max() <= 1 and not torch.equal(first, x)
    with pytest.raises(ValueError, match="pictures"):
        PixMix(pics).bind(_images(4, 12, 1))


def test_fractals_are_seeded_filled_and_cached(tmp_path):
    a = generate_fractals(5, (3, 10, 10), seed=4)
    assert a.shape == (5, 3, 10, 10) and a.dtype == np.uint8
    assert ((a.max(1) > 0).mean(axis=(1, 2)) >= 0.2).all()  # FractalDB's filling-rate threshold
    np.testing.assert_array_equal(a, generate_fractals(5, (3, 10, 10), seed=4))
    assert not np.array_equal(a, generate_fractals(5, (3, 10, 10), seed=5))
    ds = fractal_pictures(5, (3, 10, 10), seed=4, cache_dir=tmp_path)
    np.testing.assert_array_equal(ds.images.numpy(), a)
    (path,) = tmp_path.glob("fractals-5-3x10x10-seed4-*.npy")
    np.save(path, np.zeros_like(a))  # a second call reads the cache, it does not regenerate
    assert int(fractal_pictures(5, (3, 10, 10), seed=4, cache_dir=tmp_path).images.max()) == 0


def test_mixoe_mixes_and_soft_targets_match_the_paper():
    rng = np.random.default_rng(0)
    x, xo = torch.rand(2, 1, 10, 10), torch.rand(2, 1, 10, 10)
    mixed, lam = mix_batch(x, xo, 0.3, "mixup", rng)
    assert lam == 0.3 and torch.allclose(mixed, 0.3 * x + 0.7 * xo)
    mixed, lam = mix_batch(x, xo, 0.64, "cutmix", rng)
    from_out = (mixed == xo) & (mixed != x)
    assert lam == pytest.approx(1 - from_out[0].float().mean().item())  # lam = the exact ID pixel fraction
    y = torch.tensor([0, 0, 1, 2])
    partners = other_class_partners(y, rng)
    assert (y[partners] != y).all()
    # the loss: CE(f(x), y) + beta * softCE(f(x_mix), lam onehot + (1 - lam) U), draws replayed here
    torch.manual_seed(0)
    model = build_model("small_resnet", 3, 1).eval()
    outl = _images(5, 10, seed=1)
    obj = MixOE(outl, op="mixup", beta=5.0, seed=2)
    obj.bind(model, _images(4, 10), None)
    xb = torch.rand(4, 1, 10, 10)
    step = obj.loss(model, xb, y, lambda v: v)
    replay = np.random.default_rng([2, 11])
    idx = replay.integers(5, size=4)
    lam = replay.beta(1.0, 1.0)
    xm = lam * xb + (1 - lam) * outl.images[torch.from_numpy(idx)].float() / 255
    t = lam * np.eye(3)[y.numpy()] + (1 - lam) / 3
    with torch.no_grad():
        soft = -(t * np.log(_softmax(model(xm).double().numpy()))).sum(1).mean()
        expected = F.cross_entropy(model(xb), y).item() + 5.0 * soft
    assert step.total.item() == pytest.approx(expected, rel=1e-5) and step.logs["lam"] == pytest.approx(lam)


def test_recipe_names_and_options():
    assert parse_recipe("rotpred+pixmix") == ("rotpred", ("pixmix",)) and parse_recipe("pixmix") == ("plain",
                                                                                                      ("pixmix",))
    assert resolve_options("logitnorm", None)["tau"] == 0.04 and resolve_options("t2fnorm", None)["tau"] == 0.1
    assert resolve_options("mixoe", {"mixoe_op": "cutmix"})["mixoe_alpha"] == 2.0
    for bad, match in [("rotpred+logitnorm", "unknown training recipe"), ("pixmix+pixmix", "unknown training")]:
        with pytest.raises(ValueError, match=match):
            parse_recipe(bad)
    with pytest.raises(ValueError, match="belongs to pixmix"):
        resolve_options("logitnorm", {"pixmix_k": 2})
    with pytest.raises(ValueError, match="unknown recipe option"):
        resolve_options("logitnorm", {"temperature": 2})
    from oodforge.workflows import TrainPlan

    # fine-tuning defaults: lr 0.01 cosine; MixOE its authors' lr 1e-3, weight decay 1e-5; explicit values win
    assert TrainPlan(method="rotpred+pixmix", init_from="ck").train_config().lr == 0.01
    mixoe = TrainPlan(method="mixoe", init_from="ck").train_config()
    assert (mixoe.lr, mixoe.weight_decay, mixoe.schedule) == (1e-3, 1e-5, "cosine")
    assert TrainPlan(method="logitnorm", init_from="ck", lr=0.02).train_config().lr == 0.02
    with pytest.raises(ValueError, match="recipe options are for"):
        TrainPlan(method="plain", recipe_options={"tau": 1}).train_config()


class _KilledAt:
    """Wraps an objective and raises KeyboardInterrupt at one step (a killed job); state passes through."""

    def __init__(self, inner, at_step):
        self.inner, self.at_step, self.step = inner, at_step, 0
        self.name = inner.name

    def __getattr__(self, item):
        return getattr(self.inner, item)

    def loss(self, model, x, y, augment):
        self.step += 1
        if self.at_step is not None and self.step == self.at_step:
            raise KeyboardInterrupt
        return self.inner.loss(model, x, y, augment)


def test_rotpred_with_pixmix_killed_after_epoch_one_resumes_to_the_same_weights(tmp_path):
    data = _images(12, 8, 1)
    cfg = TrainConfig(epochs=2, batch_size=6, seed=1, lr=0.05, schedule="cosine")
    opts = resolve_options("rotpred+pixmix", {"n_pictures": 4})

    def fresh():
        torch.manual_seed(0)
        return build_model("rotpred:small_resnet", 3, 1)

    def objective():
        obj = build_objective("rotpred+pixmix", opts, data.image_shape, seed=1, pictures_dir=tmp_path / "pics")
        assert isinstance(obj, Augmented) and obj.name == "rotpred+pixmix"
        return obj

    ref = fresh()
    run_training(ref, data, objective(), cfg, progress=False)
    with pytest.raises(KeyboardInterrupt):  # 2 batches per epoch: step 3 is in epoch 2
        run_training(fresh(), data, _KilledAt(objective(), 3), cfg, progress=False, state_dir=tmp_path / "run")
    assert (tmp_path / "run" / "train_state.pt").is_file()
    resumed = fresh()
    lines: list[str] = []
    run_training(resumed, data, objective(), cfg, progress=False, state_dir=tmp_path / "run", log=lines.append)
    assert any("after epoch 1/2" in ln for ln in lines)
    assert weights_hash(resumed) == weights_hash(ref)


def test_train_cli_runs_a_recipe_from_a_checkpoint_and_refuses_bad_options(tmp_path, capsys, monkeypatch):
    from oodforge.cli import main
    from oodforge.models.checkpoint import load_checkpoint, save_checkpoint

    monkeypatch.setenv("OODFORGE_CACHE", str(tmp_path / "cache"))
    base = ["train", "--suite", "fashion6", "--quick", "--epochs", "1", "--max-train", "24", "--batch-size", "12"]
    torch.manual_seed(0)  # a plain checkpoint to fine-tune from (a zoo classifier in real use)
    save_checkpoint(build_model("small_resnet", 6, 1), tmp_path / "plain", {"suite": "fashion6"})
    rc = main([*base, "--method", "logitnorm+pixmix", "--init-from", str(tmp_path / "plain"), "--recipe-option",
               "n_pictures=4", "--out", str(tmp_path / "ln")])
    assert rc == 0, capsys.readouterr().err[-2000:]
    _, meta = load_checkpoint(tmp_path / "ln")
    assert meta["plan"]["method"] == "logitnorm+pixmix" and meta["plan"]["recipe_options"]["tau"] == 0.04
    assert meta["plan"]["recipe_options"]["pixmix_k"] == 4 and meta["init_from"]["checkpoint"] == str(tmp_path / "plain")
    assert meta["history"]["config"]["lr"] == 0.01  # the recipes' fine-tuning default
    assert meta["forgers"] == []  # PixMix's fractals are no held-out forger's kind of outlier
    # MixOE on class mixes trains on the `mix` forger's kind: the checkpoint says so, and bench records it in
    # results.json, where the protocol's validation number leaves that forger out (protocol.trained_forgers)
    rc = main([*base, "--method", "mixoe", "--init-from", str(tmp_path / "plain"), "--recipe-option",
               "mixoe_source=classes", "--out", str(tmp_path / "mix")])
    assert rc == 0, capsys.readouterr().err[-2000:]
    assert load_checkpoint(tmp_path / "mix")[1]["forgers"] == ["mix"]
    assert main(["bench", "--suite", "fashion6", "--quick", "--checkpoint", str(tmp_path / "mix"), "--methods",
                 "msp", "--out", str(tmp_path / "mix-bench")]) == 0
    res = json.loads((tmp_path / "mix-bench" / "results.json").read_text())
    from oodforge.protocol import trained_forgers, validation_numbers

    assert trained_forgers(res, "msp@mixoe") == {"mix"}
    # one unseen held-out forger (the jigsaws) is fewer than the two a validation number needs
    assert "msp@mixoe" not in validation_numbers(res) and "jigsaw" in res["validation_heldout_by_forger"]["msp@mixoe"]
    capsys.readouterr()
    for argv, fragment in [(["--method", "logitnorm", "--recipe-option", "rot_lambda=2"], "belongs to rotpred"),
                           (["--method", "rotpred+oe"], "unknown training method"),
                           (["--method", "logitnorm", "--recipe-option", "tau"], "KEY=VALUE")]:
        assert main([*base, *argv, "--out", str(tmp_path / "bad")]) == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
        assert not (tmp_path / "bad").exists()
    assert math.isfinite(meta["id_test_accuracy"])


# ------------------------------------------------------------------------------------------------ ASCOOD
def test_ascood_shuffle_moves_exactly_the_top_attribution_pixels():
    from oodforge.recipes.ascood import gradient_top_pixels, shuffle_top_pixels

    # 2 channels, 3x3 image, pixel values all distinct; a hand-made gradient whose per-pixel score
    # sum_c exp(g_c) ranks pixels 7 > 2 > 4 > the rest
    x = torch.arange(18, dtype=torch.float32).reshape(1, 2, 3, 3) / 17
    g = torch.zeros(1, 2, 3, 3)
    g[0, 0].view(-1)[7], g[0, 1].view(-1)[7] = 3.0, 1.0
    g[0, 0].view(-1)[2], g[0, 1].view(-1)[2] = 2.0, 0.5
    g[0, 1].view(-1)[4] = 1.5
    g[0, 0].view(-1)[0] = -5.0  # a large negative gradient does not count: exp(-5) is small
    share = 3 / 9  # int(3 * 3 * share) = 3 pixels
    rng = np.random.default_rng(0)
    perm = np.random.default_rng(0).permutation(3)
    out = shuffle_top_pixels(x, g, share, [rng])
    top = [7, 2, 4]  # the ranking by hand, as torch.topk orders it
    expected = x.clone().reshape(1, 2, 9)
    expected[0, :, top] = x.reshape(1, 2, 9)[0, :, [top[j] for j in perm]]
    assert torch.equal(out.reshape(1, 2, 9), expected)
    changed = (out != x).any(1).reshape(-1).nonzero().flatten().tolist()
    assert set(changed) <= set(top) and len(changed) == sum(perm[j] != j for j in range(3))
    # the exp ranking is the reference's (grad.exp().sum(dim=1)): compare on random gradients
    gr = torch.randn(4, 3, 5, 5)
    ref_top = torch.topk(gr.exp().sum(1).reshape(4, -1), 6, dim=1).indices
    xr = torch.rand(4, 3, 5, 5)
    moved = shuffle_top_pixels(xr, gr, 6 / 25, [np.random.default_rng(i) for i in range(4)])
    for i in range(4):
        changed = (moved[i] != xr[i]).any(0).reshape(-1).nonzero().flatten().tolist()
        assert changed and set(changed) <= set(ref_top[i].tolist())
    # gradient op: exactly int(share C H W) entries move, the largest |g|, by alpha g std
    xs, gs = torch.rand(1, 2, 3, 3), torch.randn(1, 2, 3, 3)
    std = torch.tensor([0.5, 2.0]).view(1, 2, 1, 1)
    moved = gradient_top_pixels(xs, gs, 4 / 18, 10.0, std)
    k = gs.abs().reshape(-1).argsort(descending=True)[:4]
    diff = (moved - xs).reshape(-1)
    assert set((diff != 0).nonzero().flatten().tolist()) == set(k.tolist())
    assert torch.allclose(diff[k], (10.0 * gs * std).reshape(-1)[k])


def test_ascood_attribution_is_the_true_class_logit_gradient_in_eval_mode():
    from oodforge.recipes.ascood import ascood_logits, input_attribution

    torch.manual_seed(0)
    model = build_model("small_resnet", 3, 2).train()
    x, y = torch.rand(3, 2, 8, 8), torch.tensor([0, 2, 1])
    g = input_attribution(model, x, y, sigma=0.5)
    assert model.training  # restored
    assert all(p.grad is None for p in model.parameters())  # no parameter gradient left behind
    model.eval()
    xn = model.normalize(x).detach().requires_grad_(True)  # the reference differentiates the normalised input
    from oodforge.recipes.ascood import z_std

    logits = model.head(z_std(model.pool(model.body(xn))) * 0.5)
    logits[torch.arange(3), y].sum().backward()
    assert torch.allclose(g, xn.grad, atol=1e-6)
    assert torch.allclose(ascood_logits(model, x, 0.5), logits)


def test_ascood_loss_is_the_references_formula():
    from oodforge.recipes.ascood import ASCOOD, uniform_kl, z_std

    # z-score: unbiased std, eps 1e-6 (ascood_net.z_std)
    h = np.array([[1.0, 2.0, 4.0, 7.0]])
    assert z_std(torch.tensor(h)).numpy() == pytest.approx((h - 3.5) / (np.std(h, ddof=1) + 1e-6))
    # KL(U || softmax) with reduction batchmean, by hand and against torch's KLDivLoss as the reference calls it
    z = np.array([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
    p = _softmax(z)
    by_hand = np.mean([np.sum(1 / 3 * (np.log(1 / 3) - np.log(p[n]))) for n in range(2)])
    assert uniform_kl(torch.tensor(z)).item() == pytest.approx(by_hand, rel=1e-9)
    ref = torch.nn.KLDivLoss(reduction="batchmean")(F.log_softmax(torch.tensor(z), 1), torch.full((2, 3), 1 / 3, dtype=torch.float64))
    assert uniform_kl(torch.tensor(z)).item() == pytest.approx(ref.item(), rel=1e-9)
    # the whole step: CE on the ID half + w KL on the outlier half of one pass over [x; x_ood]
    torch.manual_seed(0)
    model = build_model("small_resnet", 3, 1).train()
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    obj = ASCOOD(w=2.0, seed=3)
    state, before = obj.state_dict(), copy.deepcopy(model)  # the step's train-mode pass moves batch-norm statistics
    step = obj.loss(model, x, y, lambda t: t)
    model = before
    obj.load_state_dict(state)  # replay the same permutations
    from oodforge.recipes.ascood import perturb

    rngs = [np.random.default_rng(s) for s in obj.rng.integers(2**63, size=4)]
    x_ood = perturb(model, x, y, 0.15, "shuffle", 10.0, 0.5, rngs)
    zz = model.head(z_std(model.pool(model.feature_map(torch.cat([x, x_ood])))) * 0.5).detach().double().numpy()
    ce = -np.log(_softmax(zz[:4])[np.arange(4), y.numpy()]).mean()
    kl = np.mean(-np.log(3) - np.log(_softmax(zz[4:])).mean(1))
    assert step.total.item() == pytest.approx(ce + 2.0 * kl, rel=1e-5)
    assert step.logs["cls_loss"] == pytest.approx(ce, rel=1e-5) and step.logits.shape == (4, 3)


def test_ascood_trains_through_the_loop_seeded_and_records_its_options(tmp_path):
    from oodforge.recipes.ascood import ascood_outliers, forge_ascood
    from oodforge.workflows import TrainPlan

    data = _images(12, 8, 1)
    plan = TrainPlan(method="ascood", arch="small_resnet", epochs=2, batch_size=6, seed=1,
                     recipe_options={"ascood_p": 0.25})
    assert plan.resolved_options() == {"ascood_sigma": 0.5, "ascood_p": 0.25, "ascood_op": "shuffle", "ascood_w": 1.0,
                                       "ascood_alpha_max": 10.0, "ascood_alpha_min": 10.0}

    def run():
        torch.manual_seed(0)
        model = build_model("small_resnet", 3, 1)
        hist = run_training(model, data, plan.objective(data.image_shape), plan.train_config(), progress=False)
        return model, hist

    (a, ha), (b, hb) = run(), run()
    assert weights_hash(a) == weights_hash(b) and ha["ood_loss"] == hb["ood_loss"] and len(ha["ood_loss"]) == 2
    assert ha["objective"]["objective"] == "ascood" and ha["objective"]["p"] == 0.25
    # the gradient op runs too, and alpha follows the linear schedule alpha_max -> alpha_min
    obj = build_objective("ascood", resolve_options("ascood", {"ascood_op": "gradient", "ascood_alpha_max": 30.0,
                                                               "ascood_alpha_min": 10.0}), data.image_shape)
    run_training(build_model("small_resnet", 3, 1), data, obj, TrainConfig(epochs=2, batch_size=6), progress=False)
    assert obj.alpha == pytest.approx(20.0)  # epoch 1 of 2: (30 - 10) * (1 - 1/2) + 10
    # the outlier maker on uint8 images, and as a store (resumable: a second call adds nothing twice)
    out = ascood_outliers(a, data.images[:4], data.labels[:4], share=0.25)
    assert out.dtype == torch.uint8 and out.shape == data.images[:4].shape
    assert torch.equal(out.flatten(1).sort(1).values, data.images[:4].flatten(1).sort(1).values)  # a permutation
    store = forge_ascood(data, tmp_path / "store", a, share=0.25, limit=5, batch_size=2)
    store = forge_ascood(data, tmp_path / "store", a, share=0.25, batch_size=4)
    loaded = store.load()
    assert len(loaded) == 12 and loaded.store_config["method"] == "ascood"
    assert torch.equal(torch.as_tensor(loaded.images[:4]), ascood_outliers(
        a, data.images[:4], data.labels[:4], share=0.25, seeds=[r["seed"] for r in store.records()[:4]]))


def test_ascood_refuses_bad_options_naming_them():
    from oodforge.recipes import recipe_forgers

    for opts, name in [({"ascood_p": 0}, "ascood_p"), ({"ascood_p": 1.5}, "ascood_p"), ({"ascood_p": "x"}, "ascood_p"),
                       ({"ascood_sigma": -1}, "ascood_sigma"), ({"ascood_op": "noise"}, "ascood_op"),
                       ({"ascood_w": -0.1}, "ascood_w"), ({"ascood_alpha_min": -1}, "ascood_alpha_min")]:
        with pytest.raises(ValueError, match=name):
            resolve_options("ascood", opts)
    with pytest.raises(ValueError, match="belongs to ascood"):
        resolve_options("logitnorm", {"ascood_p": 0.1})
    with pytest.raises(TypeError, match="Classifier"):
        build_objective("ascood", resolve_options("ascood", None), (1, 8, 8)).bind(torch.nn.Linear(2, 2), None, None)
    # the held-out forgers each recipe's outliers stand for: ASCOOD's shuffled salient pixels are neither
    assert recipe_forgers("ascood", resolve_options("ascood", None)) == []
    assert recipe_forgers("mixoe", resolve_options("mixoe", {"mixoe_source": "classes"})) == ["mix"]
    assert recipe_forgers("mixoe", resolve_options("mixoe", None)) == []
