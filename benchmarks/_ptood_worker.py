"""pytorch-ood's side of ``benchmarks/bench_vs_pytorch_ood.py``; runs in the pytorch-ood venv, not oodforge's.

Reads what the main script wrote into ``--data DIR``: the classifier (``backbone.pt2``, a ``torch.export`` of
oodforge's ``feature_map`` -- normalisation and body -- plus ``head.pt``, the class head's weight and bias), the
uint8 images and labels of every set (``images_<set>.npy``, ``labels_<set>.npy``) and the cached features of
oodforge's forward pass (``logits_<set>.npy``, ``penultimate_<set>.npy``, ``fmap_<set>.npy``). Writes every
score array to ``DIR/ptood_scores/<part>/<detector>__<set>.npy`` (pytorch-ood's sign: higher = more OOD) and
prints one JSON object on stdout: the seconds of each detector in both parts.

* ``whole``: pytorch-ood's usual loop, per detector: ``fit(train_loader)`` (the validation loader for the two
  detectors oodforge fits on validation data) and ``predict`` batch by batch over every scored set's loader,
  i.e. the network runs again for every detector.
* ``maths``: ``fit_logits`` / ``fit_features`` / ``fit_feature_maps`` and ``predict_*`` on the same tensors
  oodforge's detectors read (``--repeats`` times, the median); detectors that need images are not in it.

No oodforge import: only torch, numpy and pytorch-ood. pytorch-ood imports torchvision at import time for its
model zoo, datasets and augmentations, none of which this benchmark uses; where PyPI's torchvision does not load
beside a CPU build of torch (its C ops are built for the CUDA build: "operator torchvision::nms does not exist"),
the worker installs a placeholder ``torchvision`` package (every name a dummy class) before importing pytorch-ood,
and records that it did.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch


def _torchvision_placeholder() -> bool:
    """Make ``import torchvision...`` succeed with dummy names when the real package does not load; True if used."""
    import importlib.abc
    import importlib.machinery
    import types

    try:
        import torchvision  # noqa: F401

        return False
    except Exception:  # noqa: BLE001 -- any failure to load it: the placeholder instead
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]

    class _Module(types.ModuleType):
        def __getattr__(self, attr):
            if attr.startswith("__"):
                raise AttributeError(attr)
            cls = type(attr, (torch.nn.Module,), {})  # e.g. ResNet, BasicBlock, Compose: never called here
            setattr(self, attr, cls)
            return cls

    class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, fullname, path, target=None):
            if fullname == "torchvision" or fullname.startswith("torchvision."):
                return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
            return None

        def create_module(self, spec):
            m = _Module(spec.name)
            m.__path__ = []
            return m

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, _Finder())
    return True


TORCHVISION_PLACEHOLDER = _torchvision_placeholder()
import pytorch_ood  # noqa: E402
from pytorch_ood import detector as D  # noqa: E402


class Net(torch.nn.Module):
    """The classifier: exported feature map -> global average pool -> linear head (oodforge's Classifier)."""

    def __init__(self, backbone: torch.nn.Module, head: torch.nn.Linear):
        super().__init__()
        self.backbone, self.head = backbone, head

    def features(self, x):
        return self.backbone(x).mean(dim=(2, 3))

    def forward(self, x):
        return self.head(self.features(x))


class _Batches(torch.utils.data.Dataset):
    """Batches of uint8 images as float32 in [0, 1] (what oodforge's models take), indexed by a BatchSampler."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = torch.from_numpy(images), torch.from_numpy(labels).long()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, idx):
        return self.images[idx].float().div_(255.0), self.labels[idx]


def loader(images, labels, batch_size):
    sampler = torch.utils.data.BatchSampler(torch.utils.data.SequentialSampler(range(len(images))), batch_size, False)
    return torch.utils.data.DataLoader(_Batches(images, labels), batch_size=None, sampler=sampler)


def build(name: str, net: Net):
    """pytorch-ood's detector matching oodforge's ``name`` with the same parameters, and the data it fits on."""
    enc, head = net.features, net.head

    def pooled_map(x):  # the pooled vector as a 1x1 map, for the map-shaping detectors (ASH / SCALE)
        return enc(x)[:, :, None, None]

    def head_of_map(fm):
        return head(fm.mean(dim=(2, 3)))

    w, b = head.weight.detach(), head.bias.detach()
    table = {
        "msp": lambda: D.MaxSoftmax(net), "maxlogit": lambda: D.MaxLogit(net),
        "energy": lambda: D.EnergyBased(net), "entropy": lambda: D.Entropy(net),
        "gen": lambda: D.GEN(net, gamma=0.1, M=None),
        "tempscale": lambda: D.TemperatureScaling(net), "klm": lambda: D.KLMatching(net),
        "odin": lambda: D.ODIN(net, eps=0.0014, temperature=1000.0),
        "gradnorm": lambda: D.GradNorm(net, param_filter=lambda n: n == "head.weight", temperature=1.0),
        "react": lambda: D.ReAct(enc, head, percentile=0.9),
        "dice": lambda: D.DICE(enc, w, b, p=0.9),
        "vra": lambda: D.VRA(enc, head, lower_percentile=0.6, upper_percentile=0.9),
        "ash": lambda: D.ASH(pooled_map, head_of_map, variant="ash-s", percentile=0.95),
        "scale": lambda: D.SCALE(pooled_map, head_of_map, percentile=0.85),
        "rankfeat": lambda: D.RankFeat(net.backbone, head_of_map),
        "mahalanobis": lambda: D.Mahalanobis(enc), "rmds": lambda: D.RMD(enc),
        "gmm": lambda: D.GMM(enc),
        "knn": lambda: D.KNN(enc, k=50), "nnguide": lambda: D.NNGuide(enc, head, k=10),
        "vim": lambda: D.ViM(enc, d=net.head.in_features // 2, w=w, b=b),
        "she": lambda: D.SHE(enc, head), "fdbd": lambda: D.fDBD(enc, head),
        "nci": lambda: D.NCI(enc, head, alpha=1e-4),
    }
    return table[name]().to("cpu")


#: what each detector reads in the maths part: "logits", "features" (penultimate), "pooled_map" (the penultimate
#: as a 1x1 map), "map" (the last feature map); None = needs images (left out of the maths part)
READS = {"msp": "logits", "maxlogit": "logits", "energy": "logits", "entropy": "logits", "gen": "logits",
         "tempscale": "logits", "klm": "logits", "odin": None, "gradnorm": None, "react": "features",
         "dice": "features", "vra": "features", "ash": "pooled_map", "scale": "pooled_map", "rankfeat": "map",
         "mahalanobis": "features", "rmds": "features", "gmm": "features", "knn": "features", "nnguide": "features",
         "vim": "features", "she": "features", "fdbd": "features", "nci": "features"}
FIT_ON_VAL = {"tempscale", "klm"}  # oodforge fits these two on the ID validation split


def _version() -> str:
    from importlib.metadata import version

    return version("pytorch-ood")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true", help="only check that pytorch-ood and scikit-learn import")
    ap.add_argument("--data")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--parts", default="whole,maths")
    args = ap.parse_args(argv)
    if args.check:
        import sklearn  # noqa: F401 -- pytorch-ood's KNN needs it

        print(_version())
        return 0
    torch.set_num_threads(args.threads)
    data = Path(args.data)
    spec = json.loads((data / "spec.json").read_text())
    detectors, score_sets = spec["detectors"], spec["score_sets"]
    backbone = torch.export.load(str(data / "backbone.pt2")).module()
    hw = torch.load(data / "head.pt")
    head = torch.nn.Linear(hw["weight"].shape[1], hw["weight"].shape[0])
    head.load_state_dict(hw)
    net = Net(backbone, head)  # exported in eval mode (batch-norm running statistics); it has no train()
    for p in net.parameters():
        p.requires_grad_(False)
    fit_sets = ("train", "val")
    out: dict = {"pytorch_ood": _version(),
                 "torch": torch.__version__, "numpy": np.__version__, "python": sys.version.split()[0],
                 "threads": torch.get_num_threads(),
           "torchvision_placeholder": TORCHVISION_PLACEHOLDER, "whole": {}, "maths": {}}
    sc_dir = data / "ptood_scores"

    def save(part, name, set_name, s):
        d = sc_dir / part
        d.mkdir(parents=True, exist_ok=True)
        np.save(d / f"{name}__{set_name}.npy", s.detach().double().cpu().numpy())

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    if "whole" in args.parts:
        images = {s: np.load(data / f"images_{s}.npy") for s in (*fit_sets, *score_sets)}
        labels = {s: np.load(data / f"labels_{s}.npy") for s in (*fit_sets, *score_sets)}
        loaders = {s: loader(images[s], labels[s], args.batch_size) for s in images}
        for name in detectors:
            t0 = time.perf_counter()
            det = build(name, net)
            if det.requires_fit:
                det.fit(loaders["val" if name in FIT_ON_VAL else "train"])
            scores = {}
            for s in score_sets:
                with torch.no_grad():  # the usual evaluation loop; ODIN and GradNorm enable gradients themselves
                    scores[s] = torch.cat([det.predict(x) for x, _ in loaders[s]])
            out["whole"][name] = time.perf_counter() - t0
            for s, v in scores.items():
                save("whole", name, s, v)
            log(f"  pytorch-ood whole  {name:<12} {out['whole'][name]:7.2f} s")

    if "maths" in args.parts:
        feats = {}
        for s in (*fit_sets, *score_sets):
            f = {"logits": torch.from_numpy(np.load(data / f"logits_{s}.npy")),
                 "features": torch.from_numpy(np.load(data / f"penultimate_{s}.npy")),
                 "labels": torch.from_numpy(np.load(data / f"labels_{s}.npy")).long()}
            f["pooled_map"] = f["features"][:, :, None, None]
            if (data / f"fmap_{s}.npy").exists():
                f["map"] = torch.from_numpy(np.load(data / f"fmap_{s}.npy"))
            feats[s] = f
        for name in detectors:
            reads = READS[name]
            if reads is None:
                continue
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                det = build(name, net)
                fit = feats["val" if name in FIT_ON_VAL else "train"]
                if det.requires_fit:
                    fit_fn = {"logits": det.fit_logits if hasattr(det, "fit_logits") else None,
                              "features": getattr(det, "fit_features", None),
                              "pooled_map": getattr(det, "fit_feature_maps", None),
                              "map": getattr(det, "fit_feature_maps", None)}[reads]
                    if reads == "features" and isinstance(det, pytorch_ood.api.FeatureMapsDetector):
                        fit_fn = det.fit_feature_maps  # ReAct / VRA take the pooled vector as their "map"
                    fit_fn(fit[reads], fit["labels"])
                predict = {pytorch_ood.api.LogitsDetector: "predict_logits",
                           pytorch_ood.api.FeaturesDetector: "predict_features",
                           pytorch_ood.api.FeatureMapsDetector: "predict_feature_maps"}
                fn = next(getattr(det, m) for cls, m in predict.items() if isinstance(det, cls))
                with torch.no_grad():
                    scores = {s: fn(feats[s][reads]) for s in score_sets}
                times.append(time.perf_counter() - t0)
            out["maths"][name] = {"median": statistics.median(times), "all": times}
            for s, v in scores.items():
                save("maths", name, s, v)
            log(f"  pytorch-ood maths  {name:<12} {out['maths'][name]['median']:8.4f} s")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
