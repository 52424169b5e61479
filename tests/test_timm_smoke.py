"""timm smoke tests: sparsify -> a few training steps -> export -> strict load into a fresh model -> equal outputs
and the zeros counted, for magnitude pruning and for L0 gates.

Random initialisation only (``pretrained=False``); small inputs keep the file fast on two CPU cores.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

import sparsewrap as sw
from sparsewrap.parametrizations.gated import ChannelGated
from sparsewrap.parametrizations.gated_weight import GatedWeight

timm = pytest.importorskip("timm")

# (architecture, image size, batch): ViT-Tiny needs its 224 × 224 position embedding, so a batch of 2
MODELS = [
    ("resnet18", 64, 4),
    ("vit_tiny_patch16_224", 224, 2),
    ("efficientnet_b0", 64, 4),
    ("convnext_atto", 64, 4),
    ("mobilenetv3_small_100", 64, 4),
]
ROWS = [("magnitude", dict(target=0.6)), ("magnitude-channel", dict(target=0.4, granularity="channel"))]


def _create(arch: str) -> torch.nn.Module:
    return timm.create_model(arch, pretrained=False, num_classes=10)


@pytest.mark.parametrize(("arch", "size", "batch"), MODELS, ids=[m[0] for m in MODELS])
@pytest.mark.parametrize(("row_id", "kwargs"), ROWS, ids=[r[0] for r in ROWS])
def test_sparsify_train_export_strict_reload(arch: str, size: int, batch: int, row_id: str, kwargs: dict) -> None:
    model = _create(arch)
    sp = sw.sparsify(model, "magnitude", **kwargs)
    head = model.get_classifier()
    assert not parametrize.is_parametrized(head)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))
    opt = torch.optim.SGD(sp.param_groups(lr=0.01), momentum=0.9)
    model.train()
    pruned = {t.name: t.module.weight.detach() == 0 for t in sp.targets}
    for _ in range(2):
        loss = F.cross_entropy(model(x), y) + sp.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sp.step()
    assert torch.isfinite(loss)
    for t in sp.targets:  # masked weights stay exactly zero through training
        assert (t.module.weight.detach()[pruned[t.name]] == 0).all(), t.name

    plain = sw.export(sp)
    fresh = _create(arch)
    fresh.load_state_dict(plain.state_dict(), strict=True)
    model.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))
    total = sum(t.numel for t in sp.targets)
    zeros = sum(int((fresh.get_submodule(t.name).weight == 0).sum()) for t in sp.targets)
    if kwargs.get("granularity") == "channel":
        assert abs(zeros / total - kwargs["target"]) < 0.01
    else:
        assert zeros == round(kwargs["target"] * total)
    assert sp.report().exported == pytest.approx(zeros / total)


# -- L0 gates -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("granularity", ["weight", "channel"])
@pytest.mark.parametrize(
    ("name", "kwargs", "shape", "target"),
    [
        ("resnet18", dict(num_classes=4), (3, 32, 32), 0.7),
        ("vit_tiny_patch16_224", dict(num_classes=4, img_size=32, depth=2), (3, 32, 32), 0.3),
    ],
)
def test_l0_timm_smoke(name, kwargs, shape, target, granularity):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs)
    sp = sw.sparsify(model, "l0", target=target, granularity=granularity, input_shape=list(shape))
    x, y = torch.randn(2, *shape), torch.tensor([0, 3])
    opt = torch.optim.Adam(sp.param_groups(lr=1e-3, gates={"lr": 0.1}))
    for _ in range(2):
        loss = F.cross_entropy(model(x), y) + sp.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sp.step()
    report = sp.report()
    assert abs(report.exported - target) <= 0.01
    plain = sw.export(sp)
    fresh = timm.create_model(name, pretrained=False, **kwargs)
    fresh.load_state_dict(plain.state_dict(), strict=True)
    fresh.eval(), model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))  # what one evaluates is what one exports
    assert fresh(x).shape == (2, 4)
    total = sum(t.numel for t in sp.targets)
    zeros = sum(int((fresh.get_submodule(t.name).weight == 0).sum()) for t in sp.targets)
    assert report.exported == pytest.approx(zeros / total, abs=1e-12)
    if granularity == "weight":  # per weight the projection is exact: the top round((1 - target) n) gates stay
        assert zeros == total - round((1 - target) * total)
    if granularity == "channel" and name == "resnet18":
        assert isinstance(model.layer1[0].bn1.parametrizations.weight[0], ChannelGated)
        # every group of a ResNet is exact and gated (two steps leave the expected density far from the target)
        assert [n for n in report.notes if not n.startswith("expected density")] == []
        assert len(report.notes) == 1 and "far from the requested 0.300 after 2 steps" in report.notes[0]
    if granularity == "weight":
        assert all(isinstance(model.get_submodule(t.name).parametrizations.weight[0], GatedWeight) for t in sp.targets)


def test_timm_model_gives_its_own_input_shape():
    model = timm.create_model("resnet18", pretrained=False, num_classes=3)
    sp = sw.sparsify(model, "l0", target=0.5, granularity="channel")  # no input_shape: timm's pretrained_cfg
    assert isinstance(model.layer4[1].conv2.parametrizations.weight[0], ChannelGated)
    assert model.fc not in [t.module for t in sp.targets]
