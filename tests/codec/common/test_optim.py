import pytest
import torch

from codec.common.optim import OptimConfig, adamw, learning_rate, set_learning_rate


def test_learning_rate_warmup_then_cosine():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert learning_rate(0, cfg, 110) == pytest.approx(0.1)
    assert learning_rate(9, cfg, 110) == pytest.approx(1.0)
    assert learning_rate(10, cfg, 110) == pytest.approx(1.0)
    assert learning_rate(60, cfg, 110) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way down the cosine
    assert learning_rate(110, cfg, 110) == pytest.approx(0.1)
    assert learning_rate(500, cfg, 110) == pytest.approx(0.1)


def test_fused_adamw_makes_the_same_steps_as_the_loop_one():
    """optim.fused picks torch's fused kernel: the same AdamW update (to rounding), the config's betas and decay."""
    torch.manual_seed(0)
    start, grads = torch.randn(1000), [torch.randn(1000) for _ in range(5)]
    weights = {}
    for fused in (False, True):
        weight = torch.nn.Parameter(start.clone())
        optimizer = adamw([weight], OptimConfig(lr=1e-2, betas=[0.9, 0.99], weight_decay=0.1, fused=fused))
        assert optimizer.defaults["fused"] is (True if fused else None) and optimizer.defaults["betas"] == (0.9, 0.99)
        for grad in grads:
            weight.grad = grad.clone()
            optimizer.step()
        weights[fused] = weight.detach()
    assert (weights[True] - start).abs().max() > 0.04  # five steps of about lr each
    torch.testing.assert_close(weights[True], weights[False], rtol=1e-5, atol=1e-6)


def test_set_learning_rate_reaches_every_group():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([{"params": [a]}, {"params": [b], "lr": 3.0}], lr=1.0)
    set_learning_rate(optimizer, 0.25)
    assert [group["lr"] for group in optimizer.param_groups] == [0.25, 0.25]


def test_backward_and_step_clips_only_the_synchronised_step(fresh_accelerate_state):
    from accelerate import Accelerator

    from codec.common.optim import backward_and_step

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    weight = torch.nn.Parameter(torch.zeros(4))
    model = torch.nn.Module()
    model.weight = weight
    optimizer = torch.optim.SGD([weight], lr=1.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    # Two micro-batches of one step; accelerate halves each loss: gradient 2.5 + 2.5 per element, norm 10.
    with accelerator.accumulate(model):
        backward_and_step(accelerator, 5.0 * weight.sum(), optimizer, [weight], max_grad_norm=1.0)
    # Half-way: neither clipped nor applied, and kept for the second micro-batch.
    torch.testing.assert_close(weight.grad, torch.full((4,), 2.5))
    assert torch.equal(weight.detach(), torch.zeros(4))
    with accelerator.accumulate(model):
        backward_and_step(accelerator, 5.0 * weight.sum(), optimizer, [weight], max_grad_norm=1.0)
    # Clipped to norm 1 on the synchronised step, then applied: -0.5 per element (unclipped: -5).
    torch.testing.assert_close(weight.detach(), torch.full((4,), -0.5))
    assert weight.grad is None  # zeroed for the next step


def test_learning_rate_warmup_stable_decay():
    """cooldown_steps: `lr` after the warm-up until the last N steps, then linear to lr * min_lr_ratio; every step
    before the decay is the same for any budget, which is what lets a run be extended from its checkpoints."""
    cfg = OptimConfig(lr=2.0, warmup_steps=10, min_lr_ratio=0.0, cooldown_steps=100)
    assert learning_rate(0, cfg, 1000) == pytest.approx(0.2)
    assert learning_rate(10, cfg, 1000) == pytest.approx(2.0)
    assert learning_rate(900, cfg, 1000) == pytest.approx(2.0)  # the decay starts here
    assert learning_rate(950, cfg, 1000) == pytest.approx(1.0)  # half-way down the line
    assert learning_rate(1000, cfg, 1000) == pytest.approx(0.0)
    assert learning_rate(1200, cfg, 1000) == pytest.approx(0.0)
    assert [learning_rate(s, cfg, 500) for s in range(400)] == [learning_rate(s, cfg, 1000) for s in range(400)]
    floor = OptimConfig(lr=1.0, min_lr_ratio=0.1, cooldown_steps=10)
    assert learning_rate(95, floor, 100) == pytest.approx(1 - 0.9 * 0.5)
    assert learning_rate(100, floor, 100) == pytest.approx(0.1)


def test_negative_cooldown_is_refused():
    from codec.common.config import ConfigError

    with pytest.raises(ConfigError, match="cooldown_steps"):
        OptimConfig(cooldown_steps=-1)
