"""A user's own classifier through :func:`oodforge.models.wrap.wrap`: a torchvision-style ResNet-18 written
here (no torchvision dependency), wrapped by naming its head and feature layer, scored by the detectors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from oodforge.bench import parse_method
from oodforge.data.base import ArrayDataset
from oodforge.detectors import FitContext, create
from oodforge.models.features import extract_features
from oodforge.models.wrap import wrap


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + idt)


class ResNet18(nn.Module):
    """The torchvision ResNet-18 layout: conv1/bn1/relu/maxpool, layer1-4 of two BasicBlocks, avgpool, fc."""

    def __init__(self, num_classes: int = 7, pool: str = "avg"):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths, cin = [64, 128, 256, 512], 64
        for i, w in enumerate(widths):
            setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(cin, w, 1 if i == 0 else 2), BasicBlock(w, w, 1)))
            cin = w
        self.avgpool = nn.AdaptiveAvgPool2d(1) if pool == "avg" else nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _images(n: int, seed: int, shift: float = 0.0) -> ArrayDataset:
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, 3, 32, 32, generator=g) * 0.5 + shift).clamp(0, 1)
    return ArrayDataset((x * 255).round().to(torch.uint8), torch.randint(0, 7, (n,), generator=g),
                        identity=f"wrap-test/{seed}/{shift}")


@pytest.fixture(scope="module")
def user_model():
    torch.manual_seed(0)
    net = ResNet18().eval()
    return net, wrap(net, head="fc", features="layer4", mean=MEAN, std=STD, input_size=(32, 32))


def test_one_pass_gives_the_models_own_logits_penultimate_and_feature_map(user_model):
    net, model = user_model
    x = torch.rand(4, 3, 32, 32)
    out = model.forward_all(x)
    xn = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(out.logits, net(xn))
        h = net.maxpool(net.relu(net.bn1(net.conv1(xn))))
        fmap = net.layer4(net.layer3(net.layer2(net.layer1(h))))
    torch.testing.assert_close(out.feature_map, fmap)
    torch.testing.assert_close(out.penultimate, fmap.mean(dim=(2, 3)))
    assert model.num_classes == 7 and model.feature_dim == 512 and model.gap_head
    assert model.arch == "user:ResNet18"


def test_detectors_score_the_wrapped_model(user_model, tmp_path):
    _, model = user_model
    train, test, ood = _images(64, 0), _images(32, 1), _images(32, 2, shift=0.5)
    feats = {k: extract_features(model, d, feature_map=True, cache_dir=tmp_path) for k, d in
             (("train", train), ("test", test), ("ood", ood))}
    ctx = FitContext(model=model, train=feats["train"])
    for spec in ("msp", "energy", "react", "vim", "knn:k=3", "ash", "scale", "mahalanobis"):
        name, params = parse_method(spec)  # k=3: 64 images over 7 classes (knn warns at its default k=50)
        det = create(name, **params).fit(ctx)
        s = det.score(feats["test"])
        assert s.shape == (32,) and np.isfinite(s).all(), spec
    msp = create("msp").fit(ctx).score(feats["test"])
    with torch.no_grad():
        expected = torch.softmax(model(test.float_images(0, 32)), 1).max(1).values.double().numpy()
    np.testing.assert_allclose(msp, expected, rtol=1e-5)
    cached = extract_features(model, test, feature_map=True, cache_dir=tmp_path)  # from the cache
    torch.testing.assert_close(cached.logits, feats["test"].logits)


def test_bad_names_and_non_average_heads_are_refused():
    net = ResNet18().eval()
    with pytest.raises(ValueError, match="no submodule of that name.*layer4"):
        wrap(net, head="classifier", features="layer4", mean=MEAN, std=STD, input_size=(32, 32))
    with pytest.raises(ValueError, match="must be the final nn.Linear"):
        wrap(net, head="layer4", features="layer3", mean=MEAN, std=STD, input_size=(32, 32))
    flat = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 5))
    with pytest.raises(ValueError, match=r"\[N, C, H, W\] feature map"):
        wrap(flat, head="1", features="0", mean=MEAN, std=STD, input_size=(32, 32))
    maxpool = wrap(ResNet18(pool="max").eval(), head="fc", features="layer4", mean=MEAN, std=STD, input_size=(64, 64))
    assert not maxpool.gap_head
    with pytest.raises(ValueError, match="global average"):
        maxpool.pool(torch.rand(1, 512, 1, 1))


USER_MODULE = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(32, 6)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


def build():
    return Net()
'''


def test_bench_takes_a_users_model_from_the_command_line(tmp_path, monkeypatch, capsys):
    import json

    from safetensors.torch import save_file

    from oodforge.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OODFORGE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "my_user_net.py").write_text(USER_MODULE)
    import importlib.util

    spec = importlib.util.spec_from_file_location("my_user_net_ref", tmp_path / "my_user_net.py")
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    torch.manual_seed(3)
    save_file(ref.build().state_dict(), str(tmp_path / "w.safetensors"))
    rc = main(["bench", "--suite", "fashion6", "--quick", "--model", "my_user_net:build", "--weights", "w.safetensors",
               "--head", "classifier", "--features", "features", "--mean", "0.3", "--std", "0.3",
               "--methods", "msp,knn,scale", "--out", "out"])
    err = capsys.readouterr().err
    assert rc == 0, err[-2000:]
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(res["methods"]) == {"msp@user", "knn@user", "scale@user"}
    assert res["models"]["user"]["user_model"] == "my_user_net:build"
    rc = main(["bench", "--suite", "fashion6", "--quick", "--model", "my_user_net:build", "--weights", "w.safetensors",
               "--head", "classifier", "--features", "nope", "--methods", "msp", "--out", "out2"])
    assert rc == 2 and "features='nope'" in capsys.readouterr().err and not (tmp_path / "out2").exists()


def test_load_user_model_reads_torch_state_dicts_and_refuses_what_does_not_fit(tmp_path, monkeypatch):
    from oodforge.models.wrap import load_user_model

    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_user_net2.py").write_text(USER_MODULE + "\n\ndef not_a_model():\n    return 3\n")
    # importable whatever ran before in this worker: the folder on sys.path and the finders' caches invalidated
    # (a cached listing of the working directory made the import fail once, depending on the test order)
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(4)
    import importlib

    ref = importlib.import_module("my_user_net2").build()
    torch.save(ref.state_dict(), tmp_path / "w.pt")
    model = load_user_model("my_user_net2:build", "w.pt", head="classifier", features="features", mean=(0.5,),
                            std=(0.5,), input_size=(28, 28))
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref((x - 0.5) / 0.5))  # the saved weights, not a fresh init
    torch.save({"other": torch.zeros(3)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="does not fit my_user_net2:build"):
        load_user_model("my_user_net2:build", "bad.pt", head="classifier", features="features", mean=(0.5,),
                        std=(0.5,), input_size=(28, 28))
    torch.save(ref, tmp_path / "pickled_module.pt")  # a whole pickled module: refused, never unpickled
    with pytest.raises(ValueError, match="cannot be read as a state dict"):
        load_user_model("my_user_net2:build", "pickled_module.pt", head="classifier", features="features",
                        mean=(0.5,), std=(0.5,), input_size=(28, 28))
    with pytest.raises(ValueError, match="returned a int, not a torch.nn.Module"):
        load_user_model("my_user_net2:not_a_model")
    with pytest.raises(FileNotFoundError, match="--weights"):
        load_user_model("my_user_net2:build", "missing.safetensors")


def test_a_model_wrapped_in_python_cannot_be_exported_without_its_factory(user_model, tmp_path):
    """The guard of a user's model stores how to rebuild it; a model wrapped in Python has no factory to name,
    so saving it fails with the way out, before any file is written."""
    from oodforge.deploy.fileformat import save_guard

    _, model = user_model
    with pytest.raises(ValueError, match="--model package.module:factory"):
        model.rebuild_spec()

    class Guard:  # the attributes save_guard reads before it writes anything
        detector = create("msp")
        model = None

    Guard.model = model
    with pytest.raises(ValueError, match="wrapped in Python"):
        save_guard(Guard(), tmp_path / "guard.oodf")
    assert not (tmp_path / "guard.oodf").exists()
