import copy
import io
import math

import pytest
import torch

from galore_torch.spam import SPAM, exact_count_mask, warmup_scale

BETA1, BETA2, EPS = 0.9, 0.999, 1e-6


class PlainSPAM:
    """SPAM written the obvious way from docs/algorithms.md#b3: a Python loop per param, boolean indexing, 1-D moments
    for density params, the period carried across groups and steps. The fast optimizer must match it."""

    def __init__(self, groups, *, lr, weight_decay=0.0, warmup_epoch, threshold, grad_accu_steps, variant):
        self.groups = [{"lr": lr, "weight_decay": weight_decay, **group} for group in groups]
        self.warmup_epoch, self.threshold, self.grad_accu_steps = warmup_epoch, threshold, grad_accu_steps
        self.corrected = variant == "corrected"
        self.state = {}
        for group in self.groups:
            for p in group["params"]:
                self.state[p] = {"step": 0}
                if "density" in group and p.dim() == 2:
                    rows, cols = p.shape
                    count = int(group["density"] * rows * cols)
                    mask = torch.zeros(rows * cols, dtype=torch.bool)
                    if count > 0:
                        mask[torch.randperm(rows * cols)[:count]] = True
                    self.state[p]["mask"] = mask.view(rows, cols)
        self.total_step, self.current_step, self.gap = 0, warmup_epoch + 1, None
        self.grad_norm = None
        self.clipped_entries = self.refreshes = 0

    def step(self):
        n = self.total_step + 1
        c, w = self.current_step, self.warmup_epoch
        scale = 1.0 - (0.0 if c >= w else 0.99 * (1 + math.cos(math.pi * c / (w + 1))) / 2)
        norm_sq = torch.tensor(0.0)
        for group in self.groups:
            if "density" in group:
                self.gap = group["update_proj_gap"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                mask = state.get("mask")
                g = p.grad.clone() if mask is None else p.grad[mask]
                if "m" not in state or (self.gap and n % self.gap == 0):
                    state["m"], state["v"] = torch.zeros_like(g), torch.zeros_like(g)
                m, v = state["m"], state["v"]
                state["step"] += 1
                if self.threshold and n >= self.grad_accu_steps and (
                        not self.gap or n % self.gap >= self.grad_accu_steps):
                    spikes = g**2 > self.threshold * v
                    if self.corrected:
                        spikes &= v > 0
                    g[spikes] = g[spikes].sign() * torch.sqrt(v[spikes] * self.threshold)
                    self.clipped_entries += int(spikes.sum())
                norm_sq += g.norm() ** 2
                m.mul_(BETA1).add_(g, alpha=1 - BETA1)
                v.mul_(BETA2).addcmul_(g, g, value=1 - BETA2)
                k = state["step"]
                step_size = group["lr"] * math.sqrt(1 - BETA2**k) / (1 - BETA1**k)
                update = m / (v.sqrt() + EPS)
                if mask is None:
                    p.data.add_(update, alpha=-step_size * scale)
                else:
                    full = torch.zeros_like(p)
                    full[mask] = update
                    p.data.add_(full * scale, alpha=-step_size)
                if group["weight_decay"] > 0:
                    decay = group["lr"] * group["weight_decay"]
                    if mask is None:
                        p.data.add_(p.data, alpha=-decay)
                    elif self.corrected:
                        p.data[mask] -= decay * p.data[mask]
        self.total_step += 1
        self.current_step += 1
        if self.gap and (self.total_step + 1) % self.gap == 0:
            self._refresh_masks()
            self.current_step = 0
        self.grad_norm = norm_sq.sqrt()

    def _refresh_masks(self):
        self.refreshes += 1
        for group in self.groups:
            if "density" not in group:
                continue
            for p in group["params"]:
                state = self.state[p]
                if "mask" not in state:
                    continue
                old, new = state["mask"], torch.rand(p.shape) < group["density"]
                both = old & new
                for key in ("m", "v"):
                    if key in state:
                        moved = torch.zeros(int(new.sum()), dtype=p.dtype)
                        moved[both[new]] = state[key][both[old]]
                        state[key] = moved
                state["mask"] = new


def make_params(dtype, seed=0):
    """Two regular params (one 1-D) and a density group with two matrices and a vector."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"emb": (7, 4), "bias": (3,), "w1": (6, 5), "w2": (4, 3), "norm": (5,)}
    return {name: torch.nn.Parameter(torch.randn(shape, generator=g, dtype=dtype)) for name, shape in shapes.items()}


def param_groups(params, density, gap, **density_group_options):
    return [{"params": [params["emb"], params["bias"]]},
            {"params": [params["w1"], params["w2"], params["norm"]], "density": density, "update_proj_gap": gap,
             **density_group_options}]


def set_gradients(params, step, generator):
    """Noise plus a pull towards 0, with spikes, an early all-zero param and a param that skips steps."""
    for name, p in params.items():
        noise = torch.randn(p.shape, generator=generator, dtype=p.dtype)
        if step % 7 == 3:
            noise[..., 0] *= 300.0
        p.grad = noise + 0.5 * p.detach()
        if name == "bias" and step <= 8:
            p.grad = torch.zeros_like(p)
        if name == "w2" and 18 <= step <= 21:
            p.grad = None


def run_plain(dtype, density, variant, steps, *, seed=0, gap=10):
    torch.manual_seed(seed)
    params = make_params(dtype)
    optimizer = PlainSPAM(param_groups(params, density, gap), lr=2e-2, weight_decay=0.1, warmup_epoch=3,
                          threshold=2000, grad_accu_steps=4, variant=variant)
    generator = torch.Generator().manual_seed(1)
    norms = []
    for step in range(1, steps + 1):
        set_gradients(params, step, generator)
        optimizer.step()
        norms.append(optimizer.grad_norm)
    return params, optimizer, norms


def run_fast(dtype, density, variant, steps, *, seed=0, gap=10, **options):
    torch.manual_seed(seed)
    params = make_params(dtype)
    optimizer = SPAM(param_groups(params, density, gap), lr=2e-2, weight_decay=0.1, warmup_epoch=3,
                     threshold=2000, grad_accu_steps=4, variant=variant, **options)
    generator = torch.Generator().manual_seed(1)
    norms = []
    for step in range(1, steps + 1):
        set_gradients(params, step, generator)
        optimizer.step()
        norms.append(optimizer.last_grad_norm)
    return params, optimizer, norms


def tolerances(dtype):
    return {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 2e-5, "atol": 2e-6}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("density", [1.0, 0.5])
@pytest.mark.parametrize("variant", ["reference", "corrected"])
def test_matches_plain_implementation(dtype, density, variant):
    steps = 55
    plain_params, plain, plain_norms = run_plain(dtype, density, variant, steps)
    fast_params, fast, fast_norms = run_fast(dtype, density, variant, steps)
    for name, p in fast_params.items():
        torch.testing.assert_close(p, plain_params[name], **tolerances(dtype), msg=name)
        plain_state, fast_state = plain.state[plain_params[name]], fast.state[p]
        assert fast_state["step"] == plain_state["step"]
        mask = plain_state.get("mask")
        if mask is not None:
            assert torch.equal(fast_state["mask"], mask)
        for fast_key, plain_key in (("exp_avg", "m"), ("exp_avg_sq", "v")):
            moment = fast_state[fast_key] if mask is None else fast_state[fast_key][mask]
            torch.testing.assert_close(moment, plain_state[plain_key], **tolerances(dtype))
    torch.testing.assert_close(torch.stack(fast_norms), torch.stack(plain_norms), rtol=1e-5, atol=1e-6)
    assert (fast.total_step, fast.current_step) == (plain.total_step, plain.current_step)


def test_scenario_exercises_every_quirk():
    """Guards the comparison above: its runs clip spikes, freeze a zero-v param, reset and refresh masks."""
    params, optimizer, _ = run_plain(torch.float64, 0.5, "reference", 55)
    assert optimizer.clipped_entries > 0 and optimizer.refreshes == 5
    assert optimizer.state[params["w2"]]["step"] == 55 - 4
    for variant, frozen in (("reference", True), ("corrected", False)):
        params, optimizer, _ = run_plain(torch.float64, 1.0, variant, 9)
        assert bool((optimizer.state[params["bias"]]["v"] == 0).all()) is frozen


def test_foreach_false_gives_the_same_parameters():
    batched, _, _ = run_fast(torch.float32, 0.5, "reference", 25)
    single, _, _ = run_fast(torch.float32, 0.5, "reference", 25, foreach=False)
    for name in batched:
        assert torch.equal(batched[name], single[name]), name


def test_compiled_core_matches_eager():
    """12 steps: clipping off then on (two graphs), and a mask refresh at the end of step 9."""
    torch._dynamo.reset()
    compiled, _, compiled_norms = run_fast(torch.float32, 0.5, "reference", 12, compile=True)
    eager, _, eager_norms = run_fast(torch.float32, 0.5, "reference", 12)
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.stack(compiled_norms), torch.stack(eager_norms), rtol=1e-5, atol=1e-6)


def test_first_steps_by_hand():
    p = torch.nn.Parameter(torch.tensor([1.0, -3.0], dtype=torch.float64))
    optimizer = SPAM([p], lr=0.1, weight_decay=0.1, threshold=0)
    expected, m, v = [1.0, -3.0], [0.0, 0.0], [0.0, 0.0]
    for k, grads in enumerate(([0.5, -2.0], [-1.0, 4.0]), start=1):
        p.grad = torch.tensor(grads, dtype=torch.float64)
        optimizer.step()
        step_size = 0.1 * math.sqrt(1 - 0.999**k) / (1 - 0.9**k)
        for i, g in enumerate(grads):
            m[i] = 0.9 * m[i] + 0.1 * g
            v[i] = 0.999 * v[i] + 0.001 * g * g
            expected[i] -= step_size * m[i] / (math.sqrt(v[i]) + 1e-6)
            expected[i] -= 0.1 * 0.1 * expected[i]
        torch.testing.assert_close(p.detach(), torch.tensor(expected, dtype=torch.float64), rtol=1e-13, atol=0)


def test_spike_clipped_against_previous_second_moment():
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    optimizer = SPAM([p], lr=0.0, threshold=2000, grad_accu_steps=2)
    p.grad = torch.ones(3, dtype=torch.float64)
    optimizer.step()  # n = 1 < grad_accu_steps: no clipping; v = 0.001
    p.grad = torch.tensor([100.0, -100.0, 1.2], dtype=torch.float64)
    optimizer.step()  # 1e4 > 2000 * 0.001 = 2: clipped to +-sqrt(2); 1.44 < 2 kept
    clipped = [math.sqrt(2000 * 0.001), -math.sqrt(2000 * 0.001), 1.2]
    expected_m = [0.9 * 0.1 + 0.1 * g for g in clipped]
    torch.testing.assert_close(optimizer.state[p]["exp_avg"], torch.tensor(expected_m, dtype=torch.float64))
    assert float(optimizer.last_grad_norm) == pytest.approx(math.sqrt(2 + 2 + 1.44), rel=1e-6)
    assert torch.equal(p.grad, torch.tensor([100.0, -100.0, 1.2], dtype=torch.float64))


def test_warmup_scale_values():
    expected = [0.01, 0.0763174, 0.2575, 0.505, 0.7525, 1.0, 1.0]
    assert [warmup_scale(c, 5) for c in range(7)] == pytest.approx(expected, abs=1e-7)
    assert warmup_scale(6, 5) == 1.0 and warmup_scale(0, 0) == 1.0


def test_reset_and_warmup_timeline():
    """G=20, W=5: moments zeroed at the start of 20 and 40, the update scale 0.01 at 20 ramping to 1 at 25."""
    p = torch.nn.Parameter(torch.ones(4, 3, dtype=torch.float64))
    optimizer = SPAM([{"params": [p], "density": 1.0, "update_proj_gap": 20}], lr=1e-3, threshold=0,
                     warmup_epoch=5, grad_accu_steps=5)
    generator = torch.Generator().manual_seed(0)
    scales, fresh_moment_steps = {}, []
    for n in range(1, 47):
        p.grad = torch.randn(p.shape, generator=generator, dtype=torch.float64)
        before = p.detach().clone()
        optimizer.step()
        state = optimizer.state[p]
        step_size = 1e-3 * math.sqrt(1 - 0.999**n) / (1 - 0.9**n)
        adam_update = step_size * state["exp_avg"] / (state["exp_avg_sq"].sqrt() + 1e-6)
        scales[n] = ((before - p.detach()) / adam_update).mean().item()
        if torch.allclose(state["exp_avg"], 0.1 * p.grad, rtol=1e-12, atol=0):
            fresh_moment_steps.append(n)
    assert fresh_moment_steps == [1, 20, 40]
    ramp = [0.01, 0.0763174, 0.2575, 0.505, 0.7525, 1.0]
    assert [scales[n] for n in range(20, 26)] == pytest.approx(ramp, rel=1e-6)
    assert [scales[n] for n in range(40, 46)] == pytest.approx(ramp, rel=1e-6)
    assert [scales[n] for n in (*range(1, 20), *range(26, 40))] == pytest.approx([1.0] * 33, rel=1e-6)


def test_clip_gate_timeline():
    """Clipping is active for n >= A and n % G >= A: a tiny threshold clips every gradient when active."""
    p = torch.nn.Parameter(torch.zeros(2, 2))
    optimizer = SPAM([{"params": [p], "density": 1.0, "update_proj_gap": 20}], lr=1e-3, threshold=1e-6,
                     warmup_epoch=5, grad_accu_steps=5)
    clipped = []
    for n in range(1, 61):
        p.grad = torch.full((2, 2), 0.5)
        optimizer.step()
        if float(optimizer.last_grad_norm) < 0.5:  # unclipped: sqrt(4 * 0.25) = 1; clipped: ~6e-5
            clipped.append(n)
    assert clipped == [n for n in range(1, 61) if n >= 5 and n % 20 >= 5]


def test_period_comes_from_the_density_group():
    """Without a density group nothing resets, but clipping still starts after grad_accu_steps."""
    p = torch.nn.Parameter(torch.zeros(3))
    optimizer = SPAM([p], lr=1e-3, threshold=1e-6, grad_accu_steps=3, warmup_epoch=2)
    clipped = []
    for n in range(1, 30):
        p.grad = torch.ones(3)
        optimizer.step()
        if float(optimizer.last_grad_norm) < 1.0:
            clipped.append(n)
    assert clipped == list(range(3, 30))
    assert optimizer.current_step == 2 + 1 + 29


def test_initial_masks_have_exact_count_and_replay_the_global_rng():
    torch.manual_seed(5)
    a, b, vector = (torch.nn.Parameter(torch.zeros(shape)) for shape in ((6, 7), (5, 4), (9,)))
    optimizer = SPAM([{"params": [torch.nn.Parameter(torch.zeros(3, 3))]},
                      {"params": [a, vector, b], "density": 0.3, "update_proj_gap": 4}])
    torch.manual_seed(5)
    expected_a, expected_b = exact_count_mask((6, 7), 0.3), exact_count_mask((5, 4), 0.3)
    replay = torch.zeros(42, dtype=torch.bool)
    torch.manual_seed(5)
    replay[torch.randperm(42)[:int(0.3 * 42)]] = True
    assert torch.equal(expected_a.flatten(), replay)
    assert torch.equal(optimizer.state[a]["mask"], expected_a)
    assert torch.equal(optimizer.state[b]["mask"], expected_b)
    assert int(optimizer.state[a]["mask"].sum()) == int(0.3 * 42)
    assert "mask" not in optimizer.state[vector]


def test_masks_refresh_one_step_before_each_reset_from_the_global_rng():
    torch.manual_seed(3)
    w = torch.nn.Parameter(torch.zeros(8, 6))
    optimizer = SPAM([{"params": [w], "density": 0.5, "update_proj_gap": 5}], lr=1e-2, threshold=0)
    torch.manual_seed(3)
    expected = [exact_count_mask((8, 6), 0.5)]
    generator = torch.Generator().manual_seed(0)
    refresh_steps = []
    for n in range(1, 16):
        w.grad = torch.randn(w.shape, generator=generator)
        mask_before = optimizer.state[w]["mask"]
        untouched = w.detach()[~mask_before].clone()
        rng_before = torch.get_rng_state()
        optimizer.step()
        assert torch.equal(w.detach()[~mask_before], untouched)
        assert torch.equal(mask_before, expected[-1])
        if not torch.equal(optimizer.state[w]["mask"], mask_before):
            refresh_steps.append(n)
            torch.set_rng_state(rng_before)
            expected.append(torch.rand(8, 6) < 0.5)
            assert torch.equal(optimizer.state[w]["mask"], expected[-1])
            assert optimizer.state[w]["exp_avg"][~expected[-1]].abs().sum() == 0
    assert refresh_steps == [4, 9, 14]


def test_same_seed_same_masks():
    masks = []
    for _ in range(2):
        torch.manual_seed(11)
        w = torch.nn.Parameter(torch.zeros(10, 10))
        optimizer = SPAM([{"params": [w], "density": 0.4, "update_proj_gap": 3}], threshold=0)
        for _ in range(5):
            w.grad = torch.ones_like(w)
            optimizer.step()
        masks.append(optimizer.state[w]["mask"])
    assert torch.equal(masks[0], masks[1])


@pytest.mark.parametrize("variant, frozen", [("reference", True), ("corrected", False)])
def test_zero_second_moment_freeze(variant, frozen):
    late, early = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
    optimizer = SPAM([late, early], lr=1e-2, grad_accu_steps=2, variant=variant)
    for n in range(1, 12):
        late.grad = torch.zeros(4) if n <= 3 else torch.full((4,), 0.3)
        early.grad = torch.full((4,), 0.3)
        optimizer.step()
    assert bool((early.detach() < 1).all())
    assert torch.equal(late.detach(), torch.ones(4)) is frozen
    assert bool((optimizer.state[late]["exp_avg_sq"] == 0).all()) is frozen


@pytest.mark.parametrize("variant", ["reference", "corrected"])
def test_density_group_weight_decay(variant):
    torch.manual_seed(0)
    w, regular = torch.nn.Parameter(torch.ones(4, 5)), torch.nn.Parameter(torch.ones(3))
    optimizer = SPAM([{"params": [regular]}, {"params": [w], "density": 0.5, "update_proj_gap": 100}],
                     lr=0.1, weight_decay=0.5, threshold=0, variant=variant)
    w.grad, regular.grad = torch.zeros(4, 5), torch.zeros(3)
    optimizer.step()
    mask = optimizer.state[w]["mask"]
    torch.testing.assert_close(regular.detach(), torch.full((3,), 0.95))
    assert torch.equal(w.detach()[~mask], torch.ones(int((~mask).sum())))
    decayed = torch.full((int(mask.sum()),), 0.95)
    assert torch.equal(w.detach()[mask], decayed if variant == "corrected" else torch.ones_like(decayed))


def test_zero_period_means_no_resets_and_matches_no_density_group():
    params = make_params(torch.float32)
    plain_params = {name: torch.nn.Parameter(p.detach().clone()) for name, p in params.items()}
    torch.manual_seed(0)
    with_zero_gap = SPAM(param_groups(params, 1.0, 0), lr=1e-2, warmup_epoch=3, grad_accu_steps=4)
    rng_after_construction = torch.get_rng_state()
    without_density = SPAM(list(plain_params.values()), lr=1e-2, warmup_epoch=3, grad_accu_steps=4)
    generator = torch.Generator().manual_seed(0)
    for step in range(1, 31):
        set_gradients(params, step, generator)
        for name, p in plain_params.items():
            p.grad = None if params[name].grad is None else params[name].grad.clone()
        torch.set_rng_state(rng_after_construction)
        with_zero_gap.step()
        assert torch.equal(torch.get_rng_state(), rng_after_construction)
        without_density.step()
    for name, p in params.items():
        assert torch.equal(p, plain_params[name]), name
    assert with_zero_gap.current_step == 3 + 1 + 30


def _state_bytes(optimizer):
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("variant", ["reference", "corrected"])
def test_state_dict_round_trip_is_exact_across_a_mask_refresh(variant):
    def build(params):
        return SPAM(param_groups(params, 0.5, 10), lr=2e-2, weight_decay=0.1, warmup_epoch=3,
                    grad_accu_steps=4, variant=variant)

    torch.manual_seed(0)
    params = make_params(torch.float32)
    optimizer = build(params)
    generator = torch.Generator().manual_seed(1)
    for step in range(1, 16):
        set_gradients(params, step, generator)
        optimizer.step()
    saved, rng, grads_generator_state = _state_bytes(optimizer), torch.get_rng_state(), generator.get_state()
    resumed_params = {name: torch.nn.Parameter(p.detach().clone()) for name, p in params.items()}
    resumed = build(resumed_params)
    resumed.load_state_dict(saved)
    assert all(resumed.state[p]["mask"].dtype == torch.bool for p in (resumed_params["w1"], resumed_params["w2"]))

    for run_params, run_optimizer in ((params, optimizer), (resumed_params, resumed)):
        torch.set_rng_state(rng)
        generator.set_state(grads_generator_state)
        for step in range(16, 31):
            set_gradients(run_params, step, generator)
            run_optimizer.step()
    for name, p in params.items():
        assert torch.equal(p, resumed_params[name]), name
        for key, value in optimizer.state[p].items():
            resumed_value = resumed.state[resumed_params[name]][key]
            assert torch.equal(value, resumed_value) if torch.is_tensor(value) else value == resumed_value
    assert (resumed.total_step, resumed.current_step) == (optimizer.total_step, optimizer.current_step) == (30, 1)


SPAM_HYPER_PARAMETERS = {"warmup_epoch": 3, "threshold": 500.0, "grad_accu_steps": 2, "variant": "corrected",
                         "maximize": False}


def test_hyper_parameters_are_param_group_keys_saved_by_state_dict():
    params = make_params(torch.float32)
    optimizer = SPAM(param_groups(params, 0.5, 10), **SPAM_HYPER_PARAMETERS)
    saved = optimizer.state_dict()
    assert all(group.items() >= SPAM_HYPER_PARAMETERS.items() for group in saved["param_groups"])
    resumed = SPAM(param_groups(params, 0.5, 10), warmup_epoch=3, variant="corrected")
    resumed.load_state_dict(saved)
    assert all(group.items() >= SPAM_HYPER_PARAMETERS.items() for group in resumed.param_groups)


def test_per_group_threshold_and_variant_match_one_optimizer_per_group():
    together_params, apart_params = make_params(torch.float64), make_params(torch.float64)
    other = {"threshold": 50.0, "grad_accu_steps": 5, "variant": "reference"}
    together = SPAM([{"params": [together_params["emb"], together_params["bias"]], **other},
                     {"params": [together_params["w1"], together_params["norm"]]}], lr=2e-2, weight_decay=0.1,
                    warmup_epoch=3, variant="corrected", grad_accu_steps=2)
    apart = [SPAM([apart_params["emb"], apart_params["bias"]], lr=2e-2, weight_decay=0.1, warmup_epoch=3, **other),
             SPAM([apart_params["w1"], apart_params["norm"]], lr=2e-2, weight_decay=0.1, warmup_epoch=3,
                  variant="corrected", grad_accu_steps=2)]
    for run_params, optimizers in ((together_params, [together]), (apart_params, apart)):
        del run_params["w2"]
        generator = torch.Generator().manual_seed(1)
        for step in range(1, 12):
            set_gradients(run_params, step, generator)
            for optimizer in optimizers:
                optimizer.step()
    for name, p in together_params.items():
        assert torch.equal(p, apart_params[name]), name


def test_warmup_epoch_is_optimizer_wide():
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))]},
              {"params": [torch.nn.Parameter(torch.zeros(2))], "warmup_epoch": 5}]
    with pytest.raises(ValueError, match="param group 1 warmup_epoch: 5 .*optimizer-wide"):
        SPAM(groups, warmup_epoch=3)


def test_loading_a_state_of_the_other_variant_is_refused():
    params = make_params(torch.float32)
    saved = SPAM(param_groups(params, 0.5, 10), variant="corrected").state_dict()
    with pytest.raises(ValueError, match="param group 0 .*variant='corrected'.*variant='reference'"):
        SPAM(param_groups(params, 0.5, 10)).load_state_dict(saved)


def test_old_checkpoint_without_hyper_parameter_keys_loads_with_the_constructor_values():
    params = make_params(torch.float32)
    saved = SPAM(param_groups(params, 0.5, 10), **SPAM_HYPER_PARAMETERS).state_dict()
    for group in saved["param_groups"]:
        for key in SPAM_HYPER_PARAMETERS:
            del group[key]
    resumed = SPAM(param_groups(params, 0.5, 10), **SPAM_HYPER_PARAMETERS)
    resumed.load_state_dict(saved)
    assert all(group.items() >= SPAM_HYPER_PARAMETERS.items() for group in resumed.param_groups)


def test_deepcopy_carries_the_settings():
    torch.manual_seed(0)
    params = make_params(torch.float32)
    optimizer = SPAM(param_groups(params, 0.5, 4), lr=2e-2, warmup_epoch=3, grad_accu_steps=2, variant="corrected")
    generator = torch.Generator().manual_seed(1)
    for step in range(1, 6):
        set_gradients(params, step, generator)
        optimizer.step()
    copied_params, copied = copy.deepcopy((params, optimizer))
    assert (copied.param_groups[1]["warmup_epoch"], copied.param_groups[1]["variant"], copied.total_step) == \
        (3, "corrected", 5)
    rng, grads_state = torch.get_rng_state(), generator.get_state()
    for run_params, run_optimizer in ((params, optimizer), (copied_params, copied)):
        torch.set_rng_state(rng)
        generator.set_state(grads_state)
        for step in range(6, 12):
            set_gradients(run_params, step, generator)
            run_optimizer.step()
    for name, p in params.items():
        assert torch.equal(p, copied_params[name]), name


def test_fp32_state_survives_load_state_dict():
    w = torch.nn.Parameter(torch.ones(4, 4, dtype=torch.bfloat16))
    optimizer = SPAM([{"params": [w], "density": 0.5, "update_proj_gap": 5}], fp32_state=True)
    w.grad = torch.full((4, 4), 0.1, dtype=torch.bfloat16)
    optimizer.step()
    assert optimizer.state[w]["exp_avg_sq"].dtype == torch.float32
    fresh = SPAM([{"params": [w], "density": 0.5, "update_proj_gap": 5}], fp32_state=True)
    fresh.load_state_dict(_state_bytes(optimizer))
    for key in ("exp_avg", "exp_avg_sq"):
        assert fresh.state[w][key].dtype == torch.float32
        assert torch.equal(fresh.state[w][key], optimizer.state[w][key])
    assert fresh.state[w]["mask"].dtype == torch.bool


@pytest.mark.parametrize("fp32_state", [False, True])
def test_bf16_params(fp32_state):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 4, dtype=torch.bfloat16))
    b = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    start = w.detach().clone()
    optimizer = SPAM([{"params": [b]}, {"params": [w], "density": 1.0, "update_proj_gap": 4}], lr=1e-2,
                     grad_accu_steps=2, fp32_state=fp32_state)
    for _ in range(6):
        w.grad, b.grad = torch.randn(8, 4).bfloat16(), torch.randn(4).bfloat16()
        optimizer.step()
    assert w.dtype == torch.bfloat16 and not torch.equal(w.detach(), start)
    assert optimizer.state[w]["exp_avg"].dtype == (torch.float32 if fp32_state else torch.bfloat16)
    assert torch.isfinite(w).all() and torch.isfinite(optimizer.last_grad_norm)


def test_step_returns_loss_leaves_grads_and_reports_masked_norm():
    torch.manual_seed(0)
    w, b = torch.nn.Parameter(torch.randn(6, 5)), torch.nn.Parameter(torch.randn(5))
    optimizer = SPAM([{"params": [b]}, {"params": [w], "density": 0.5, "update_proj_gap": 50}], threshold=0)
    x = torch.randn(10, 6)

    def closure():
        optimizer.zero_grad()
        loss = (x @ w + b).square().mean()
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    assert torch.is_tensor(loss) and loss.dim() == 0
    grads = (w.grad.clone(), b.grad.clone())
    optimizer.step()
    assert torch.equal(w.grad, grads[0]) and torch.equal(b.grad, grads[1])
    mask = optimizer.state[w]["mask"]
    expected = torch.sqrt(w.grad[mask].square().sum() + b.grad.square().sum())
    torch.testing.assert_close(optimizer.last_grad_norm, expected)
    assert optimizer.last_grad_norm.dim() == 0


def test_loss_decreases_on_a_tiny_regression():
    torch.manual_seed(0)
    x, true_w = torch.randn(64, 8), torch.randn(8, 3)
    y = x @ true_w
    model = torch.nn.Linear(8, 3)
    optimizer = SPAM([{"params": [model.bias]}, {"params": [model.weight], "density": 1.0, "update_proj_gap": 40}],
                     lr=3e-2, warmup_epoch=5, grad_accu_steps=5)
    losses = []
    for _ in range(120):
        optimizer.zero_grad()
        loss = (model(x) - y).square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]


@pytest.mark.parametrize("kwargs, name", [
    ({"lr": -1.0}, "lr"),
    ({"eps": -1e-8}, "eps"),
    ({"betas": (1.0, 0.999)}, "betas"),
    ({"betas": (0.9, -0.1)}, "betas"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"warmup_epoch": -1}, "warmup_epoch"),
    ({"warmup_epoch": 2.5}, "warmup_epoch"),
    ({"threshold": -1}, "threshold"),
    ({"grad_accu_steps": -2}, "grad_accu_steps"),
    ({"variant": "fixed"}, "variant"),
])
def test_invalid_arguments_name_themselves(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SPAM([torch.nn.Parameter(torch.zeros(2, 2))], **kwargs)


@pytest.mark.parametrize("group, name", [
    ({"density": 0.0, "update_proj_gap": 10}, "density"),
    ({"density": 1.5, "update_proj_gap": 10}, "density"),
    ({"density": 0.5, "update_proj_gap": -1}, "update_proj_gap"),
    ({"density": 0.5, "update_proj_gap": 2.5}, "update_proj_gap"),
    ({"density": 0.5}, "update_proj_gap"),
    ({"update_proj_gap": 10}, "density"),
    ({"density": 0.5, "update_proj_gap": 10, "lr": -1.0}, "lr"),
])
def test_invalid_param_groups_name_the_key(group, name):
    with pytest.raises(ValueError, match=name):
        SPAM([{"params": [torch.nn.Parameter(torch.zeros(2, 2))], **group}])


def test_accepts_and_ignores_no_deprecation_warning(recwarn):
    SPAM([torch.nn.Parameter(torch.zeros(2))], no_deprecation_warning=False)
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)]
