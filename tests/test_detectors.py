"""Post-hoc detectors: each against its paper formula on hand-made tensors, then on a toy OOD problem."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from sklearn.covariance import EmpiricalCovariance
from sklearn.neighbors import NearestNeighbors
from toy_problems import ToyClassifier, make_toy_problem

from oodforge.detectors import NotFittedError, available, create
from oodforge.detectors.base import REGISTRY, FitContext
from oodforge.detectors.knn import faiss_available
from oodforge.metrics import evaluate
from oodforge.models.featureset import FeatureSet

torch.set_num_threads(1)

POSTHOC = ["msp", "maxlogit", "energy", "odin", "mahalanobis", "react", "dice", "knn", "vim", "gradnorm"]
QUIET = {"odin": {"progress": False}, "knn": {"progress": False}}


@pytest.fixture(scope="module")
def toy():
    return make_toy_problem()


def handmade(seed=0, n=300, dim=12, classes=5, hidden=None):
    """Random non-negative 'penultimate' features, a random head, consistent logits and a FitContext."""
    g = torch.Generator().manual_seed(seed)
    model = ToyClassifier(4, classes, hidden=dim, seed=seed)
    with torch.no_grad():
        model.head.weight.copy_(torch.randn(classes, dim, generator=g))
        model.head.bias.copy_(torch.randn(classes, generator=g))
    model.requires_grad_(False)
    labels = torch.arange(n) % classes
    shift = torch.randn(classes, dim, generator=g)
    h = torch.relu(torch.randn(n, dim, generator=g) + shift[labels])
    logits = h @ model.head.weight.T + model.head.bias
    feats = FeatureSet(logits, h, labels)
    return model, feats, FitContext(model=model, train=feats)


def make_test(model, n=50, dim=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    h = torch.relu(torch.randn(n, dim, generator=g) * 2)
    with torch.no_grad():
        return FeatureSet(model.head(h), h, torch.full((n,), -1))


# --- registry and API ---------------------------------------------------------------------------

def test_registry_lists_all_posthoc_detectors():
    names = available()
    for name in POSTHOC:
        assert name in names
        cls = REGISTRY[name]
        assert cls.name == name and len(cls.paper) > 20
        det = create(name)
        assert not [k for k in vars(det) if k.endswith("_")], "constructor must only store hyperparameters"
    assert REGISTRY["odin"].needs_inputs and not REGISTRY["energy"].needs_inputs
    assert create("mahalanobis").needs_inputs is False and create("mahalanobis", noise=0.01).needs_inputs is True


@pytest.mark.parametrize("name", POSTHOC)
def test_not_fitted_error(name, toy):
    with pytest.raises(NotFittedError):
        create(name).score(toy.test)


def test_needs_inputs_without_images_is_a_clear_error(toy):
    det = create("odin", progress=False).fit(toy.ctx())
    with pytest.raises(ValueError, match="needs the input images"):
        det.score(FeatureSet(toy.test.logits, toy.test.penultimate, toy.test.labels))


def test_bad_hyperparameters_raise():
    model, feats, ctx = handmade()
    for name, params, match in [("react", {"percentile": 0}, "percentile"), ("dice", {"sparsity": 1.0}, "sparsity"),
                                ("knn", {"k": 10_000}, "k=10000"), ("knn", {"backend": "annoy"}, "backend"),
                                ("vim", {"principal_dim": 12}, "principal_dim"), ("energy", {"temperature": 0}, "temperature"),
                                ("odin", {"epsilon": -1}, "epsilon")]:
        with pytest.raises(ValueError, match=match):
            create(name, **params).fit(ctx).score(feats)
    # the declared ranges also hold for detectors constructed directly, checked once in Detector.fit
    from oodforge.detectors.activation_shaping import ReAct
    from oodforge.detectors.logit_based import Energy

    for det, match in ((ReAct(percentile=150), r"percentile must be in \(0, 100\], got 150"),
                       (Energy(temperature=-1.0), r"temperature must be in \(0, inf\)")):
        with pytest.raises(ValueError, match=match):
            det.fit(ctx)
    unlabelled = FeatureSet(feats.logits, feats.penultimate, torch.full((len(feats),), -1))
    with pytest.raises(ValueError, match="unlabelled"):
        create("mahalanobis").fit(FitContext(model=model, train=unlabelled))


# --- formulas on hand-made tensors --------------------------------------------------------------

def test_logit_detectors_known_values():
    model, _, ctx = handmade(classes=2)
    logits = torch.tensor([[0.0, np.log(3.0)], [0.0, 0.0], [10.0, -5.0]])
    feats = FeatureSet(logits, torch.zeros(3, 12), torch.zeros(3, dtype=torch.long))
    np.testing.assert_allclose(create("msp").fit(ctx).score(feats), [0.75, 0.5, 1 / (1 + np.exp(-15))], rtol=1e-6)
    np.testing.assert_allclose(create("maxlogit").fit(ctx).score(feats), [np.log(3.0), 0.0, 10.0], rtol=1e-6)
    np.testing.assert_allclose(create("energy").fit(ctx).score(feats), [np.log(4.0), np.log(2.0), logsumexp([10, -5])],
                               rtol=1e-6)
    t = 2.0
    expect = t * logsumexp(logits.double().numpy() / t, axis=1)
    np.testing.assert_allclose(create("energy", temperature=t).fit(ctx).score(feats), expect, rtol=1e-12)


def test_mahalanobis_matches_explicit_inverse():
    model, feats, ctx = handmade(n=400)
    det = create("mahalanobis").fit(ctx)
    x, y = feats.penultimate.double().numpy(), feats.labels.numpy()
    means = np.stack([x[y == c].mean(0) for c in range(5)])
    resid = x - means[y]
    inv = np.linalg.inv(resid.T @ resid / len(x))
    test = make_test(model)
    h = test.penultimate.double().numpy()
    d = np.array([[(hi - m) @ inv @ (hi - m) for m in means] for hi in h])
    np.testing.assert_allclose(det.score(test), -d.min(1), rtol=1e-7, atol=1e-7)


def test_mahalanobis_is_exact_far_from_the_origin():
    # features with a large common offset and a small spread (like post-ReLU features of a network
    # whose activations share a big mean): a naive h'Ph - 2h'P mu + mu'P mu loses all digits here
    model, feats, ctx = handmade(n=400)
    test = make_test(model)
    base = create("mahalanobis").fit(ctx).score(test)

    def shifted(fs):
        return FeatureSet(fs.logits, fs.penultimate.double() * 0.01 + 1e5, fs.labels)

    far = create("mahalanobis").fit(FitContext(model=model, train=shifted(feats))).score(shifted(test))
    np.testing.assert_allclose(far, base, rtol=1e-6)


def test_mahalanobis_input_preprocessing_matches_autograd(toy):
    eps = 0.01
    det = create("mahalanobis", noise=eps, batch_size=7).fit(toy.ctx())
    plain = create("mahalanobis").fit(toy.ctx())
    mu, prec = det.means_, det.precision_
    ds = toy.ood_near.subset(np.arange(20))
    feats = FeatureSet(toy.near.logits[:20], toy.near.penultimate[:20], toy.near.labels[:20], images=ds)
    expect = []
    for i in range(20):
        x = ds.float_images(i, i + 1).requires_grad_(True)
        h = toy.model.forward_all(x).penultimate.double()[0]
        d = torch.stack([(h - m) @ prec @ (h - m) for m in mu])
        d.min().backward()
        x2 = (x - eps * x.grad.sign()).detach()  # = x + eps * sign(grad M), M = -min distance
        h2 = toy.model.forward_all(x2).penultimate.double()[0]
        expect.append(-min(float((h2 - m) @ prec @ (h2 - m)) for m in mu))
    got = det.score(feats)
    np.testing.assert_allclose(got, expect, rtol=1e-6, atol=1e-6)
    # the step moves towards the closest class: the score never gets (noticeably) worse
    assert np.all(got >= plain.score(feats) - 1e-6) and np.mean(got > plain.score(feats)) > 0.9


def test_react_clips_at_the_percentile():
    model, feats, ctx = handmade()
    det = create("react", percentile=90).fit(ctx)
    c = np.percentile(feats.penultimate.numpy().ravel(), 90)
    assert det.threshold_ == pytest.approx(c, rel=1e-6)
    test = make_test(model)
    h = test.penultimate.double().numpy()
    w, b = model.head.weight.double().numpy(), model.head.bias.double().numpy()
    assert (h > c).any()  # clipping is actually exercised
    np.testing.assert_allclose(det.score(test), logsumexp(np.minimum(h, c) @ w.T + b, axis=1), rtol=1e-10)
    # nothing clipped at the 100th percentile of a set whose max exceeds every test value -> plain energy
    big = FeatureSet(feats.logits, feats.penultimate * 100, feats.labels)
    no_clip = create("react", percentile=100).fit(FitContext(model=model, train=big))
    np.testing.assert_allclose(no_clip.score(test), create("energy").fit(ctx).score(test), rtol=1e-5)


def test_dice_mask_sparsity_and_formula():
    model, feats, ctx = handmade(n=500, dim=40, classes=5)
    det = create("dice", sparsity=0.9).fit(ctx)
    mask = det.mask_.numpy()
    assert mask.shape == (5, 40)
    assert mask.sum() == 20  # top 10 % of 200 contributions
    w = model.head.weight.double().numpy()
    contrib = w * feats.penultimate.double().numpy().mean(0)
    assert contrib[mask].min() > contrib[~mask].max()  # the kept entries are the largest contributions
    test = make_test(model, dim=40)
    h = test.penultimate.double().numpy()
    np.testing.assert_allclose(det.score(test), logsumexp(h @ (w * mask).T + model.head.bias.double().numpy(), axis=1),
                               rtol=1e-10)
    dense = create("dice", sparsity=0.0).fit(ctx)
    assert dense.mask_.float().mean() > 0.99


def knn_reference(train_h, test_h, k):
    z = train_h.numpy() / np.linalg.norm(train_h.numpy(), axis=1, keepdims=True)
    q = test_h.numpy() / np.linalg.norm(test_h.numpy(), axis=1, keepdims=True)
    dist, _ = NearestNeighbors(n_neighbors=k).fit(z).kneighbors(q)
    return -dist[:, -1]


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_knn_matches_sklearn_neighbors(backend):
    if backend == "faiss" and not faiss_available():
        pytest.skip("faiss not installed")
    model, feats, ctx = handmade(n=500)
    test = make_test(model, n=80)
    det = create("knn", k=7, backend=backend, batch_size=16, progress=False).fit(ctx)
    assert det.backend_ == backend
    np.testing.assert_allclose(det.score(test), knn_reference(feats.penultimate, test.penultimate, 7), atol=2e-5)


def test_knn_backends_agree_and_train_fraction(toy):
    auto = create("knn", progress=False).fit(toy.ctx())
    torch_ = create("knn", backend="torch", progress=False).fit(toy.ctx())
    assert auto.backend_ == ("faiss" if faiss_available() else "torch")
    for fs in (toy.test, toy.far):
        np.testing.assert_allclose(auto.score(fs), torch_.score(fs), atol=2e-5)
    sub = create("knn", k=5, train_fraction=0.25, progress=False).fit(toy.ctx(seed=3))
    assert sub.bank_size == 200
    assert (auto.train_ is None) == (auto.index_ is not None)  # one copy of the bank, not two
    again = create("knn", k=5, train_fraction=0.25, progress=False).fit(toy.ctx(seed=3))
    np.testing.assert_array_equal(sub.score(toy.test), again.score(toy.test))


def vim_reference(train: FeatureSet, test: FeatureSet, w, b, dim):
    """The authors' numpy code (haoqiwang/vim, benchmark.py), transcribed."""
    u = -np.matmul(np.linalg.pinv(w), b)
    ftr, fte = train.penultimate.double().numpy(), test.penultimate.double().numpy()
    ec = EmpiricalCovariance(assume_centered=True).fit(ftr - u)
    eig_vals, eigen_vectors = np.linalg.eig(ec.covariance_)
    ns = np.ascontiguousarray((eigen_vectors.T[np.argsort(eig_vals * -1)[dim:]]).T)
    vlogit_train = np.linalg.norm((ftr - u) @ ns, axis=-1)
    alpha = (ftr @ w.T + b).max(axis=-1).mean() / vlogit_train.mean()
    vlogit = np.linalg.norm((fte - u) @ ns, axis=-1) * alpha
    return -vlogit + logsumexp(fte @ w.T + b, axis=-1)


def test_vim_matches_numpy_reimplementation():
    model, feats, ctx = handmade(n=400, dim=12, classes=5)
    test = make_test(model)
    w, b = model.head.weight.double().numpy(), model.head.bias.double().numpy()
    det = create("vim").fit(ctx)
    assert det.principal_dim_ == 6  # feature_dim // 2 for small features
    np.testing.assert_allclose(det.score(test), vim_reference(feats, test, w, b, 6), rtol=1e-5, atol=1e-5)
    det4 = create("vim", principal_dim=4).fit(ctx)
    np.testing.assert_allclose(det4.score(test), vim_reference(feats, test, w, b, 4), rtol=1e-5, atol=1e-5)


def test_vim_default_dims():
    from oodforge.detectors.vim import default_principal_dim

    assert [default_principal_dim(d) for d in (2048, 4096, 768, 1024, 512, 64)] == [1000, 1000, 512, 512, 256, 32]


def test_odin_matches_explicit_autograd(toy):
    t, eps = 1000.0, 0.0014
    det = create("odin", batch_size=16, progress=False).fit(toy.ctx())
    assert (det.temperature, det.epsilon) == (t, eps)  # paper defaults
    ds = toy.ood_near.subset(np.arange(30))
    feats = FeatureSet(toy.near.logits[:30], toy.near.penultimate[:30], toy.near.labels[:30], images=ds)
    expect = []
    for i in range(30):
        x = ds.float_images(i, i + 1).requires_grad_(True)
        logits = toy.model(x)
        log_s = torch.log_softmax(logits / t, dim=1)[0, logits.argmax()]
        (-log_s).backward()
        x_tilde = x.detach() - eps * torch.sign(x.grad)  # x - eps * sign(-grad log S_yhat)
        expect.append(torch.softmax(toy.model(x_tilde).double() / t, dim=1).max().item())
    got = det.score(feats)
    np.testing.assert_allclose(got, expect, rtol=1e-9, atol=1e-12)
    # without perturbation ODIN is temperature-scaled MSP, and the perturbation raises the score
    no_eps = create("odin", epsilon=0.0, progress=False).fit(toy.ctx()).score(feats)
    np.testing.assert_allclose(no_eps, create("msp", temperature=t).fit(toy.ctx()).score(feats), rtol=1e-6)
    assert np.all(got >= no_eps - 1e-12) and np.mean(got > no_eps) > 0.9


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_gradnorm_closed_form_matches_autograd(temperature):
    model, feats, ctx = handmade(n=20, classes=5)
    det = create("gradnorm", temperature=temperature).fit(ctx)
    head = torch.nn.Linear(12, 5).double()
    head.load_state_dict({k: v.double() for k, v in model.head.state_dict().items()})
    h64 = feats.penultimate.double()
    with torch.no_grad():
        feats = FeatureSet(head(h64), h64, feats.labels)  # float64 logits, so rounding is not what we measure
    expect = []
    for h in feats.penultimate:
        head.zero_grad()
        z = head(h[None]) / temperature
        u = torch.full((1, 5), 1 / 5, dtype=torch.float64)
        kl = (u * (u.log() - torch.log_softmax(z, dim=1))).sum()  # KL(u || softmax(z / T))
        kl.backward()
        expect.append(head.weight.grad.abs().sum().item())
    np.testing.assert_allclose(det.score(feats), expect, rtol=1e-10)


# --- behaviour on the toy problem ---------------------------------------------------------------

FEATURE_SPACE = ["mahalanobis", "knn", "vim"]


@pytest.fixture(scope="module")
def toy_results(toy):
    out = {}
    for name in POSTHOC:
        det = create(name, **QUIET.get(name, {})).fit(toy.ctx())
        sid = det.score(toy.test)
        out[name] = (sid, evaluate(sid, det.score(toy.near)), evaluate(sid, det.score(toy.far)),
                     det.score(toy.near))
    return out


def test_toy_classifier_is_accurate(toy):
    assert (toy.test.logits.argmax(1) == toy.test.labels).float().mean() > 0.98


@pytest.mark.parametrize("name", POSTHOC)
def test_detects_the_between_class_blob(name, toy_results):
    sid, near, _, sn = toy_results[name]
    # higher = more ID: a sign flip gives AUROC ~ 0.03 and FPR95 ~ 1 and fails both
    assert near["auroc"] > 0.95 and near["fpr95"] < 0.25, near
    assert np.median(sid) > np.median(sn)


@pytest.mark.parametrize("name", FEATURE_SPACE)
def test_feature_space_detectors_detect_far_noise(name, toy_results):
    _, _, far, _ = toy_results[name]
    # MSP reaches only ~0.8 AUROC / 0.3 FPR95 here (over-confident ReLU extrapolation), so a
    # detector silently returning MSP (or energy) fails
    assert far["auroc"] > 0.97 and far["fpr95"] < 0.05, far
    assert toy_results["msp"][2]["auroc"] < far["auroc"] - 0.1


def test_react_improves_energy_on_far_noise(toy_results):
    # the point of ReAct: clipping the abnormal activations of far inputs lowers their energy
    assert toy_results["react"][2]["auroc"] > toy_results["energy"][2]["auroc"] + 0.08


def test_detectors_are_not_msp_in_disguise(toy_results):
    msp = toy_results["msp"][0]
    for name in POSTHOC:
        if name != "msp":
            assert not np.allclose(toy_results[name][0], msp), name


def test_knn_faiss_state_restores_without_faiss(toy, monkeypatch):
    """A knn fitted with faiss keeps its bank once (in the index); restored where faiss is missing, the index's
    vectors become the torch backend's bank and the scores agree."""
    import builtins
    import sys

    pytest.importorskip("faiss")
    from oodforge.deploy.state import detector_state, restore_detector

    det = create("knn", k=5, progress=False).fit(toy.ctx())
    assert det.backend_ == "faiss" and det.train_ is None
    manifest, tensors = detector_state(det, toy.model)
    real_import = builtins.__import__

    def no_faiss(name, *a, **kw):
        if name == "faiss":
            raise ImportError("no faiss here")
        return real_import(name, *a, **kw)

    monkeypatch.delitem(sys.modules, "faiss")
    monkeypatch.setattr(builtins, "__import__", no_faiss)
    with pytest.warns(UserWarning, match="torch backend"):
        restored = restore_detector(manifest, tensors, toy.model, "cpu")
    assert restored.backend_ == "torch" and restored.bank_size == det.bank_size
    np.testing.assert_allclose(restored.score(toy.far), det.score(toy.far), atol=2e-5)


def test_knn_faiss_index_filled_in_place_equals_faiss_add(toy, monkeypatch):
    """``_flat_index`` writes the normalised rows into the index's storage; on a faiss build that does not expose
    it, it falls back to ``add``: both give the same index, hence the same scores."""
    faiss = pytest.importorskip("faiss")
    from oodforge.detectors.knn import _flat_index

    h = toy.ctx().train.penultimate
    filled = _flat_index(faiss, h)
    monkeypatch.delattr(faiss, "rev_swig_ptr")
    added = _flat_index(faiss, h)
    assert filled.ntotal == added.ntotal == len(h)
    np.testing.assert_array_equal(filled.reconstruct_n(0, len(h)), added.reconstruct_n(0, len(h)))
    q = np.ascontiguousarray(toy.far.penultimate[:20].numpy(), dtype=np.float32)
    np.testing.assert_array_equal(filled.search(q, 5)[0], added.search(q, 5)[0])
