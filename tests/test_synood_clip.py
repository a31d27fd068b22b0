"""SynOOD's CLIP side: WordNet lexicon, NegMining, Eq. 2 + grouping, MCM, and the mcm / neglabel /
synood detectors end to end on a tiny random CLIP built from configs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oodforge.data.base import ArrayDataset
from oodforge.detectors import FitContext, create
from oodforge.hub import ModelUnavailableError
from oodforge.models.featureset import FeatureSet
from oodforge.synood.clip_detectors import (
    NEGLABEL_ADJ_TEMPLATE,
    NEGLABEL_NOUN_TEMPLATE,
    mcm_score,
    mine_from_lexicon,
    mine_negative_labels,
    neglabel_score,
)
from oodforge.synood.clip_model import clear_loaded, load_clip
from oodforge.synood.wordnet import WordNetNotFoundError, load_wordnet, parse_data_file

NOUNS = """\
  1 This software and database is being provided to you, the LICENSEE, by
  2 Princeton University under the following license.
00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived
00002137 03 n 02 abstraction 0 abstract_entity 0 000 | a general concept
00002452 03 n 01 thing 0 000 | a separate entity
00003000 05 n 02 sky 0 welkin 0 000 | the atmosphere
00003100 05 n 01 Mercury 0 000 | the planet
00003200 05 n 01 mercury 0 000 | the metal
00003300 05 n 01 boot 0 000 | footwear (an ID class name: never a negative label)
00003400 06 n 0b w1 0 w2 0 w3 0 w4 0 w5 0 w6 0 w7 0 w8 0 w9 0 w10 0 w11 0 000 | eleven lemmas (hex count)
"""
ADJS = """\
  1 header
00001740 00 a 01 able 0 000 | skilled
00002098 00 a 01 unable 0 000 | not able
00002312 00 a 02 abaxial 0 dorsal 4 000 | facing away
00002400 00 s 01 galore(ip) 0 000 | plentiful
00002500 00 s 01 elect(p) 0 000 | chosen
"""


@pytest.fixture(scope="module")
def wordnet_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("wordnet")
    (d / "data.noun").write_text(NOUNS)
    (d / "data.adj").write_text(ADJS)
    return d


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from oodforge.synood.tiny import build_tiny_clip

    clear_loaded()
    return str(build_tiny_clip(tmp_path_factory.mktemp("clip") / "clip", seed=0))


def _fs(ds: ArrayDataset) -> FeatureSet:
    n = len(ds)
    return FeatureSet(torch.zeros(n, 2), torch.zeros(n, 2), ds.labels, images=ds)


# --- WordNet ---------------------------------------------------------------------------------------
def test_wordnet_parses_lemmas_markers_hex_counts_and_dedups(wordnet_dir):
    w = load_wordnet(wordnet_dir)
    assert w["noun"] == ["entity", "abstraction", "abstract entity", "thing", "sky", "welkin", "Mercury", "boot",
                         *[f"w{i}" for i in range(1, 12)]]
    assert w["adj"] == ["able", "unable", "abaxial", "dorsal", "galore", "elect"]
    assert load_wordnet(wordnet_dir, first_lemma_only=True)["noun"] == [
        "entity", "abstraction", "thing", "sky", "Mercury", "boot", "w1"]


def test_wordnet_errors_name_the_fix(tmp_path, wordnet_dir):
    with pytest.raises(WordNetNotFoundError, match="wordnet-base.*--wordnet-dir"):
        load_wordnet(tmp_path)
    bad = tmp_path / "data.noun"
    bad.write_text("00001740 03 n zz entity 0 000 | broken count\n")
    with pytest.raises(ValueError, match=r"data.noun:1: not a WordNet data line"):
        parse_data_file(bad)


def test_debian_wordnet_is_readable_when_installed():
    try:
        w = load_wordnet()
    except WordNetNotFoundError:
        pytest.skip("wordnet-base not installed")
    assert len(w["noun"]) > 50000 and len(w["adj"]) > 10000
    assert "dog" in w["noun"] and "red" in w["adj"]


# --- NegMining and scores ----------------------------------------------------------------------------
def test_mine_negative_labels_matches_percentile_distance_reference():
    g = torch.Generator().manual_seed(0)
    pos = torch.nn.functional.normalize(torch.randn(7, 16, generator=g), dim=1)
    cand = torch.nn.functional.normalize(torch.randn(300, 16, generator=g), dim=1)
    got = mine_negative_labels(pos, cand, 40, percentile=0.95)
    sims = cand.double().numpy() @ pos.double().numpy().T
    dist = np.percentile(-sims, 5, axis=1)  # NegLabel Eq. 5: eta = 0.05 percentile of -cos
    want = np.argsort(-dist, kind="stable")[:40]
    assert got.tolist() == want.tolist()
    # the mined labels are on average farther from every ID label than the rest
    rest = np.setdiff1d(np.arange(300), want)
    assert sims[want].max(1).mean() < sims[rest].max(1).mean()


def test_mine_negative_labels_picks_the_far_words():
    pos = torch.eye(4)[:2]  # ID labels along e0, e1
    cand = torch.tensor([[1.0, 0, 0, 0], [0, 0, 1.0, 0], [0.7, 0.7, 0, 0], [0, 0, 0, 1.0], [0.6, 0, 0.8, 0]])
    assert sorted(mine_negative_labels(pos, cand, 2).tolist()) == [1, 3]


def test_neglabel_score_is_eq2_and_grouping_averages_groups():
    g = torch.Generator().manual_seed(1)
    img = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=1)
    pos = torch.nn.functional.normalize(torch.randn(3, 8, generator=g), dim=1)
    neg = torch.nn.functional.normalize(torch.randn(10, 8, generator=g), dim=1)
    tau = 0.05
    e_pos = np.exp(img.double().numpy() @ pos.double().numpy().T / tau).sum(1)
    e_neg_all = np.exp(img.double().numpy() @ neg.double().numpy().T / tau)
    eq2 = e_pos / (e_pos + e_neg_all.sum(1))
    np.testing.assert_allclose(neglabel_score(img, pos, neg, tau, ngroup=1).numpy(), eq2, rtol=1e-5)
    # 3 groups of 3 (one label dropped), permutation from the seed
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(7)).numpy()[:9].reshape(3, 3)
    grouped = np.mean([e_pos / (e_pos + e_neg_all[:, grp].sum(1)) for grp in perm], axis=0)
    np.testing.assert_allclose(neglabel_score(img, pos, neg, tau, ngroup=3, seed=7).numpy(), grouped, rtol=1e-5)
    assert not np.allclose(grouped, eq2)


def test_mcm_score_is_max_softmax_of_cosine_over_T():
    g = torch.Generator().manual_seed(2)
    img = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=1)
    pos = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=1)
    cos = img.double().numpy() @ pos.double().numpy().T
    sm = np.exp(cos) / np.exp(cos).sum(1, keepdims=True)  # T = 1 (MCM default)
    np.testing.assert_allclose(mcm_score(img, pos).numpy(), sm.max(1), rtol=1e-6)
    # a sharper temperature can only increase the max probability
    assert bool((mcm_score(img, pos, 0.1) >= mcm_score(img, pos, 1.0) - 1e-7).all())


# --- tiny CLIP end to end ----------------------------------------------------------------------------
def test_clip_features_gray_is_repeated_rgb_and_cached(tiny_clip, tmp_path):
    clip = load_clip(tiny_clip, cache_dir=tmp_path)
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (3, 1, 28, 28), dtype=np.uint8)
    f_gray = clip.image_features(ArrayDataset(gray, identity="gray"))
    f_rgb = clip.image_features(ArrayDataset(np.repeat(gray, 3, axis=1), identity="rgb"))
    torch.testing.assert_close(f_gray, f_rgb)
    torch.testing.assert_close(f_gray.norm(dim=1), torch.ones(3))
    assert clip.image_features(ArrayDataset(gray, identity="gray")) is f_gray  # computed once per image set
    assert len(list((tmp_path / "clip").glob("*.pt"))) == 2
    clip._mem.clear()
    torch.testing.assert_close(clip.image_features(ArrayDataset(gray, identity="gray")), f_gray)  # from disk
    t = clip.encode_text(["the nice boot", "the nice shirt", "the nice boot"])
    torch.testing.assert_close(t[0], t[2])
    assert not torch.allclose(t[0], t[1])


def test_clip_detectors_need_a_model_and_class_names(tiny_clip):
    ds = ArrayDataset(np.zeros((2, 1, 28, 28), np.uint8), np.array([0, 1]), ["shirt", "boot"])
    for name in ("mcm", "neglabel"):
        with pytest.raises(ModelUnavailableError, match="--clip-model"):
            create(name).fit(FitContext(model=None, train=_fs(ds), extra={"class_names": ds.class_names}))
    with pytest.raises(ModelUnavailableError, match="does not exist.*--clip-model"):
        create("mcm", clip_model="/nonexistent/clip").fit(
            FitContext(model=None, train=_fs(ds), extra={"class_names": ds.class_names}))
    with pytest.raises(ValueError, match="class names"):
        create("mcm", clip_model=tiny_clip).fit(FitContext(model=None, train=_fs(ds)))


def test_mcm_and_neglabel_detectors_end_to_end(tiny_clip, wordnet_dir):
    rng = np.random.default_rng(0)
    train = ArrayDataset(rng.integers(0, 256, (8, 1, 28, 28), dtype=np.uint8), np.array([0, 1] * 4),
                         ["shirt", "boot"])
    test = ArrayDataset(rng.integers(0, 256, (5, 1, 28, 28), dtype=np.uint8))
    ctx = FitContext(model=None, train=_fs(train), extra={"class_names": train.class_names, "clip_model": tiny_clip})
    clip = load_clip(tiny_clip)
    img = clip.image_features(test)

    mcm = create("mcm").fit(ctx)  # the CLIP model from FitContext.extra (CLI --clip-model)
    pos = clip.encode_text(["a photo of a shirt.", "a photo of a boot."])
    np.testing.assert_allclose(mcm.score(_fs(test)), mcm_score(img, pos).numpy(), rtol=1e-6)

    neg = create("neglabel", wordnet_dir=str(wordnet_dir), num_neg=10, ngroup=2).fit(ctx)
    assert "boot" not in neg.neg_words_  # ID names are never negative labels
    lex = load_wordnet(wordnet_dir, first_lemma_only=True)
    n_cand = len(lex["noun"]) - 1 + len(lex["adj"])
    assert len(neg.neg_words_) == round(10 / n_cand * (len(lex["noun"]) - 1)) + round(10 / n_cand * len(lex["adj"]))
    pos_nl = clip.encode_text(["the nice shirt", "the nice boot"])
    np.testing.assert_allclose(neg.score(_fs(test)),
                               neglabel_score(img, pos_nl, neg.neg_feats_, 0.01, 2, ctx.seed).numpy(), rtol=1e-6)
    # the mined nouns are the farthest by NegMining, with NegLabel's prompts
    mined = mine_from_lexicon(clip, pos_nl, lex, ["shirt", "boot"], num=10)
    words, prompts = mined.words, mined.prompts
    torch.testing.assert_close(mined.feats, neg.neg_feats_)
    raw = clip.encode_text(prompts, normalize=False)
    torch.testing.assert_close(mined.norms, raw.norm(dim=1))
    torch.testing.assert_close(mined.feats, torch.nn.functional.normalize(raw, dim=1))
    assert prompts[0] == NEGLABEL_NOUN_TEMPLATE.format(words[0])
    assert prompts[-1] == NEGLABEL_ADJ_TEMPLATE.format(words[-1])
    nouns = [w for w in lex["noun"] if w != "boot"]
    f_all = clip.encode_text([NEGLABEL_NOUN_TEMPLATE.format(w) for w in nouns])
    top = mine_negative_labels(pos_nl, f_all, sum(w in nouns for w in words))
    assert [nouns[i] for i in top.tolist()] == [w for w in words if w in nouns]


def test_synood_detector_end_to_end(tiny_clip, wordnet_dir):
    rng = np.random.default_rng(1)
    train = ArrayDataset(rng.integers(0, 256, (12, 1, 28, 28), dtype=np.uint8), np.array([0, 1, 2] * 4),
                         ["shirt", "boot", "bag"])
    outliers = ArrayDataset(rng.integers(0, 256, (16, 3, 28, 28), dtype=np.uint8), np.array([0, 1, 2, 0] * 4))
    test = ArrayDataset(rng.integers(0, 256, (6, 1, 28, 28), dtype=np.uint8))
    ctx = FitContext(model=None, train=_fs(train), outliers=_fs(outliers),
                     extra={"class_names": train.class_names, "clip_model": tiny_clip})
    with pytest.raises(ValueError, match="outliers"):
        create("synood", wordnet_dir=str(wordnet_dir)).fit(
            FitContext(model=None, train=_fs(train), outliers=FeatureSet(torch.zeros(1, 2), torch.zeros(1, 2),
                                                                         torch.zeros(1)), extra=ctx.extra))
    base = create("neglabel", wordnet_dir=str(wordnet_dir), num_neg=10, ngroup=2).fit(ctx)
    det = create("synood", wordnet_dir=str(wordnet_dir), num_neg=10, ngroup=2, per_class=2).fit(ctx)
    s = det.score(_fs(test))
    assert s.shape == (6,) and np.all((s > 0) & (s < 1))
    # the mined labels are NegLabel's; only the learnable subset (<= half) moved
    assert det.neg_words_ == base.neg_words_
    moved = (det.neg_feats_ - base.neg_feats_).norm(dim=1) > 1e-6
    assert 0 < int(moved.sum()) <= 5 and set(torch.nonzero(moved).flatten().tolist()) <= set(det.learnable_.tolist())
    assert det.history_["label_loss"][-1] < det.history_["label_loss"][0]
    assert det.variant == "table1" and det.projection_ is not None  # the paper's configuration by default
    assert det.history_["projection_loss"][-1] < det.history_["projection_loss"][0]
    lab = create("synood", wordnet_dir=str(wordnet_dir), num_neg=10, ngroup=2, per_class=2,
                 variant="labels-only").fit(ctx)
    assert lab.projection_ is None
    # table1 trains the label features as labels-only does (on the unprojected features): the same features
    torch.testing.assert_close(lab.neg_feats_, det.neg_feats_, rtol=0, atol=0)
    # fine-tuned labels attract the outliers: their score drops compared with plain NegLabel (without the
    # projection; on this random tiny CLIP three steps of it scramble the feature space)
    assert lab.score(_fs(outliers)).mean() < base.score(_fs(outliers)).mean()


def _synood_data(tiny_clip):
    rng = np.random.default_rng(2)
    train = ArrayDataset(rng.integers(0, 256, (9, 3, 28, 28), dtype=np.uint8), np.array([0, 1, 2] * 3),
                         ["shirt", "boot", "bag"])
    outliers = ArrayDataset(rng.integers(0, 256, (12, 3, 28, 28), dtype=np.uint8))
    test = ArrayDataset(rng.integers(0, 256, (5, 3, 28, 28), dtype=np.uint8))
    ctx = FitContext(model=None, train=_fs(train), outliers=_fs(outliers),
                     extra={"class_names": train.class_names, "clip_model": tiny_clip})
    return ctx, outliers, test


def test_synood_every_variant_fits_and_scores(tiny_clip, wordnet_dir):
    from oodforge.synood.finetune import VARIANTS

    ctx, _, test = _synood_data(tiny_clip)
    base = create("neglabel", wordnet_dir=str(wordnet_dir), num_neg=10, ngroup=2).fit(ctx)
    for variant, spec in VARIANTS.items():
        det = create("synood", wordnet_dir=str(wordnet_dir), num_neg=10, ngroup=2, variant=variant,
                     proj_epochs=2, label_epochs=2).fit(ctx)
        s = det.score(_fs(test))
        assert s.shape == (5,) and np.all((s >= 0) & (s <= 1)), variant
        assert det.variant == variant and (det.projection_ is not None) == spec.projection
        assert ("label_loss" in det.history_) == (spec.labels_on is not None)
        if variant == "no-finetune":  # nothing trained: NegLabel's score
            np.testing.assert_allclose(s, base.score(_fs(test)), rtol=1e-6)


def test_synood_table1_trains_labels_on_raw_features_and_scores_through_the_projection(tiny_clip, wordnet_dir):
    from oodforge.synood.finetune import assign_negative_labels, learnable_subset, train_label_features

    ctx, outliers, test = _synood_data(tiny_clip)
    det = create("synood", wordnet_dir=str(wordnet_dir), num_neg=10, ngroup=2, proj_epochs=2, label_epochs=3).fit(ctx)
    assert det.variant == "table1" and det.projection_ is not None  # (c) the default
    clip = load_clip(tiny_clip)
    pos = clip.encode_text(["the nice shirt", "the nice boot", "the nice bag"])
    mined = mine_from_lexicon(clip, pos, load_wordnet(wordnet_dir, first_lemma_only=True), ["shirt", "boot", "bag"],
                              num=10)
    # (a) the label features are Eq. 14 trained on the frozen, unprojected CLIP features of the outliers
    raw_out = clip.image_features(outliers)
    sub = learnable_subset(assign_negative_labels(raw_out, mined.feats), len(mined.feats), 0.5)
    torch.testing.assert_close(det.learnable_, sub)
    targets = assign_negative_labels(raw_out, mined.feats[sub])
    init = mined.feats[sub] * mined.norms[sub].unsqueeze(1)
    raw, _ = train_label_features(raw_out, targets, init, epochs=3, seed=ctx.seed)
    torch.testing.assert_close(det.neg_feats_[sub], raw)
    projd, _ = train_label_features(raw_out, targets, init, epochs=3, seed=ctx.seed, projection=det.projection_)
    assert (projd - raw).abs().max() > 1e-4  # the check above tells the two apart
    # (b) scoring is Eq. 2 (with NegLabel's grouping) on the projected image features
    img = clip.image_features(test)
    with torch.no_grad():
        img_p = det.projection_(img)
    assert (img_p - img).abs().max() > 1e-3
    s = det.score(_fs(test))
    np.testing.assert_allclose(s, neglabel_score(img_p, pos, det.neg_feats_, 0.01, 2, ctx.seed).numpy(), rtol=1e-6)
    assert np.abs(s - neglabel_score(img, pos, det.neg_feats_, 0.01, 2, ctx.seed).numpy()).max() > 1e-6
    # Eq. 2 by hand, one group: sum_ID e^{cos/tau} / (sum_ID e^{cos/tau} + sum_NEG e^{cos/tau}), in float64
    one = create("synood", wordnet_dir=str(wordnet_dir), num_neg=10, ngroup=1, proj_epochs=2, label_epochs=3).fit(ctx)
    with torch.no_grad():
        x = one.projection_(img).double()
    e_pos = torch.exp(x @ pos.double().T / 0.01).sum(1)
    e_neg = torch.exp(x @ one.neg_feats_.double().T / 0.01).sum(1)
    np.testing.assert_allclose(one.score(_fs(test)), (e_pos / (e_pos + e_neg)).numpy(), rtol=1e-5)


def test_synood_variant_is_checked_at_construction(wordnet_dir):
    from oodforge.synood.detector import SynOOD

    with pytest.raises(ValueError, match="^synood: variant must be one of 'table1', 'labels-only', "
                                         "'projected-labels', 'projection-only', 'no-finetune', got 'best'$"):
        create("synood", variant="best")
    with pytest.raises(ValueError, match="variant must be one of"):
        SynOOD(variant="Table1")  # the constructor checks, not only create()
    with pytest.raises(ValueError, match="has no parameter 'use_projection'"):
        create("synood", use_projection=True)  # the former boolean is gone: variant names the configuration
    # every name survives the CLI / bench method syntax (where a bare "none" would parse as None)
    from oodforge.bench import parse_method
    from oodforge.synood.finetune import VARIANTS

    for v in VARIANTS:
        name, params = parse_method(f"synood:num_neg=10,variant={v}")
        assert create(name, **params).variant == v
