"""One DMDR inner step (docs/method.md §5.1–§5.4) assembled from the algo pieces with toy networks.

This checks that the pieces fit together (shapes, gradient routing), not training quality.
"""

from __future__ import annotations

import torch

from dmdr_fast.algo import (
    DynaDG,
    DynaRS,
    GuidanceQuery,
    GuidanceScale,
    backward_simulation,
    concat_guidance_queries,
    critic_loss,
    expand_cond,
    few_step_timesteps,
    generator_dmd_loss,
    noise_like,
    predict_x0,
    renoise,
)

D = 6


class ToyGuidance(torch.nn.Module):
    """Frozen 'teacher' plus a LoRA-like residual scaled per sample; cond is a (B, D) tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.base = torch.nn.Linear(D, D).requires_grad_(False)
        self.lora = torch.nn.Linear(D, D, bias=False)

    def forward(self, x, t, cond, lora_scale):
        return self.base(x) + cond * t[:, None] + lora_scale[:, None] * self.lora(x)


def test_one_inner_step_routes_gradients():
    torch.manual_seed(0)
    gen_net = torch.nn.Linear(D, D)
    guidance = ToyGuidance()
    g = torch.Generator().manual_seed(123)
    batch, step = 8, 100
    cond = torch.randn(batch, D, generator=g)
    null = torch.zeros(1, D)
    grid = few_step_timesteps(4, 3.0)
    rs, dg, cfg = DynaRS(horizon=1000), DynaDG(0.75, 1000), GuidanceScale(3.0, 0.5)

    def generator(x, t, c):
        return gen_net(x) + c * t[:, None]

    # 1. backward simulation (no grad)
    sim = backward_simulation(generator, torch.randn(batch, D, generator=g), cond, grid, generator=g)

    # 2. critic update
    tau = rs.sample(batch, step, generator=g)
    eps = noise_like(sim.x0_sel, g)
    v = guidance(renoise(sim.x0_sel, tau, eps), tau, cond, torch.full((batch,), 2.0))
    critic_loss(v, sim.x0_sel, eps).backward()
    assert guidance.lora.weight.grad is not None and gen_net.weight.grad is None
    guidance.zero_grad()

    # 3. generator update: one batched guidance forward of 3B
    x0 = predict_x0(generator, sim.x_in, sim.t_in, cond)
    tau2 = rs.sample(batch, step, generator=g)
    x_t = renoise(x0.detach(), tau2, noise_like(x0, g))
    with torch.no_grad():
        lam_r = dg.real_scale(step)
        queries = [GuidanceQuery(x_t, tau2, cond, 2.0), GuidanceQuery(x_t, tau2, cond, lam_r)]
        queries.append(GuidanceQuery(x_t, tau2, expand_cond(null, batch), lam_r))
        gb = concat_guidance_queries(queries)
        v_fake, v_cond, v_uncond = gb.chunk(guidance(gb.x, gb.t, gb.cond, gb.lora_scale))
    loss, direction = generator_dmd_loss(
        x0, x_t, tau2, v_fake, v_cond, v_uncond, cfg.sample(g), return_direction=True
    )
    loss.backward()
    assert gen_net.weight.grad is not None and guidance.lora.weight.grad is None
    # d loss / d x0 = g / numel, chained through x0 = x_in − t·G(x_in): d x0 / d bias = −t
    expected_bias_grad = -(sim.t_in[:, None] * direction / direction.numel()).sum(0)
    torch.testing.assert_close(gen_net.bias.grad, expected_bias_grad.float())
