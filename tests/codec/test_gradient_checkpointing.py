"""train.gradient_checkpointing: diffusers' own activation checkpointing gives the codec's gradients unchanged, and
really recomputes the blocks (it is not a silent no-op)."""

import copy

import torch

import codec.training.train as train_module
from codec.network.model import CodecForTraining, build_autoencoder
from codec.training.config import load_codec_config
from tests.conftest import CONFIGS


def _tiny_codec(seed=0):
    # Mid-block attention on, so the attention inside the checkpointed mid-blocks is exercised too.
    cfg = load_codec_config(CONFIGS / "codec" / "tiny.yaml", ["model.mid_block_add_attention=true"])
    torch.manual_seed(seed)
    return build_autoencoder(cfg.model)


def _calls_under_grad(modules):
    """Counts each module's forward calls made with grad enabled (the recomputation in backward is one).

    A pre-hook, not a forward hook: torch's checkpoint stops a recomputation as soon as it has every tensor
    backward needs, so the recomputed forward may never return and a forward hook would miss it."""
    counts = [0] * len(modules)

    def hook(i):
        def count(module, args):
            counts[i] += torch.is_grad_enabled()
        return count

    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(modules)]
    return counts, handles


def _codec_step(vae, images, draws):
    """One training forward + backward as the trainer runs it (CodecForTraining, keyed posterior noise)."""
    model = CodecForTraining(vae, learn_logvar=True, seed=0).train()
    blocks = [vae.encoder.mid_block, vae.encoder.mid_block.attentions[0], vae.decoder.up_blocks[0],
              vae.decoder.mid_block.attentions[0]]
    counts, handles = _calls_under_grad(blocks)
    recon, mean, logvar = model(images, draws)
    after_forward = list(counts)
    # A loss touching every output: pixels, the posterior's mean and log-variance, the learned NLL scale.
    loss = ((recon - images).abs().mean() / model.logvar.exp() + model.logvar
            + 1e-2 * (mean.pow(2).mean() + logvar.exp().mean()))
    loss.backward()
    for h in handles:
        h.remove()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return grads, after_forward, counts


def test_codec_gradients_are_the_same_with_checkpointing_and_the_blocks_are_recomputed():
    plain = _tiny_codec()
    checkpointed = copy.deepcopy(plain)
    checkpointed.enable_gradient_checkpointing()
    assert checkpointed.is_gradient_checkpointing and not plain.is_gradient_checkpointing
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    draws = torch.tensor([3, 11])  # the same draws: the same posterior noise in both runs

    grads_plain, fwd_plain, total_plain = _codec_step(plain, images, draws)
    grads_ckpt, fwd_ckpt, total_ckpt = _codec_step(checkpointed, images, draws)

    # Each block runs once in the forward pass; with checkpointing once more in backward, without it never.
    assert fwd_plain == fwd_ckpt == [1, 1, 1, 1]
    assert total_plain == [1, 1, 1, 1] and total_ckpt == [2, 2, 2, 2]
    assert grads_plain.keys() == grads_ckpt.keys() and len(grads_plain) == len(list(plain.parameters())) + 1
    # Measured: the largest difference over all parameters is 0 (the recomputation repeats the same float ops on
    # one thread); we allow 1e-6 of each gradient's scale for other kernels' summation order.
    for name, g in grads_plain.items():
        scale = g.abs().max().item()
        assert (grads_ckpt[name] - g).abs().max().item() <= 1e-6 * max(scale, 1e-12), name


def test_trainer_turns_checkpointing_on_from_the_config(tiny_config, fresh_accelerate_state, monkeypatch):
    built = []

    def build_and_keep(cfg, *args):
        vae = build_autoencoder(cfg)
        built.append(vae)
        return vae

    monkeypatch.setattr(train_module, "build_codec", build_and_keep)
    counts = []
    real_init = CodecForTraining.__init__

    def init_and_count(self, vae, *args, **kwargs):
        real_init(self, vae, *args, **kwargs)
        found, _ = _calls_under_grad([vae.encoder.mid_block])
        counts.append(found)

    monkeypatch.setattr(CodecForTraining, "__init__", init_and_count)
    train_module.train_codec(tiny_config("train.max_steps=2", "train.gradient_checkpointing=true",
                                         "train.ema_decay=null"))

    assert built[0].is_gradient_checkpointing
    # 2 steps, each a forward and a recomputation in backward; export's latent statistics run without grad.
    assert counts[0] == [4]
