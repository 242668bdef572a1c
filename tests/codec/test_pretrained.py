"""Starting the codec trainer from a codec the user has (model.init: pretrained), training only half of it
(train.trainable), the presets that do both, and the refusals of bad parents."""

import json
import subprocess
import sys

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file

import codec.training.train as train_module
from codec.common.config import ConfigError
from codec.exchange.pretrained import load_parent
from codec.network.model import (
    ENCODER_PREFIXES,
    build_autoencoder,
    codec_identity,
    compression_ratio,
    encode_posterior,
    encoder_identity,
)
from codec.training.config import load_codec_config
from codec.training.train import train_codec
from tests.conftest import CONFIGS, ROOT, TWO_PROCESSES, killed_after_a_checkpoint, launch_env, reset_accelerate

TINY = ("model.block_out_channels=[8,8,16,16]", "model.layers_per_block=1", "model.norm_num_groups=4",
        "model.mid_block_add_attention=false")


def make_parent(path, latent_channels=4, seed=0, scaling_factor=0.5):
    """A tiny AutoencoderKL saved as a diffusers folder, with a scale of its own (not the 1.0 placeholder)."""
    cfg = load_codec_config(None, [*TINY, f"model.latent_channels={latent_channels}"]).model
    torch.manual_seed(seed)
    vae = build_autoencoder(cfg)
    vae.register_to_config(scaling_factor=scaling_factor)
    vae.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture
def parent(tmp_path):
    return make_parent(tmp_path / "parent")


def _pretrained(tiny_config, parent, *overrides):
    """The tiny preset started from `parent`: its model keys agree with the parent's, so they pass the check."""
    return tiny_config("model.init=pretrained", f"model.pretrained={parent}", *overrides)


def _latents(vae, images):
    with torch.no_grad():
        return encode_posterior(vae.eval(), images).mean, encode_posterior(vae, images).logvar


def _val_images(n=2):
    torch.manual_seed(7)
    return torch.rand(n, 3, 64, 64) * 2 - 1


# ---- configuration ------------------------------------------------------------------------------------------


def test_architecture_keys_default_to_kl_f8_for_a_new_network_and_to_null_for_a_pretrained_one():
    new = load_codec_config(None).model
    assert new.architecture() == {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
                                  "latent_channels": 4, "norm_num_groups": 32, "mid_block_add_attention": True,
                                  "sample_size": 512}
    started = load_codec_config(None, ["model.init=pretrained", "model.pretrained=some/codec"]).model
    assert set(started.architecture().values()) == {None}  # read from the checkpoint later


@pytest.mark.parametrize("overrides, message", [
    (["model.pretrained=a/codec"], "model.pretrained is set .* but model.init is 'random'"),
    (["train.trainable=decoder"], "train.trainable: decoder freezes half of a randomly initialised codec"),
    (["train.latent_norm=keep"], "train.latent_norm: keep keeps a parent's scale"),
    (["train.trainable=middle"], "train.trainable: 'middle' is not one of all, decoder, encoder"),
    (["model.init=pretrained", "model.pretrained=x", "train.trainable=encoder", "loss.gan_weight=0.5"],
     "loss.gan_weight must be 0"),
])
def test_contradictory_choices_are_refused_when_the_config_loads(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_codec_config(None, overrides)


def test_finetune_decoder_preset_is_the_sd_vae_ft_mse_recipe():
    cfg = load_codec_config(CONFIGS / "codec" / "finetune-decoder.yaml")
    assert (cfg.model.init, cfg.model.pretrained, cfg.train.trainable) == ("pretrained", None, "decoder")
    assert (cfg.loss.pixel, cfg.loss.perceptual, cfg.loss.perceptual_weight) == ("mse", "lpips", 0.1)
    assert cfg.loss.if_lpips_missing == "ms_ssim" and cfg.loss.sample_posterior
    assert cfg.train.ema_decay and cfg.optim.lr == pytest.approx(1e-5)
    assert cfg.latent_norm() == "keep"


def test_f8c16_preset_is_sd3_shaped_and_12x():
    cfg = load_codec_config(CONFIGS / "codec" / "f8c16.yaml")
    assert cfg.model.architecture() == {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
                                        "latent_channels": 16, "norm_num_groups": 32,
                                        "mid_block_add_attention": True, "sample_size": 512}
    small = load_codec_config(CONFIGS / "codec" / "f8c16.yaml", TINY).model  # same shape, tiny widths
    vae = build_autoencoder(small)
    # 512*512*3 = 786,432 numbers -> 16*64*64 = 65,536: 12x (4x64x64 would be 48x).
    assert compression_ratio(vae, 512, 512) == 12.0


def test_encoder_identity_follows_the_encoder_half_only(tmp_path):
    vae = AutoencoderKL.from_pretrained(make_parent(tmp_path / "a"))
    first = encoder_identity(vae)
    with torch.no_grad():
        vae.decoder.conv_in.bias.add_(1.0)
        vae.post_quant_conv.bias.add_(1.0)
    vae.register_to_config(scaling_factor=0.25, latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    assert encoder_identity(vae) == first  # decoder weights and latent scale are not part of it
    with torch.no_grad():
        vae.quant_conv.bias.add_(1e-3)
    assert encoder_identity(vae) != first
    assert encoder_identity(vae) != codec_identity(vae)


# ---- the parent: loading, resolving, refusing -------------------------------------------------------------


def test_the_architecture_comes_from_the_parent(tmp_path):
    path = make_parent(tmp_path / "c16", latent_channels=16)
    resolved = load_parent(load_codec_config(None, ["model.init=pretrained", f"model.pretrained={path}"]).model)
    assert resolved.model.architecture() == {"block_out_channels": [8, 8, 16, 16], "layers_per_block": 1,
                                             "latent_channels": 16, "norm_num_groups": 4,
                                             "mid_block_add_attention": False, "sample_size": 512}
    assert resolved.record["codec_identity"] == codec_identity(AutoencoderKL.from_pretrained(path))
    assert resolved.record["scaling_factor"] == 0.5
    # A key the user set that agrees passes; one that contradicts is named with both values.
    agrees = load_codec_config(None, ["model.init=pretrained", f"model.pretrained={path}", "model.latent_channels=16"])
    assert load_parent(agrees.model).model.latent_channels == 16
    contradicts = load_codec_config(None, ["model.init=pretrained", f"model.pretrained={path}",
                                           "model.latent_channels=4"])
    with pytest.raises(ConfigError, match=r"model.latent_channels: the config says 4 but the pretrained codec .*c16 "
                                          r"has 16"):
        load_parent(contradicts.model)


def _bad_parents(tmp_path, parent):
    """(path, what the refusal must say) for each kind of bad parent."""
    cases = []
    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    cases.append((unet, "describes a UNet2DConditionModel, not an AutoencoderKL"))
    pipeline = tmp_path / "pipeline"
    (pipeline / "vae").mkdir(parents=True)
    (pipeline / "vae" / "config.json").write_text("{}")
    cases.append((pipeline, r"no config.json\); it looks like a pipeline folder: pass .*pipeline/vae"))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((parent / "config.json").read_text())
    torch.save({"w": torch.zeros(1)}, pickled / "diffusion_pytorch_model.bin")
    cases.append((pickled, "diffusion_pytorch_model.bin is a pickle checkpoint"))
    ckpt = tmp_path / "vae.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    cases.append((ckpt, "vae.ckpt is a pickle checkpoint, which can run code when loaded"))
    tensors = load_file(parent / "diffusion_pytorch_model.safetensors")
    for name, edit, says in (("missing", lambda t: t.pop("decoder.conv_out.bias"), "1 missing keys"),
                             ("extra", lambda t: t.update({"loss.logvar": torch.zeros(())}), "1 unexpected keys")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text((parent / "config.json").read_text())
        edited = dict(tensors)
        edit(edited)
        save_file(edited, folder / "diffusion_pytorch_model.safetensors")
        cases.append((folder, says))
    reshaped = tmp_path / "reshaped"
    reshaped.mkdir()
    config = json.loads((parent / "config.json").read_text())
    (reshaped / "config.json").write_text(json.dumps(dict(config, latent_channels=16)))
    save_file(tensors, reshaped / "diffusion_pytorch_model.safetensors")
    cases.append((reshaped, r"decoder.conv_in.weight has shape \[16, 4, 3, 3\] in the file, config.json needs "
                            r"\[16, 16, 3, 3\]"))
    cases.append((tmp_path / "nowhere", "no such file or folder"))
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    cases.append((text, "expected a diffusers AutoencoderKL folder or an LDM-format .safetensors VAE file"))
    return cases


def test_an_ldm_single_file_parent_is_the_same_codec_as_its_folder(parent, tmp_path):
    from codec.exchange.ldm_format import save_ldm_vae, to_ldm_state_dict

    folder_vae = AutoencoderKL.from_pretrained(parent)
    file = save_ldm_vae(folder_vae, tmp_path / "parent.safetensors")
    started = load_parent(load_codec_config(None, ["model.init=pretrained", f"model.pretrained={file}"]).model)
    assert started.record["format"] == "LDM single file"
    from_folder = load_parent(load_codec_config(None, ["model.init=pretrained", f"model.pretrained={parent}"]).model)
    # sample_size (a tiling hint, not a weight shape) is not in the LDM format; everything else is read off it.
    assert ({**started.model.architecture(), "sample_size": None}
            == {**from_folder.model.architecture(), "sample_size": None})
    assert started.record["encoder_identity"] == encoder_identity(folder_vae)
    images = _val_images()
    assert torch.equal(_latents(started.vae, images)[0], _latents(folder_vae, images)[0])
    # The same file with a key no VAE has is refused in one line naming the file.
    extra = tmp_path / "extra.safetensors"
    save_file({**to_ldm_state_dict(folder_vae), "model_ema.decay": torch.zeros(())}, extra,
              metadata={"format": "pt", "norm_num_groups": "4"})
    with pytest.raises(ConfigError, match=r"model.pretrained .*extra.safetensors: .*unexpected") as caught:
        load_parent(load_codec_config(None, ["model.init=pretrained", f"model.pretrained={extra}"]).model)
    assert "\n" not in str(caught.value)


def test_bad_parents_are_refused_in_one_line_naming_the_file_before_anything_is_written(
        tiny_config, parent, tmp_path, fresh_accelerate_state):
    for path, says in _bad_parents(tmp_path, parent):
        cfg = _pretrained(tiny_config, path, f"train.output_dir={tmp_path / 'out'}")
        with pytest.raises(ConfigError, match=says) as caught:
            train_codec(cfg)
        message = str(caught.value)
        assert "\n" not in message and str(path) in message, message
        assert not (tmp_path / "out").exists(), f"{path}: the run folder was created before the refusal"


def test_cli_refuses_a_pickle_parent_with_exit_2_and_one_line(tmp_path):
    ckpt = tmp_path / "vae.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "latent_codec", "codec", "train", "--config",
                           "configs/codec/finetune-decoder.yaml",
                           "--pretrained", str(ckpt), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("latent-codec codec train: error: model.pretrained "), proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "vae.ckpt is a pickle checkpoint" in proc.stderr and not out.exists()


# ---- training half of a codec -------------------------------------------------------------------------------


def test_decoder_only_fine_tune_keeps_the_encoder_bit_identical(tiny_config, parent, fresh_accelerate_state):
    cfg = _pretrained(tiny_config, parent, "train.trainable=decoder", "train.max_steps=6", "optim.lr=1e-3",
                      "optim.warmup_steps=1", "train.checkpoint_every=6")
    result = train_codec(cfg)

    before, after = AutoencoderKL.from_pretrained(parent), AutoencoderKL.from_pretrained(result.final)
    old, new = before.state_dict(), after.state_dict()
    encoder_keys = [k for k in old if k.startswith(ENCODER_PREFIXES)]
    assert encoder_keys and all(torch.equal(old[k], new[k]) for k in encoder_keys)
    moved = [k for k in old if not k.startswith(ENCODER_PREFIXES) and not torch.equal(old[k], new[k])]
    assert len(moved) > 10  # the decoder did train (lr 1e-3 over 6 steps)
    # The child's latents are the parent's, bit for bit; its reconstructions are not.
    images = _val_images()
    for a, b in zip(_latents(before, images), _latents(after, images)):
        assert torch.equal(a, b)
    assert encoder_identity(after) == encoder_identity(before) and codec_identity(after) != codec_identity(before)
    # latent_norm auto keeps the parent's scale: U-Nets made for the parent read the child's latents alike.
    assert after.config.scaling_factor == 0.5
    info = json.loads((result.final / "codec_training.json").read_text())
    assert info["latent_norm"] == "keep" and info["trainable"] == "decoder"
    assert info["parent"]["codec_identity"] == codec_identity(before)
    assert info["encoder_identity"] == info["parent"]["encoder_identity"] == encoder_identity(before)
    # The optimizer held only the decoder half: decoder + post_quant_conv (no learned logvar in the tiny preset).
    decoder_parameters = sum(p.numel() for n, p in before.named_parameters() if not n.startswith(ENCODER_PREFIXES))
    assert info["trainable_parameters"] == decoder_parameters
    # The checkpoint records the architecture read from the parent, with the parent and the trainable half.
    state = json.loads((result.final.parent / "checkpoints" / "step_00000006" / "trainer_state.json").read_text())
    assert state["model"]["block_out_channels"] == [8, 8, 16, 16]
    assert state["model"]["parent_codec_identity"] == codec_identity(before)
    assert state["model"]["trainable"] == "decoder"


def test_encoder_only_fine_tune_keeps_the_decoder_bit_identical(tiny_config, parent, fresh_accelerate_state):
    cfg = _pretrained(tiny_config, parent, "train.trainable=encoder", "train.max_steps=3", "optim.lr=1e-3",
                      "optim.warmup_steps=1")
    result = train_codec(cfg)
    old = AutoencoderKL.from_pretrained(parent).state_dict()
    new = AutoencoderKL.from_pretrained(result.final).state_dict()
    assert all(torch.equal(old[k], new[k]) for k in old if not k.startswith(ENCODER_PREFIXES))
    assert any(not torch.equal(old[k], new[k]) for k in old if k.startswith(ENCODER_PREFIXES))


def test_full_fine_tune_of_a_16_channel_parent_re_measures_the_scale_when_asked(tiny_config, tmp_path,
                                                                                fresh_accelerate_state):
    path = make_parent(tmp_path / "c16", latent_channels=16)
    cfg = _pretrained(tiny_config, path, "model.latent_channels=16", "train.max_steps=2", "train.latent_norm=global")
    result = train_codec(cfg)
    child = AutoencoderKL.from_pretrained(result.final)
    info = json.loads((result.final / "codec_training.json").read_text())
    assert child.config.latent_channels == 16 and info["compression_ratio_512"] == 12.0
    assert child.config.scaling_factor == pytest.approx(1 / info["latent_statistics"]["std"])
    assert child.config.scaling_factor != 0.5
    assert encoder_identity(child) != info["parent"]["encoder_identity"]  # the encoder trained too


def test_a_pretrained_start_resumes_to_the_weights_of_a_straight_run(tiny_config, parent, tmp_path, monkeypatch,
                                                                      fresh_accelerate_state):
    common = ("train.trainable=decoder", "train.max_steps=4", "train.checkpoint_every=2", "optim.warmup_steps=1")
    straight = train_codec(_pretrained(tiny_config, parent, *common, f"train.output_dir={tmp_path / 'straight'}"))
    reset_accelerate()
    interrupted = _pretrained(tiny_config, parent, *common, f"train.output_dir={tmp_path / 'resumed'}")
    with killed_after_a_checkpoint(monkeypatch, train_module):
        train_codec(interrupted)
    resumed = train_codec(interrupted, resume="latest")
    a = load_file(straight.final / "diffusion_pytorch_model.safetensors")
    b = load_file(resumed.final / "diffusion_pytorch_model.safetensors")
    assert resumed.step == 4 and all(torch.equal(a[k], b[k]) for k in a)
    # Another parent of the same architecture is refused: the export would name the wrong one.
    reset_accelerate()
    other = make_parent(tmp_path / "other", seed=1)
    with pytest.raises(ConfigError, match="parent_codec_identity"):
        train_codec(_pretrained(tiny_config, other, *common, f"train.output_dir={tmp_path / 'resumed'}"),
                    resume="latest")


def test_decoder_only_with_two_ddp_processes_keeps_the_encoder(parent, bundled_dir, tmp_path):
    """DDP registers gradient hooks for the parameters that require grad when it wraps the model: the frozen
    encoder must already be frozen then (else DDP waits for gradients that never come, or averages zeros)."""
    env = launch_env()
    out = tmp_path / "two"
    proc = subprocess.run([*TWO_PROCESSES, "-m", "latent_codec", "codec", "train", "--config",
                           str(CONFIGS / "codec" / "tiny.yaml"),
                           "--pretrained", str(parent), "--max-steps", "3", "--out", str(out),
                           "--set", f"data.bundled_dir={bundled_dir}", "--set", "train.trainable=decoder",
                           "--set", "train.batch_size=2", "--set", "optim.lr=1e-3", "--set", "optim.warmup_steps=1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    old = AutoencoderKL.from_pretrained(parent).state_dict()
    new = AutoencoderKL.from_pretrained(out / "final").state_dict()
    assert all(torch.equal(old[k], new[k]) for k in old if k.startswith(ENCODER_PREFIXES))
    assert any(not torch.equal(old[k], new[k]) for k in old if k.startswith("decoder."))


@pytest.mark.parametrize("trainable", ["decoder", "all"])
def test_an_equivariance_fine_tune_of_a_pretrained_codec(tiny_config, parent, fresh_accelerate_state, trainable):
    # EQ-VAE's recipe is a fine-tune of a codec a user already has: the term must train from a pretrained start,
    # decoder-only (the encoder, so every shard, stays the parent's) or the whole codec.
    from codec.common.logs import read_history

    cfg = _pretrained(tiny_config, parent, f"train.trainable={trainable}", "train.max_steps=4", "optim.lr=1e-3",
                      "optim.warmup_steps=1", "train.log_every=1", "loss.equivariance_weight=1.0",
                      "loss.equivariance=both", "loss.equivariance_resample=bilinear")
    result = train_codec(cfg)
    terms = [h["loss/equivariance"] for h in read_history(result.final.parent) if "loss/equivariance" in h]
    assert len(terms) == 4 and all(t > 0 for t in terms)
    before, after = AutoencoderKL.from_pretrained(parent), AutoencoderKL.from_pretrained(result.final)
    assert (encoder_identity(after) == encoder_identity(before)) == (trainable == "decoder")
    assert codec_identity(after) != codec_identity(before)
