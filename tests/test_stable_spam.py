import copy
import io
import math
import warnings

import pytest
import torch

from galore_torch.stable_spam import StableSPAM, cosine_scale

VARIANTS = ["reference", "corrected"]


class PlainStableSPAM:
    """StableSPAM written the plain way, one param at a time, from docs/algorithms.md#a3, #a4 and
    #g2-2 to #g2-5: the yardstick for the multi-tensor implementation."""

    def __init__(self, groups, gamma1=0.7, gamma2=0.9, gamma3=0.999, total_T=None, eta_min=0.5,
                 update_proj_gap=1000, variant="reference"):
        self.groups = groups
        self.gamma1, self.gamma2, self.theta = gamma1, gamma2, gamma3
        self.total_T, self.eta_min, self.gap = total_T, eta_min, update_proj_gap
        self.corrected = variant == "corrected"
        self.t = 0
        self.state = {}

    def scale(self):
        if self.total_T is None:
            return 1.0
        if self.corrected and self.t > self.total_T + 1:
            return self.eta_min
        return self.eta_min + (1.0 - self.eta_min) * (1 + math.cos(math.pi * self.t / (self.total_T + 1))) / 2

    def step(self):
        self.t += 1
        s = self.scale()
        reset = self.gap != 0 and self.t % self.gap == 0
        for group in self.groups:
            lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.mul_(1 - lr * group["weight_decay"])
                if p not in self.state:
                    zero = torch.zeros((), dtype=p.dtype)
                    self.state[p] = {"k": 0, "k_stat": 0, "m": torch.zeros_like(p), "v": torch.zeros_like(p),
                                     "vmax": torch.zeros_like(p), "m_max": zero, "m_norm": zero, "v_norm": zero}
                st = self.state[p]
                g = p.grad.clone()
                st["k"] += 1
                st["k_stat"] += 1
                k_stat = st["k_stat"] if self.corrected else st["k"]

                a = g.abs().max()
                st["m_max"] = self.theta * st["m_max"] + (1 - self.theta) * a
                threshold = st["m_max"] / (1 - self.theta**k_stat)
                spikes = g.abs() > threshold
                g[spikes] = g[spikes] / a * threshold

                n = torch.norm(g)
                st["m_norm"] = self.gamma1 * s * st["m_norm"] + (1 - self.gamma1 * s) * n
                st["v_norm"] = self.gamma2 * st["v_norm"] + (1 - self.gamma2) * n**2
                m_hat = st["m_norm"] / (1 - (self.gamma1 * s) ** k_stat)
                v_hat = st["v_norm"] / (1 - self.gamma2**k_stat)
                c = m_hat / (torch.sqrt(v_hat) + eps)
                if n > 0:
                    g = g / n * c

                m, v = st["m"], st["v"]
                if reset:
                    st["k"] = 1
                    if self.corrected:
                        m.zero_()
                        v.zero_()
                        st["vmax"].zero_()
                    else:  # the old moments serve this step, fresh ones the next
                        st["m"], st["v"] = torch.zeros_like(p), torch.zeros_like(p)
                b1 = beta1 * s
                bc1, bc2 = 1 - b1 ** st["k"], 1 - beta2 ** st["k"]
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                if group["amsgrad"]:
                    torch.maximum(st["vmax"], v, out=st["vmax"])
                    v = st["vmax"]
                p.add_(m / (v.sqrt() / math.sqrt(bc2) + eps), alpha=-lr / bc1)


SHAPES = [(6, 5), (5,), (3, 2, 4), (1, 7)]


def make_params(dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=dtype) for shape in SHAPES]


def param_groups(params):
    """Two groups: weight decay on the matrices, amsgrad and another lr on the rest."""
    return [
        {"params": [params[0], params[3]], "lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1,
         "amsgrad": False},
        {"params": [params[1], params[2]], "lr": 3e-2, "betas": (0.8, 0.99), "eps": 1e-8, "weight_decay": 0.0,
         "amsgrad": True},
    ]


def set_grads(params, t, generator):
    """Gradient of a noisy quadratic, with 1000x spikes, a param without gradient every fourth step and an
    all-zero gradient once."""
    for i, p in enumerate(params):
        noise = torch.randn(p.shape, generator=generator, dtype=p.dtype)
        grad = noise + 0.5 * p
        if t % 5 == 0:
            grad.view(-1)[(t + i) % p.numel()] *= 1000.0
        if i == 2 and t == 9:
            grad.zero_()
        p.grad = None if (i == 1 and t % 4 == 1) else grad


def run_both(dtype, variant, steps, compile=False):
    hyper = {"gamma1": 0.7, "gamma2": 0.9, "gamma3": 0.999, "total_T": 20, "eta_min": 0.5,
             "update_proj_gap": 7, "variant": variant}
    fast_params, plain_params = make_params(dtype), make_params(dtype)
    fast = StableSPAM(param_groups(fast_params), compile=compile, **hyper)
    plain = PlainStableSPAM(param_groups(plain_params), **hyper)
    fast_gen, plain_gen = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for t in range(1, steps + 1):
        set_grads(fast_params, t, fast_gen)
        set_grads(plain_params, t, plain_gen)
        fast.step()
        plain.step()
    return fast, fast_params, plain, plain_params


def assert_same_run(fast, fast_params, plain, plain_params, rtol, atol):
    for p, q in zip(fast_params, plain_params):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol)
        fast_state, plain_state = fast.state[p], plain.state[q]
        assert fast_state["step"] == plain_state["k"]
        for fast_key, plain_key in [("exp_avg", "m"), ("exp_avg_sq", "v"), ("m_max", "m_max"),
                                    ("m_norm", "m_norm"), ("v_norm", "v_norm")]:
            torch.testing.assert_close(fast_state[fast_key], plain_state[plain_key], rtol=rtol, atol=atol)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype, rtol, atol", [(torch.float64, 1e-12, 1e-14), (torch.float32, 1e-5, 1e-6)])
def test_matches_plain_per_param_implementation(variant, dtype, rtol, atol):
    fast, fast_params, plain, plain_params = run_both(dtype, variant, steps=55)
    assert fast.total_steps == 55
    # param 1 missed every fourth step: its own counters lag behind
    assert fast.state[fast_params[1]]["step"] != fast.state[fast_params[0]]["step"]
    assert_same_run(fast, fast_params, plain, plain_params, rtol, atol)


@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_matches_plain_implementation_to_bf16_round_off(variant):
    """The plain implementation rounds to bf16 after every operation, as the original does."""
    fast, fast_params, plain, plain_params = run_both(torch.bfloat16, variant, steps=30)
    ulp = 2.0**-7
    for p, q in zip(fast_params, plain_params):
        torch.testing.assert_close(p, q, rtol=ulp, atol=ulp)
        for key in ("m_max", "m_norm", "v_norm"):
            torch.testing.assert_close(fast.state[p][key], plain.state[q][key], rtol=ulp, atol=0.0)


def test_compiled_matches_plain_and_does_not_recompile_every_step():
    torch._dynamo.reset()
    stats = torch._dynamo.utils.counters["stats"]
    graphs_before = stats["unique_graphs"]
    fast, fast_params, plain, plain_params = run_both(torch.float32, "reference", steps=9, compile=True)
    assert_same_run(fast, fast_params, plain, plain_params, rtol=1e-5, atol=1e-6)
    # the step's numbers are tensor data, not constants: one graph per set of params with a gradient (param 1
    # has none every fourth step) and step kind (plain or reset), none per step
    assert stats["unique_graphs"] - graphs_before == 3
    generator = torch.Generator().manual_seed(2)
    for t in range(10, 16):
        set_grads(fast_params, t, generator)
        fast.step()
    assert stats["unique_graphs"] - graphs_before == 3


def test_compiled_bf16_rounds_like_eager():
    """The compiled core keeps the bf16 roundings of the moving averages (inductor drops them by default)."""
    torch.manual_seed(0)
    eager_model = torch.nn.Linear(16, 8).to(torch.bfloat16)
    compiled_model = copy.deepcopy(eager_model)
    hyper = {"lr": 1e-2, "weight_decay": 0.1, "update_proj_gap": 0}
    eager = StableSPAM(eager_model.parameters(), **hyper)
    compiled = StableSPAM(compiled_model.parameters(), compile=True, **hyper)
    inputs = torch.randn(32, 16, dtype=torch.bfloat16)
    for _ in range(6):
        for model, opt in ((eager_model, eager), (compiled_model, compiled)):
            opt.zero_grad()
            model(inputs).float().pow(2).mean().backward()
            opt.step()
    for p, q in zip(eager_model.parameters(), compiled_model.parameters()):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq", "m_max", "m_norm", "v_norm"):
            assert torch.equal(eager.state[p][key], compiled.state[q][key]), key


def hand_run(variant):
    """Three steps on p = [1, 2, -3] with all decay rates 0.5, eps 0, lr 0.1, s_t = 1, reset at step 2."""
    p = torch.tensor([1.0, 2.0, -3.0], dtype=torch.float64)
    opt = StableSPAM([p], lr=0.1, betas=(0.5, 0.5), eps=0.0, gamma1=0.5, gamma2=0.5, gamma3=0.5,
                     update_proj_gap=2, variant=variant)
    trajectory = []
    for grad in ([0.1, -0.2, 0.4], [0.2, 0.3, -4.0], [-0.3, 0.1, 0.2]):
        p.grad = torch.tensor(grad, dtype=torch.float64)
        opt.step()
        trajectory.append(p.clone())
    return trajectory


def sign(x):
    return math.copysign(1.0, x)


@pytest.mark.parametrize("variant", VARIANTS)
def test_first_three_steps_by_hand(variant):
    lr = 0.1
    p0 = [1.0, 2.0, -3.0]
    # step 1 (k = 1): T = 0.5 * 0.4 / (1 - 0.5) = 0.4, nothing clipped; c = n / sqrt(n^2) = 1; the bias-corrected
    # moments are g/n and (g/n)^2, so each entry moves by lr * sign(g).
    g1 = [0.1, -0.2, 0.4]
    n1 = math.sqrt(sum(x * x for x in g1))
    gh1 = [x / n1 for x in g1]
    m1 = [0.5 * x for x in gh1]
    v1 = [0.5 * x * x for x in gh1]
    p1 = [p - lr * sign(x) for p, x in zip(p0, g1)]

    # step 2 (k = 2, a reset step with gap 2): max 4 -> m_max = 0.5 * 0.2 + 0.5 * 4 = 2.1, T = 2.1 / 0.75 = 2.8,
    # so -4 is rescaled to -4 / 4 * 2.8 = -2.8.
    clipped2 = [0.2, 0.3, -2.8]
    n2 = math.sqrt(sum(x * x for x in clipped2))
    mu2 = 0.5 * (0.5 * n1) + 0.5 * n2
    nu2 = 0.5 * (0.5 * n1**2) + 0.5 * n2**2
    c2 = (mu2 / 0.75) / math.sqrt(nu2 / 0.75)
    gh2 = [x / n2 * c2 for x in clipped2]
    if variant == "reference":
        # the old moments, continued, with k = 1 bias corrections (1 - 0.5^1); zeroed afterwards
        m2 = [0.5 * m + 0.5 * x for m, x in zip(m1, gh2)]
        v2 = [0.5 * v + 0.5 * x * x for v, x in zip(v1, gh2)]
    else:
        # zeroed first, then k = 1
        m2 = [0.5 * x for x in gh2]
        v2 = [0.5 * x * x for x in gh2]
    p2 = [p - lr * (m / 0.5) / (math.sqrt(v) / math.sqrt(0.5)) for p, m, v in zip(p1, m2, v2)]

    # step 3: no spike (max 0.3). AdaClip/AdaGN count k = 2 after the shared reset (reference) or 3 (corrected);
    # Adam counts k = 2 in both, on fresh zero moments (reference) or the continued ones (corrected).
    g3 = [-0.3, 0.1, 0.2]
    k_stat = 2 if variant == "reference" else 3
    n3 = math.sqrt(sum(x * x for x in g3))
    mu3 = 0.5 * mu2 + 0.5 * n3
    nu3 = 0.5 * nu2 + 0.5 * n3**2
    c3 = (mu3 / (1 - 0.5**k_stat)) / math.sqrt(nu3 / (1 - 0.5**k_stat))
    gh3 = [x / n3 * c3 for x in g3]
    if variant == "reference":
        m3 = [0.5 * x for x in gh3]
        v3 = [0.5 * x * x for x in gh3]
    else:
        m3 = [0.5 * m + 0.5 * x for m, x in zip(m2, gh3)]
        v3 = [0.5 * v + 0.5 * x * x for v, x in zip(v2, gh3)]
    p3 = [p - lr * (m / 0.75) / (math.sqrt(v) / math.sqrt(0.75)) for p, m, v in zip(p2, m3, v3)]

    trajectory = hand_run(variant)
    for got, expected in zip(trajectory, (p1, p2, p3)):
        torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0.0)


def test_hand_runs_differ_between_variants_only_from_the_reset_step():
    reference, corrected = hand_run("reference"), hand_run("corrected")
    assert torch.equal(reference[0], corrected[0])
    assert not torch.allclose(reference[1], corrected[1])


@pytest.mark.parametrize("variant", VARIANTS)
def test_momentum_reset_boundary(variant):
    """Constant gradient, gap 3: every normal Adam step moves each entry by exactly lr. The reference's reset
    step (t=3) applies the old moments with k=1 corrections, the next (t=4) fresh ones with k=2."""
    lr, beta1, beta2, theta = 0.01, 0.9, 0.999, 0.999
    p = torch.zeros(4, dtype=torch.float64)
    grad = torch.tensor([0.5, -0.5, 0.5, 0.5], dtype=torch.float64)
    opt = StableSPAM([p], lr=lr, betas=(beta1, beta2), eps=0.0, gamma3=theta, update_proj_gap=3, variant=variant)
    moves, thresholds = [], []
    for _ in range(4):
        before = p.clone()
        p.grad = grad.clone()
        opt.step()
        moves.append(((before - p) / (lr * grad.sign())).tolist())
        thresholds.append(opt.state[p]["clip_threshold"].item())

    state = opt.state[p]
    if variant == "reference":
        reset_move = ((1 - beta1**3) / (1 - beta1)) / math.sqrt((1 - beta2**3) / (1 - beta2))  # ~1.565
        after_move = ((1 - beta1) / (1 - beta1**2)) / math.sqrt((1 - beta2) / (1 - beta2**2))  # ~0.744
        expected = [1.0, 1.0, reset_move, after_move]
        # AdaClip's bias correction restarted with the moments: the threshold is inflated at t=4
        expected_threshold_4 = 0.5 * (1 - theta**4) / (1 - theta**2)
    else:
        expected = [1.0, 1.0, 1.0, 1.0]
        expected_threshold_4 = 0.5
    assert state["step"] == 2
    for got, want in zip(moves, expected):
        assert got == pytest.approx([want] * 4, rel=1e-12)
    assert thresholds[3] == pytest.approx(expected_threshold_4, rel=1e-12)


def test_reference_reset_zeroes_moments_after_the_reset_step():
    p = torch.zeros(3)
    opt = StableSPAM([p], update_proj_gap=2)
    for _ in range(2):
        p.grad = torch.tensor([0.1, -0.2, 0.3])
        opt.step()
    assert opt.state[p]["step"] == 1
    assert torch.count_nonzero(opt.state[p]["exp_avg"]) == 0
    assert torch.count_nonzero(opt.state[p]["exp_avg_sq"]) == 0


def test_adaclip_rescales_spikes_and_tracks_the_unclipped_max():
    theta = 0.9
    p = torch.zeros(6, dtype=torch.float64)
    # betas 0: exp_avg is exactly this step's clipped and normalised gradient
    opt = StableSPAM([p], betas=(0.0, 0.0), gamma3=theta, update_proj_gap=0)
    generator = torch.Generator().manual_seed(0)
    for _ in range(30):
        p.grad = torch.randn(6, generator=generator, dtype=torch.float64)
        opt.step()
    m_max_before = opt.state[p]["m_max"].item()

    grad = torch.tensor([0.3, -0.5, 0.2, 0.4, -0.1, 0.6], dtype=torch.float64)
    grad[1] *= 1000.0
    grad[3] *= 250.0
    p.grad = grad.clone()
    opt.step()
    state = opt.state[p]

    unclipped_max = 500.0
    m_max = theta * m_max_before + (1 - theta) * unclipped_max
    threshold = m_max / (1 - theta**31)
    assert state["m_max"].item() == pytest.approx(m_max, rel=1e-14)
    assert state["clip_threshold"].item() == pytest.approx(threshold, rel=1e-14)
    assert threshold < 100.0  # both spikes are above it
    expected = grad.clone()
    expected[1] = -threshold  # the largest lands exactly on T
    expected[3] = 100.0 / unclipped_max * threshold  # the smaller spike proportionally below
    direction = state["exp_avg"] / state["exp_avg"][1]
    torch.testing.assert_close(direction, expected / expected[1], rtol=1e-13, atol=0.0)
    assert torch.equal(p.grad, grad)


def test_cosine_scale_is_torchs_closed_form_periodic_in_reference_and_clamped_in_corrected():
    total_T, eta_min = 10, 0.3
    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(dummy, total_T + 1, eta_min)
    for t in range(1, 3 * (total_T + 1)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scheduler.step(t)
        assert cosine_scale(t, total_T, eta_min, clamp=False) == dummy.param_groups[0]["lr"]
    assert cosine_scale(total_T + 1, total_T, eta_min, clamp=False) == eta_min
    assert cosine_scale(2 * (total_T + 1), total_T, eta_min, clamp=False) == 1.0
    assert cosine_scale(total_T + 1, total_T, eta_min, clamp=True) == eta_min
    for t in (total_T + 2, 2 * (total_T + 1), 5 * total_T):
        assert cosine_scale(t, total_T, eta_min, clamp=True) == eta_min
    assert cosine_scale(7, None, eta_min, clamp=False) == 1.0


def train(model, opt, steps, seed):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        inputs = torch.randn(16, 4, generator=generator)
        targets = torch.randn(16, 2, generator=generator)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(inputs), targets).backward()
        opt.step()


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_round_trip_resumes_exactly(variant):
    torch.manual_seed(0)
    hyper = {"lr": 1e-2, "total_T": 8, "update_proj_gap": 4, "weight_decay": 0.1, "variant": variant}
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = StableSPAM(model.parameters(), **hyper)
    train(model, opt, steps=6, seed=1)

    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    resumed_model = copy.deepcopy(model)
    resumed_opt = StableSPAM(resumed_model.parameters(), **hyper)
    buffer.seek(0)
    resumed_opt.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed_opt.total_steps == 6

    train(model, opt, steps=7, seed=2)
    train(resumed_model, resumed_opt, steps=7, seed=2)
    assert resumed_opt.total_steps == opt.total_steps == 13
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)
        for key, value in opt.state[p].items():
            resumed = resumed_opt.state[q][key]
            assert torch.equal(value, resumed) if isinstance(value, torch.Tensor) else value == resumed


HYPER_PARAMETERS = {"gamma1": 0.6, "gamma2": 0.8, "gamma3": 0.99, "total_T": 8, "eta_min": 0.3,
                    "update_proj_gap": 4, "variant": "corrected", "maximize": False}


def tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def assert_same_params_and_state(model, opt, other_model, other_opt):
    for p, q in zip(model.parameters(), other_model.parameters()):
        assert torch.equal(p, q)
        for key, value in opt.state[p].items():
            other = other_opt.state[q][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


def test_hyper_parameters_are_param_group_keys_saved_by_state_dict():
    model = tiny_model()
    opt = StableSPAM(model.parameters(), lr=1e-2, **HYPER_PARAMETERS)
    train(model, opt, steps=3, seed=1)
    saved = copy.deepcopy(opt.state_dict())
    assert saved["param_groups"][0].items() >= HYPER_PARAMETERS.items()

    # loading restores them, as torch.optim does: the saved values win over the constructor's
    resumed_model = copy.deepcopy(model)
    resumed_opt = StableSPAM(resumed_model.parameters(), lr=1e-2, variant="corrected")
    resumed_opt.load_state_dict(saved)
    assert resumed_opt.state_dict()["param_groups"] == saved["param_groups"]
    train(model, opt, steps=6, seed=2)
    train(resumed_model, resumed_opt, steps=6, seed=2)
    assert_same_params_and_state(model, opt, resumed_model, resumed_opt)


def test_per_group_hyper_parameters_match_one_optimizer_per_group():
    """Every hyper-parameter, the variant included, can differ between param groups."""
    other = {"gamma1": -1, "gamma2": 0.7, "gamma3": 0.9, "total_T": None, "eta_min": 0.5, "update_proj_gap": 3,
             "variant": "reference", "amsgrad": True}
    together_params, apart_params = make_params(torch.float64), make_params(torch.float64)
    together = StableSPAM([{"params": together_params[:2], **HYPER_PARAMETERS},
                           {"params": together_params[2:], **other}], lr=1e-2)
    apart = [StableSPAM(apart_params[:2], lr=1e-2, **HYPER_PARAMETERS),
             StableSPAM(apart_params[2:], lr=1e-2, **other)]
    together_gen, apart_gen = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for t in range(1, 10):
        set_grads(together_params, t, together_gen)
        set_grads(apart_params, t, apart_gen)
        together.step()
        for opt in apart:
            opt.step()
    for p, q in zip(together_params, apart_params):
        assert torch.equal(p, q)


def test_group_values_are_validated_and_name_the_group():
    groups = [{"params": [torch.zeros(2, requires_grad=True)]},
              {"params": [torch.zeros(2, requires_grad=True)], "variant": "fixed"}]
    with pytest.raises(ValueError, match="param group 1 variant"):
        StableSPAM(groups)


@pytest.mark.parametrize("old_checkpoint", [False, True])
@pytest.mark.parametrize("saved_variant, variant", [("corrected", "reference"), ("reference", "corrected")])
def test_loading_a_state_of_the_other_variant_is_refused(saved_variant, variant, old_checkpoint):
    """Its counters and moments mean something else. An old checkpoint has no variant key: its params' state
    tells the variant (only the corrected one counts `stat_step`)."""
    model = tiny_model()
    opt = StableSPAM(model.parameters(), variant=saved_variant)
    train(model, opt, steps=2, seed=1)
    saved = opt.state_dict()
    if old_checkpoint:
        del saved["param_groups"][0]["variant"]
    with pytest.raises(ValueError, match=f"param group 0 .*variant='{saved_variant}'.*variant='{variant}'"):
        StableSPAM(model.parameters(), variant=variant).load_state_dict(saved)


def test_old_checkpoint_without_hyper_parameter_keys_loads_with_the_constructor_values():
    model = tiny_model()
    opt = StableSPAM(model.parameters(), lr=1e-2, **HYPER_PARAMETERS)
    train(model, opt, steps=3, seed=1)
    saved = copy.deepcopy(opt.state_dict())
    for key in HYPER_PARAMETERS:
        del saved["param_groups"][0][key]
    resumed_model = copy.deepcopy(model)
    resumed_opt = StableSPAM(resumed_model.parameters(), lr=1e-2, **HYPER_PARAMETERS)
    resumed_opt.load_state_dict(saved)
    assert resumed_opt.param_groups[0].items() >= HYPER_PARAMETERS.items()
    train(model, opt, steps=6, seed=2)
    train(resumed_model, resumed_opt, steps=6, seed=2)
    assert_same_params_and_state(model, opt, resumed_model, resumed_opt)


def test_deepcopy_carries_the_settings():
    model = tiny_model().to(torch.bfloat16)
    opt = StableSPAM(model.parameters(), fp32_state=True)
    copied = copy.deepcopy(opt)  # with copies of the params
    assert copied.settings == opt.settings == {"compile": False, "fp32_state": True}
    for p in copied.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    copied.step()
    assert len(copied.state) == 4
    assert all(state["exp_avg"].dtype == torch.float32 for state in copied.state.values())


def test_load_state_dict_without_total_steps_is_refused():
    p = torch.zeros(2, requires_grad=True)
    saved = StableSPAM([p]).state_dict()
    del saved["param_groups"][0]["total_steps"]
    with pytest.raises(ValueError, match="total_steps"):
        StableSPAM([p]).load_state_dict(saved)


def test_step_returns_closure_loss_and_leaves_grad_untouched():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = StableSPAM(model.parameters(), update_proj_gap=2)
    inputs = torch.randn(5, 3)
    inputs[0, 0] = 1e4  # a spike that AdaClip rescales

    def closure():
        opt.zero_grad()
        loss = model(inputs).pow(2).mean()
        loss.backward()
        return loss

    for _ in range(3):
        loss = opt.step(closure)
        assert isinstance(loss, torch.Tensor)
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()  # steps again on the same gradients
        for p, grad in zip(model.parameters(), grads):
            assert torch.equal(p.grad, grad)
    assert opt.step() is None


@pytest.mark.parametrize("fp32_state", [False, True])
def test_bf16_params(fp32_state):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2).to(torch.bfloat16)
    opt = StableSPAM(model.parameters(), lr=1e-2, update_proj_gap=3, fp32_state=fp32_state)
    inputs = torch.randn(8, 4, dtype=torch.bfloat16)
    for _ in range(4):
        opt.zero_grad()
        model(inputs).float().pow(2).mean().backward()
        opt.step()
    state_dtype = torch.float32 if fp32_state else torch.bfloat16
    for p in model.parameters():
        assert p.dtype == torch.bfloat16 and torch.isfinite(p).all()
        for key in ("exp_avg", "exp_avg_sq", "m_max", "m_norm", "v_norm", "clip_threshold", "norm_scale"):
            assert opt.state[p][key].dtype == state_dtype, key

    resumed = StableSPAM(model.parameters(), lr=1e-2, update_proj_gap=3, fp32_state=fp32_state)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    for p in model.parameters():
        for key in ("exp_avg", "exp_avg_sq", "m_max", "m_norm", "v_norm", "clip_threshold", "norm_scale"):
            assert resumed.state[p][key].dtype == state_dtype, key
            assert torch.equal(resumed.state[p][key], opt.state[p][key])


def constant_gradient_state(fp32_state, steps, **kwargs):
    """State of a one-entry bf16 param after `steps` steps of gradient 1 (lr 0, no reset)."""
    p = torch.zeros(1, dtype=torch.bfloat16)
    opt = StableSPAM([p], lr=0.0, update_proj_gap=0, fp32_state=fp32_state, **kwargs)
    for _ in range(steps):
        p.grad = torch.ones(1, dtype=torch.bfloat16)
        opt.step()
    return p, opt


@pytest.mark.parametrize("fp32_state", [False, True])
def test_bf16_moving_averages_stall_where_the_original_stalls(fp32_state):
    """docs/algorithms.md#a5-9: in bf16 the EMA of a constant 1 stalls at 0.5 (theta 0.999; Adam's v, beta2 0.999;
    the normalised gradient is 1 here) and at 2^-8 (gamma2 0.99999), and v never decays afterwards;
    with fp32_state they follow 1 - rate^t."""
    _, norm_opt = constant_gradient_state(fp32_state, 1200, gamma2=0.99999)
    p, opt = constant_gradient_state(fp32_state, 1200, gamma3=0.999)
    state = opt.state[p]
    v_norm = norm_opt.state[next(iter(norm_opt.state))]["v_norm"].item()
    if fp32_state:
        assert state["m_max"].item() == pytest.approx(1 - 0.999**1200, rel=1e-4)
        assert state["exp_avg_sq"].item() == pytest.approx(1 - 0.999**1200, rel=1e-4)
        assert v_norm == pytest.approx(1 - 0.99999**1200, rel=1e-3)
    else:
        assert state["m_max"].item() == 0.5
        assert state["exp_avg_sq"].item() == 0.5
        assert v_norm == 2.0**-8
    second_moment = state["exp_avg_sq"].item()
    for _ in range(100):
        p.grad = torch.zeros(1, dtype=torch.bfloat16)
        opt.step()
    expected = second_moment * 0.999**100 if fp32_state else 0.5
    assert state["exp_avg_sq"].item() == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("kwargs, name", [
    ({"lr": -1.0}, "lr"),
    ({"eps": -1e-8}, "eps"),
    ({"betas": (1.0, 0.999)}, "betas"),
    ({"betas": (0.9, -0.1)}, "betas"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"gamma1": 1.0}, "gamma1"),
    ({"gamma1": -0.5}, "gamma1"),
    ({"gamma2": 1.0}, "gamma2"),
    ({"gamma3": -0.1}, "gamma3"),
    ({"total_T": 0}, "total_T"),
    ({"total_T": 10.5}, "total_T"),
    ({"eta_min": 1.5}, "eta_min"),
    ({"update_proj_gap": -1}, "update_proj_gap"),
    ({"update_proj_gap": 2.0}, "update_proj_gap"),
    ({"variant": "fixed"}, "variant"),
    ({"foreach": False}, "foreach"),
])
def test_invalid_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        StableSPAM([torch.zeros(2, requires_grad=True)], **kwargs)


@pytest.mark.parametrize("key, value", [("lr", -1.0), ("betas", (0.9, 1.5)), ("eps", -1.0), ("weight_decay", -1.0)])
def test_invalid_param_group_values_name_the_group(key, value):
    groups = [{"params": [torch.zeros(2, requires_grad=True)]},
              {"params": [torch.zeros(2, requires_grad=True)], key: value}]
    with pytest.raises(ValueError, match=f"param group 1 {key}"):
        StableSPAM(groups)


def test_gamma1_minus_one_means_beta1():
    runs = []
    for gamma1 in (-1, 0.8):
        params = make_params(torch.float64)
        opt = StableSPAM(params, betas=(0.8, 0.999), gamma1=gamma1)
        generator = torch.Generator().manual_seed(1)
        for t in range(1, 4):
            set_grads(params, t, generator)
            opt.step()
        runs.append(params)
    assert all(torch.equal(p, q) for p, q in zip(*runs))


@pytest.mark.parametrize("variant", VARIANTS)
def test_loss_decreases_on_a_tiny_regression(variant):
    torch.manual_seed(0)
    inputs = torch.randn(64, 8)
    targets = inputs @ torch.randn(8, 1)
    model = torch.nn.Linear(8, 1)
    opt = StableSPAM(model.parameters(), lr=3e-2, total_T=100, update_proj_gap=25, variant=variant)
    losses = []
    for _ in range(100):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]
