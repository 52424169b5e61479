"""Every DST method (issue 17) through a checkpoint file: a resumed run continues exactly as the killed one."""

from __future__ import annotations

import pytest
import torch

import sparsewrap as sw

RESUME_ROWS = [
    ("static", dict(target=0.9)),
    ("set", dict(target=0.9, every=2, end=30, fraction=0.5)),
    ("rigl", dict(target=0.9, every=2, end=30)),
    ("dsr", dict(target=0.9, every=2, end=30, n_prune=200)),
    ("deepr", dict(target=0.9, end=30, anneal=[[4, 1e-4]], temperature=1e-2, eta=0.5)),
    ("hashednet", dict(target=0.9, sign=True)),
]


def _steps(sp: sw.Sparsifier, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, n: int) -> None:
    for _ in range(n):
        loss = torch.nn.functional.cross_entropy(sp.model(x), y) + sp.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sp.step()


@pytest.mark.parametrize(("method", "options"), RESUME_ROWS, ids=[r[0] for r in RESUME_ROWS])
def test_resume_from_a_checkpoint_continues_identically(tmp_path, method: str, options: dict) -> None:
    from sparsewrap.demo.models import mlp_300_100

    torch.manual_seed(0)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    sp = sw.sparsify(mlp_300_100(), method, **options)
    opt = torch.optim.SGD(sp.param_groups(lr=0.1))  # stateless: the optimizer needs no checkpoint of its own
    sp.start(total_steps=40, optimizer=opt)
    _steps(sp, opt, x, y, 5)
    path = sw.save(sp, tmp_path / "run.safetensors")
    torch.manual_seed(99)  # the killed process's RNG is gone: the resumed run must not depend on it
    sp2 = sw.load(path, model=mlp_300_100())
    opt2 = torch.optim.SGD(sp2.param_groups(lr=0.1))
    sp2.start(total_steps=40, optimizer=opt2)
    _steps(sp, opt, x, y, 6)
    _steps(sp2, opt2, x, y, 6)
    for (k, a), b in zip(sp.model.state_dict().items(), sp2.model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=k)
    assert sp2.method.summary() == sp.method.summary()


def test_export_with_purge_removes_the_channels_a_dst_mask_left_empty() -> None:
    from sparsewrap.demo.models import mlp_300_100

    torch.manual_seed(0)
    sp = sw.sparsify(mlp_300_100(), "set", target=0.99, every=1, end=5)
    opt = torch.optim.SGD(sp.param_groups(lr=0.1))
    sp.start(optimizer=opt)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    _steps(sp, opt, x, y, 3)
    fc2 = sp.model.fc2.weight.detach()
    unused = int((fc2 == 0).all(dim=0).sum())  # fc1 outputs that nothing reads: those channels can go
    assert unused > 0
    purged = sw.export(sp, purge=True)
    assert purged.fc1.out_features == 300 - unused and purged.fc2.in_features == 300 - unused
    sp.model.eval(), purged.eval()
    with torch.no_grad():
        torch.testing.assert_close(purged(x), sp.model(x), rtol=1e-5, atol=1e-5)
