"""The native hard-concrete kernels (sparsewrap/native): the reference formula's values and gradients, in one pass."""

from __future__ import annotations

import pytest
import torch

from sparsewrap import native
from sparsewrap.parametrizations import gated_weight
from sparsewrap.parametrizations.gated_weight import GatedMul, gate_shift, native_keys, native_sample, native_uniform
from sparsewrap.parametrizations.hard_concrete import BETA, EPS, sample_gates

pytestmark = pytest.mark.skipif(native.kernels() is None, reason="no C compiler: the eager path is used")

SHAPE = (64, 32, 4, 4)  # 32768 weights: the smallest tensor that takes the native path
assert SHAPE[0] * SHAPE[1] * SHAPE[2] * SHAPE[3] >= gated_weight.NATIVE_MIN_NUMEL


def test_uniforms_are_reproducible_per_key_inside_the_clamp_and_look_uniform() -> None:
    n = 1 << 20
    u = native_uniform(n, (12345, 678))
    assert torch.equal(u, native_uniform(n, (12345, 678)))
    assert not torch.equal(u, native_uniform(n, (12345, 679)))
    assert EPS <= u.min().item() and u.max().item() <= 1 - EPS
    # moments and a 64-bin histogram of a million draws (tolerances ~6 standard errors)
    assert abs(u.double().mean().item() - 0.5) < 6 * (1 / 12 / n) ** 0.5
    assert abs(u.double().var().item() - 1 / 12) < 2e-3
    counts = torch.histc(u, bins=64, min=0.0, max=1.0)
    assert (counts - n / 64).abs().max().item() < 6 * (n / 64) ** 0.5
    # neighbours are not correlated (a counter-based hash: consecutive indices must look independent)
    lag = torch.corrcoef(torch.stack([u[:-1], u[1:]]).double())[0, 1].item()
    assert abs(lag) < 6 / n**0.5


def test_streams_of_different_keys_are_uncorrelated() -> None:
    n = 1 << 20
    base = native_uniform(n, (1000, 2000)).double()
    for keys in [(1000, 2001), (1001, 2001), (77, 88), (123456789, 987654321)]:  # each forward draws both keys
        other = native_uniform(n, keys).double()
        r = torch.corrcoef(torch.stack([base, other]))[0, 1].item()
        assert abs(r) < 6 / n**0.5, keys
        common = torch.isin(other, base).double().mean().item()  # not the same values, moved elsewhere
        assert common < 0.1, keys


def test_a_range_split_gives_the_same_numbers_as_one_call() -> None:
    n, keys = 100_003, (7, 9)
    whole = native_uniform(n, keys)
    parts = torch.empty(n)
    lib = native.kernels()
    for lo, hi in ((0, 40_000), (40_000, 40_017), (40_017, n)):
        lib.sw_hc_uniform(native.ptr(parts), lo, hi, *keys)
    assert torch.equal(whole, parts)


@pytest.mark.parametrize("beta", [BETA, 0.5, 1.0])
def test_the_sample_is_the_reference_formula_at_the_same_uniforms(beta) -> None:
    torch.manual_seed(0)
    la = torch.cat([torch.linspace(-14, 14, 4096), torch.randn(SHAPE).reshape(-1) * 4])
    keys = (3, 4)
    u = native_uniform(la.numel(), keys)
    torch.testing.assert_close(native_sample(la, beta, keys), sample_gates(la, beta, u), rtol=0, atol=2e-6)


def _reference(w, la, beta, u, grad, count_weight):
    w, la = w.detach().clone().requires_grad_(), la.detach().clone().requires_grad_()
    out = w * sample_gates(la, beta, u)
    count = torch.sigmoid(la + gate_shift(beta)).sum()
    loss = (0 if grad is None else (out * grad).sum()) + count_weight * count
    loss.backward()
    return out.detach(), count.detach(), w.grad, la.grad


@pytest.mark.parametrize("beta", [BETA, 0.8])
@pytest.mark.parametrize("use_out", [True, False])
def test_forward_and_backward_equal_autograd_of_the_reference(beta, use_out) -> None:
    torch.manual_seed(1)
    w = torch.randn(SHAPE, requires_grad=True)
    la = (torch.randn(SHAPE) * 3).clamp(-11, 11).requires_grad_()
    grad = torch.randn(SHAPE) if use_out else None
    state = torch.get_rng_state()
    out, count = GatedMul.apply(w, la, beta)
    loss = 0.7 * count + ((out * grad).sum() if use_out else 0)
    loss.backward()
    torch.set_rng_state(state)
    u = native_uniform(la.numel(), native_keys()).view(SHAPE)  # the same keys the forward drew
    ref_out, ref_count, ref_gw, ref_gla = _reference(w, la, beta, u, grad, 0.7)
    torch.testing.assert_close(out.detach(), ref_out, rtol=0, atol=2e-6)
    torch.testing.assert_close(count.detach(), ref_count, rtol=1e-6, atol=0)
    torch.testing.assert_close(la.grad, ref_gla, rtol=1e-5, atol=1e-5)
    if use_out:
        torch.testing.assert_close(w.grad, ref_gw, rtol=0, atol=2e-6)
    else:
        assert w.grad is None


def test_count_term_and_its_gradient_match_float64_over_the_log_alpha_range() -> None:
    """The kernels' inlined exp (hardconcrete.c, exp_clamped) against float64: the expected count
    sum(sigmoid(log_alpha + shift)) and its gradient p (1 - p), over log_alpha in [-14, 14] (the L0 method keeps
    it within +-ln 1000 by default)."""
    la = torch.linspace(-14.0, 14.0, 70001).requires_grad_()
    _out, count = GatedMul.apply(torch.randn(70001), la, BETA)
    (0.7 * count).backward()  # no gradient reaches the gated weight: the count-only backward
    p = torch.sigmoid(la.detach().double() + gate_shift(BETA))
    torch.testing.assert_close(count.double(), p.sum(), rtol=1e-6, atol=0)
    ref = 0.7 * p * (1 - p)
    low = p < 0.5  # p (1 - p) is relatively exact here; where p is near 1, 1 - p has the float error of 1
    torch.testing.assert_close(la.grad.double()[low], ref[low], rtol=2e-6, atol=0)
    torch.testing.assert_close(la.grad.double(), ref, rtol=1e-5, atol=1e-7)


def test_results_do_not_depend_on_the_thread_count() -> None:
    shape = (256, 64, 3, 3)  # above the kernels' one-thread limit (65536 elements)
    la = torch.randn(shape) * 3
    w = torch.randn(shape)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            torch.manual_seed(5)
            out, count = GatedMul.apply(w, la, BETA)
            outs.append((out, count))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-6, atol=0)


def test_disabled_by_environment_falls_back_to_the_eager_path(monkeypatch) -> None:
    monkeypatch.setenv("SPARSEWRAP_NATIVE", "0")
    monkeypatch.setattr(native, "_state", {})
    assert native.kernels() is None
    w, la = torch.randn(SHAPE, requires_grad=True), torch.randn(SHAPE, requires_grad=True)
    out, count = GatedMul.apply(w, la, BETA)  # eager: the same expected count, a different noise stream
    torch.testing.assert_close(count, torch.sigmoid(la + gate_shift(BETA)).sum(), rtol=1e-6, atol=0)
    out.sum().backward()
    assert la.grad is not None and w.grad is not None


def test_the_library_is_cached_and_rebuilt_in_a_new_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SPARSEWRAP_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_state", {})
    lib = native.kernels()
    assert lib is not None
    built = list((tmp_path / "native").iterdir())
    assert len(built) == 1 and built[0].name.startswith("kernels-")  # no temporary file left behind
    mtime = built[0].stat().st_mtime_ns
    monkeypatch.setattr(native, "_state", {})
    native.kernels()
    assert built[0].stat().st_mtime_ns == mtime  # reused, not rebuilt


def _pattern(use_scratch: bool, retain: bool):
    """Two forwards whose graphs overlap (gradient accumulation, or a retained graph), then backward."""
    torch.manual_seed(3)
    w = torch.randn(SHAPE, requires_grad=True)
    la = (torch.randn(SHAPE) * 2).requires_grad_()
    scratch = gated_weight.Scratch() if use_scratch else None
    out1, c1 = GatedMul.apply(w, la, BETA, scratch)
    loss1 = (out1 * out1).sum() + c1
    if retain:
        loss1.backward(retain_graph=True)
    out2, c2 = GatedMul.apply(w, la, BETA, scratch)  # must not overwrite the sample graph 1 still holds
    loss2 = (out2 * out2).sum() + c2
    if retain:
        loss2.backward()
        loss1.backward()  # the retained graph, after the second forward
    else:
        (loss1 + loss2).backward()
    return w.grad.clone(), la.grad.clone()


@pytest.mark.parametrize("retain", [False, True])
def test_the_reused_sample_buffer_never_changes_a_gradient(retain) -> None:
    ref, got = _pattern(False, retain), _pattern(True, retain)
    assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])


def test_the_sample_buffer_is_reused_once_the_backward_released_it() -> None:
    w, la = torch.randn(SHAPE, requires_grad=True), torch.randn(SHAPE, requires_grad=True)
    scratch = gated_weight.Scratch()
    out, count = GatedMul.apply(w, la, BETA, scratch)
    first, first_out = scratch.sample.buf, scratch.out.buf
    (out.sum() + count).backward()
    del out
    out, count = GatedMul.apply(w, la, BETA, scratch)
    assert scratch.sample.buf is first and scratch.out.buf is first_out  # reused: no new full-size tensors
    out2, _ = GatedMul.apply(w, la, BETA, scratch)
    assert scratch.sample.buf is not first  # the first sample is still held by the pending graph
    assert scratch.out.buf is not first_out  # and the first gated weight by `out`


def _l0_run(eager_clamp: bool, steps: int = 6):
    """Per-weight L0 on a layer large enough for the native path, with a tight clamp that binds every step."""
    import sparsewrap as sw

    torch.manual_seed(11)
    model = torch.nn.Sequential(torch.nn.Linear(256, 192), torch.nn.ReLU(), torch.nn.Linear(192, 4))
    sp = sw.sparsify(model, "l0", target=0.15, include=["0"], log_alpha_max=0.3, droprate_init=0.4)
    gate = model[0].parametrizations.weight[0]
    opt = torch.optim.SGD(sp.param_groups(lr=0.5), lr=0.5, momentum=0.9)
    x, y = torch.randn(32, 256), torch.randint(0, 4, (32,))
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y) + sp.penalty()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sp.step()
        if eager_clamp:
            gate.ensure_clamped()  # what a clamp right after every step gives
    return sp, gate


def test_the_lazy_clamp_inside_the_kernel_equals_clamping_after_every_step() -> None:
    (lazy_sp, lazy), (eager_sp, eager) = _l0_run(False), _l0_run(True)
    assert lazy.log_alpha.numel() >= gated_weight.NATIVE_MIN_NUMEL
    assert lazy.log_alpha.detach().abs().max() > 0.3  # the last step moved it past the bound: not yet clamped
    torch.testing.assert_close(lazy_sp.model[0].parametrizations.weight.original,
                               eager_sp.model[0].parametrizations.weight.original, rtol=0, atol=0)  # fmt: skip
    state = lazy_sp.model.state_dict()  # every reader sees the clamped values
    key = next(k for k in state if k.endswith("log_alpha"))
    torch.testing.assert_close(state[key], eager.log_alpha.detach(), rtol=0, atol=0)


def test_eval_and_export_see_the_clamped_log_alpha() -> None:
    import sparsewrap as sw

    sp, gate = _l0_run(False, steps=3)
    with torch.no_grad():
        gate.log_alpha.fill_(5.0)  # beyond the bound, as an optimizer step can leave it
    sp.model.eval()
    sp.model(torch.randn(2, 256))
    assert gate.log_alpha.detach().max().item() == pytest.approx(0.3)
    with torch.no_grad():
        gate.log_alpha.add_(1.0)
    sw.export(sp)
    assert gate.log_alpha.detach().max().item() == pytest.approx(0.3)


# -- the hard-mask kernels (masks.c) ---------------------------------------------------------------------------


def _reference_bits(mask: torch.Tensor) -> list[int]:
    """Pack in Python, independently of the kernel: bit i % 64 of word i // 64 is (mask[i] != 0)."""
    flat = mask.flatten().tolist()
    words = [0] * ((len(flat) + 63) // 64)
    for i, v in enumerate(flat):
        if v != 0:
            words[i // 64] |= 1 << (i % 64)
    return [w - (1 << 64) if w >= 1 << 63 else w for w in words]  # as the int64 words torch holds


@pytest.mark.parametrize("n", [1, 63, 64, 65, 1000, 300_007])  # tails, one word, and a threaded size
def test_the_mask_kernels_pack_bits_and_zero_exactly_the_pruned_entries(n) -> None:
    lib = native.kernels()
    if not lib.sw_mask_vectorized():
        pytest.skip("no vector path in this build")
    gen = torch.Generator().manual_seed(n)
    mask = (torch.rand(n, generator=gen) > 0.7).float()
    if n >= 256:
        mask[:64] = 1  # a word with every weight kept (skipped by the kernel)
        mask[128:192] = 0  # a word with every weight pruned
    bits = torch.empty((n + 63) // 64, dtype=torch.int64)
    lib.sw_mask_pack(mask.data_ptr(), bits.data_ptr(), n)
    assert bits.tolist() == _reference_bits(mask)
    x = torch.randn(n, generator=gen)
    x[::5] = float("inf")
    expected = torch.where(mask.bool(), x, torch.zeros(()))
    lib.sw_mask_zero(bits.data_ptr(), n, x.data_ptr())
    assert torch.equal(x, expected)


@pytest.mark.parametrize("rows,row", [(130, 7), (64, 1000), (3, 20_000)])
def test_the_row_kernel_zeroes_exactly_the_pruned_channels(rows, row) -> None:
    lib = native.kernels()
    gen = torch.Generator().manual_seed(rows)
    mask = (torch.rand(rows, generator=gen) > 0.5).float()
    mask[0], mask[-1] = 0, 1
    bits = torch.empty((rows + 63) // 64, dtype=torch.int64)
    lib.sw_mask_pack(mask.data_ptr(), bits.data_ptr(), rows)
    x = torch.randn(rows, row, generator=gen)
    x[:, ::3] = float("nan")
    expected = torch.where(mask.bool()[:, None], x, torch.zeros(()))
    lib.sw_mask_zero_rows(bits.data_ptr(), rows, row, x.data_ptr())
    assert torch.equal(x.nan_to_num(7.0), expected.nan_to_num(7.0))


@pytest.mark.parametrize("flags", [["-mavx2", "-mno-avx512f"], ["-mno-avx2", "-mno-avx512f"]], ids=["avx2", "scalar"])
def test_the_mask_kernels_other_code_paths_agree(tmp_path, flags) -> None:
    """The AVX2 and scalar branches of masks.c (this machine's build may use AVX-512), built here alone."""
    import ctypes
    import subprocess

    cc = native._compiler()
    so = tmp_path / "masks.so"
    source = native.SOURCES[-1]
    assert source.name == "masks.c"
    out = subprocess.run([cc, "-O2", "-fPIC", "-shared", *flags, "-o", str(so), str(source)], capture_output=True)
    if out.returncode != 0:
        pytest.skip(f"the compiler cannot build {flags}: {out.stderr.decode()[-200:]}")
    lib = ctypes.CDLL(str(so))
    assert lib.sw_mask_vectorized() == (1 if "-mavx2" in flags else 0)
    n = 4099
    gen = torch.Generator().manual_seed(3)
    mask = (torch.rand(n, generator=gen) > 0.5).float()
    mask[:64], mask[64:128] = 1, 0
    bits = torch.empty((n + 63) // 64, dtype=torch.int64)
    lib.sw_mask_pack(ctypes.c_void_p(mask.data_ptr()), ctypes.c_void_p(bits.data_ptr()), ctypes.c_int64(n))
    assert bits.tolist() == _reference_bits(mask)
    x = torch.randn(n, generator=gen)
    expected = torch.where(mask.bool(), x, torch.zeros(()))
    lib.sw_mask_zero(ctypes.c_void_p(bits.data_ptr()), ctypes.c_int64(n), ctypes.c_void_p(x.data_ptr()))
    assert torch.equal(x, expected)


def test_loading_the_library_leaves_the_process_floating_point_mode_alone(tmp_path) -> None:
    """A library linked with -ffast-math would set flush-to-zero for the process that loads it (GCC's
    crtfastmath.o); torch's results on denormal numbers must be the same after loading as before."""
    import os
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from sparsewrap import native\n"
        "before = (torch.tensor(1e-38) / 100).item()\n"
        "assert native.kernels() is not None\n"
        "after = (torch.tensor(1e-38) / 100).item()\n"
        "print(before, after)\n"
        "assert before == after != 0.0, (before, after)\n"
    )
    env = {**os.environ, "SPARSEWRAP_CACHE": str(tmp_path)}  # a fresh build, with today's flags
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


def test_the_gate_gradient_buffer_comes_back_only_after_zero_grad_dropped_it() -> None:
    w, la = torch.randn(SHAPE, requires_grad=True), torch.randn(SHAPE, requires_grad=True)
    scratch = gated_weight.Scratch()

    def step() -> None:
        out, count = GatedMul.apply(w, la, BETA, scratch)
        (out.square().sum() + count).backward()

    step()
    first = scratch.grad.buf
    assert la.grad.untyped_storage().data_ptr() == first.data_ptr()  # autograd kept our buffer as la.grad
    kept = la.grad  # a user holding on to the gradient, then zero_grad(set_to_none=True)
    snapshot = kept.clone()
    la.grad = None
    step()
    assert scratch.grad.buf is not first and torch.equal(kept, snapshot)  # not reused under the user's feet
    del kept
    la.grad = None
    second = scratch.grad.buf
    step()
    assert scratch.grad.buf is second  # nothing else held it: reused
    expected = la.grad.clone()
    la.grad = None
    torch.manual_seed(0)
    step()
    reused = la.grad.clone()
    la.grad, scratch = None, gated_weight.Scratch()  # fresh buffers give the same gradient for the same noise
    torch.manual_seed(0)
    step()
    assert torch.equal(la.grad, reused) and not torch.equal(expected, reused)
