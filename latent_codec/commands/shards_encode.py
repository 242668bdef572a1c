"""latent-codec shards encode: encode a dataset once with a frozen codec into latent shards."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from codec.shards.config import EncodeConfig
from latent_codec import cli

HELP = "encode a dataset into a latent store with a frozen codec (resumable, 1 or N processes, local or bucket)"
DESCRIPTION = r"""Encode a dataset once with a frozen codec into a latent store (a folder or a bucket).

    latent-codec shards encode --codec runs/codec/final --data photos/ --out latents/ --resolution 512
    accelerate launch --multi_gpu --num_processes 8 -m latent_codec shards encode --codec runs/codec/final \
        --data 's3://bucket/laion/{00000..09999}.tar' --out s3://bucket/latents

The input is cut into units (one per tar or parquet file; --unit-size images of a folder or a saved dataset);
the units not yet done are dealt round-robin over the processes, and each is committed whole. Re-running into the
same --out after an interruption or a lost node redoes only the missing units and yields the same bytes as an
uninterrupted run; an --out made with another codec, input, resolution, crop, flip policy, seed or unit size is
refused. Writes litdata chunks, units/NNNNNN.json, index.json, manifest.json and rejects.jsonl (unreadable images
with reasons) into --out. Settings come from the defaults, then --config, then --set, then the flags below (the
last word wins)."""

D = EncodeConfig()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--codec", required=True, metavar="DIR", help="codec folder: a diffusers AutoencoderKL with "
                   "safetensors weights, e.g. the final/ folder `latent-codec codec train` exports")
    p.add_argument("--data", required=True, help="images: a folder (captions from metadata.jsonl/.csv or from a.txt "
                   "beside a.png), webdataset tars (a .tar, a folder of them, or a brace pattern "
                   "'dir/{00000..00099}.tar'; caption from KEY.txt or KEY.json), parquet files (img2dataset's "
                   "jpg/caption columns are found), a save_to_disk directory, .arrow files, or a hub dataset name "
                   "(streamed); any file form may be an s3://, gs:// or file:// URL (a custom S3 endpoint: "
                   "AWS_ENDPOINT_URL)")
    cli.add_out(p, "the latent store: a folder or a bucket URL (s3://...); re-running into it resumes an "
                "interrupted encode")
    cli.add_config_flags(p, "shards", required=False, example="unit_size=500")
    # Flags default to None: a flag not given leaves the config's value alone.
    p.add_argument("--resolution", type=int, help="square crop size in pixels; images are first resized so the "
                   f"shorter side is this (default {D.resolution}); a multiple of the codec's downsampling factor")
    p.add_argument("--caption-column", help="dataset column holding captions (default: a 'text' or 'caption' column, "
                   "else .txt files beside the images, else no captions)")
    p.add_argument("--image-column", help="dataset column holding images (default: the first column of image type)")
    p.add_argument("--unit-size", type=int, help=f"images per unit of an image folder or a saved dataset (default "
                   f"{D.unit_size}); each tar or parquet file is one unit whatever its size. Units are the work dealt "
                   "to processes and what a re-run redoes")
    p.add_argument("--batch-size", type=int, help=f"images per encoder call (default {D.batch_size})")
    p.add_argument("--crop", choices=("center", "random"), help=f"center crop (default {D.crop}), or a random crop "
                   "with a random left-right flip drawn per image from --seed (recorded in each record; see --flip)")
    p.add_argument("--flip", choices=("swap-left-right", "uncaptioned-only", "none"), help="with --crop random, what "
                   "a drawn flip does: swap-left-right (default) mirrors the image and swaps left/right words in its "
                   "caption ('top left' -> 'top right'), so the stored caption describes the stored pixels; "
                   "uncaptioned-only mirrors only images without a caption (for captions whose 'left' or 'right' is "
                   "no side, or with mirrored text in the image); none never mirrors. Recorded in the manifest")
    p.add_argument("--seed", type=int, help=f"seed of the random crops (default {D.seed})")
    p.add_argument("--num-workers", type=int, help="DataLoader processes per encoding process that decode and crop "
                   f"images while the encoder runs (default {D.num_workers}; 0 decodes in the encoding process)")
    p.add_argument("--write-scaling-factor", action="store_true", default=None, help="also write the measured "
                   "scaling_factor (1/std of the sampled latents) into the codec folder's config.json; the weights "
                   "are not touched")
    p.add_argument("--limit", type=int, help="encode only the first N images of the dataset")
    p.add_argument("--precision", choices=cli.PRECISIONS, help="the encoder's autocast (default "
                   f"{D.precision}; shards store float16 either way). Images whose latents are not finite in bf16/fp16 "
                   "(the known fp16 overflow of SD-style VAEs) are re-encoded in fp32 with a warning; a resume must "
                   "use the precision the shards were made with")
    p.add_argument("--process-group-timeout-minutes", type=float, help="how long a process waits for the slowest one "
                   "(the end of an uneven last round of shards) before the launch fails (default "
                   f"{D.process_group_timeout_minutes:g}; torch's NCCL default is 10)")


def run(args: argparse.Namespace) -> int:
    from codec.shards.config import load_encode_config
    from codec.shards.encode import encode_dataset

    cfg = cli.settings_with_flags(load_encode_config, args, "shards")
    encode_dataset(args.codec, args.data, args.out, **dataclasses.asdict(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(cli.main_for(sys.modules[__name__]))
