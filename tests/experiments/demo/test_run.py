"""The whole demo chain at toy size: every stage through its real command, a report at the end."""

import json

import torch
import yaml

from experiments.demo.run import load_demo_config, run_demo

PROMPTS = ["a red circle in the center on a black background", "a blue square at the top left on a navy background"]


def test_the_whole_chain_runs_at_toy_size_and_writes_the_report(tmp_path, bundled_dir):
    shapes = tmp_path / "shapes"
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({
        "codec_config": "configs/codec/beta-study.yaml", "heldout_count": 4, "prior_samples": 4,
        "shapes": str(tmp_path / "shapes-32"), "render": {"count": 12, "size": 32, "seed": 0},
        "overrides": ["train.max_steps=2", "train.batch_size=4", "data.val_count=2", "train.checkpoint_every=0",
                      "data.num_workers=0", "train.latent_stats_images=4", "model.block_out_channels=[8,8,16,16]",
                      "model.norm_num_groups=4"],
        "runs": [{"name": "beta=1e-6", "overrides": ["loss.kl_weight=1e-6"]},
                 {"name": "cvae beta=1", "overrides": ["model.global_latent=false", "model.condition=text",
                                                       "model.condition_channels=4"]}]}))
    config = {
        "output_dir": str(tmp_path / "demo"),
        "shapes": {"out": str(shapes), "count": 12, "seed": 0, "size": 64},
        "codec": {"config": "configs/codec/tiny.yaml", "overrides": [
            f"data.bundled_dir={bundled_dir}", f"data.extra_train=[{shapes}]", "data.extra_train_limit=4",
            "train.max_steps=2",
            "train.latent_stats_images=4", "data.crop_size=32", "data.resize=64"]},
        "evaluate": {"resolution": 64, "bundled_dir": str(bundled_dir)},
        "vae_study": {"config": str(study), "cvae_run": "cvae beta=1"},
        "shapes_decoder": {"config": "configs/codec/finetune-decoder.yaml", "overrides": [
            "loss.perceptual=none", "train.max_steps=2", "train.batch_size=4", "data.crop_size=32", "data.resize=64",
            "data.val_size=32", "data.val_count=2", "optim.lr=1e-3", "train.validate_every=0",
            "train.checkpoint_every=0",
            "data.num_workers=0", "train.latent_stats_images=4"]},
        "encode": {"resolution": 64, "batch_size": 8},
        "unet": {"config": "configs/unet/tiny.yaml", "overrides": ["train.max_steps=2", "train.batch_size=4"]},
        "generate": {"prompts": PROMPTS, "images_per_prompt": 1, "steps": 2, "guidance": 3.0, "seed": 0,
                     "sampler": "ddim"},
    }
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(config))
    cfg = load_demo_config(path, [f"output_dir={tmp_path / 'demo'}"])
    report = run_demo(cfg)

    text = report.read_text()
    for section in ("## Stages", "## What the codec keeps", "## Codec quality", "## Prompt adherence",
                    "## The VAE itself", "| claim | measured | target | met |", "rate_distortion.png",
                    "CVAE prior samples", "## Training curves"):
        assert section in text
    assert "**48x** fewer numbers" in text  # 3x512x512 against 4x64x64
    adherence = json.loads((tmp_path / "demo" / "generated" / "adherence.json").read_text())
    assert adherence["conditional"]["n"] == adherence["cvae_prior"]["n"] == len(PROMPTS)
    assert (tmp_path / "demo" / "vae-study" / "rate_distortion.png").is_file()
    # The pipeline draws with the decoder fine-tuned on shapes, from the codec's own (unchanged) encoder.
    from codec.network.model import codec_identity, encoder_identity, load_codec

    codec, pipeline_vae = (load_codec(tmp_path / "demo" / "codec" / "final"),
                           load_codec(tmp_path / "demo" / "unet" / "pipeline" / "vae"))
    assert (encoder_identity(codec) == encoder_identity(pipeline_vae)
            and codec_identity(codec) != codec_identity(pipeline_vae))
    assert abs(adherence["conditional"]["chance_percent"]["color"] - 100 / 7) < 1e-6
    assert (tmp_path / "demo" / "curves.png").stat().st_size > 0
    stages = json.loads((tmp_path / "demo" / "stages.json").read_text())
    assert len(stages) == 8 and all(s["seconds"] > 0 for s in stages.values())

    # Re-running reuses every finished stage instead of redoing it.
    run_demo(cfg)
    stages = json.loads((tmp_path / "demo" / "stages.json").read_text())
    assert all(s["reused"] for s in stages.values())
    # Nothing leaks into the caller: training in the same process still gets gradients.
    assert torch.is_grad_enabled()


def test_the_report_checks_the_articles_claims_against_their_targets():
    from experiments.demo.report import vae_claims

    def run(beta, psnr, rate, one_shape, condition="none", schedule="constant"):
        return {"beta": beta, "psnr_db": psnr, "rate_bits": rate, "prior_one_shape_percent": one_shape,
                "condition": condition, "schedule": schedule}

    cvae = {"percent": {"color": 100.0, "position": 100.0, "shape": 88.0, "background": 100.0}}
    falling = [run(4, 22.0, 60, 40), run(1e-6, 25.0, 200, 5), run(1, 23.5, 90, 56), run(64, 27, 0, 90, "text (film)"),
               run(1, 20.0, 300, 0, schedule="cyclical, 250 steps")]
    lines = vae_claims(falling, cvae)
    assert "| β = 1 VAE (grid latent): prior samples show one shape | 56% | ≥ 50% | yes |" in lines
    assert lines[3].endswith("| 100% / 100% / 88% / 100% | ≥ 80% each | yes |")
    assert "β 1e-06 / 1 / 4" in lines[4] and "rate 200 / 90 / 60 bits" in lines[4] and lines[4].endswith("| yes |")
    # PSNR out of β order (β = 4 above β = 1) fails the trade-off even though the rate falls
    tied = vae_claims([run(1e-6, 21.79, 196, 38), run(1, 22.22, 94, 56), run(4, 21.98, 57, 31)], None)
    assert len(tied) == 4 and tied[3].endswith("| no |")
    # With global-latent runs in the study, the claims are theirs alone: the grid runs neither fail nor pass them
    mixed = [dict(r, latent="global") for r in falling] + [dict(run(1, 30.0, 10, 0), latent="grid")]
    lines = vae_claims(mixed, None)
    assert "| β = 1 VAE (global latent): prior samples show one shape | 56% |" in lines[2]
    assert "β 1e-06 / 1 / 4" in lines[3] and lines[3].endswith("| yes |")
