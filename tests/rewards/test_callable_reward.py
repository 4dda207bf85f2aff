"""CallableReward: any fn(images, cond) -> (B,) behind the Reward protocol."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from dmdr_fast.rewards import CallableReward, CompositeReward, RewardSpec


def brightness(images: Tensor, cond) -> Tensor:
    return images.mean(dim=(1, 2, 3))


@pytest.fixture
def images() -> Tensor:
    return torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def test_scores_losses_and_gradients(images):
    reward = CallableReward(brightness, spec=RewardSpec("bright", weight=2.0, loss_form="hinge", margin=0.8))
    assert reward.differentiable and reward.name == "bright"
    x = images.clone().requires_grad_(True)
    score = reward(x, None)
    assert score.shape == (5,) and score.dtype == torch.float32
    torch.testing.assert_close(score, brightness(images, None))
    loss = reward.loss(x, None)
    torch.testing.assert_close(loss, 2.0 * torch.relu(0.8 - score))
    loss.sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all()) and x.grad.abs().sum() > 0


def test_output_is_checked_and_cast_to_float32(images):
    f64 = CallableReward(lambda x, c: brightness(x, c).double(), spec=RewardSpec("f64"))
    assert f64(images, None).dtype == torch.float32
    with pytest.raises(ValueError, match=r"shape \(5, 1\)"):
        CallableReward(lambda x, c: brightness(x, c)[:, None], spec=RewardSpec("s")).score(images, None)
    with pytest.raises(TypeError, match="floating-point"):
        CallableReward(lambda x, c: torch.ones(5, dtype=torch.long), spec=RewardSpec("i"))(images, None)
    with pytest.raises(TypeError, match="list"):
        CallableReward(lambda x, c: [1.0] * 5, spec=RewardSpec("l"))(images, None)
    with pytest.raises(TypeError, match="callable"):
        CallableReward(3, spec=RewardSpec("n"))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        CallableReward(brightness)  # type: ignore[call-arg]  # a spec (a name) is required
    with pytest.raises(TypeError, match="RewardSpec"):
        CallableReward(brightness, spec=None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):  # the old keywords are gone: the spec is taken whole
        CallableReward(brightness, name="b")  # type: ignore[call-arg]


def test_non_differentiable_runs_without_grad(images):
    seen: list[bool] = []

    def judge(x: Tensor, cond) -> Tensor:
        seen.append(torch.is_grad_enabled())
        return (x.mean(dim=(1, 2, 3)) > 0.5).float()

    reward = CallableReward(judge, spec=RewardSpec("judge"), differentiable=False)
    x = images.clone().requires_grad_(True)
    assert not reward(x, None).requires_grad and seen == [False]
    with pytest.raises(TypeError, match="not differentiable"):
        reward.loss(x, None)
    out = CompositeReward([reward, CallableReward(brightness, spec=RewardSpec("b"))])(x, None)
    torch.testing.assert_close(out.loss, -brightness(images, None))  # only the differentiable term
    assert set(out.scores) == {"judge", "b"}


def test_prompt_prefix_and_condition_kind(images):
    received = []

    def fn(x: Tensor, cond) -> Tensor:
        received.append(cond)
        return x.new_zeros(x.shape[0])

    prompts = [f"p{i}" for i in range(5)]
    CallableReward(fn, spec=RewardSpec("t", prompt_prefix="photo of "))(images, prompts)
    assert received[-1] == [f"photo of p{i}" for i in range(5)]
    labels = torch.arange(5)
    CallableReward(fn, spec=RewardSpec("t", prompt_prefix="photo of "))(images, labels)
    assert received[-1] is labels  # labels pass through untouched
    with pytest.raises(ValueError, match="prompt"):
        CallableReward(fn, spec=RewardSpec("t"), cond_kind="prompts")(images, labels)
    with pytest.raises(ValueError, match="channels"):
        CallableReward(fn, spec=RewardSpec("t"), channels=1)(images, None)


def test_module_fn_is_registered_and_frozen(images):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 1), nn.Dropout(0.5))

    def call(x: Tensor, cond) -> Tensor:  # the net's (B, 1) as (B,)
        return net(x).squeeze(-1)

    class Scorer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: Tensor, cond) -> Tensor:
            return call(x, cond)

    reward = CallableReward(Scorer(), spec=RewardSpec("net"))
    reward.train()
    assert not net.training and all(not p.requires_grad for p in net.parameters())
    assert any(p is net[1].weight for p in reward.parameters())  # .to(device) moves it
    a, b = reward(images, None), reward(images, None)
    torch.testing.assert_close(a, b)  # dropout off
    reward.to(torch.float64)
    assert net[1].weight.dtype == torch.float64
    assert "fn=Scorer" in repr(reward)
