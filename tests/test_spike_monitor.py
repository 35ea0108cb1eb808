"""The Gradient Spike Score monitor against hand computations, its cadence, aggregation, resume and no-sync
guarantee."""

import io

import pytest
import torch

from galore_torch.stable_spam import StableSPAM
from host_reads import forbid_host_reads
from peft_pretraining.spike_monitor import GradientSpikeMonitor, layer_type

Q = "model.layers.0.self_attn.q_proj.weight"


def params(**shapes: tuple[int, ...]) -> dict[str, torch.nn.Parameter]:
    """Named parameters; keyword names use '__' for '.' (q_proj__weight -> q_proj.weight)."""
    return {name.replace("__", "."): torch.nn.Parameter(torch.zeros(shape)) for name, shape in shapes.items()}


def set_grads(named: dict[str, torch.nn.Parameter], grads: dict[str, list]) -> None:
    for name, grad in grads.items():
        named[name].grad = torch.tensor(grad, dtype=torch.float32)


def as_floats(values: dict[str, torch.Tensor]) -> dict[str, float]:
    return {key: float(value) for key, value in values.items()}


def test_scores_match_hand_computation_and_zero_elements_score_zero():
    named = {Q: torch.nn.Parameter(torch.zeros(3))}
    monitor = GradientSpikeMonitor(named.items())

    set_grads(named, {Q: [2.0, -4.0, 0.0]})
    first = as_floats(monitor.observe(1))
    assert first["gss_max"] == 1.0  # |g| / |g| for every nonzero element; the zero element scores 0, not NaN
    assert first["spikes/total"] == 0.0

    set_grads(named, {Q: [6.0, -4.0, 0.0]})
    # element 0: 6 / ((2 + 6) / 2) = 1.5; element 1: 4 / 4 = 1; element 2 has stayed 0: score 0
    assert as_floats(monitor.observe(2))["gss_max"] == pytest.approx(1.5)

    set_grads(named, {Q: [0.0, 0.0, 0.0]})
    assert as_floats(monitor.observe(3))["gss_max"] == 0.0


def test_planted_1000x_spike_is_counted_once_history_is_long_enough():
    named = {Q: torch.nn.Parameter(torch.zeros(2, 2))}
    monitor = GradientSpikeMonitor(named.items(), threshold=50.0)
    for step in range(1, 100):
        set_grads(named, {Q: [[1.0, -1.0], [0.0, 1.0]]})
        assert as_floats(monitor.observe(step))["spikes/total"] == 0.0
    set_grads(named, {Q: [[1000.0, -1.0], [0.0, 1.0]]})
    result = as_floats(monitor.observe(100))
    # running mean of element (0, 0) over 100 observations: (99 * 1 + 1000) / 100 = 10.99
    assert result["gss_max"] == pytest.approx(1000.0 / 10.99, rel=1e-6)
    assert result["spikes/total"] == 1.0
    assert result["spikes/q_proj"] == 1.0


def test_score_never_exceeds_the_observation_count():
    """The current step is in the mean, so a 1000x jump on the 10th observation scores 9.91: no spike at 50."""
    named = {Q: torch.nn.Parameter(torch.zeros(1))}
    default, low = GradientSpikeMonitor(named.items()), GradientSpikeMonitor(named.items(), threshold=5.0)
    for step in range(1, 11):
        set_grads(named, {Q: [1000.0 if step == 10 else 1.0]})
        results = as_floats(default.observe(step)), as_floats(low.observe(step))
    assert results[0]["gss_max"] == pytest.approx(1000.0 / (1009.0 / 10))
    assert results[0]["spikes/total"] == 0.0
    assert results[1]["spikes/total"] == 1.0


def test_cadence_observes_only_multiples_and_averages_over_observed_steps():
    named = {Q: torch.nn.Parameter(torch.zeros(1))}
    monitor = GradientSpikeMonitor(named.items(), every=3)
    seen = {}
    for step in range(1, 7):
        set_grads(named, {Q: [1000.0 if step in (1, 2, 4, 5) else float(step)]})  # huge on unobserved steps
        seen[step] = monitor.observe(step)
    assert [step for step, result in seen.items() if result] == [3, 6]
    assert not monitor.is_due(4) and monitor.is_due(6)
    # step 6 against the mean of observed steps 3 and 6 only: 6 / ((3 + 6) / 2)
    assert float(seen[6]["gss_max"]) == pytest.approx(6.0 / 4.5)
    assert monitor.state_dict()["observations"][Q] == 2


def test_layer_type_classification():
    assert layer_type("model.layers.11.self_attn.o_proj.weight") == "o_proj"
    assert layer_type("module._orig_mod.model.layers.0.mlp.gate_proj.weight") == "gate_proj"
    assert layer_type("model.embed_tokens.weight") == "embed_tokens"
    assert layer_type("lm_head.weight") == "lm_head"
    assert layer_type("model.layers.2.post_attention_layernorm.weight") == "norm"
    assert layer_type("model.norm.weight") == "norm"
    assert layer_type("model.rotary_emb.something") == "other"


def warmed_monitor(named, steps=99, **options) -> GradientSpikeMonitor:
    """A monitor that has seen `steps` observations of all-ones gradients."""
    monitor = GradientSpikeMonitor(named.items(), **options)
    for step in range(1, steps + 1):
        for param in named.values():
            param.grad = torch.ones_like(param)
        monitor.observe(step)
    return monitor


def spiky_grad(param: torch.Tensor, spikes: int) -> torch.Tensor:
    grad = torch.ones_like(param).flatten()
    grad[:spikes] = 1000.0
    return grad.view_as(param)


def test_counts_aggregate_per_layer_type():
    named = params(model__layers__0__self_attn__q_proj__weight=(4, 4),
                   model__layers__1__self_attn__q_proj__weight=(4, 4),
                   model__layers__0__mlp__down_proj__weight=(4, 8),
                   model__layers__0__input_layernorm__weight=(4,),
                   model__norm__weight=(4,),
                   lm_head__weight=(8, 4))
    monitor = warmed_monitor(named)
    planted = {"model.layers.0.self_attn.q_proj.weight": 2, "model.layers.1.self_attn.q_proj.weight": 3,
               "model.layers.0.mlp.down_proj.weight": 0, "model.layers.0.input_layernorm.weight": 1,
               "model.norm.weight": 4, "lm_head.weight": 7}
    for name, count in planted.items():
        named[name].grad = spiky_grad(named[name], count)
    result = as_floats(monitor.observe(100))
    assert result == {"spikes/down_proj": 0.0, "spikes/lm_head": 7.0, "spikes/norm": 5.0, "spikes/q_proj": 5.0,
                      "spikes/total": 17.0, "gss_max": pytest.approx(1000.0 / 10.99, rel=1e-6)}


def test_matrices_only_skips_vectors_and_params_without_grad_are_not_counted():
    named = params(model__layers__0__self_attn__k_proj__weight=(2, 2), model__norm__weight=(2,),
                   lm_head__weight=(2, 2))
    monitor = GradientSpikeMonitor(named.items(), matrices_only=True)
    assert monitor.layer_types == ["k_proj", "lm_head"]
    assert set(monitor.state_dict()["abs_sums"]) == {"model.layers.0.self_attn.k_proj.weight", "lm_head.weight"}
    named["model.layers.0.self_attn.k_proj.weight"].grad = torch.ones(2, 2)
    assert set(monitor.observe(1)) == {"spikes/k_proj", "spikes/lm_head", "spikes/total", "gss_max"}
    assert monitor.state_dict()["observations"] == {"model.layers.0.self_attn.k_proj.weight": 1,
                                                    "lm_head.weight": 0}
    named["model.layers.0.self_attn.k_proj.weight"].grad = None
    assert monitor.observe(2) == {}


def test_bfloat16_grads_accumulate_in_float32():
    named = {Q: torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))}
    monitor = GradientSpikeMonitor(named.items())
    named[Q].grad = torch.tensor([3.0, 1.0], dtype=torch.bfloat16)
    monitor.observe(1)
    named[Q].grad = torch.tensor([1.0, 1.0], dtype=torch.bfloat16)
    result = monitor.observe(2)
    assert monitor.state_dict()["abs_sums"][Q].dtype == torch.float32
    assert result["gss_max"].dtype == torch.float32
    assert float(result["gss_max"]) == pytest.approx(1.0)  # element 1: 1 / 1; element 0: 1 / 2


def test_state_dict_round_trip_resumes_identically():
    def build():
        torch.manual_seed(0)
        return params(model__layers__0__mlp__up_proj__weight=(3, 5), model__norm__weight=(5,))

    original_params, resumed_params = build(), build()
    original = warmed_monitor(original_params, steps=60, every=2, threshold=10.0)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    resumed = GradientSpikeMonitor(resumed_params.items(), every=2, threshold=10.0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))

    for named in (original_params, resumed_params):
        generator = torch.Generator().manual_seed(1)
        for param in named.values():
            param.grad = torch.randn(param.shape, generator=generator) * 200
    expected, got = as_floats(original.observe(62)), as_floats(resumed.observe(62))
    assert got == expected
    assert expected["spikes/total"] > 0  # the comparison covers counted spikes, not only zeros
    assert resumed.state_dict()["observations"] == original.state_dict()["observations"] == {
        "model.layers.0.mlp.up_proj.weight": 31, "model.norm.weight": 31}


def test_load_state_dict_rejects_a_different_model():
    monitor = GradientSpikeMonitor(params(lm_head__weight=(2, 2)).items())
    with pytest.raises(ValueError, match="same parameters"):
        monitor.load_state_dict(GradientSpikeMonitor(params(model__norm__weight=(2,)).items()).state_dict())
    wrong_shape = GradientSpikeMonitor(params(lm_head__weight=(2, 3)).items()).state_dict()
    with pytest.raises(ValueError, match="shape"):
        monitor.load_state_dict(wrong_shape)


@pytest.mark.parametrize("options, message", [({"threshold": 0.0}, "threshold"), ({"every": 0}, "every"),
                                              ({"every": 2.5}, "every")])
def test_invalid_options_raise(options, message):
    with pytest.raises(ValueError, match=message):
        GradientSpikeMonitor(params(lm_head__weight=(2, 2)).items(), **options)


def test_no_trainable_parameter_raises():
    with pytest.raises(ValueError, match="no parameter to monitor"):
        GradientSpikeMonitor(params(model__norm__weight=(2,)).items(), matrices_only=True)


def test_observe_reads_no_tensor_value_on_the_host(monkeypatch):
    named = params(model__layers__0__self_attn__v_proj__weight=(4, 4), model__norm__weight=(4,))
    monitor = warmed_monitor(named, steps=3)
    for param in named.values():
        param.grad = spiky_grad(param, 1)
    forbid_host_reads(monkeypatch)
    result = monitor.observe(4)
    monkeypatch.undo()
    assert result and all(isinstance(value, torch.Tensor) and value.dim() == 0 for value in result.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_device_sync_on_cuda():
    torch.manual_seed(0)
    up, norm = torch.nn.Linear(64, 64, bias=False).cuda(), torch.nn.LayerNorm(64).cuda()
    named = [("model.layers.0.mlp.up_proj.weight", up.weight), ("model.norm.weight", norm.weight),
             ("model.norm.bias", norm.bias)]
    monitor = GradientSpikeMonitor(named)
    optimizer = StableSPAM([p for _, p in named], lr=1e-3)
    for step in range(1, 4):
        norm(up(torch.randn(8, 64, device="cuda"))).square().sum().backward()
        optimizer.step()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            result = monitor.observe(step) | optimizer.metrics()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        optimizer.zero_grad(set_to_none=True)
    assert set(result) >= {"spikes/up_proj", "spikes/norm", "spikes/total", "gss_max",
                           "stablespam/clip_threshold_mean", "stablespam/norm_scale_max"}
    assert all(value.is_cuda and value.dim() == 0 for value in result.values())
    assert float(result["gss_max"]) > 0
