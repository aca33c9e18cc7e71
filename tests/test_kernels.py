"""Fast forms (methods/kernels.py and each method's forward/route) against each method's
`reference`, its equation written plainly: across shapes, dtypes, in place or not, routed or not."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

import adapterkit as ak
from adapterkit.methods import build_site_method
from adapterkit.methods.base import SiteShape

CONFIGS = {
    "lora": lambda size: ak.LoRA(r=size, alpha=2 * size),
    "pfeiffer": lambda size: ak.Bottleneck(bottleneck_size=size, activation="gelu", scaling=0.7),
    "parallel": lambda size: ak.Bottleneck(placement="parallel", bottleneck_size=size),
    "ia3": lambda size: ak.IA3(),
    "bitfit": lambda size: ak.BitFit(),
    "dora": lambda size: ak.DoRA(r=size, alpha=2 * size),
}
#: methods that only attach to Linear sites
LINEAR_ONLY = {"dora"}
TOLERANCE = {torch.float32: {"rtol": 1e-4, "atol": 1e-5}, torch.float64: {"rtol": 1e-10, "atol": 1e-12}}


def site(kind: str, d_in: int, d_out: int, seed: int = 0) -> tuple[nn.Module, SiteShape]:
    with torch.random.fork_rng():  # the frozen weights too are the same on every call (hypothesis replays)
        torch.manual_seed(seed)
        module = nn.Linear(d_in, d_out) if kind == "linear" else nn.Conv2d(d_in, d_out, 1)
    return module, SiteShape.of(module, "m")


def tensors(kind, rows, tokens, d_in, d_out, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    shape_in = (rows, tokens, d_in) if kind == "linear" else (rows, d_in, tokens, 2)
    shape_out = (rows, tokens, d_out) if kind == "linear" else (rows, d_out, tokens, 2)
    return torch.randn(shape_in, generator=gen, dtype=dtype), torch.randn(shape_out, generator=gen, dtype=dtype)


def adapters(method, kind, d_in, d_out, sizes, dtype, seed):
    module, shape = site(kind, d_in, d_out, seed)
    built = []
    for i, size in enumerate(sizes):
        adapter = build_site_method(CONFIGS[method](size), shape, module).to(dtype)
        gen = torch.Generator().manual_seed(seed + i)
        with torch.no_grad():
            for p in adapter.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) * 0.5)
        built.append(adapter.eval())
    return built, shape


@settings(max_examples=60, deadline=None)
@given(method=st.sampled_from(sorted(CONFIGS)), kind=st.sampled_from(["linear", "conv"]),
       rows=st.integers(1, 4), tokens=st.integers(1, 5), d_in=st.integers(1, 9), d_out=st.integers(1, 9),
       sizes=st.lists(st.integers(1, 4), min_size=1, max_size=3), dtype=st.sampled_from([torch.float32, torch.float64]),
       inplace=st.booleans(), seed=st.integers(0, 1000))
def test_fast_forms_equal_the_reference(method, kind, rows, tokens, d_in, d_out, sizes, dtype, inplace, seed):
    assume(kind == "linear" or method not in LINEAR_ONLY)
    group, shape = adapters(method, kind, d_in, d_out, sizes, dtype, seed)
    x, h = tensors(kind, rows, tokens, d_in, d_out, dtype, seed)
    tol = TOLERANCE[dtype]
    takes_inplace = getattr(group[0], "adds_in_place", False) and kind == "linear"
    with torch.no_grad():
        for adapter in group:  # one adapter for the whole batch
            want = adapter.reference(x, h)
            got = adapter(x, h.clone(), inplace=True) if inplace and takes_inplace else adapter(x, h)
            torch.testing.assert_close(got, want, **tol)
        # routed: row i uses adapter rows[i]; len(group) is the empty slot (the base model)
        picks = torch.randint(0, len(group) + 1, (rows,), generator=torch.Generator().manual_seed(seed))
        stacked = type(group[0]).stack(group)
        extra = {"inplace": True} if inplace and takes_inplace else {}
        got = type(group[0]).route(stacked, picks, x, h.clone(), shape, **extra)
        for i, slot in enumerate(picks.tolist()):
            want = h[i : i + 1] if slot == len(group) else group[slot].reference(x[i : i + 1], h[i : i + 1])
            torch.testing.assert_close(got[i : i + 1], want, **tol)


@pytest.mark.parametrize("grad", [False, True])
def test_lora_fast_form_keeps_gradients(grad):
    """Training takes the differentiable path: gradients through forward equal the reference's."""
    (adapter,), _ = adapters("lora", "linear", 6, 5, [3], torch.float32, 0)
    x, h = tensors("linear", 2, 3, 6, 5, torch.float32, 1)
    with torch.set_grad_enabled(grad):
        out = adapter(x, h)
    if grad:
        out.sum().backward()
        fast = [p.grad.clone() for p in adapter.parameters()]
        adapter.zero_grad()
        adapter.reference(x, h).sum().backward()
        for a, b in zip(fast, [p.grad for p in adapter.parameters()], strict=True):
            torch.testing.assert_close(a, b)
    else:
        torch.testing.assert_close(out, adapter.reference(x, h), rtol=1e-4, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(kind=st.sampled_from(["linear", "conv"]), rows=st.integers(1, 4), tokens=st.integers(1, 5),
       d_in=st.integers(1, 9), sizes=st.lists(st.integers(1, 4), min_size=1, max_size=3),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 1000))
def test_bottleneck_on_an_input_equals_its_reference(kind, rows, tokens, d_in, sizes, dtype, seed):
    """input_arg: x' = x + s·up(act(down(x))) on the argument, whole batch and routed; x itself is kept."""
    module, shape = site(kind, d_in, 3)
    group = []
    for i, size in enumerate(sizes):
        adapter = build_site_method(ak.Bottleneck(input_arg=0, bottleneck_size=size, scaling=0.6), shape, module)
        gen = torch.Generator().manual_seed(seed + i)
        with torch.no_grad():
            for p in adapter.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) * 0.5)
        group.append(adapter.to(dtype).eval())
    x, _ = tensors(kind, rows, tokens, d_in, 3, dtype, seed)
    kept, tol = x.clone(), TOLERANCE[dtype]
    with torch.no_grad():
        for adapter in group:
            x_last = x.movedim(1, -1) if kind == "conv" else x
            want = x_last + 0.6 * adapter.up(torch.relu(adapter.down(x_last)))
            want = want.movedim(-1, 1) if kind == "conv" else want
            torch.testing.assert_close(adapter.reference(x), want, **tol)
            torch.testing.assert_close(adapter(x), want, **tol)
        picks = torch.randint(0, len(group) + 1, (rows,), generator=torch.Generator().manual_seed(seed))
        got = type(group[0]).route(type(group[0]).stack(group), picks, x, None, shape, inplace=True)
        for i, slot in enumerate(picks.tolist()):
            want = x[i : i + 1] if slot == len(group) else group[slot].reference(x[i : i + 1])
            torch.testing.assert_close(got[i : i + 1], want, **tol)
    assert torch.equal(x, kept)  # the caller's argument is never written


@settings(max_examples=60, deadline=None)
@given(method=st.sampled_from(sorted(CONFIGS)), kind=st.sampled_from(["linear", "conv"]),
       rows=st.integers(1, 4), tokens=st.integers(1, 5), d_in=st.integers(1, 9), d_out=st.integers(1, 9),
       sizes=st.lists(st.integers(1, 4), min_size=1, max_size=3), dtype=st.sampled_from([torch.bfloat16, torch.float16]),
       inplace=st.booleans(), seed=st.integers(0, 1000))
def test_fast_forms_in_half_precision_stay_within_its_rounding(method, kind, rows, tokens, d_in, d_out, sizes, dtype,
                                                               inplace, seed):
    """bf16 / fp16: the fast forms, whole batch and routed, against the reference computed exactly (float64)
    on the same inputs and parameters. Each result may be off by the rounding of a few low-precision steps
    (each rounds to eps = 2^-8 for bf16, 2^-11 for fp16, relative to the size of what it sums), no more."""
    assume(kind == "linear" or method not in LINEAR_ONLY)
    group, shape = adapters(method, kind, d_in, d_out, sizes, dtype, seed)
    x, h = tensors(kind, rows, tokens, d_in, d_out, dtype, seed)
    eps = torch.finfo(dtype).eps
    if method == "dora":  # DoRA divides by ‖W + s·BA‖ per row: where W and s·BA nearly cancel, that norm is
        for adapter in group:  # mostly the low precision's rounding, and so is the result
            weight = adapter.frozen.weight.double()
            delta = (adapter.lora_B.double() @ adapter.lora_A.double()) * adapter.scale
            condition = (weight.norm(dim=1) + delta.norm(dim=1)) / (weight + delta).norm(dim=1)
            assume(bool((condition < 4).all()))
    takes_inplace = getattr(group[0], "adds_in_place", False) and kind == "linear"
    with torch.no_grad():
        exact = []
        for adapter in group:
            exact.append(adapter.to(torch.float64).reference(x.double(), h.double()))
            adapter.to(dtype)

        def close(got, want):
            size = max(1.0, float(want.abs().max()))
            torch.testing.assert_close(got.double(), want, rtol=8 * eps, atol=8 * eps * size)

        for adapter, want in zip(group, exact, strict=True):
            got = adapter(x, h.clone(), inplace=True) if inplace and takes_inplace else adapter(x, h)
            assert got.dtype == dtype
            close(got, want)
        picks = torch.randint(0, len(group) + 1, (rows,), generator=torch.Generator().manual_seed(seed))
        extra = {"inplace": True} if inplace and takes_inplace else {}
        got = type(group[0]).route(type(group[0]).stack(group), picks, x, h.clone(), shape, **extra)
        for i, slot in enumerate(picks.tolist()):
            want = h[i : i + 1].double() if slot == len(group) else exact[slot][i : i + 1]
            close(got[i : i + 1], want)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 17), tokens=st.integers(1, 3), d_in=st.integers(1, 40), d_out=st.integers(1, 40),
       bias=st.booleans(), seed=st.integers(0, 99))
def test_fast_linear_equals_f_linear(rows, tokens, d_in, d_out, bias, seed):
    from adapterkit.methods.kernels import linear

    gen = torch.Generator().manual_seed(seed)
    x, weight = torch.randn(rows, tokens, d_in, generator=gen), torch.randn(d_out, d_in, generator=gen)
    b = torch.randn(d_out, generator=gen) if bias else None
    with torch.inference_mode():
        torch.testing.assert_close(linear(x, weight, b), torch.nn.functional.linear(x, weight, b), **TOLERANCE[torch.float32])


def test_fast_linears_swap_plain_linear_forwards_only_and_keep_training_and_copies_intact():
    import copy

    from adapterkit.methods.kernels import fast_linears

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4), nn.Bilinear(4, 4, 2))
    plain = copy.deepcopy(model)
    assert fast_linears(model) == 2 and fast_linears(model) == 0  # once per layer
    assert type(model[0]) is nn.Linear and list(model.state_dict()) == list(plain.state_dict())
    x = torch.randn(5, 8)
    with torch.inference_mode():
        torch.testing.assert_close(model[:3](x), plain[:3](x), **TOLERANCE[torch.float32])
    model[:3](x).sum().backward()  # outside inference: F.linear's own autograd
    plain[:3](x).sum().backward()
    torch.testing.assert_close(model[0].weight.grad, plain[0].weight.grad)
    import pickle

    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):  # a copy reads its own weights
        with torch.no_grad():
            twin[0].weight.zero_()
            twin[0].bias.zero_()
            assert torch.equal(twin[0](x), torch.zeros(5, 16))
            assert not torch.equal(model[0](x), torch.zeros(5, 16))


@pytest.fixture
def fresh_rows(monkeypatch):
    """A RowProduct of the test's own: no kernel compiled, none switched off by another test."""
    from adapterkit.methods import kernels

    fresh = kernels.RowProduct()
    monkeypatch.setattr(kernels, "row_product", fresh)
    return fresh


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_row_product_equals_f_linear_for_every_shape_with_a_kernel_for_each(dtype, fresh_rows):
    from adapterkit.methods import kernels

    gen = torch.Generator().manual_seed(0)
    # square and not, a row of a 3-D input, with and without bias; each weight large enough to apply
    shapes = [(512, 512, False), (768, 512, True), (512, 1024, False), (1536, 512, True)]
    tolerance = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for d_out, d_in, has_bias in shapes:
        weight = torch.randn(d_out, d_in, generator=gen).div(d_in**0.5).to(dtype)
        bias = torch.randn(d_out, generator=gen).to(dtype) if has_bias else None
        x = torch.randn(1, 1, d_in, generator=gen).to(dtype)
        with torch.inference_mode():
            assert kernels.row_product.applies(x, weight)
            assert kernels.row_product(x, weight) is not None  # the kernel's answer, not the GEMMs' fallback
            got = kernels.linear(x, weight, bias)
        assert got.shape == (1, 1, d_out) and got.dtype == dtype
        want = torch.nn.functional.linear(x.double(), weight.double(), None if bias is None else bias.double())
        torch.testing.assert_close(got.double(), want, **tolerance)
    assert kernels.row_product.failed is None
    threads = torch.get_num_threads()
    assert {(dtype, o, i, threads) for o, i, _ in shapes} <= set(kernels.row_product._kernels)


class _Wrapped(torch.Tensor):
    """A tensor subclass, as a quantized weight is."""


def test_one_row_product_leaves_training_several_rows_and_small_weights_to_the_gemms(fresh_rows):
    from adapterkit.methods import kernels

    weight = torch.randn(512, 512)
    one, rows, small = torch.randn(1, 512), torch.randn(3, 512), torch.randn(1, 64)
    with torch.inference_mode():
        assert kernels.row_product.applies(one, weight)
        assert not kernels.row_product.applies(rows, weight)
        assert not kernels.row_product.applies(small, torch.randn(64, 64))
        assert not kernels.row_product.applies(one, weight.T)  # not contiguous
        assert not kernels.row_product.applies(one, torch.Tensor._make_subclass(_Wrapped, weight))  # e.g. torchao's
        assert not kernels.row_product.applies(torch.randn(1, 256), weight)  # F.linear gives the shape error
        with pytest.raises(RuntimeError, match="cannot be multiplied"):
            kernels.linear(torch.randn(1, 256), weight)
        bias = torch.randn(1, 512)  # not 1-D: what F.linear does with it, not the kernel's in-place add
        torch.testing.assert_close(kernels.linear(one, weight, bias), torch.nn.functional.linear(one, weight, bias),
                                   rtol=1e-4, atol=1e-4)
        a, wide = torch.randn(64, 4096), torch.randn(1, 4096)  # a LoRA's A of 2^18 elements
        torch.testing.assert_close(kernels.down_project(wide, a), wide @ a.T, rtol=1e-4, atol=1e-4)
    assert kernels.row_product._kernels == {} and kernels.row_product.failed is None
    with torch.no_grad():  # plain no-grad code (an evaluation loop) keeps the GEMM
        assert not kernels.row_product.applies(one, weight)
    x = one.clone().requires_grad_()
    kernels.linear(x, weight).sum().backward()
    torch.testing.assert_close(x.grad, weight.sum(0, keepdim=True), rtol=1e-4, atol=1e-4)


def test_one_row_product_that_cannot_compile_falls_back_once_with_a_warning(monkeypatch, caplog):
    from adapterkit.methods import kernels

    def no_compiler(graph, inputs, **options):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

    fresh = kernels.RowProduct()
    monkeypatch.setattr(kernels, "row_product", fresh)
    monkeypatch.setattr(torch._inductor, "standalone_compile", no_compiler)
    weight, x = torch.randn(512, 512), torch.randn(1, 512)
    with torch.inference_mode(), caplog.at_level("WARNING", logger=kernels.__name__):
        for _ in range(3):
            torch.testing.assert_close(kernels.linear(x, weight), x @ weight.T, rtol=1e-4, atol=1e-4)
    assert fresh.failed is not None and "C++ compiler" in fresh.failed
    assert sum("one-row product is off" in r.message for r in caplog.records) == 1
    assert not fresh.applies(x, weight)


def test_warm_row_products_compiles_each_variant_of_a_model_before_its_first_step(fresh_rows):
    from adapterkit.methods import kernels

    model = nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 1024), nn.Linear(8, 8), nn.Linear(512, 1536))
    model = model.to(torch.bfloat16)
    model[3].weight = nn.Parameter(torch.Tensor._make_subclass(_Wrapped, model[3].weight.detach()), requires_grad=False)
    assert kernels.warm_row_products(model) == 2  # a kernel a shape; not the small layer nor the subclass
    assert kernels.row_product.failed is None
    threads = torch.get_num_threads()
    assert {(torch.bfloat16, 512, 512, threads), (torch.bfloat16, 1024, 512, threads)} <= set(kernels.row_product._kernels)
    assert kernels.warm_row_products(nn.Sequential(nn.Linear(8, 8))) == 0


def test_one_row_product_keeps_a_bounded_number_of_kernels(monkeypatch):
    from adapterkit.methods import kernels

    fresh = kernels.RowProduct()
    fresh.MAX_KERNELS = 1
    monkeypatch.setattr(kernels, "row_product", fresh)
    first, second, x = torch.randn(512, 512), torch.randn(1024, 512), torch.randn(1, 512)
    with torch.inference_mode():
        torch.testing.assert_close(kernels.linear(x, first), x @ first.T, rtol=1e-4, atol=1e-4)
        assert fresh.applies(x, first) and not fresh.applies(x, second)  # a further shape: the GEMMs
        torch.testing.assert_close(kernels.linear(x, second), x @ second.T, rtol=1e-4, atol=1e-4)
    assert len(fresh._kernels) == 1


def test_one_row_product_compiles_for_the_thread_count_in_force(fresh_rows):
    from adapterkit.methods import kernels

    weight, x = torch.randn(512, 512), torch.randn(1, 512)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with torch.inference_mode():
                torch.testing.assert_close(kernels.linear(x, weight), x @ weight.T, rtol=1e-4, atol=1e-4)
            assert (torch.float32, 512, 512, threads) in kernels.row_product._kernels
    finally:
        torch.set_num_threads(before)


def test_one_row_kernel_failing_on_one_call_answers_it_with_the_gemms_and_stays_on(fresh_rows):
    from adapterkit.methods import kernels

    weight, x = torch.randn(512, 512), torch.randn(1, 512)
    with torch.inference_mode():
        kernels.linear(x, weight)
        key = next(iter(fresh_rows._kernels))
        good = fresh_rows._kernels[key]

        def broken(*args):
            raise AssertionError("expected size 512==512, stride 1==2 at dim=0")

        fresh_rows._kernels[key] = broken
        torch.testing.assert_close(kernels.linear(x, weight), x @ weight.T, rtol=1e-4, atol=1e-4)
        assert fresh_rows.failed is None and fresh_rows.applies(x, weight)
        fresh_rows._kernels[key] = good
        torch.testing.assert_close(kernels.linear(x, weight), x @ weight.T, rtol=1e-4, atol=1e-4)


def test_a_one_row_product_traced_into_a_graph_is_the_multiply_and_sum():
    """Inside torch.compile (a captured decode step) `linear` writes one row through a large weight as
    `row_product_reference`, which Inductor fuses (a small weight too), and leaves a GEMM to several rows."""
    import torch.nn.functional as F

    from adapterkit.methods import kernels

    graphs = []

    def keep(gm, example_inputs):  # noqa: ANN001 - dynamo's backend signature
        graphs.append({str(node.target) for node in gm.graph.nodes if node.op in ("call_function", "call_method")})
        return gm.forward

    w, small = torch.randn(512, 512), torch.randn(8, 512)
    for x, weight in ((torch.randn(1, 1, 512), w), (torch.randn(1, 3, 512), w), (torch.randn(1, 1, 512), small)):
        torch._dynamo.reset()
        product = torch.compile(lambda x, weight: kernels.linear(x, weight), backend=keep, fullgraph=True, dynamic=False)
        with torch.inference_mode():
            got = product(x, weight)
        torch.testing.assert_close(got, F.linear(x, weight), rtol=1e-5, atol=1e-4)
    one_row, rows, narrow = graphs
    assert any("sum" in t for t in one_row) and not any("linear" in t for t in one_row)
    assert any("linear" in t for t in rows) and any("sum" in t for t in narrow)
    if kernels._ONEDNN_IN_GRAPH is not None:  # several fp32 rows through a large weight: oneDNN's operator
        assert any("onednn_linear" in t for t in rows)
