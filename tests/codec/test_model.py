import math

import pytest
import torch
from diffusers import AutoencoderKL

from codec.network.model import (
    CodecForTraining,
    build_autoencoder,
    compression_ratio,
    encode_posterior,
    interpolate,
    latent_shape,
    latent_statistics,
    per_sample_noise,
    reconstruct,
    sample_prior,
    write_latent_stats,
)
from codec.training.config import load_codec_config
from tests.conftest import CONFIGS


@pytest.mark.parametrize("preset", ["tiny", "small", "kl-f8"])
def test_512_image_encodes_to_4x64x64(preset):
    torch.manual_seed(0)
    vae = build_autoencoder(load_codec_config(CONFIGS / "codec" / f"{preset}.yaml").model).eval()
    x = torch.rand(1, 3, 512, 512) * 2 - 1
    with torch.no_grad():
        posterior = encode_posterior(vae, x)
    assert posterior.mean.shape == (1, 4, 64, 64)
    assert posterior.logvar.shape == (1, 4, 64, 64)
    assert latent_shape(vae, 512, 512) == (4, 64, 64)
    # 48 is computed from the shapes, never typed into the code.
    assert compression_ratio(vae, 512, 512) == x[0].numel() / posterior.mean[0].numel() == 48.0


@pytest.fixture(scope="module")
def tiny_vae():
    torch.manual_seed(0)
    return build_autoencoder(load_codec_config(CONFIGS / "codec" / "tiny.yaml").model).eval()


def test_posterior_mode_sample_and_clamp(tiny_vae):
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        q = encode_posterior(tiny_vae, x)
        assert torch.equal(q.mode(), q.mean)
        g = torch.Generator().manual_seed(3)
        z = q.sample(generator=g)
        eps = torch.randn(q.mean.shape, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(z, q.mean + torch.exp(0.5 * q.logvar) * eps)
        assert q.logvar.min() >= -30 and q.logvar.max() <= 20


def test_per_sample_noise_depends_only_on_each_seed():
    a = per_sample_noise((3, 4, 8, 8), torch.tensor([5, 6, 7]), 0, "cpu", torch.float32)
    b = per_sample_noise((2, 4, 8, 8), torch.tensor([7, 5]), 0, "cpu", torch.float32)
    assert torch.equal(a[2], b[0]) and torch.equal(a[0], b[1])
    assert not torch.equal(a[0], a[1])
    assert abs(a.std().item() - 1) < 0.15


def test_training_forward_uses_seeded_reparameterization(tiny_vae):
    model = CodecForTraining(tiny_vae)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        r1, mean, logvar = model(x, torch.tensor([1, 2]))
        r2, _, _ = model(x, torch.tensor([1, 2]))
        r3, _, _ = model(x, torch.tensor([1, 3]))
        r_mode, _, _ = model(x, None)
    assert torch.equal(r1, r2)
    assert torch.equal(r1[0], r3[0]) and not torch.equal(r1[1], r3[1])
    torch.testing.assert_close(r_mode, reconstruct(tiny_vae, x))


def test_prior_samples_and_interpolation(tiny_vae):
    g = torch.Generator().manual_seed(0)
    samples = sample_prior(tiny_vae, 3, 64, 64, generator=g)
    assert samples.shape == (3, 3, 64, 64)
    a, b = torch.rand(2, 3, 64, 64) * 2 - 1
    path = interpolate(tiny_vae, a, b, steps=4)
    assert path.shape == (4, 3, 64, 64)
    torch.testing.assert_close(path[0], reconstruct(tiny_vae, a[None])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(path[-1], reconstruct(tiny_vae, b[None])[0], atol=1e-5, rtol=1e-5)


def test_latent_statistics_give_unit_std_after_scaling(tiny_vae):
    batches = [torch.rand(4, 3, 64, 64) * 2 - 1 for _ in range(3)]
    stats = latent_statistics(tiny_vae, batches)
    with torch.no_grad():
        posteriors = [encode_posterior(tiny_vae, b) for b in batches]
    z = torch.cat([p.mean for p in posteriors]).double()
    var = torch.cat([p.var for p in posteriors]).double()
    # Of z ~ q(z|x), the latent the U-Net trains on: Var[z] = Var[mean] + E[var] (law of total variance).
    assert stats["std"] == pytest.approx(math.sqrt(z.var(unbiased=False).item() + var.mean().item()), rel=1e-4)
    torch.testing.assert_close(torch.tensor(stats["channel_mean"]).double(), z.mean(dim=(0, 2, 3)), rtol=1e-4,
                               atol=1e-6)
    channel_var = z.var(dim=(0, 2, 3), unbiased=False) + var.mean(dim=(0, 2, 3))
    torch.testing.assert_close(torch.tensor(stats["channel_std"]).double(), channel_var.sqrt(), rtol=1e-4, atol=0)
    write_latent_stats(tiny_vae, stats, "global")
    assert tiny_vae.config.scaling_factor == pytest.approx(1 / stats["std"]) and tiny_vae.config.shift_factor is None
    write_latent_stats(tiny_vae, stats, "shift")
    assert tiny_vae.config.shift_factor == pytest.approx(stats["mean"])
    write_latent_stats(tiny_vae, stats, "per_channel")
    assert tiny_vae.config.latents_std == pytest.approx(stats["channel_std"]) and tiny_vae.config.shift_factor is None
    assert tiny_vae.config.scaling_factor == 1.0


def test_saved_folder_loads_with_diffusers(tiny_vae, tmp_path):
    write_latent_stats(tiny_vae, {"std": 0.5, "channel_mean": [0] * 4, "channel_std": [1] * 4}, "global")
    tiny_vae.save_pretrained(tmp_path / "vae")
    loaded = AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    assert math.isclose(loaded.config.scaling_factor, 2.0)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    assert torch.equal(reconstruct(loaded, x), reconstruct(tiny_vae, x))


def test_codec_identity_follows_weights_not_location(tiny_vae, tmp_path):
    from codec.network.model import codec_identity

    tiny_vae.save_pretrained(tmp_path / "a")
    a = AutoencoderKL.from_pretrained(tmp_path / "a")
    (tmp_path / "a").rename(tmp_path / "b")
    b = AutoencoderKL.from_pretrained(tmp_path / "b")
    assert codec_identity(a) == codec_identity(b) == codec_identity(tiny_vae)
    with torch.no_grad():
        b.decoder.conv_out.bias.add_(1e-3)
    assert codec_identity(b) != codec_identity(a)
