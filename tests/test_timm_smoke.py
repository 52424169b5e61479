"""timm smoke tests: sparsify -> a few training steps -> export -> strict load into a fresh model -> equal outputs.

Random initialisation only (``pretrained=False``); small inputs keep the file fast on two CPU cores.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

import sparsewrap as sw

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
