"""train.gradient_checkpointing for the U-Net: diffusers' own checkpointing gives the same gradients, and really
recomputes the resnets and the cross-attention transformer blocks in backward."""

import copy

import torch

import diffusion.train as train_module
from diffusion.config import load_unet_config
from diffusion.schedule import build_noise_scheduler, training_loss
from diffusion.unet import build_unet
from tests.codec.test_gradient_checkpointing import _calls_under_grad
from tests.conftest import CONFIGS


def _checkpointed_blocks(unet):
    # A resnet of a cross-attention level, its transformer block, and the mid-block's resnet after attention:
    # each sits behind one of diffusers' checkpoint calls.
    return [unet.down_blocks[0].resnets[0], unet.down_blocks[0].attentions[0].transformer_blocks[0],
            unet.mid_block.resnets[1], unet.up_blocks[1].attentions[0].transformer_blocks[0]]


def _unet_step(unet, cfg):
    """One training loss (Min-SNR-weighted, as the trainer computes it) and its gradients."""
    g = torch.Generator().manual_seed(2)
    latents, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    text, timesteps = torch.randn(3, 16, 384, generator=g), torch.tensor([5, 400, 990])
    scheduler = build_noise_scheduler(cfg.diffusion)
    counts, handles = _calls_under_grad(_checkpointed_blocks(unet))
    prediction = unet(scheduler.add_noise(latents, noise, timesteps), timesteps, encoder_hidden_states=text).sample
    training_loss(scheduler, prediction, latents, noise, timesteps, cfg.diffusion.snr_gamma).backward()
    for h in handles:
        h.remove()
    return {name: p.grad.clone() for name, p in unet.named_parameters() if p.grad is not None}, counts


def test_unet_gradients_are_the_same_with_checkpointing_and_the_blocks_are_recomputed():
    cfg = load_unet_config(CONFIGS / "unet" / "tiny.yaml")
    torch.manual_seed(0)
    plain = build_unet(cfg.unet, 4, 8, 384).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.enable_gradient_checkpointing()

    grads_plain, calls_plain = _unet_step(plain, cfg)
    grads_ckpt, calls_ckpt = _unet_step(checkpointed, cfg)

    assert calls_plain == [1, 1, 1, 1] and calls_ckpt == [2, 2, 2, 2]  # once more in backward: recomputed
    assert grads_plain.keys() == grads_ckpt.keys() and len(grads_plain) == len(list(plain.parameters()))
    # Measured: bit-identical on 1 and 2 threads; 1e-6 of each gradient's scale allows other summation orders.
    for name, g in grads_plain.items():
        scale = g.abs().max().item()
        assert (grads_ckpt[name] - g).abs().max().item() <= 1e-6 * max(scale, 1e-12), name


def test_trainer_turns_checkpointing_on_from_the_config(tiny_shards, tiny_codec_dir, tmp_path, fresh_accelerate_state,
                                                        monkeypatch):
    built, counts = [], []

    def build_and_count(*args, **kwargs):
        unet = build_unet(*args, **kwargs)
        built.append(unet)
        counts.append(_calls_under_grad(_checkpointed_blocks(unet)[:1])[0])
        return unet

    monkeypatch.setattr(train_module, "build_unet", build_and_count)
    cfg = load_unet_config(CONFIGS / "unet" / "tiny.yaml", [
        f"shards={tiny_shards}", f"codec={tiny_codec_dir}", f"train.output_dir={tmp_path / 'run'}",
        "train.max_steps=2", "train.batch_size=4", "train.ema_decay=null", "train.gradient_checkpointing=true"])
    train_module.train_unet(cfg)

    assert built[0].is_gradient_checkpointing
    assert counts[0] == [4]  # 2 steps x (forward + recomputation); the export runs nothing with grad
