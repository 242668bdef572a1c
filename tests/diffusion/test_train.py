import json
import shutil
import subprocess
import sys
from collections import Counter

import pytest
import torch
import yaml
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import Encoder
from safetensors.torch import load_file

import diffusion.train as train_module
from codec.common.config import ConfigError
from codec.exchange.pipeline import LatentDiffusionPipeline
from codec.network.text_encoder import CaptionEmbeddings
from codec.shards import LatentShards
from diffusion.config import load_unet_config
from diffusion.draws import TrainingDraws, eval_set
from diffusion.schedule import build_noise_scheduler
from diffusion.train import codec_for_shards, denoising_loss, train_unet
from tests.conftest import (
    CONFIGS,
    ROOT,
    TWO_PROCESSES,
    assert_same_safetensors,
    killed_after_a_checkpoint,
    launch_env,
    reset_accelerate,
)


def _config(tiny_shards, tiny_codec_dir, output_dir, *overrides):
    return load_unet_config(CONFIGS / "unet" / "tiny.yaml", [
        f"shards={tiny_shards}", f"codec={tiny_codec_dir}", f"train.output_dir={output_dir}", *overrides])


class EncoderCalled(AssertionError):
    pass


def test_training_lowers_the_denoising_loss_without_ever_running_the_encoder(
        tiny_shards, tiny_codec_dir, tmp_path, fresh_accelerate_state, monkeypatch):
    def refuse(*args, **kwargs):
        raise EncoderCalled("the U-Net trainer ran the codec's encoder; it must train from the shards alone")

    monkeypatch.setattr(AutoencoderKL, "encode", refuse)
    monkeypatch.setattr(Encoder, "forward", refuse)
    cfg = _config(tiny_shards, tiny_codec_dir, tmp_path / "run", "train.max_steps=80", "train.validate_every=80")

    result = train_unet(cfg)

    assert result.step == 80
    (first, before), (last, after) = result.history
    assert (first, last) == (0, 80)
    before, after = before["val/denoising_loss"], after["val/denoising_loss"]
    # Eval loss: epsilon MSE on 16 fixed (record, noise, timestep) triples, timesteps spread over 0..999, EMA
    # weights. Measured on this machine: 1.092 -> 0.265 after 80 steps (4.1x); we require 2x.
    assert after < before / 2, (before, after)

    # The export: the shards' scaling factor in the vae config, and the EMA weights that were evaluated.
    pipe = LatentDiffusionPipeline.from_pretrained(result.pipeline, use_safetensors=True)
    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    assert pipe.vae.config.scaling_factor == pytest.approx(manifest["scaling_factor"], rel=1e-9)
    assert pipe.tokenizer.model_max_length == cfg.text_encoder.max_length
    shards = LatentShards(tiny_shards)
    held = eval_set(shards, cfg.train.eval_items, 1000, cfg.train.seed)
    text = CaptionEmbeddings(pipe.tokenizer, pipe.text_encoder, cfg.text_encoder.max_length)(held.captions)
    reloaded = denoising_loss(pipe.unet, build_noise_scheduler(cfg.diffusion), held, text)
    assert reloaded == pytest.approx(after, rel=1e-5)
    info = json.loads((result.pipeline / "unet_training.json").read_text())
    assert info["steps"] == 80 and info["compression_ratio"] == 48.0
    assert (tmp_path / "run" / "samples" / "step_00000080.png").is_file()


def test_the_logged_loss_is_the_mean_over_every_step_since_the_last_log(
        tiny_shards, tiny_codec_dir, tmp_path, fresh_accelerate_state, monkeypatch):
    from codec.common.logs import read_history

    losses, real = [], train_module.training_loss

    def recorded(*args, **kwargs):
        loss = real(*args, **kwargs)
        losses.append(loss.item())
        return loss

    monkeypatch.setattr(train_module, "training_loss", recorded)
    cfg = _config(tiny_shards, tiny_codec_dir, tmp_path / "run", "train.max_steps=4", "train.log_every=2",
                  "train.validate_every=0")
    train_unet(cfg)
    rows = [row for row in read_history(tmp_path / "run") if "loss" in row]
    assert [row["step"] for row in rows] == [2, 4] and len(losses) == 4
    assert [row["loss"] for row in rows] == pytest.approx([sum(losses[:2]) / 2, sum(losses[2:]) / 2], rel=1e-6)
    assert abs(rows[0]["loss"] - losses[1]) > 1e-6  # not the last step's loss


def test_resume_latest_gives_the_same_weights_as_a_straight_run(tiny_shards, tiny_codec_dir, tmp_path,
                                                                 fresh_accelerate_state, monkeypatch):
    common = ("train.max_steps=6", "train.checkpoint_every=3", "optim.warmup_steps=2", "train.batch_size=4")
    straight = train_unet(_config(tiny_shards, tiny_codec_dir, tmp_path / "straight", *common))

    reset_accelerate()
    interrupted = _config(tiny_shards, tiny_codec_dir, tmp_path / "resumed", *common)
    with killed_after_a_checkpoint(monkeypatch, train_module):
        train_unet(interrupted)
    assert not (tmp_path / "resumed" / "pipeline").exists()
    resumed = train_unet(interrupted, resume="latest")

    assert resumed.step == straight.step == 6
    # Raw weights in the checkpoint, EMA weights in the exported U-Net: both bit for bit.
    assert_same_safetensors(tmp_path / "straight", tmp_path / "resumed",
                            ("checkpoints/step_00000006/model.safetensors",
                             "pipeline/unet/diffusion_pytorch_model.safetensors"))

    # Another head count keeps every parameter's shape: without the recorded architecture the checkpoint would
    # load silently into a different network.
    reset_accelerate()
    changed = _config(tiny_shards, tiny_codec_dir, tmp_path / "resumed", *common, "unet.attention_head_dim=[1,2]")
    with pytest.raises(ConfigError, match=r"attention_head_dim: 8 in the checkpoint, \[1, 2\] now"):
        train_unet(changed, resume="latest")


def test_a_resume_with_another_global_batch_reads_every_record_of_the_epoch_once(
        tiny_shards, tiny_codec_dir, tmp_path, fresh_accelerate_state, monkeypatch):
    """Killed after its checkpoint at step 2 with batch 2 (4 draws consumed), resumed with batch 4, as another
    process count would change the global batch: the resume starts at draw 4, where the checkpoint's loader position
    says, not at 2 steps x 4 = 8, so the tiny shards' 8 records are each read exactly once in the first epoch. The
    draws are counted where TrainingDraws reads them; the loader reads one batch ahead of the step that uses it."""
    read: list[tuple[int, str]] = []
    real_getitem = TrainingDraws.__getitem__

    def counted(self, draw):
        read.append((int(draw), self.shards[self.record(draw)]["id"]))
        return real_getitem(self, draw)

    monkeypatch.setattr(TrainingDraws, "__getitem__", counted)
    common = ("train.checkpoint_every=2", "optim.warmup_steps=1")
    with killed_after_a_checkpoint(monkeypatch, train_module):
        train_unet(_config(tiny_shards, tiny_codec_dir, tmp_path / "run", *common, "train.batch_size=2",
                           "train.max_steps=4"))
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000002"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["draws"] == 4
    before = [(d, record) for d, record in read if d < 4]
    shutil.copytree(tmp_path / "run", tmp_path / "old")
    read.clear()

    resumed = train_unet(_config(tiny_shards, tiny_codec_dir, tmp_path / "run", *common, "train.batch_size=4",
                                 "train.max_steps=3"), resume="latest")
    assert resumed.step == 3 and min(d for d, _ in read) == 4
    after = [(d, record) for d, record in read if d < 8]  # step 3's batch: draws 4..7
    assert sorted(d for d, _ in before + after) == list(range(8))
    every_id = {LatentShards(tiny_shards)[i]["id"] for i in range(8)}
    assert Counter(record for _, record in before + after) == Counter(every_id)

    # A checkpoint written before checkpoints kept the loader position resumes by the old rule, step x global
    # batch, and says so.
    state = tmp_path / "old" / "checkpoints" / "step_00000002" / "trainer_state.json"
    state.write_text(json.dumps({key: value for key, value in json.loads(state.read_text()).items() if key != "draws"}))
    reset_accelerate()
    read.clear()
    train_unet(_config(tiny_shards, tiny_codec_dir, tmp_path / "old", *common, "train.batch_size=4",
                       "train.max_steps=3"), resume="latest")
    assert min(d for d, _ in read) == 8
    assert "records no loader position" in (tmp_path / "old" / "train.log").read_text()


def test_a_draw_fixes_record_noise_timestep_and_dropout(tiny_shards, tiny_unet_config):
    shards = LatentShards(tiny_shards)
    window = tiny_unet_config.train.shuffle_chunks
    draws = TrainingDraws(shards, tiny_unet_config.diffusion, seed=0, shuffle_chunks=window)
    again = TrainingDraws(shards, tiny_unet_config.diffusion, seed=0, shuffle_chunks=window)
    for key in ("latents", "noise", "timestep", "drop_caption"):
        assert torch.equal(draws[13][key], again[13][key]), key  # no hidden state: any order, any process
    assert draws[13]["caption"] == again[13]["caption"]
    n = len(shards)
    assert sorted(draws.record(d) for d in range(n)) == list(range(n))  # each record once per epoch
    assert [draws.record(d) for d in range(n)] != [draws.record(d) for d in range(n, 2 * n)]  # reshuffled
    items = [draws[d] for d in range(400)]
    # 10% caption dropout: 40 expected of 400, standard deviation 6.
    dropped = sum(bool(i["drop_caption"]) for i in items)
    assert 20 <= dropped <= 60, dropped
    t = torch.stack([i["timestep"] for i in items])
    assert t.min() >= 0 and t.max() <= 999 and t.float().std() > 200  # uniform over 0..999 (std 289)
    # The posterior sample scattered around the (scaled) mean; the mean is what sample_posterior=false trains on.
    record = draws.record(0)
    assert not torch.equal(items[0]["latents"], shards.latents(record, sample=False))


def test_shards_of_another_codec_are_refused(tiny_shards, tmp_path):
    from codec.network.model import build_autoencoder
    from codec.training.config import load_codec_config

    torch.manual_seed(123)
    build_autoencoder(load_codec_config(CONFIGS / "codec" / "tiny.yaml").model).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="encoded by codec"):
        codec_for_shards(str(tmp_path / "other"), str(tiny_shards))


def _run(cmd, env=None, ok=True):
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_cli_help_and_config_errors(tmp_path):
    out = _run([sys.executable, "-m", "latent_codec", "unet", "train", "--help"]).stdout
    for flag in ("--config", "--shards", "--codec", "--out", "--max-steps", "--resume", "--set"):
        assert flag in out
    tiny = str(CONFIGS / "unet" / "tiny.yaml")
    bad = _run([sys.executable, "-m", "latent_codec", "unet", "train", "--config", tiny, "--shards", "s", "--codec",
                "c",
                "--set", "diffusion.snr_gama=5"], ok=False)
    assert bad.returncode == 2 and "diffusion.snr_gama" in bad.stderr
    missing = _run([sys.executable, "-m", "latent_codec", "unet", "train", "--config", tiny], ok=False)
    assert missing.returncode == 2 and "--shards" in missing.stderr


def test_two_cpu_processes_match_one_process_with_the_same_global_batch(tiny_shards, tiny_codec_dir, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2`, batch 2 per process, against one process with batch 4:
    the same draws (records, posterior samples, noise, timesteps, dropped captions), gradients averaged by DDP."""
    env = launch_env()
    common = ["--config", str(CONFIGS / "unet" / "tiny.yaml"), "--shards", str(tiny_shards), "--codec",
              str(tiny_codec_dir), "--max-steps", "5", "--set", "train.checkpoint_every=5"]
    _run([*TWO_PROCESSES, "-m", "latent_codec", "unet", "train", *common, "--out", str(tmp_path / "two"),
          "--set", "train.batch_size=2"], env)
    _run([sys.executable, "-m", "latent_codec", "unet", "train", *common, "--out", str(tmp_path / "one"),
          "--set", "train.batch_size=4"], env)

    two = yaml.safe_load((tmp_path / "two" / "run.yaml").read_text())
    assert two["processes"] == 2 and two["global_batch"] == 4
    for name in ("checkpoints/step_00000005/model.safetensors", "pipeline/unet/diffusion_pytorch_model.safetensors"):
        a, b = load_file(tmp_path / "one" / name), load_file(tmp_path / "two" / name)
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        # Only the order of floating-point sums differs (batch mean vs gloo all-reduce), which Adam's first steps
        # amplify for weights with tiny gradients. Measured: 1.2e-5 after 5 steps, while 1 process with batch 2
        # (half the global batch) differs from batch 4 by 5.5e-3.
        assert worst < 1e-4, (name, worst)

    # Resuming that run as a different network (same parameter shapes) is refused by the command, cleanly.
    changed = _run([sys.executable, "-m", "latent_codec", "unet", "train", *common, "--out", str(tmp_path / "one"),
                    "--resume", "latest", "--set", "unet.attention_head_dim=[1,2]"], env, ok=False)
    assert changed.returncode == 2 and "attention_head_dim: 8 in the checkpoint" in changed.stderr
    assert "Traceback" not in changed.stderr


def test_v_prediction_with_zero_terminal_snr_trains_and_every_sampler_stays_finite(
        tiny_shards, tiny_codec_dir, tmp_path, fresh_accelerate_state):
    cfg = _config(tiny_shards, tiny_codec_dir, tmp_path / "run", "train.max_steps=4", "train.validate_every=4",
                  "diffusion.prediction_type=v_prediction", "diffusion.rescale_betas_zero_snr=true",
                  "train.eval_timesteps=[999]", "train.eval_items=4")
    result = train_unet(cfg)
    assert all(torch.isfinite(torch.tensor(m["val/denoising_loss"])) for _, m in result.history)
    pipe = LatentDiffusionPipeline.from_pretrained(result.pipeline, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.prediction_type == "v_prediction" and pipe.scheduler.config.rescale_betas_zero_snr

    # The trainer's loss at t = 999, where SNR is 0: x_t is the noise itself and the v-target is -x0, so the
    # evaluated (EMA, exported) U-Net's loss there is its MSE to -x0 on the pure noise.
    held = eval_set(LatentShards(tiny_shards), 4, 1000, cfg.train.seed, timesteps=[999])
    text = CaptionEmbeddings(pipe.tokenizer, pipe.text_encoder, cfg.text_encoder.max_length)(held.captions)
    with torch.no_grad():
        v = pipe.unet(held.noise, held.timesteps, encoder_hidden_states=text).sample
    by_hand = (v + held.latents).pow(2).mean().item()
    assert result.history[-1][1]["val/denoising_loss_t999"] == pytest.approx(by_hand, rel=1e-5)
    # The samplers start from there: SNR 0 at their first step, and a v model's x0 estimate there is -v.
    ddim = pipe.scheduler
    assert ddim.alphas_cumprod[999].item() == 0.0
    ddim.set_timesteps(4)
    torch.testing.assert_close(ddim.step(v, 999, held.noise).pred_original_sample, -v)
    for sampler in ("ddim", "dpm", "euler"):
        pipe.use_sampler(sampler)
        out = pipe("a rocket on the launch pad", num_inference_steps=4, seed=0, output_type="pt")
        # The first step is t = 999, where SNR is exactly 0: pure noise in, -x0 out for a v model.
        assert pipe.scheduler.timesteps[0] == 999
        assert torch.isfinite(out.latents).all() and torch.isfinite(out.images).all(), sampler


@pytest.fixture(scope="module")
def held_out_shards(tiny_codec_dir, caption_images, tmp_path_factory):
    """Three of the captioned photos encoded on their own: their manifest's scale is not the training shards'."""
    from codec.shards.encode import encode_dataset

    out = tmp_path_factory.mktemp("held") / "shards"
    encode_dataset(tiny_codec_dir, caption_images, out, resolution=64, batch_size=4, num_workers=0, progress=False,
                   limit=3)
    reset_accelerate()
    return out


def test_an_eval_set_at_fixed_timesteps_takes_the_training_shards_scale(tiny_shards, held_out_shards):
    train, held = LatentShards(tiny_shards), LatentShards(held_out_shards)
    assert train.scaling_factor != pytest.approx(held.scaling_factor)
    data = eval_set(held, 2, 1000, seed=0, timesteps=[100, 500, 900], scale=train)
    assert data.timesteps.tolist() == [100, 100, 500, 500, 900, 900]
    torch.testing.assert_close(data.latents[0], held[0]["mean"] * train.scaling_factor)
    torch.testing.assert_close(data.latents[4], data.latents[0])  # the same record and noise at every t
    torch.testing.assert_close(data.noise[5], data.noise[1])
    assert data.captions[2:4] == data.captions[:2]


def test_validation_on_held_out_shards_reports_the_loss_at_each_timestep(
        tiny_shards, held_out_shards, tiny_codec_dir, tmp_path, fresh_accelerate_state):
    from codec.common.logs import read_history

    cfg = _config(tiny_shards, tiny_codec_dir, tmp_path / "run", "train.max_steps=4", "train.validate_every=2",
                  f"train.eval_shards={held_out_shards}", "train.eval_timesteps=[100,500,900]", "train.eval_items=3",
                  "train.validate_samples=false")
    train_unet(cfg)
    evals = [h for h in read_history(tmp_path / "run") if "val/denoising_loss" in h]
    assert [h["step"] for h in evals] == [0, 2, 4]
    for h in evals:  # three records at each of three timesteps: the overall loss is the mean of the three
        per_t = [h[f"val/denoising_loss_t{t}"] for t in (100, 500, 900)]
        assert h["val/denoising_loss"] == pytest.approx(sum(per_t) / 3, rel=1e-6)
    assert not (tmp_path / "run" / "samples").exists()
    with pytest.raises(ConfigError, match="eval_timesteps"):
        _config(tiny_shards, tiny_codec_dir, tmp_path / "x", "train.eval_timesteps=[1000]")
