"""The single-file LDM-format VAE: written with the key names ComfyUI and AUTOMATIC1111 read, loaded back by diffusers'
own from_single_file and by ours, with the same outputs."""

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file

from codec.exchange.ldm_format import load_ldm_vae, save_ldm_vae, to_ldm_state_dict
from codec.network.model import build_autoencoder, write_latent_stats
from codec.training.config import ModelConfig


def _codec(latent_channels=4, attention=True, groups=4) -> AutoencoderKL:
    torch.manual_seed(latent_channels + attention)
    vae = build_autoencoder(ModelConfig(block_out_channels=[8, 16, 16], layers_per_block=1, norm_num_groups=groups,
                                        latent_channels=latent_channels, mid_block_add_attention=attention))
    with torch.no_grad():  # away from the initialisation, so a wrongly mapped key cannot go unnoticed
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return vae.eval()


def _outputs(vae, x):
    with torch.no_grad():
        return vae.decode(vae.encode(x).latent_dist.mode()).sample


@pytest.mark.parametrize("latent_channels,attention", [(4, True), (16, True), (4, False)])
def test_export_then_diffusers_from_single_file_gives_the_same_outputs(tmp_path, latent_channels, attention):
    vae = _codec(latent_channels, attention)
    vae.save_pretrained(tmp_path / "folder")
    path = save_ldm_vae(vae, tmp_path / "vae.safetensors")
    back = AutoencoderKL.from_single_file(str(path), config=str(tmp_path / "folder"), local_files_only=True)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(_outputs(back, x), _outputs(vae, x))
    ours = load_ldm_vae(path)  # the architecture read off the file alone
    assert torch.equal(_outputs(ours, x), _outputs(vae, x))
    assert list(ours.config.block_out_channels) == list(vae.config.block_out_channels)
    assert ours.config.latent_channels == latent_channels and ours.config.mid_block_add_attention == attention


def test_the_file_uses_ldm_key_names_and_1x1_convolutions_for_attention(tmp_path):
    vae = _codec()
    tensors = load_file(save_ldm_vae(vae, tmp_path / "vae.safetensors", dtype=torch.float16))
    levels = len(vae.config.block_out_channels)
    # LDM numbers decoder levels from the bottom: diffusers' first up block is LDM's last level.
    assert torch.equal(tensors[f"decoder.up.{levels - 1}.block.0.conv1.weight"],
                       vae.decoder.up_blocks[0].resnets[0].conv1.weight.half())
    assert tensors["encoder.mid.attn_1.q.weight"].shape == (16, 16, 1, 1)
    assert {"encoder.norm_out.weight", "decoder.mid.block_2.conv2.bias", "encoder.down.0.downsample.conv.weight",
            "encoder.down.1.block.0.nin_shortcut.weight"} <= set(tensors)
    assert not any("down_blocks" in k or "mid_block" in k or "to_q" in k for k in tensors)
    assert all(t.dtype == torch.float16 for t in tensors.values())
    assert len(tensors) == len(to_ldm_state_dict(vae))


def test_latent_normalisation_and_group_count_travel_in_the_metadata(tmp_path):
    vae = _codec(16)
    write_latent_stats(vae, {"channel_mean": [0.1] * 16, "channel_std": [2.0] * 16, "std": 2.0}, "per_channel")
    back = load_ldm_vae(save_ldm_vae(vae, tmp_path / "vae.safetensors"))
    assert back.config.norm_num_groups == 4 and back.config.latents_mean == [0.1] * 16
    assert back.config.latents_std == [2.0] * 16 and back.config.scaling_factor == 1.0


def test_a_full_checkpoint_holding_the_vae_under_first_stage_model_loads(tmp_path):
    vae = _codec(groups=8)
    tensors = {f"first_stage_model.{k}": v for k, v in to_ldm_state_dict(vae).items()}
    tensors["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(4, 4, 3, 3)  # the U-Net, ignored
    save_file(tensors, str(tmp_path / "sd.safetensors"))  # no metadata: SD's 32 groups is assumed
    with pytest.raises(ValueError, match="sd.safetensors: .* so 32 was assumed"):
        load_ldm_vae(tmp_path / "sd.safetensors")  # widths of 8 and 16 cannot be split into 32 groups
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    vae.save_pretrained(tmp_path / "folder")
    assert torch.equal(_outputs(load_ldm_vae(tmp_path / "sd.safetensors", tmp_path / "folder"), x), _outputs(vae, x))
    assert (load_ldm_vae(tmp_path / "sd.safetensors", tmp_path / "folder").config.scaling_factor
            == vae.config.scaling_factor)


def test_bad_files_are_refused_in_one_line_naming_the_file(tmp_path):
    vae = _codec()
    tensors = to_ldm_state_dict(vae)
    (tmp_path / "vae.ckpt").write_bytes(b"pickle")
    cases = {"vae.ckpt": "pickle"}
    missing = dict(tensors)
    del missing["decoder.mid.block_1.conv1.weight"]
    save_file(missing, str(tmp_path / "missing.safetensors"), metadata={"norm_num_groups": "4"})
    cases["missing.safetensors"] = "1 missing and 0 unexpected keys"
    save_file({**tensors, "decoder.extra.weight": torch.zeros(1)}, str(tmp_path / "extra.safetensors"),
              metadata={"norm_num_groups": "4"})
    cases["extra.safetensors"] = "0 missing and 1 unexpected keys"
    save_file({"weight": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    cases["other.safetensors"] = "not an LDM VAE file"
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 20)
    cases["broken.safetensors"] = "not a readable safetensors file"
    for name, words in cases.items():
        with pytest.raises(ValueError) as info:
            load_ldm_vae(tmp_path / name)
        message = str(info.value)
        assert name in message and words in message and "\n" not in message, message
    with pytest.raises(ValueError, match="written as .safetensors"):
        save_ldm_vae(vae, tmp_path / "out.ckpt")


def test_export_command_writes_both_forms_and_checks_the_round_trip(tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT

    vae = _codec(16)
    vae.save_pretrained(tmp_path / "codec")
    proc = subprocess.run([sys.executable, "-m", "latent_codec", "codec", "export", "--codec", str(tmp_path / "codec"),
                           "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "latent channels 16" in proc.stdout
    # Widths 8-16-16: not SD's network, so the two tools that build it are named, and only diffusers is promised.
    assert "loads in: diffusers\n" in proc.stdout
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "ComfyUI and AUTOMATIC1111 build SD's fixed network" in warnings[0], proc.stderr
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    folder = AutoencoderKL.from_pretrained(tmp_path / "out" / "diffusers")
    assert torch.equal(_outputs(folder, x), _outputs(vae, x))
    single = AutoencoderKL.from_single_file(str(tmp_path / "out" / "vae.safetensors"),
                                            config=str(tmp_path / "out" / "diffusers"), local_files_only=True)
    difference = (_outputs(single.float(), x) - _outputs(vae, x)).abs().max().item()
    assert 0 < difference < 0.02  # fp16 weights: measured 4e-3

    bad = subprocess.run([sys.executable, "-m", "latent_codec", "codec", "export", "--codec", str(tmp_path / "nothing"),
                          "--out", str(tmp_path / "out2")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("latent-codec codec export: error: ")
    assert bad.stderr.count("\n") == 1
    assert not (tmp_path / "out2").exists()


def _preset_on_meta(name: str) -> AutoencoderKL:
    from codec.training.config import load_codec_config

    with torch.device("meta"):  # the architecture only: kl-f8's 84 MB of weights are not needed to read its keys
        return build_autoencoder(load_codec_config(f"configs/codec/{name}.yaml").model)


@pytest.mark.parametrize("preset,loaders", [
    ("kl-f8", ["diffusers", "ComfyUI", "AUTOMATIC1111"]),
    # 16 latent channels: SD3/Flux-shaped, which AUTOMATIC1111's SD configs are not
    ("f8c16", ["diffusers", "ComfyUI"]),
    ("small", ["diffusers"]), ("tiny", ["diffusers"]), ("compress-f4", ["diffusers"]),
])
def test_the_export_names_the_tools_that_load_each_preset(preset, loaders):
    from codec.exchange.ldm_format import tools_that_load

    have, because = tools_that_load(to_ldm_state_dict(_preset_on_meta(preset)))
    assert have == loaders
    if "ComfyUI" not in loaders:
        assert ("ComfyUI and AUTOMATIC1111" in because and "128-256-512-512" in because
                and "keys differ, e.g. " in because and "SD's network has" in because)
    elif "AUTOMATIC1111" not in loaders:
        assert because.startswith("AUTOMATIC1111") and "16 latent channels" in because
    else:
        assert because is None


def test_sd_fixed_network_loads_an_sd_shaped_file_and_refuses_the_small_preset():
    """The check against the network ComfyUI builds agrees with a real load into that network: an SD-shaped codec
    (kl-f8's architecture, random weights) loads and decodes exactly; the small preset's weights hit a size mismatch
    even with strict=False, as they do in ComfyUI."""
    from codec.exchange.ldm_format import sd_fixed_network_config, sd_fixed_network_mismatches
    from codec.training.config import load_codec_config

    torch.manual_seed(0)
    sd_shaped = build_autoencoder(load_codec_config("configs/codec/kl-f8.yaml").model).eval()
    tensors = to_ldm_state_dict(sd_shaped)
    assert sd_fixed_network_mismatches(tensors) == []
    fixed = AutoencoderKL(**sd_fixed_network_config(tensors))
    names = {k: v for k, v in zip(to_ldm_state_dict(fixed), fixed.state_dict())}
    fixed.load_state_dict({names[k]: (v[:, :, 0, 0] if ".attn_1." in k and v.ndim == 4 else v)
                           for k, v in tensors.items()}, strict=True)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert torch.equal(_outputs(fixed.eval(), x), _outputs(sd_shaped, x))

    small = to_ldm_state_dict(build_autoencoder(load_codec_config("configs/codec/small.yaml").model))
    problems = sd_fixed_network_mismatches(small)
    assert problems[0] == "decoder.conv_in.bias is (128,), SD's network has (512,)"
    fixed = AutoencoderKL(**sd_fixed_network_config(small))
    names = dict(zip(to_ldm_state_dict(fixed), fixed.state_dict()))
    with pytest.raises(RuntimeError, match="size mismatch"):
        fixed.load_state_dict({names[k]: v for k, v in small.items() if k in names}, strict=False)
