"""The equivariance regulariser against closed forms on a linear box codec, and its wiring into training."""

import pytest
import torch
import torch.nn.functional as F

from codec.common.config import ConfigError
from codec.measurement.equivariance import Transform, draw_transform, transform_image, transform_latent
from codec.network.model import CodecForTraining, build_autoencoder
from codec.training.config import LossConfig, ModelConfig, load_codec_config
from codec.training.losses import CodecLoss, equivariance_loss, pixel_loss

TINY = ModelConfig(block_out_channels=[8, 8, 16, 16], layers_per_block=1, norm_num_groups=4,
                   mid_block_add_attention=False)
ONE = torch.zeros(())  # s = 0: the likelihood scale e^s is 1


def box_encode(x):  # the 8x box thumbnail: a linear codec's encoder
    return F.avg_pool2d(x, 8)


def box_decode(z):  # nearest upsampling back: its decoder
    return F.interpolate(z, scale_factor=8, mode="nearest")


def equivariance_of_box_codec(x, tau, resample="area"):
    z = box_encode(x)
    target = transform_image(x, tau, 8, tuple(z.shape[-2:]), resample)
    return equivariance_loss(target, box_decode(transform_latent(z, tau, resample)), ONE)


@pytest.mark.parametrize("turns", [1, 2, 3])
def test_a_box_codec_is_rotation_equivariant_so_the_term_is_its_plain_error(turns):
    # D(rot(E x)) = rot(D(E x)) and target rot(x): the term is exactly mean |x - D(E(x))|.
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    plain = pixel_loss(x, box_decode(box_encode(x))).mean()
    torch.testing.assert_close(equivariance_of_box_codec(x, Transform(quarter_turns=turns)), plain)


def test_a_box_codec_under_area_downscale_reconstructs_the_downscaled_image():
    # τ = ½: avgpool2(avgpool8 x) = avgpool8(avgpool2 x), so the term is the codec's own error on x' = avgpool2(x).
    x = torch.rand(2, 3, 64, 48) * 2 - 1
    small = F.avg_pool2d(x, 2)
    expected = pixel_loss(small, box_decode(box_encode(small))).mean()
    torch.testing.assert_close(equivariance_of_box_codec(x, Transform(scale=0.5)), expected)
    # An image constant on 16x16 blocks survives both paths exactly: the term is 0.
    blocks = F.interpolate(torch.rand(1, 3, 4, 3) * 2 - 1, scale_factor=16, mode="nearest")
    assert equivariance_of_box_codec(blocks, Transform(scale=0.5)).item() == pytest.approx(0.0, abs=1e-6)


def test_a_quarter_downscale_is_anti_aliased_by_area_and_aliased_by_bilinear():
    # At ½ bilinear and area agree (both the mean of 2x2 pixels); at ¼ area is still the mean of each 4x4 block,
    # while bilinear without anti-aliasing reads only the 2x2 in its middle (source x = 4i + 1.5).
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    quarter = Transform(scale=0.25)
    blocks = x.reshape(2, 3, 16, 4, 16, 4)
    area = transform_image(x, quarter, 8, (8, 8), "area")
    torch.testing.assert_close(area, blocks.mean(dim=(3, 5)))
    middles = blocks[:, :, :, 1:3, :, 1:3].mean(dim=(3, 5))
    torch.testing.assert_close(transform_image(x, quarter, 8, (8, 8), "bilinear"), middles)
    torch.testing.assert_close(transform_latent(box_encode(x), quarter), F.avg_pool2d(box_encode(x), 4))
    # So for the box codec the ¼ term is again its own error on the anti-aliased small image.
    expected = pixel_loss(area, box_decode(box_encode(area))).mean()
    torch.testing.assert_close(equivariance_of_box_codec(x, quarter), expected)
    # Columns +1, -1, -1, +1 repeated: every 4x4 block averages to 0, and its middle columns to -1.
    stripes = torch.tensor([1.0, -1.0, -1.0, 1.0]).repeat(16).expand(1, 3, 64, 64)
    assert transform_image(stripes, quarter, 8, (8, 8), "area").abs().max().item() == pytest.approx(0.0, abs=1e-6)
    assert transform_image(stripes, quarter, 8, (8, 8), "bilinear").mean().item() == pytest.approx(-1.0)


def test_sizes_follow_the_latent_whatever_the_crop():
    # A 40x56 image has a 5x7 latent; ½ gives round(2.5)=2 x round(3.5)=4 latents and a 16x32 target.
    x, z = torch.rand(1, 3, 40, 56), torch.rand(1, 4, 5, 7)
    tau = Transform(scale=0.5, quarter_turns=1)
    assert transform_latent(z, tau).shape[-2:] == (4, 2)  # rotated
    assert transform_image(x, tau, 8, (5, 7)).shape[-2:] == (32, 16)


def test_the_likelihood_scale_divides_the_term_like_the_plain_reconstruction():
    target, transformed = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    base = equivariance_loss(target, transformed, ONE, pixel="mse")
    torch.testing.assert_close(equivariance_loss(target, transformed, torch.tensor(1.0), pixel="mse"), base / torch.e)
    torch.testing.assert_close(base, (target - transformed).pow(2).mean())


def test_the_transform_of_a_step_is_keyed_and_covers_the_configured_set():
    draws = [draw_transform("both", [0.5, 0.25], seed=3, step=s) for s in range(200)]
    assert draws == [draw_transform("both", [0.5, 0.25], seed=3, step=s) for s in range(200)]  # any process, any resume
    assert {d.scale for d in draws} == {0.5, 0.25} and {d.quarter_turns for d in draws} == {1, 2, 3}
    assert {draw_transform("scale", [0.5], 0, s).quarter_turns for s in range(50)} == {0}
    assert {draw_transform("rotate", [0.5], 0, s).scale for s in range(50)} == {1.0}
    assert draws != [draw_transform("both", [0.5, 0.25], seed=4, step=s) for s in range(200)]


def test_gradients_of_the_term_reach_encoder_and_decoder():
    torch.manual_seed(0)
    model = CodecForTraining(build_autoencoder(TINY))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    cfg = LossConfig(perceptual="none", equivariance_weight=1.0, equivariance="both")
    criterion = CodecLoss(cfg, None)
    recon, mean, logvar, transformed, target = model(x, torch.tensor([0, 1]), None, Transform(0.5, 1))
    assert transformed.shape == target.shape == (2, 3, 16, 16)
    with_term = criterion(x, recon, mean, logvar, model.logvar, 0, (transformed, target))
    without = criterion(x, recon, mean, logvar, model.logvar, 0)
    torch.testing.assert_close(with_term.total, without.total + with_term.equivariance)
    term = equivariance_loss(target, transformed, model.logvar)  # the logged value is detached: recompute it
    encoder_grad, decoder_grad = torch.autograd.grad(
        term, [model.vae.encoder.conv_in.weight, model.vae.decoder.conv_out.weight])
    assert encoder_grad.abs().sum() > 0 and decoder_grad.abs().sum() > 0


def test_a_decoder_only_fine_tune_trains_the_decoder_alone_with_the_term():
    model = CodecForTraining(build_autoencoder(TINY), frozen_encoder=True)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    *_, transformed, target = model(x, None, None, Transform(scale=0.5))
    term = equivariance_loss(target, transformed, model.logvar)
    term.backward()
    assert model.vae.encoder.conv_in.weight.grad is None
    assert model.vae.decoder.conv_out.weight.grad.abs().sum() > 0


def test_config_refuses_what_cannot_work():
    with pytest.raises(ConfigError, match="loss.equivariance"):
        LossConfig(equivariance="shear")
    with pytest.raises(ConfigError, match="equivariance_scales"):
        LossConfig(equivariance_scales=[2.0])
    with pytest.raises(ConfigError, match="ELBO"):
        LossConfig(equivariance_weight=1.0, nll="exact", perceptual="none")
    cfg = load_codec_config("configs/codec/tiny.yaml", ["loss.equivariance_weight=0.5", "loss.equivariance=rotate"])
    assert (cfg.loss.equivariance_weight, cfg.loss.equivariance) == (0.5, "rotate")


def test_training_with_the_term_logs_it_every_step(tmp_path, bundled_dir):
    from codec.common.logs import read_history
    from codec.training.train import train_codec

    cfg = load_codec_config("configs/codec/tiny.yaml", [
        f"train.output_dir={tmp_path / 'run'}", f"data.bundled_dir={bundled_dir}", "train.max_steps=6",
        "train.log_every=1", "loss.equivariance_weight=1.0", "loss.equivariance=both", "loss.perceptual=none"])
    result = train_codec(cfg)
    logs = [h for h in read_history(tmp_path / "run") if "loss/equivariance" in h]
    assert len(logs) == 6 and all(h["loss/equivariance"] > 0 for h in logs)
    assert (result.final / "config.json").is_file()
