"""Numerics of every fake-quantisation format: exact grids, quirks of the reference, SQNR, rounding."""

import dataclasses
import math

import pytest
import torch

from quantization import W4A4_FORMATS, QuantConfig, fake_quantize
from quantization.outliers import kth_largest

INT_W, INT_A = W4A4_FORMATS["int"]
FP4_REF = W4A4_FORMATS["fp4_ref"][0]
E2M1 = QuantConfig("e2m1")
MXFP4 = QuantConfig("mxfp4")
NVFP4 = QuantConfig("nvfp4")
DETERMINISTIC = {
    "int_w": INT_W, "int_a": INT_A, "fp4_ref": FP4_REF, "e2m1": E2M1, "mxfp4": MXFP4, "nvfp4": NVFP4
}
E2M1_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def gaussian(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def sqnr_db(x, q):
    return 10 * math.log10(x.pow(2).mean().item() / (x - q).pow(2).mean().item())


def tensor(values):
    return torch.tensor(values, dtype=torch.float32)


# ---- int, asymmetric (docs/algorithms.md#c2) ----------------------------------------------------------

def test_int_asymmetric_exact_on_its_own_grid():
    config = QuantConfig("int", bits=4, group_size=16, symmetric=False)
    x = torch.arange(16.0) - 5.0  # max - min = 15: scale 1, zero point 5
    assert torch.equal(fake_quantize(x, config), x)


def test_int_asymmetric_zero_point_saturation_quirk():
    config = QuantConfig("int", bits=4, group_size=8, symmetric=False)
    positive = torch.linspace(1.0, 1.9, 8)  # in [1, 2): every value saturates to max - min
    negative = torch.linspace(-2.0, -1.1, 8)  # negative-only: every value becomes -(max - min)
    constant = torch.full((8,), 3.0)  # range floored at 1e-5: dequantises to 1e-5
    zeros = torch.zeros(8)
    out = fake_quantize(torch.cat([positive, negative, constant, zeros]), config).view(4, 8)
    torch.testing.assert_close(out[0], torch.full((8,), 0.9), rtol=1e-6, atol=0)
    torch.testing.assert_close(out[1], torch.full((8,), -0.9), rtol=1e-6, atol=0)
    torch.testing.assert_close(out[2], torch.full((8,), 1e-5), rtol=1e-6, atol=0)
    assert torch.equal(out[3], zeros)


def test_int_asymmetric_codes_within_range_and_error_within_half_step():
    x = gaussian(4, 256)
    out = fake_quantize(x, INT_W)
    scale = (x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)) / 15
    zero = torch.round(-x.amin(-1, keepdim=True) / scale)
    codes = out / scale + zero
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-4)
    assert codes.round().min() >= 0 and codes.round().max() <= 15
    assert ((out - x).abs() <= scale / 2 * (1 + 1e-5)).all()


def test_int_asymmetric_bfloat16_follows_the_reference_arithmetic():
    """docs/algorithms.md#c2 written plainly, evaluated in bfloat16 as the reference did."""
    x = gaussian(8, 256, dtype=torch.bfloat16)
    low, high = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    scale = (high - low).clamp(min=1e-5) / 15
    zero = (-torch.round(low / scale)).clamp(0, 15)
    codes = torch.clamp(torch.round(x / scale) + zero, 0, 15).to(torch.uint8)
    expected = (codes.to(torch.bfloat16) - zero) * scale
    out = fake_quantize(x, INT_W)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected)


# ---- int, symmetric with outliers (docs/algorithms.md#c3) -----------------------------------------------

def test_int_symmetric_keeps_top2_and_rounds_half_to_even():
    config = QuantConfig("int", bits=4, group_size=8, symmetric=True, topk=2)
    x = tensor([100.0, -50.0, 7.0, -7.0, 3.5, 2.5, 1.2, 0.0])  # scale 7 after removing 100 and -50
    assert torch.equal(fake_quantize(x, config), tensor([100.0, -50.0, 7.0, -7.0, 4.0, 2.0, 1.0, 0.0]))


def test_int_symmetric_single_huge_outlier():
    x = tensor([1000.0, 1.0, -2.0, 0.5, 3.0, -0.25, 0.0, 2.0])
    crushed = fake_quantize(x, QuantConfig("int", group_size=8, topk=0))
    assert torch.equal(crushed, tensor([1000.0, 0, 0, 0, 0, 0, 0, 0]))
    kept = fake_quantize(x, QuantConfig("int", group_size=8, topk=1))  # scale 3: steps of 3/7
    assert kept[0] == 1000.0
    torch.testing.assert_close(kept[1:], torch.round(x[1:] * 7 / 3) * 3 / 7)


def test_int_symmetric_all_equal_negative_and_zero_groups():
    config = QuantConfig("int", bits=4, group_size=8, topk=2)
    x = torch.cat([torch.full((8,), 2.0), -torch.linspace(0.5, 4.0, 8), torch.zeros(8)])
    out = fake_quantize(x, config).view(3, 8)
    assert torch.equal(out[0], torch.full((8,), 2.0))
    negative = -torch.linspace(0.5, 4.0, 8)
    rest_scale = negative[:6].abs().max()  # -4.0 and -3.5 are the outliers
    torch.testing.assert_close(out[1, :6], torch.round(negative[:6] * 7 / rest_scale) * rest_scale / 7)
    assert torch.equal(out[1, 6:], negative[6:])
    assert torch.equal(out[2], torch.zeros(8))


def test_int_symmetric_levels():
    for bits in (2, 4, 8):
        config = QuantConfig("int", bits=bits, group_size=256, topk=2)
        x = gaussian(16, 256, seed=bits)
        out = fake_quantize(x, config)
        magnitude = x.abs()
        threshold = magnitude.topk(3, -1).values[:, 2:]
        max_code = 2 ** (bits - 1) - 1
        codes = out * max_code / threshold
        rest = magnitude <= threshold
        torch.testing.assert_close(codes[rest], codes[rest].round(), rtol=0, atol=1e-4)
        assert codes[rest].round().abs().max() <= max_code
        assert torch.equal(out[~rest], x[~rest])


# ---- fp4_ref (docs/algorithms.md#c4) --------------------------------------------------------------------

def llm_fp4_formula(x, group_size=256, topk=2, e=1, m=2, b=1):
    """The reference's path written out from docs/algorithms.md#c4: LLM-FP4 exponent formula with its constants."""
    groups = x.clone().reshape(-1, group_size)
    index = groups.abs().topk(topk, -1).indices
    kept = groups.gather(-1, index)
    groups.scatter_(-1, index, 0.0)
    alpha = groups.abs().amax(-1).clamp(min=1e-6)
    clamped = torch.clamp(groups, -alpha[:, None], alpha[:, None])
    alpha_hat = alpha * 2 ** (-b)
    b_hat = 2**e - torch.log2(alpha) + math.log2(2 - 2 ** (-m)) - 1
    log_v = torch.floor(torch.log2(clamped.abs() + 1e-8) + b_hat[:, None])
    v = torch.pow(2, torch.clamp(log_v - m, min=1 - m))
    out = alpha_hat[:, None] * v * torch.round(clamped / (alpha_hat[:, None] * v) + 1e-12)
    out.scatter_(-1, index, kept)
    return out.reshape(x.shape)


@pytest.mark.parametrize("scale", [1e-4, 1.0, 300.0])
def test_fp4_ref_bit_exact_with_the_reference_formula_float32(scale):
    x = gaussian(32, 1024, seed=3) * scale
    assert torch.equal(fake_quantize(x, FP4_REF), llm_fp4_formula(x))
    line = torch.linspace(-3.0, 5.0, 256 * 8) * scale
    assert torch.equal(fake_quantize(line, FP4_REF), llm_fp4_formula(line))


def test_fp4_ref_bit_exact_with_the_reference_formula_bfloat16():
    x = gaussian(32, 1024, seed=4, dtype=torch.bfloat16)
    out = fake_quantize(x, FP4_REF)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, llm_fp4_formula(x))


def test_fp4_ref_is_a_nine_level_grid_with_top2_exact():
    x = gaussian(16, 256, seed=5)
    out = fake_quantize(x, FP4_REF)
    alpha = x.abs().topk(3, -1).values[:, 2:]
    rest = x.abs() <= alpha
    codes = out[rest] / (alpha / 4).expand_as(out)[rest]
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-5)
    assert set(codes.round().tolist()) == set(range(-4, 5))
    assert torch.equal(out[~rest], x[~rest])


def test_fp4_ref_exact_values_and_alpha_zero():
    config = QuantConfig("fp4_ref", group_size=8, topk=2)
    x = tensor([10.0, -9.0, 4.0, -3.0, 1.5, 0.5, -2.5, 0.0])  # alpha 4: steps of 1, ties to even
    assert torch.equal(fake_quantize(x, config), tensor([10.0, -9.0, 4.0, -3.0, 2.0, 0.0, -2.0, 0.0]))
    only_outliers = tensor([5.0, -3.0, 0, 0, 0, 0, 0, 0])  # alpha == 0: the rest stays 0, no NaN
    assert torch.equal(fake_quantize(only_outliers, config), only_outliers)
    assert torch.equal(fake_quantize(torch.zeros(8), config), torch.zeros(8))


def test_fp4_ref_topk0_quantises_everything():
    """The reference returns its input unchanged for topk=0; we quantise with alpha = max|x|."""
    x = tensor([4.0, 1.4, -0.6, 2.0])
    assert torch.equal(fake_quantize(x, QuantConfig("fp4_ref", group_size=4)), tensor([4.0, 1.0, -1.0, 2.0]))


def test_flat_groups_straddle_rows_like_the_reference():
    x = gaussian(16, 2736)  # LLaMA-350M down_proj rows: groups of 256 straddle them
    out = fake_quantize(x, FP4_REF)
    assert torch.equal(out, fake_quantize(x.reshape(-1), FP4_REF).view_as(x))
    assert torch.equal(out, llm_fp4_formula(x))


# ---- E2M1-based formats ---------------------------------------------------------------------------------

def test_e2m1_grid_and_ties_to_even():
    config = QuantConfig("e2m1", group_size=8)
    x = tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    expected = tensor([6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0])
    assert torch.equal(fake_quantize(x, config), expected)
    assert torch.equal(fake_quantize(-2 * x, config), -2 * expected)  # scale 2, symmetric
    grid = torch.cat([E2M1_GRID, -E2M1_GRID]) * 0.375
    assert torch.equal(fake_quantize(grid, QuantConfig("e2m1", group_size=16)), grid)


def test_e2m1_zero_and_outlier_blocks():
    config = QuantConfig("e2m1", group_size=4)
    x = tensor([0.0, 0.0, 0.0, 0.0, 600.0, 1.0, -20.0, 60.0])  # outlier block: scale 100
    assert torch.equal(fake_quantize(x, config), tensor([0.0, 0.0, 0.0, 0.0, 600.0, 0.0, 0.0, 50.0]))


def test_mxfp4_power_of_two_scale_and_saturation():
    def block(*head):
        return torch.cat([tensor(head), torch.zeros(32 - len(head))])

    below_four = torch.nextafter(torch.tensor(4.0), torch.tensor(0.0)).item()
    x = torch.stack([
        block(5.0, 1.5, -0.5),  # amax 5: scale 2^(2-2) = 1, grid values stay
        block(7.0, -7.0, 3.0),  # amax 7: scale 1, 7 saturates to 6
        block(0.75, 0.1),  # amax 0.75: scale 2^(-1-2) = 1/8; 0.1 -> 0.8 -> 1 -> 0.125
        block(below_four, 1.0),  # floor(log2) = 1 exactly (log2 rounds up to 2): scale 1/2, saturates to 3
        block(),
    ])
    expected = torch.stack([
        block(4.0, 1.5, -0.5),  # 5 is a tie between 4 and 6: the even code, 4
        block(6.0, -6.0, 3.0),
        block(0.75, 0.125),
        block(3.0, 1.0),
        block(),
    ])
    assert torch.equal(fake_quantize(x, MXFP4), expected)


def test_nvfp4_e4m3_block_scale_and_tensor_scale():
    def block(*head):
        return torch.cat([tensor(head), torch.zeros(16 - len(head))])

    # Tensor amax 2688 = 6 * 448: tensor scale 1. 13/6 rounds to 2.25 in E4M3, so 13 -> 6 * 2.25 and
    # 1 -> 0.5 * 2.25; a block scale of 1e-3/6 underflows E4M3 and its block becomes 0.
    x = torch.cat([block(13.0, 1.0), block(2688.0, -448.0), block(1e-3)])
    expected = torch.cat([block(13.5, 1.125), block(2688.0, -448.0), block()])
    assert torch.equal(fake_quantize(x, NVFP4), expected)
    assert torch.equal(fake_quantize(torch.zeros(2, 16), NVFP4), torch.zeros(2, 16))


def test_block_formats_zero_pad_a_ragged_last_block():
    x = gaussian(3, 40) * 0.1  # small: padding with anything but zeros would change the tail's scale
    tail = torch.nn.functional.pad(x[:, 32:], (0, 24))
    expected = torch.cat([fake_quantize(x[:, :32], MXFP4), fake_quantize(tail, MXFP4)[:, :8]], dim=1)
    assert torch.equal(fake_quantize(x, MXFP4), expected)


@pytest.mark.parametrize("config", [E2M1, MXFP4, NVFP4], ids=lambda c: c.format)
def test_block_formats_compute_in_float32_and_cast_back(config):
    x = gaussian(4, 64, seed=6, dtype=torch.bfloat16)
    out = fake_quantize(x, config)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert torch.equal(out, fake_quantize(x.float(), config).bfloat16())


def test_block_formats_use_the_last_dimension():
    x = gaussian(8, 64, seed=7)
    assert not torch.equal(fake_quantize(x, MXFP4), fake_quantize(x.t().contiguous(), MXFP4).t())
    assert torch.equal(fake_quantize(x, MXFP4)[:4], fake_quantize(x[:4], MXFP4))


# ---- properties shared by all formats -------------------------------------------------------------------

@pytest.mark.parametrize("name", DETERMINISTIC)
def test_idempotent(name):
    """Quantising a quantised tensor changes nothing. int and nvfp4 recompute their scale from dequantised
    values, which can move it by an ulp, so their second pass agrees to rounding error."""
    config = DETERMINISTIC[name]
    once = fake_quantize(gaussian(16, 512, seed=8), config)
    twice = fake_quantize(once, config)
    if name in ("int_w", "int_a", "nvfp4"):
        torch.testing.assert_close(twice, once, rtol=1e-6, atol=0)
    else:
        assert torch.equal(twice, once)


# Measured on this tensor (float32, N(0, 1)): int_w 19.4, int_a 19.6, fp4_ref 14.7, e2m1 19.9, mxfp4 18.8,
# nvfp4 20.5 dB; the floors sit a little below.
SQNR_FLOOR_DB = {"int_w": 19.0, "int_a": 19.2, "fp4_ref": 14.3, "e2m1": 19.5, "mxfp4": 18.4, "nvfp4": 20.0}


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_sqnr_floor_on_gaussian_data(name):
    x = gaussian(64, 1024, seed=1234)
    assert sqnr_db(x, fake_quantize(x, DETERMINISTIC[name])) > SQNR_FLOOR_DB[name]


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_shape_and_dtype_preserved(name):
    for dtype in (torch.float32, torch.bfloat16):
        x = gaussian(2, 8, 256, seed=9, dtype=dtype)
        out = fake_quantize(x, DETERMINISTIC[name])
        assert out.shape == x.shape and out.dtype == dtype
        assert torch.isfinite(out).all()
        assert not torch.equal(out, x)


# ---- stochastic rounding --------------------------------------------------------------------------------

def _stochastic_case(name, draws):
    """Rows that repeat one group whose scale makes the grid known: returns (x, config, sorted grid)."""
    row_values = torch.rand(1, 250, generator=torch.Generator().manual_seed(11))
    if name == "int_w":  # min 0, max 15: scale 1, zero point 0
        row = torch.cat([tensor([[0.0, 15.0]]), row_values[:, :30] * 15], 1)
        config = QuantConfig("int", group_size=32, symmetric=False, stochastic=True)
        return row.expand(draws, -1), config, torch.arange(16.0)
    if name == "int_a":  # outliers 100, -90; scale 7: steps of 1
        row = torch.cat([tensor([[100.0, -90.0, 7.0]]), row_values[:, :29] * 14 - 7], 1)
        config = QuantConfig("int", group_size=32, topk=2, stochastic=True)
        return row.expand(draws, -1), config, torch.arange(-8.0, 8.0)
    if name == "fp4_ref":  # alpha 4: steps of 1
        row = torch.cat([tensor([[100.0, -90.0, 4.0]]), row_values[:, :29] * 8 - 4], 1)
        config = QuantConfig("fp4_ref", group_size=32, topk=2, stochastic=True)
        return row.expand(draws, -1), config, torch.arange(-4.0, 5.0)
    grid = torch.cat([-E2M1_GRID.flip(0), E2M1_GRID[1:]])
    row = torch.cat([tensor([[6.0]]), row_values[:, :31] * 12 - 6], 1)  # e2m1 / mxfp4: scale 1
    if name == "nvfp4":  # a first block holding 6 * 448 makes the tensor scale 1; the second has scale 1
        row = torch.cat([tensor([[2688.0]]), torch.zeros(1, 15), row[:, :16]], 1)
    return row.expand(draws, -1), QuantConfig(name, stochastic=True), grid


@pytest.mark.parametrize("name", ["int_w", "int_a", "fp4_ref", "e2m1", "mxfp4", "nvfp4"])
def test_stochastic_rounding_is_unbiased_and_lands_on_neighbours(name):
    draws = 4000
    x, config, grid = _stochastic_case(name, draws)
    out = fake_quantize(x, config, generator=torch.Generator().manual_seed(12))
    checked = slice(16, None) if name == "nvfp4" else slice(None)
    x, out = x[:, checked], out[:, checked]
    inside = (x.abs() <= grid.max()) & (x >= grid.min())
    position = torch.searchsorted(grid, x[inside].contiguous(), right=True).clamp(max=len(grid) - 1)
    lower, upper = grid[(position - 1).clamp(min=0)], grid[position]
    on_neighbour = (out[inside] == lower) | (out[inside] == upper) | (out[inside] == x[inside])
    assert on_neighbour.all()
    assert (out[0] != x[0]).any()  # it does round
    # Each draw errs by at most one step (<= 2): the mean of 4000 draws is within 0.1 of x.
    torch.testing.assert_close(out.mean(0), x[0], rtol=0, atol=0.1)
    assert (out.std(0) > 0).sum() > 10  # and it is random


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_stochastic_rounding_reproducible_with_a_generator(name):
    config = dataclasses.replace(DETERMINISTIC[name], stochastic=True)
    x = gaussian(4, 512, seed=13)
    first = fake_quantize(x, config, generator=torch.Generator().manual_seed(1))
    again = fake_quantize(x, config, generator=torch.Generator().manual_seed(1))
    other = fake_quantize(x, config, generator=torch.Generator().manual_seed(2))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


# ---- helpers and errors ---------------------------------------------------------------------------------

def test_kth_largest_counts_ties_like_topk():
    values = torch.randint(0, 5, (500, 16), generator=torch.Generator().manual_seed(14)).float()
    for k in (0, 1, 2, 5):
        assert torch.equal(kth_largest(values, k), values.topk(k + 1, -1).values[:, k:])


def test_flat_group_size_must_divide_numel():
    with pytest.raises(ValueError, match="group_size"):
        fake_quantize(torch.ones(10, 30), INT_A)


def test_non_float_and_scalar_inputs_rejected():
    with pytest.raises(ValueError, match="floating-point"):
        fake_quantize(torch.ones(256, dtype=torch.int32), INT_W)
    with pytest.raises(ValueError, match="dimension"):
        fake_quantize(torch.tensor(1.0), MXFP4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", DETERMINISTIC)
def test_cuda_matches_cpu(name):
    x = gaussian(16, 2736, seed=15)  # a ragged last block for mxfp4; int/fp4_ref groups straddle rows
    expected = fake_quantize(x, DETERMINISTIC[name])
    assert torch.equal(fake_quantize(x.cuda(), DETERMINISTIC[name]).cpu(), expected)


# ---- NaN and infinity stay in their block or group ------------------------------------------------------

@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("name", DETERMINISTIC)
def test_a_non_finite_value_stays_in_its_block_or_group(name, bad):
    """NVFP4 took its per-tensor scale over a NaN (falling back to 1, which zeroed or clipped every block) or
    an infinity (every output NaN); MXFP4 turned an infinity into a finite 6 * 2^126 and zeroed its block.
    Now every other block/group is what it would be with that entry 0, and a block format's block is NaN."""
    config = DETERMINISTIC[name]
    x = gaussian(4, 512, seed=3)
    x[0] *= 100.0  # the largest values sit in the row that will also hold the non-finite entry
    x[0, 5] = bad
    out = fake_quantize(x, config)
    expected = fake_quantize(torch.where(torch.isfinite(x), x, 0.0), config)
    group = 256 if name in ("int_w", "int_a", "fp4_ref") else config.group_size
    assert torch.equal(out[0, group:], expected[0, group:]) and torch.equal(out[1:], expected[1:])
    if name in ("e2m1", "mxfp4", "nvfp4"):
        assert out[0, :group].isnan().all()
