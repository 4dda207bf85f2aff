"""Tests of dmdr_fast.algo.sampling with toy velocity fields whose answers are known exactly."""

from __future__ import annotations

import pytest
import torch

from dmdr_fast.algo import backward_simulation, euler_sample, few_step_sample, few_step_timesteps

SHAPE = (2, 3, 3)  # per-sample shape


def point_mass(x, t, cond):
    """Exact velocity of the flow whose data is the point ``cond``: ``(x − cond)/t``.

    Along ``x_t = (1 − t)·c + t·ε`` this is ``ε − c``, so x̂0 = c exactly at every t > 0.
    """
    return (x - cond) / t.view(-1, 1, 1, 1)


def linear_field(x, t, cond):
    """An arbitrary smooth field (depends on x, t and cond) for recursion checks."""
    return 0.3 * x + cond * t.view(-1, 1, 1, 1) - 0.1


class Recorder:
    """Wraps a velocity function and records the batch size of every call."""

    def __init__(self, fn):
        self.fn = fn
        self.batch_sizes: list[int] = []

    def __call__(self, x, t, cond):
        assert t.shape == (x.shape[0],)
        self.batch_sizes.append(x.shape[0])
        return self.fn(x, t, cond)


def _data(batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *SHAPE, generator=g), torch.randn(batch, *SHAPE, generator=g)


# --------------------------------------------------------------------------------------------------
# Few-step sampler.
# --------------------------------------------------------------------------------------------------


def test_one_step_sample_is_exact_for_v_eq_eps_minus_x0():
    noise, x0 = _data(4)
    out = few_step_sample(lambda x, t, c: noise - x0, noise, None, few_step_timesteps(1))
    torch.testing.assert_close(out, x0)


@pytest.mark.parametrize(("steps", "shift"), [(1, 1.0), (4, 3.0), (8, 5.0)])
def test_point_mass_is_recovered_at_every_step(steps, shift):
    noise, target = _data(5)
    grid = few_step_timesteps(steps, shift)
    traj = few_step_sample(point_mass, noise, target, grid, return_trajectory=True)
    assert traj.inputs.shape == (steps, 5, *SHAPE) and traj.x0.shape == (steps, 5, *SHAPE)
    torch.testing.assert_close(traj.x0, target.expand_as(traj.x0))
    assert torch.equal(traj.inputs[0], noise)
    assert torch.equal(traj.timesteps, grid)


def test_few_step_sample_matches_the_recursion_by_hand():
    noise, cond = _data(3)
    grid = few_step_timesteps(4, 3.0)  # 1, 0.9, 0.75, 0.5, 0
    out = few_step_sample(linear_field, noise, cond, grid, generator=torch.Generator().manual_seed(11))

    g = torch.Generator().manual_seed(11)
    x = noise
    for k, t_k in enumerate([1.0, 0.9, 0.75, 0.5]):
        t = torch.full((3,), t_k)
        x0 = x - t_k * linear_field(x, t, cond)
        if k < 3:
            t_next = [0.9, 0.75, 0.5][k]
            x = (1 - t_next) * x0 + t_next * torch.randn(noise.shape, generator=g)
    torch.testing.assert_close(out, x0)


def test_few_step_sample_is_reproducible_and_uses_fresh_noise():
    noise, cond = _data(3)
    grid = few_step_timesteps(3)
    a = few_step_sample(linear_field, noise, cond, grid, generator=torch.Generator().manual_seed(0))
    b = few_step_sample(linear_field, noise, cond, grid, generator=torch.Generator().manual_seed(0))
    c = few_step_sample(linear_field, noise, cond, grid, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_few_step_sample_keeps_dtype_and_passes_grid_dtype_times():
    seen = []

    def fn(x, t, c):
        seen.append(t.dtype)
        return torch.zeros_like(x)

    noise = torch.randn(2, *SHAPE, dtype=torch.bfloat16)
    out = few_step_sample(fn, noise, None, few_step_timesteps(2))
    assert out.dtype == torch.bfloat16 and seen == [torch.float32, torch.float32]


@pytest.mark.parametrize(
    ("grid", "exc", "match"),
    [
        (torch.tensor([1.0, 0.5, 0.5, 0.0]), ValueError, "strictly decreasing"),
        (torch.tensor([1.0, 0.5]), ValueError, "end at 0"),
        (torch.tensor([1.5, 0.0]), ValueError, "start at <= 1"),
        (torch.tensor([1.0]), ValueError, r"shape \(N \+ 1,\)"),
        (torch.tensor([[1.0, 0.0]]), ValueError, r"shape \(N \+ 1,\)"),
        (torch.tensor([1, 0]), TypeError, "timesteps"),
    ],
)
def test_bad_grid_raises(grid, exc, match):
    noise, cond = _data(2)
    with pytest.raises(exc, match=match):
        few_step_sample(point_mass, noise, cond, grid)


def test_sampler_rejects_wrong_network_output():
    noise, _ = _data(2)
    with pytest.raises(ValueError, match="velocity_fn must return"):
        few_step_sample(lambda x, t, c: x[:, :1], noise, None, few_step_timesteps(1))


# --------------------------------------------------------------------------------------------------
# Backward simulation.
# --------------------------------------------------------------------------------------------------

B, N = 48, 4


def _backward(mode="trajectory", seed=3, fn=linear_field, **kwargs):
    noise, cond = _data(B)
    grid = few_step_timesteps(N, 3.0)
    sim = backward_simulation(
        fn, noise, cond, grid, mode=mode, generator=torch.Generator().manual_seed(seed), **kwargs
    )
    return sim, noise, cond, grid


def test_backward_simulation_shapes_and_dtypes():
    sim, noise, _, grid = _backward()
    assert sim.x_in.shape == noise.shape and sim.x0_sel.shape == noise.shape
    assert sim.k.shape == (B,) and sim.k.dtype == torch.int64
    assert sim.t_in.shape == (B,) and sim.t_in.dtype == torch.float32
    assert int(sim.k.min()) >= 0 and int(sim.k.max()) < N
    assert set(sim.k.tolist()) == set(range(N))  # 48 draws cover the 4 steps
    assert torch.equal(sim.t_in, grid[sim.k])


def test_backward_simulation_trajectory_mode_matches_the_rollout():
    sim, noise, cond, grid = _backward(seed=5)
    # Same RNG stream: k first, then the rollout's noises.
    g = torch.Generator().manual_seed(5)
    k = torch.randint(0, N, (B,), generator=g)
    traj = few_step_sample(linear_field, noise, cond, grid, generator=g, return_trajectory=True)
    assert torch.equal(sim.k, k)
    rows = torch.arange(B)
    torch.testing.assert_close(sim.x_in, traj.inputs[k, rows], rtol=0, atol=0)
    torch.testing.assert_close(sim.x0_sel, traj.x0[k, rows], rtol=0, atol=0)


def test_backward_simulation_k0_is_pure_noise():
    sim, noise, _, _ = _backward(seed=6)
    first = sim.k == 0
    assert bool(first.any())
    assert torch.equal(sim.x_in[first], noise[first])
    assert bool((sim.t_in[first] == 1.0).all())


def test_backward_simulation_is_deterministic_with_a_seed():
    a, *_ = _backward(seed=7)
    b, *_ = _backward(seed=7)
    c, *_ = _backward(seed=8)
    for field in ("x_in", "t_in", "k", "x0_sel"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert not torch.equal(a.k, c.k)


def test_pruning_changes_cost_not_results():
    pruned_fn, full_fn = Recorder(linear_field), Recorder(linear_field)
    cond_dict_fn = lambda x, t, c: linear_field(x, t, c["target"])  # noqa: E731
    pruned, *_ = _backward(seed=9, fn=pruned_fn, prune=True)
    full, *_ = _backward(seed=9, fn=full_fn, prune=False)
    for field in ("x_in", "t_in", "k", "x0_sel"):
        assert torch.equal(getattr(pruned, field), getattr(full, field))
    kmax = int(full.k.max())
    assert full_fn.batch_sizes == [B] * (kmax + 1)  # stops after the last selected step
    expected = [int((full.k >= j).sum()) for j in range(kmax + 1)]
    assert pruned_fn.batch_sizes == expected and sum(expected) < B * (kmax + 1)
    # Dict conditions are sliced along with the samples.
    noise, cond = _data(B)
    grid = few_step_timesteps(N, 3.0)
    g = torch.Generator().manual_seed(9)
    via_dict = backward_simulation(cond_dict_fn, noise, {"target": cond, "tag": "x"}, grid, generator=g)
    assert torch.equal(via_dict.x0_sel, pruned.x0_sel)


def test_skip_selected_gives_the_same_inputs_with_fewer_evaluations():
    """skip_selected: same x_in/t_in/k (same RNG stream), no x0_sel, and G is evaluated only on
    samples that continue past a step; evaluating G at x_in afterwards reproduces x0_sel."""
    full_fn, skip_fn = Recorder(linear_field), Recorder(linear_field)
    full, _, cond, _ = _backward(seed=11, fn=full_fn)
    skip, *_ = _backward(seed=11, fn=skip_fn, skip_selected=True)
    for field in ("x_in", "t_in", "k"):
        assert torch.equal(getattr(full, field), getattr(skip, field))
    assert skip.x0_sel is None
    kmax = int(full.k.max())
    assert skip_fn.batch_sizes == [int((full.k > j).sum()) for j in range(kmax)]
    assert sum(skip_fn.batch_sizes) == sum(full_fn.batch_sizes) - B
    x0_again = skip.x_in - skip.t_in.view(-1, 1, 1, 1) * linear_field(skip.x_in, skip.t_in, cond)
    torch.testing.assert_close(x0_again, full.x0_sel)


def test_backward_simulation_one_step_skip_evaluates_nothing():
    fn = Recorder(linear_field)
    noise, cond = _data(B)
    sim = backward_simulation(fn, noise, cond, few_step_timesteps(1), skip_selected=True)
    assert fn.batch_sizes == [] and torch.equal(sim.x_in, noise) and bool((sim.t_in == 1).all())


def test_backward_simulation_point_mass_x0_sel_is_exact():
    sim, _, target, _ = _backward(fn=point_mass)
    torch.testing.assert_close(sim.x0_sel, target)


def test_backward_simulation_runs_without_grad():
    weight = torch.tensor(0.5, requires_grad=True)
    sim, *_ = _backward(fn=lambda x, t, c: weight * x)
    assert not sim.x_in.requires_grad and not sim.x0_sel.requires_grad
    sim, *_ = _backward(mode="final", fn=lambda x, t, c: weight * x)
    assert not sim.x_in.requires_grad and not sim.x0_sel.requires_grad


def test_backward_simulation_final_mode_renoises_the_final_sample():
    sim, noise, cond, grid = _backward(mode="final", seed=10)
    g = torch.Generator().manual_seed(10)
    k = torch.randint(0, N, (B,), generator=g)
    final = few_step_sample(linear_field, noise, cond, grid, generator=g)
    eps = torch.randn(noise.shape, generator=g)
    t = grid[k].view(-1, 1, 1, 1)
    assert torch.equal(sim.k, k)
    torch.testing.assert_close(sim.x0_sel, final, rtol=0, atol=0)
    torch.testing.assert_close(sim.x_in, (1 - t) * final + t * eps)
    # k = 0 (t = 1): fresh noise, not the rollout's initial noise
    first = k == 0
    assert torch.equal(sim.x_in[first], eps[first]) and not torch.equal(sim.x_in[first], noise[first])


def test_backward_simulation_bad_inputs():
    noise, cond = _data(4)
    grid = few_step_timesteps(2)
    with pytest.raises(ValueError, match="mode"):
        backward_simulation(linear_field, noise, cond, grid, mode="ode")
    with pytest.raises(ValueError, match="cond has batch size 3"):
        backward_simulation(linear_field, noise, cond[:3], grid)
    with pytest.raises(TypeError, match="noise"):
        backward_simulation(linear_field, noise.long(), cond, grid)


# --------------------------------------------------------------------------------------------------
# Multi-step Euler sampler (teacher).
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("steps", "shift"), [(1, 1.0), (10, 1.0), (50, 3.0)])
def test_euler_is_exact_for_a_point_mass(steps, shift):
    # Euler on v = (x − c)/t gives x_{i+1} − c = (x_i − c)·t_{i+1}/t_i, which telescopes to c at t = 0.
    noise, target = _data(3)
    torch.testing.assert_close(euler_sample(point_mass, noise, target, num_steps=steps, shift=shift), target)


def test_euler_cfg_endpoint_and_batching():
    noise, a = _data(3, seed=1)
    b = torch.zeros_like(a) + 2.0
    w = 2.5
    fn = Recorder(point_mass)
    out = euler_sample(fn, noise, a, num_steps=20, guidance=w, null_cond=b)
    # guided field (x − (b + w·(a − b)))/t: a point mass at b + w·(a − b)
    torch.testing.assert_close(out, b + w * (a - b))
    assert fn.batch_sizes == [6] * 20
    unbatched = Recorder(point_mass)
    out2 = euler_sample(unbatched, noise, a, num_steps=20, guidance=w, null_cond=b, batched_cfg=False)
    torch.testing.assert_close(out2, out)
    assert unbatched.batch_sizes == [3] * 40


def test_euler_null_cond_broadcast_from_batch_one():
    noise, a = _data(3, seed=2)
    null = torch.full((1, *SHAPE), -1.0)
    out = euler_sample(point_mass, noise, a, num_steps=5, guidance=3.0, null_cond=null)
    torch.testing.assert_close(out, null + 3.0 * (a - null))


@pytest.mark.parametrize("w", [1.0, 0.0])
def test_euler_without_cfg_uses_cond_only(w):
    noise, a = _data(2, seed=3)
    fn = Recorder(point_mass)
    out = euler_sample(fn, noise, a, num_steps=4, guidance=w, null_cond=torch.zeros_like(a))
    torch.testing.assert_close(out, a)
    assert fn.batch_sizes == [2] * 4


def test_euler_trajectory_and_explicit_grid():
    noise, a = _data(2, seed=4)
    grid = torch.tensor([1.0, 0.6, 0.2, 0.0])
    traj = euler_sample(point_mass, noise, a, timesteps=grid, return_trajectory=True)
    assert traj.shape == (4, 2, *SHAPE)
    assert torch.equal(traj[0], noise)
    # x_i = c + (ε − c)·t_i exactly on the straight path
    torch.testing.assert_close(traj[1], a + (noise - a) * 0.6)
    torch.testing.assert_close(traj[-1], a)


def test_euler_bad_inputs():
    noise, a = _data(2)
    with pytest.raises(ValueError, match="null_cond is required"):
        euler_sample(point_mass, noise, a, guidance=2.0)
    with pytest.raises(ValueError, match="num_steps"):
        euler_sample(point_mass, noise, a, num_steps=0)
    with pytest.raises(ValueError, match="guidance"):
        euler_sample(point_mass, noise, a, guidance=float("inf"))


def test_host_to_device_keeps_values_and_leaves_same_device_tensors_alone():
    from dmdr_fast.algo._utils import host_to_device

    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    assert host_to_device(x, None) is x
    assert host_to_device(x, "cpu") is x  # no copy when nothing moves
    assert torch.equal(host_to_device(x[:, 1:], torch.device("cpu")), x[:, 1:])


@pytest.mark.gpu
@pytest.mark.parametrize("pinned_source", [False, True])
def test_host_to_device_to_cuda_is_exact_after_later_host_writes(pinned_source: bool):
    """The copy is queued behind a busy stream (so it runs after this call returns) and the caller
    overwrites its tensor at once: what arrives must still be the values at call time — also when
    the caller's tensor is already pinned (pin_memory() would then hand back that very memory)."""
    from dmdr_fast.algo._utils import host_to_device

    x = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))
    x = x.pin_memory() if pinned_source else x
    expected = x.clone()
    torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU work ahead of the copy
    y = host_to_device(x, "cuda")
    x.zero_()
    assert y.device.type == "cuda" and torch.equal(y.cpu(), expected)
