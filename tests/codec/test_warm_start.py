import pytest
import torch
import torch.nn.functional as F

from codec.config import ModelConfig
from codec.model import build_autoencoder, encode_posterior, reconstruct
from codec.warm_start import normalisable_layout, thumbnail_init

SHAPES = [
    ModelConfig(block_out_channels=[32, 64, 128, 128], layers_per_block=1, norm_num_groups=8),
    ModelConfig(block_out_channels=[8, 8, 16, 16], layers_per_block=1, norm_num_groups=1, mid_block_add_attention=False),
    ModelConfig(block_out_channels=[16, 32, 32, 32], layers_per_block=2, norm_num_groups=4),
]


@pytest.mark.parametrize("cfg", SHAPES, ids=["small-g8", "tiny-g1", "two-blocks"])
def test_thumbnail_init_encodes_the_box_thumbnail_and_decodes_it(cfg):
    torch.manual_seed(0)
    vae = thumbnail_init(build_autoencoder(cfg)).eval()
    x = torch.rand(2, 3, 64, 96) * 2 - 1
    with torch.no_grad():
        q = encode_posterior(vae, x)
        # The posterior mean's first three channels are the 8x box average; σ is tiny.
        torch.testing.assert_close(q.mean[:, :3], F.avg_pool2d(x, 8), atol=1e-4, rtol=0)
        assert q.std.max() < 1e-2
        # The decoder upsamples them (nearest) whatever the free fourth channel holds.
        out = vae.decode(q.mean).sample
    torch.testing.assert_close(out, F.interpolate(F.avg_pool2d(x, 8), scale_factor=8, mode="nearest"), atol=1e-4, rtol=0)
    torch.testing.assert_close(reconstruct(vae, x), out)


def test_thumbnail_init_leaves_everything_trainable():
    torch.manual_seed(0)
    vae = thumbnail_init(build_autoencoder(SHAPES[1]))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    loss = (vae(x).sample - x).abs().mean()
    loss.backward()
    # Zeroed residual outputs still receive gradient, so the residual branches start learning at step 1.
    last = vae.decoder.up_blocks[-1].resnets[-1].conv2
    assert last.weight.grad.abs().sum() > 0


def test_layout_needs_four_channels_per_group():
    assert normalisable_layout(32, 32, 10.0) is None  # GroupNorm(32, 32) normalises each channel alone
    layout = normalisable_layout(32, 8, 10.0)
    assert len(layout.plus) == 3 and all(abs(layout.anchors[c]) == 10.0 for c in layout.anchors)
    with pytest.raises(ValueError, match="norm_num_groups"):
        thumbnail_init(build_autoencoder(ModelConfig(block_out_channels=[32, 64, 128, 128], layers_per_block=1)))
