"""The cache store's bytes: own dtype, 8-bit codes, exact size accounting, host copies and prefetch."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from procache_core import CacheStore, SchedulePolicy, TokenSelector, parse_pattern
from procache_core import cache as cache_module
from procache_core.forecast import Taylor
from procache_core.reference.dit import DiT, DiTConfig
from procache_core.reference.sampling import sample

FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx.double() - exact.double()).norm() / exact.double().norm())


def _outlier_activations(tokens=512, channels=768, outliers=8, gain=20.0, seed=0) -> torch.Tensor:
    """Normal activations with a few channels `gain` times larger in every token, as large
    transformers grow them: the hard case for a per-token scale."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, tokens, channels, generator=gen)
    x[..., torch.randperm(channels, generator=gen)[:outliers]] *= gain
    return x


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_values_stay_in_their_dtype_without_a_copy(dtype):
    store = CacheStore()
    value = torch.randn(2, 5, 3).to(dtype)
    store.put(("c", "u"), "k", value)
    assert store.get(("c", "u"), "k") is value
    swapped = store.get(("u", "c"), "k")
    assert swapped.dtype == dtype and torch.equal(swapped, value.flip(0))
    assert store.nbytes == value.numel() * value.element_size()


def test_a_bf16_run_caches_branch_outputs_in_bf16():
    """Autocast makes every branch output bf16; the cache path (history slots, corrections of
    selective steps) must not turn any of them into float32."""
    torch.manual_seed(0)
    model = DiT(DiTConfig(depth=4, hidden=64, heads=2))
    model.reset_parameters(zero_gates=False)
    seen = []
    put = CacheStore.put

    def recording_put(self, streams, key, value):
        seen.append((key, value.dtype))
        return put(self, streams, key, value)
    CacheStore.put = recording_put
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            sample(model.eval(), torch.tensor([3]), steps=6, policy=SchedulePolicy(parse_pattern("1,2,2,1,2,2"),
                   deep_fraction=1.0), selector=TokenSelector(ratio=0.25), forecaster=Taylor(order=1))
    finally:
        CacheStore.put = put
    branch = [(k, d) for k, d in seen if isinstance(k[-1], int) or k[-1] == "correction"]
    assert any(k[-1] == "correction" for k, _ in branch) and any(len(k) == 4 for k, _ in branch)
    assert {d for _, d in branch} == {torch.bfloat16}
    assert {d for k, d in seen if k[-1] == "staleness"} <= {torch.int32}


@pytest.mark.parametrize("quantize", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", FLOATS)
def test_8bit_store_decodes_to_the_values_dtype_and_keeps_streams_apart(quantize, dtype):
    store = CacheStore(quantize=quantize)
    value = _outlier_activations(tokens=16, channels=32).to(dtype)
    store.put(("c", "u"), "k", value)
    both, swapped, alone = (store.get(s, "k") for s in (("c", "u"), ("u", "c"), ("u",)))
    assert both.dtype == dtype and both.shape == value.shape
    assert torch.equal(swapped, both.flip(0)) and torch.equal(alone, both[1:])
    assert 0 < _relative_error(both, value) < 0.06
    assert store.nbytes == value.numel() + 2 * 16 * 4            # one byte a value, a float32 scale a token


@pytest.mark.parametrize("quantize", ["int8", "fp8"])
def test_8bit_store_keeps_integers_vectors_and_zero_rows_exact(quantize):
    store = CacheStore(quantize=quantize)
    staleness = torch.randint(0, 9, (2, 7), dtype=torch.int32)
    vector = torch.randn(4, dtype=torch.bfloat16)
    zeros = torch.zeros(2, 3, 8, dtype=torch.bfloat16)
    for key, value in (("staleness", staleness), ("vector", vector), ("zeros", zeros)):
        store.put(("c",), key, value)
        out = store.get(("c",), key)
        assert out.dtype == value.dtype and torch.equal(out, value)
    assert store.get(("c",), "staleness") is staleness


def test_8bit_store_reads_parts_put_in_separate_calls():
    store = CacheStore(quantize="int8")
    cond, uncond = torch.randn(1, 6, 16), torch.randn(1, 6, 16) * 100
    store.put(("c",), "k", cond)
    store.put(("u",), "k", uncond)
    joined = store.get(("u", "c"), "k")
    assert torch.equal(joined, torch.cat([store.get(("u",), "k"), store.get(("c",), "k")]))
    assert _relative_error(joined[1:], cond) < 0.01 and _relative_error(joined[:1], uncond) < 0.01


@pytest.mark.parametrize("quantize", ["int8", "fp8"])
def test_8bit_error_is_bounded_on_realistic_activations(quantize):
    """Bounds from the measured figures (benchmarks/cache_quantize.py): per-token int8 keeps plain
    normal activations within 1 %, fp8 within 3 %; outlier channels cost int8 its edge."""
    bounds = {"int8": (0.01, 0.05, 0.02), "fp8": (0.03, 0.03, 0.03)}[quantize]
    normal = torch.randn(2, 512, 768, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    outliers = _outlier_activations().to(torch.bfloat16)
    torch.manual_seed(0)
    model = DiT(DiTConfig(depth=2, hidden=64, heads=4))
    model.reset_parameters(zero_gates=False)
    branch_outputs = []
    hooks = [b.mlp.register_forward_hook(lambda m, i, o: branch_outputs.append(o)) for b in model.blocks]
    with torch.no_grad():
        sample(model.eval(), torch.arange(4), steps=3)
    for hook in hooks:
        hook.remove()
    for value, bound in zip((normal, outliers, torch.cat(branch_outputs).to(torch.bfloat16)), bounds):
        store = CacheStore(quantize=quantize)
        store.put(("c",), "k", value)
        assert _relative_error(store.get(("c",), "k"), value) < bound


def test_quantize_rejects_unknown_formats_and_says_what_lacks_fp8(monkeypatch):
    with pytest.raises(ValueError, match="int8"):
        CacheStore(quantize="int4")
    monkeypatch.delattr(torch, "float8_e4m3fn")
    with pytest.raises(ValueError, match="float8_e4m3fn.*int8"):
        CacheStore(quantize="fp8")
    CacheStore(quantize="int8")


def test_a_batch_that_does_not_split_evenly_into_streams_is_refused():
    with pytest.raises(ValueError, match="batch of 3 into 2 streams"):
        CacheStore().put(("c", "u"), "k", torch.zeros(3, 4))


_shapes = st.lists(st.integers(0, 6), min_size=1, max_size=4)
_dtypes = st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int32,
                           torch.int64, torch.bool, torch.uint8])


@settings(max_examples=150, deadline=None)
@given(shape=_shapes, dtype=_dtypes, streams=st.integers(1, 3), quantize=st.sampled_from([None, "int8", "fp8"]),
       device=st.sampled_from([None, "cpu"]))
def test_entry_nbytes_is_what_a_put_holds(shape, dtype, streams, quantize, device):
    shape = [shape[0] * streams] + shape[1:]
    store = CacheStore(device, quantize=quantize)
    value = torch.zeros(shape, dtype=dtype)
    names = [f"s{i}" for i in range(streams)]
    store.put(names, "k", value)
    store.put(names[:1], "other", value[:shape[0] // streams].clone())
    expected = CacheStore.entry_nbytes(shape, dtype, quantize) + CacheStore.entry_nbytes(
        [shape[0] // streams] + shape[1:], dtype, quantize)
    assert store.nbytes == expected
    store.discard(names, "k")
    assert store.nbytes == CacheStore.entry_nbytes([shape[0] // streams] + shape[1:], dtype, quantize)


def test_entry_nbytes_of_a_flux_branch_halves_with_8bit_codes():
    shape = (2, 4096, 3072)                                   # cond + uncond, 1024x1024 FLUX image tokens
    plain = CacheStore.entry_nbytes(shape, torch.bfloat16)
    assert plain == 2 * 4096 * 3072 * 2
    assert CacheStore.entry_nbytes(shape, torch.bfloat16, "int8") == plain // 2 + 2 * 4096 * 4
    assert CacheStore.entry_nbytes(shape, torch.int32, "fp8") == 2 * 4096 * 3072 * 4


# ---- host copies and prefetch -------------------------------------------------------------------
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_cpu_store_without_cuda_is_exact_and_prefetch_does_nothing(quantize):
    store = CacheStore("cpu", quantize=quantize)
    value = torch.randn(2, 8, 16, dtype=torch.bfloat16)
    store.put(("c", "u"), "k", value)
    expected = store.get(("c", "u"), "k")
    assert store.prefetch(("c", "u"), "k", "cpu") is False
    assert store.prefetch(("c", "u"), "missing", "cpu") is False
    assert store.prefetched_nbytes == 0
    out = store.get(("c", "u"), "k", device=torch.device("cpu"))
    assert torch.equal(out, expected) and (quantize is not None or torch.equal(out, value))


class _CopyingAhead(CacheStore):
    """A store whose prefetch copies synchronously to the CPU, standing in for the side-stream copy
    of a CUDA machine: the bookkeeping around it is the same."""

    def _copy_ahead(self, entry, device):
        self.copies = getattr(self, "copies", 0) + 1
        return cache_module._Entry(entry.data.clone(), None if entry.scale is None else entry.scale.clone(),
                                   entry.dtype), None


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_prefetched_values_are_handed_out_once_and_never_stale(quantize):
    store = _CopyingAhead("cpu", quantize=quantize)
    first, second = torch.randn(2, 4, 8), torch.randn(2, 4, 8) + 10
    store.put(("c", "u"), "k", first)
    exact = store.get(("c", "u"), "k")

    assert store.prefetch(("c", "u"), "k", "cpu") and store.prefetched_nbytes > 0
    ahead = store._ahead["k"].value.data
    out = store.get(("c", "u"), "k", device="cpu")
    assert torch.equal(out, exact) and (quantize is not None or out is ahead)
    assert store.prefetched_nbytes == 0 and "k" not in store._ahead          # handed out once

    store.prefetch(("c", "u"), "k", "cpu")
    store.put(("c", "u"), "k", second)                                       # overwritten
    assert store.prefetched_nbytes == 0
    assert torch.allclose(store.get(("c", "u"), "k", device="cpu"), second, rtol=0.02, atol=0.02)

    store.prefetch(("c", "u"), "k", "cpu")
    store.discard(("u",), "k")                                               # one stream forgotten
    assert store.get(("c", "u"), "k", device="cpu") is None
    assert store.get(("c",), "k") is not None

    store.prefetch(("c",), "k", "cpu")
    store._parts[("c", "k")] = cache_module._Entry(torch.zeros(1, 4, 8))
    assert torch.equal(store.get(("c",), "k", device="cpu"), torch.zeros(1, 4, 8))  # replaced under it

    store.put(("c", "u"), "k", first)
    store.prefetch(("c", "u"), "k", "cpu")
    assert torch.equal(store.get(("u", "c"), "k", device="cpu"), exact.flip(0))  # other order: not the copy
    store.prefetch(("c", "u"), "k", "cpu")
    store.clear()
    assert store.prefetched_nbytes == 0 and store.get(("c", "u"), "k", device="cpu") is None
    assert store.copies == 6


def test_clear_gives_pinned_blocks_back_once(monkeypatch):
    """A store that pinned host memory empties PyTorch's host cache on clear (the blocks would keep
    system RAM after the run); a store that pinned nothing leaves it alone."""
    calls = []
    monkeypatch.setattr(torch.accelerator, "empty_host_cache", lambda: calls.append(1))
    store = CacheStore("cpu")
    store.put(("c",), "k", torch.ones(1, 2, 3))
    store.clear()
    assert calls == []
    store._pinned = True            # what a put of a CUDA value into pinned memory sets
    store.clear()
    store.clear()
    assert calls == [1]
