import pytest
import torch
import torch.nn.functional as F

from codec.data import CenterCrops, bundled_photos, load_image_dataset
from codec.measurement.metrics import psnr, quantise
from codec.measurement.quality import thumbnail_baseline
from codec.network.linear_codec import LinearCodec, fit, fitted_path, initial
from codec.network.model import build_autoencoder, encode_posterior, reconstruct
from codec.network.warm_start import normalisable_layout, thumbnail_init
from codec.training.config import ModelConfig

SHAPES = [
    ModelConfig(block_out_channels=[32, 64, 128, 128], layers_per_block=1, norm_num_groups=8),
    ModelConfig(block_out_channels=[16, 16, 16, 16], layers_per_block=1, norm_num_groups=1,
                mid_block_add_attention=False),
    ModelConfig(block_out_channels=[16, 32, 32, 32], layers_per_block=2, norm_num_groups=2),
]


def _held_out(bundled_dir, size: int) -> torch.Tensor:
    _, val_dir = bundled_photos(bundled_dir)
    dataset, column = load_image_dataset(val_dir)
    return torch.stack([item["pixels"] for item in CenterCrops(dataset, column, size)])


@pytest.mark.parametrize("cfg", SHAPES, ids=["small-g8", "narrow-g1", "two-blocks"])
def test_thumbnail_init_computes_the_fitted_linear_codec(cfg):
    torch.manual_seed(0)
    linear = LinearCodec.load()
    vae = thumbnail_init(build_autoencoder(cfg), linear).eval()
    x = torch.rand(2, 3, 64, 96) * 2 - 1
    with torch.no_grad():
        q = encode_posterior(vae, x)
        # Channels 0-2 are the 8x box thumbnail; all four are the linear codec's latent; σ is tiny.
        torch.testing.assert_close(q.mean[:, :3], F.avg_pool2d(x, 8), atol=2e-3, rtol=0)
        torch.testing.assert_close(q.mean, linear.encode(x), atol=2e-3, rtol=0)
        assert q.std.max() < 1e-2
        out = vae.decode(q.mean).sample
    # The decoder is the linear upsampler, whatever the random free channels hold (pair-trick error < 1%).
    torch.testing.assert_close(out, linear.decode(q.mean), atol=2e-2, rtol=0)
    torch.testing.assert_close(reconstruct(vae, x), out)


def test_an_f4_codec_starts_as_the_shipped_f4_linear_codec():
    # configs/codec/compress-f4.yaml's shape: thumbnail_init picks the fit by the network's factor.
    cfg = ModelConfig(block_out_channels=[32, 64, 128], layers_per_block=1, norm_num_groups=8,
                      mid_block_add_attention=False)
    torch.manual_seed(0)
    vae = thumbnail_init(build_autoencoder(cfg)).eval()
    linear = LinearCodec.load(fitted_path(2))
    assert linear.levels == 2
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        q = encode_posterior(vae, x)
        torch.testing.assert_close(q.mean[:, :3], F.avg_pool2d(x, 4), atol=2e-3, rtol=0)
        torch.testing.assert_close(vae.decode(q.mean).sample, linear.decode(q.mean), atol=2e-2, rtol=0)
    # An f2 network has no shipped fit: refused with the file it looked for.
    f2 = ModelConfig(block_out_channels=[32, 32], layers_per_block=1, norm_num_groups=8, mid_block_add_attention=False)
    with pytest.raises(FileNotFoundError, match="linear_codec_f2c4.json"):
        thumbnail_init(build_autoencoder(f2))


def test_warm_start_begins_no_worse_than_the_thumbnail_baseline(bundled_dir):
    # Held-out photos (never in the fit), 128² centre crops, a narrow network: seconds.
    images = _held_out(bundled_dir, 128)
    torch.manual_seed(0)
    vae = thumbnail_init(build_autoencoder(SHAPES[1])).eval()
    with torch.no_grad():
        warm = psnr(quantise(reconstruct(vae, images)), quantise(images)).mean().item()
    thumb = psnr(quantise(thumbnail_baseline(images, 8)), quantise(images)).mean().item()
    # Measured: warm start 19.52 dB, thumbnail 17.78 dB (128² crops are harder than the 256² protocol).
    assert warm >= thumb + 0.5, (warm, thumb)


def test_the_fit_improves_on_its_starting_point():
    torch.manual_seed(0)
    # Smooth random images (a blurred noise field) so the linear codec has structure to find.
    x = F.interpolate(torch.rand(4, 3, 8, 8) * 2 - 1, size=64, mode="bicubic", align_corners=False).clamp(-1, 1)
    start = initial()
    fitted = fit(x, steps=60)
    before = F.mse_loss(start.decode(start.encode(x)), x).item()
    after = F.mse_loss(fitted.decode(fitted.encode(x)), x).item()
    assert after < 0.7 * before, (before, after)
    # The thumbnail channels are never changed by the fit.
    torch.testing.assert_close(fitted.encode(x)[:, :3], F.avg_pool2d(x, 8))


def test_thumbnail_init_leaves_everything_trainable():
    torch.manual_seed(0)
    vae = thumbnail_init(build_autoencoder(SHAPES[1]))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    loss = (vae(x).sample - x).abs().mean()
    loss.backward()
    # Zeroed residual outputs still receive gradient, so the residual branches start learning at step 1.
    last = vae.decoder.up_blocks[-1].resnets[-1].conv2
    assert last.weight.grad.abs().sum() > 0


def test_layout_needs_four_channels_per_group_and_the_fitted_shape():
    assert normalisable_layout(32, 32, 10.0, 4) is None  # GroupNorm(32, 32) normalises each channel alone
    layout = normalisable_layout(32, 8, 10.0, 4)
    assert len(layout.plus) == 4 and all(abs(layout.anchors[c]) == 10.0 for c in layout.anchors)
    with pytest.raises(ValueError, match="norm_num_groups"):
        thumbnail_init(build_autoencoder(ModelConfig(block_out_channels=[32, 64, 128, 128], layers_per_block=1)))
    with pytest.raises(ValueError, match="f8/c4"):  # 16 latent channels: no fit holds them
        thumbnail_init(build_autoencoder(ModelConfig(block_out_channels=[64, 64, 64, 64], layers_per_block=1,
                                                     norm_num_groups=1, latent_channels=16)))
