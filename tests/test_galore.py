"""GaLore optimizers against plain per-tensor implementations written here, the projector's cadence, types
and shapes, Q-GaLore's factor quantization and lazy gap, state_dict continuation and per-layer updates."""

import io
import math

import pytest
import torch

from galore_torch import (
    GaLoreAdafactor,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    GaLoreProjector,
    GaLoreSPAM,
    GaLoreStableSPAM,
    PerLayerOptimizer,
    QGaLoreAdamW8bit,
    SPAM,
    StableSPAM,
)
from galore_torch.factor_quant import dequantize_factor, quantize_factor

SHAPES = {"tall": (12, 8), "wide": (8, 12), "square": (10, 10)}
PROJ_TYPES = ["std", "reverse_std", "right", "left", "full"]
STEPS = 7


def sides(shape, proj_type):
    m, n = shape
    return {"std": (m < n, m >= n), "reverse_std": (m >= n, m < n), "right": (False, True),
            "left": (True, False), "full": (True, True)}[proj_type]


class PlainProjection:
    """The projection written out: factors from the SVD every `gap` steps, rotations between subspaces."""

    def __init__(self, shape, rank, proj_type, gap, scale):
        self.left_side, self.right_side = sides(shape, proj_type)
        self.rank, self.gap, self.scale, self.t = rank, gap, scale, 0
        self.left = self.right = None

    def project(self, g):
        rotations = None
        if self.t % self.gap == 0:
            u, _, vh = torch.linalg.svd(g, full_matrices=False)
            new_left = u[:, :self.rank] if self.left_side else None
            new_right = vh[:self.rank] if self.right_side else None
            if self.t > 0:
                rotations = (None if new_left is None else new_left.T @ self.left,
                             None if new_right is None else new_right @ self.right.T)
            self.left, self.right = new_left, new_right
        self.t += 1
        low = g
        if self.left is not None:
            low = self.left.T @ low
        if self.right is not None:
            low = low @ self.right.T
        return low, rotations

    def back(self, low):
        if self.left is not None:
            low = self.left @ low
        if self.right is not None:
            low = low @ self.right
        return low * self.scale


def rotate(x, rotations, squared):
    left, right = rotations
    if left is not None:
        x = (left.square() if squared else left) @ x
    if right is not None:
        x = x @ (right.square() if squared else right).T
    return x


def plain_galore_adamw(w, grads, *, rank, proj_type, gap, scale, lr, wd, variant, betas=(0.9, 0.999), eps=1e-6):
    w = w.clone()
    projection = PlainProjection(w.shape, rank, proj_type, gap, scale)
    m = v = None
    for t, g in enumerate(grads, start=1):
        low, rotations = projection.project(g)
        if m is None:
            m, v = torch.zeros_like(low), torch.zeros_like(low)
        elif rotations is not None and variant == "corrected":
            m, v = rotate(m, rotations, False), rotate(v, rotations, True)
        m = betas[0] * m + (1 - betas[0]) * low
        v = betas[1] * v + (1 - betas[1]) * low * low
        step_size = lr * math.sqrt(1 - betas[1] ** t) / (1 - betas[0] ** t)
        w = w + projection.back(-step_size * m / (v.sqrt() + eps))
        w = w - lr * wd * w
    return w


def run(optimizer_class, w, grads, groups_extra, **kwargs):
    p = torch.nn.Parameter(w.clone())
    optimizer = optimizer_class([{"params": [p], **groups_extra}], **kwargs)
    for g in grads:
        p.grad = g.clone()
        optimizer.step()
    return p.detach(), optimizer


def data(shape, dtype, steps=STEPS, seed=0):
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
    grads = [torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype) for _ in range(steps)]
    return w, grads


TOLERANCES = {torch.float32: {"rtol": 1e-5, "atol": 1e-6}, torch.float64: {"rtol": 1e-12, "atol": 1e-13}}


@pytest.mark.parametrize("variant", ["reference", "corrected"])
@pytest.mark.parametrize("proj_type", PROJ_TYPES)
@pytest.mark.parametrize("shape_name", sorted(SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_galore_adamw_matches_plain_implementation(shape_name, proj_type, variant, dtype):
    shape = SHAPES[shape_name]
    rank = min(shape) - 1 if proj_type == "full" else 3  # r near min(m, n), and a small r
    w, grads = data(shape, dtype)
    settings = {"rank": rank, "proj_type": proj_type, "update_proj_gap": 3, "scale": 0.25}
    got, _ = run(GaLoreAdamW, w, grads, settings, lr=1e-2, weight_decay=0.1, variant=variant)
    expected = plain_galore_adamw(w, grads, rank=rank, proj_type=proj_type, gap=3, scale=0.25, lr=1e-2, wd=0.1,
                                  variant=variant)
    torch.testing.assert_close(got, expected, **TOLERANCES[dtype])


@pytest.mark.parametrize("rank", [1, 7])
def test_rank_up_to_min_minus_one_matches_plain(rank):
    w, grads = data((8, 12), torch.float64)
    got, _ = run(GaLoreAdamW, w, grads, {"rank": rank, "update_proj_gap": 2})
    expected = plain_galore_adamw(w, grads, rank=rank, proj_type="std", gap=2, scale=1.0, lr=1e-3, wd=0.0,
                                  variant="reference")
    torch.testing.assert_close(got, expected, **TOLERANCES[torch.float64])


def test_variants_differ_only_after_the_subspace_changes():
    w, grads = data((12, 8), torch.float64)
    settings = {"rank": 3, "update_proj_gap": 3}
    reference = [run(GaLoreAdamW, w, grads[:k], settings, variant="reference")[0] for k in (3, 4)]
    corrected = [run(GaLoreAdamW, w, grads[:k], settings, variant="corrected")[0] for k in (3, 4)]
    assert torch.equal(reference[0], corrected[0])
    assert not torch.allclose(reference[1], corrected[1])


def plain_galore_adafactor(w, grads, *, rank, gap, lr, wd, beta1, eps=(1e-30, 1e-3), clip=1.0, decay_rate=-0.8):
    w = w.clone()
    projection = PlainProjection(w.shape, rank, "std", gap, 1.0)
    row = col = exp_avg = None
    for t, g in enumerate(grads, start=1):
        low, _ = projection.project(g)
        if row is None:
            row, col, exp_avg = low.new_zeros(low.shape[0]), low.new_zeros(low.shape[1]), torch.zeros_like(low)
        beta2 = 1 - t**decay_rate
        squared = low * low + eps[0]
        row = beta2 * row + (1 - beta2) * squared.mean(dim=-1)
        col = beta2 * col + (1 - beta2) * squared.mean(dim=-2)
        update = (row / row.mean()).rsqrt()[:, None] * col.rsqrt()[None, :] * low
        update = update / torch.clamp(update.norm() / math.sqrt(update.numel()) / clip, min=1.0) * lr
        if beta1 is not None:
            exp_avg = beta1 * exp_avg + (1 - beta1) * update
            update = exp_avg
        w = w - lr * wd * w
        w = w - projection.back(update)
    return w


@pytest.mark.parametrize("beta1", [None, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_galore_adafactor_matches_plain_implementation(dtype, beta1):
    w, grads = data((12, 8), dtype)
    got, _ = run(GaLoreAdafactor, w, grads, {"rank": 3, "update_proj_gap": 3}, lr=1e-2, weight_decay=0.1,
                 beta1=beta1)
    expected = plain_galore_adafactor(w, grads, rank=3, gap=3, lr=1e-2, wd=0.1, beta1=beta1)
    torch.testing.assert_close(got, expected, **TOLERANCES[dtype])


@pytest.mark.parametrize("galore_class, inner_class, kwargs, inner_group", [
    (GaLoreStableSPAM, StableSPAM, {"momentum_reset_gap": 4, "total_T": 10}, {"update_proj_gap": 4, "total_T": 10}),
    (GaLoreSPAM, SPAM, {"momentum_reset_gap": 4, "threshold": 2.0, "grad_accu_steps": 1, "warmup_epoch": 2},
     {"update_proj_gap": 4, "density": 1.0, "threshold": 2.0, "grad_accu_steps": 1}),
], ids=["stablespam", "spam"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_spike_aware_galore_is_the_optimizer_on_the_projected_gradient(galore_class, inner_class, kwargs,
                                                                       inner_group, dtype):
    """The inner optimizer stepping a zero tensor on the projected gradient gives the rank-r update; the
    momentum-reset period (4) is distinct from the projection period (3)."""
    w, grads = data((12, 8), dtype, steps=9)
    got, _ = run(galore_class, w, grads, {"rank": 3, "update_proj_gap": 3}, lr=1e-2, weight_decay=0.1, **kwargs)
    projection = PlainProjection(w.shape, 3, "std", 3, 1.0)
    subspace = torch.zeros(12, 3, dtype=dtype, requires_grad=True)
    inner_kwargs = {"warmup_epoch": 2} if inner_class is SPAM else {}
    inner = inner_class([{"params": [subspace], **inner_group}], lr=1e-2, **inner_kwargs)
    expected = w.clone()
    for g in grads:
        low, _ = projection.project(g)
        with torch.no_grad():
            subspace.zero_()
        subspace.grad = low
        inner.step()
        if inner_class is StableSPAM:  # decay before the update, as StableSPAM
            expected = expected - 1e-2 * 0.1 * expected + projection.back(subspace.detach())
        else:
            expected = expected + projection.back(subspace.detach())
            expected = expected - 1e-2 * 0.1 * expected
    torch.testing.assert_close(got, expected, **TOLERANCES[dtype])


def test_svd_is_recomputed_every_update_proj_gap_steps(monkeypatch):
    calls = []
    svd = torch.linalg.svd

    def counting_svd(*args, **kwargs):
        calls.append(len(calls))
        return svd(*args, **kwargs)

    w, grads = data((12, 8), torch.float32, steps=10)
    p = torch.nn.Parameter(w)
    optimizer = GaLoreAdamW([{"params": [p], "rank": 2, "update_proj_gap": 4}])
    monkeypatch.setattr(torch.linalg, "svd", counting_svd)
    svd_steps = []
    for g in grads:
        p.grad = g
        optimizer.step()
        svd_steps.append(optimizer.state[p]["proj_svd_step"])
    assert len(calls) == 3  # steps 0, 4, 8
    assert svd_steps == [0, 0, 0, 0, 4, 4, 4, 4, 8, 8]


@pytest.mark.parametrize("shape, rank", [((12, 8), 8), ((8, 12), 9), ((10, 10), 10), ((12, 8), 0)])
def test_rank_at_or_above_min_dimension_is_refused_with_the_shape(shape, rank):
    p = torch.nn.Parameter(torch.zeros(shape))
    with pytest.raises(ValueError, match=rf"--rank.*{shape[0]}, {shape[1]}") as err:
        GaLoreAdamW([{"params": [p], "rank": rank}])
    assert "\n" not in str(err.value)


def test_bad_settings_are_refused_in_one_line():
    p = torch.nn.Parameter(torch.zeros(8, 12))
    for settings, flag in [({"proj_type": "up"}, "--proj_type"), ({"update_proj_gap": 0}, "--update_proj_gap"),
                           ({"quant": True, "quant_n_bit": 3}, "--proj_bits")]:
        with pytest.raises(ValueError, match=flag):
            GaLoreAdamW([{"params": [p], "rank": 2, **settings}])
    with pytest.raises(ValueError, match="2-D"):
        GaLoreAdamW([{"params": [torch.nn.Parameter(torch.zeros(4))], "rank": 2}])


def save_and_load(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


RESUMABLE = [
    (GaLoreAdamW, {}, {}),
    (GaLoreAdamW, {"variant": "corrected"}, {"proj_type": "full"}),
    (GaLoreAdamW, {}, {"quant": True, "quant_n_bit": 4, "quant_group_size": 8, "cos_threshold": -1.0,
                       "queue_size": 2}),
    (GaLoreAdafactor, {"beta1": 0.9}, {}),
    (GaLoreStableSPAM, {"momentum_reset_gap": 3}, {}),
    (GaLoreSPAM, {"momentum_reset_gap": 3, "density": 0.5, "warmup_epoch": 2}, {}),
]


@pytest.mark.parametrize("optimizer_class, kwargs, settings", RESUMABLE,
                         ids=["adamw", "adamw-corrected-full", "adamw-qgalore", "adafactor", "stablespam", "spam"])
def test_state_dict_round_trip_mid_run_continues_bitwise(optimizer_class, kwargs, settings):
    torch.manual_seed(0)
    w, grads = data((12, 8), torch.float32, steps=8)
    bias, bias_grads = data((8,), torch.float32, steps=8, seed=1)

    def make(weight, b):
        return optimizer_class([{"params": [b]}, {"params": [weight], "rank": 3, "update_proj_gap": 2, **settings}],
                               lr=1e-2, weight_decay=0.1, **kwargs)

    params = [torch.nn.Parameter(w.clone()), torch.nn.Parameter(bias.clone())]
    optimizer = make(*params)

    def steps(opt, ps, indices):
        for i in indices:
            ps[0].grad, ps[1].grad = grads[i].clone(), bias_grads[i].clone()
            opt.step()

    steps(optimizer, params, range(5))
    saved = save_and_load(optimizer.state_dict())
    rng = torch.get_rng_state()
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = make(*copies)
    resumed.load_state_dict(saved)
    steps(optimizer, params, range(5, 8))
    torch.set_rng_state(rng)
    steps(resumed, copies, range(5, 8))
    for p, q in zip(params, copies):
        assert torch.equal(p, q)


def test_per_layer_updates_match_one_optimizer_with_a_scheduler():
    """Hooks step each param during backward; one LambdaLR over the per-layer wrapper gives every param the
    lr the reference's per-param schedulers did."""
    def train(per_layer: bool):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 4))
        groups = [{"params": [model[0].bias, model[2].bias]},
                  {"params": [model[0].weight, model[2].weight], "rank": 2, "update_proj_gap": 2}]
        if per_layer:
            optimizer = PerLayerOptimizer(groups, optimizer_class=GaLoreAdamW, lr=1e-2, weight_decay=0.1)
        else:
            optimizer = GaLoreAdamW(groups, lr=1e-2, weight_decay=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
        generator = torch.Generator().manual_seed(1)
        for _ in range(5):
            model(torch.randn(8, 6, generator=generator)).square().mean().backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        return model, optimizer

    model, _ = train(per_layer=False)
    per_layer_model, per_layer = train(per_layer=True)
    for p, q in zip(model.parameters(), per_layer_model.parameters()):
        assert torch.equal(p, q)
        assert q.grad is None  # freed by the hook
    saved = save_and_load(per_layer.state_dict())
    assert len(saved["param_groups"]) == 4 and set(saved["state"]) == {0, 1, 2, 3}
    per_layer.load_state_dict(saved)
    assert per_layer.param_groups[0]["lr"] == saved["param_groups"][0]["lr"]


def test_factor_quantization_error_is_within_half_a_step():
    factor = torch.linalg.qr(torch.randn(64, 8, generator=torch.Generator().manual_seed(0)))[0]
    for bits, bound in ((8, 0.005), (4, 0.08)):
        codes, scales, minima = quantize_factor(factor, bits, 32)
        assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1
        restored = dequantize_factor(codes, scales, minima, factor.shape, torch.float32)
        step = scales.expand(-1, 32).reshape(-1)[:factor.numel()].view_as(factor)
        assert ((restored - factor).abs() <= step / 2 + 1e-7).all()
        assert (restored - factor).abs().max() < bound


def test_qgalore_gap_grows_once_the_queue_is_full_of_similar_subspaces():
    """A constant gradient gives the same leading vector at every recomputation (cos = 1): the queue of 2
    fills at the 2nd and 3rd recomputations, after which each recomputation doubles the gap."""
    projector = GaLoreProjector((12, 8), 3, update_proj_gap=2, quant=True, cos_threshold=0.99, gamma_proj=2,
                                queue_size=2)
    grad = torch.randn(12, 8, generator=torch.Generator().manual_seed(0))
    state, gaps = {}, []
    for _ in range(20):
        projector.project(grad, state)
        gaps.append(state["proj_gap"])
    # recomputations at steps 0, 2, 4 (queue full: gap 4), 8 (gap 8), 16 (gap 16)
    assert gaps == [2] * 4 + [4] * 4 + [8] * 8 + [16] * 4
    assert state["proj_queue_len"] == 2 and torch.allclose(state["proj_queue"], torch.ones(2))
    assert state["proj_right_codes"].dtype == torch.uint8 and "proj_right" not in state


def test_qgalore_gap_stays_below_the_threshold():
    projector = GaLoreProjector((12, 8), 3, update_proj_gap=2, quant=True, cos_threshold=1.01, queue_size=2)
    generator = torch.Generator().manual_seed(0)
    state = {}
    for _ in range(10):
        projector.project(torch.randn(12, 8, generator=generator), state)
    assert state["proj_gap"] == 2


def test_eight_bit_galore_runs_and_corrected_is_refused():
    pytest.importorskip("galore_torch.blockwise8bit")
    w, grads = data((12, 8), torch.float32)
    for optimizer_class in (GaLoreAdamW8bit, QGaLoreAdamW8bit):
        got, optimizer = run(optimizer_class, w, grads, {"rank": 3, "update_proj_gap": 3}, lr=1e-2)
        assert torch.isfinite(got).all() and not torch.equal(got, w)
        save_and_load(optimizer.state_dict())
        with pytest.raises(ValueError, match="corrected"):
            optimizer_class([{"params": [torch.nn.Parameter(w)], "rank": 3}], variant="corrected")


def test_pickling_is_refused_in_favour_of_state_dict():
    """torch would pickle only state and param groups, silently dropping the projectors and inner optimizer."""
    import copy
    import pickle

    p = torch.nn.Parameter(torch.zeros(8, 12))
    for optimizer in (GaLoreAdamW([{"params": [p], "rank": 2}]),
                      PerLayerOptimizer([p], optimizer_class=GaLoreAdamW)):
        with pytest.raises(TypeError, match="state_dict"):
            pickle.dumps(optimizer)
        with pytest.raises(TypeError, match="state_dict"):
            copy.deepcopy(optimizer)
        if isinstance(optimizer, PerLayerOptimizer):
            optimizer.remove_hooks()


@pytest.mark.parametrize("optimizer_class", [GaLoreAdamW, GaLoreSPAM, GaLoreStableSPAM])
def test_a_matrix_without_gradient_is_left_alone(optimizer_class):
    """No decay, no projection, no counter; SPAM's mask refresh (every 3 steps here) still finds its shape."""
    kwargs = {"momentum_reset_gap": 3} if optimizer_class is not GaLoreAdamW else {}
    trained, frozen = torch.nn.Parameter(torch.randn(8, 12)), torch.nn.Parameter(torch.randn(8, 12))
    before = frozen.detach().clone()
    optimizer = optimizer_class([{"params": [trained, frozen], "rank": 2, "update_proj_gap": 2}], weight_decay=0.1,
                                **kwargs)
    for _ in range(7):
        trained.grad = torch.randn(8, 12)
        optimizer.step()
    assert torch.equal(frozen, before) and "proj_step" not in optimizer.state[frozen]
    assert optimizer.state[trained]["proj_step"] == 7
