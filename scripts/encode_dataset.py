#!/usr/bin/env python
"""Encode a dataset once with a frozen codec into latent shards, or verify shards already written.

    accelerate launch scripts/encode_dataset.py --codec runs/codec/final --data photos/ --out shards/ --resolution 512
    accelerate launch --multi_gpu --num_processes 2 scripts/encode_dataset.py --codec ... --data ... --out ...
    python scripts/encode_dataset.py verify shards/ [--codec runs/codec/final]

Each process encodes a disjoint set of shards (shard k goes to process k mod processes). Re-running into the
same --out after an interruption skips complete shards and yields the same files as an uninterrupted run; an
--out made with another codec, resolution, crop, flip policy, seed or shard size is refused. Writes
<out>/shard-NNNNN.safetensors, <out>/manifest.json and <out>/rejects.jsonl (unreadable images with reasons).
`verify` exits 1 when any shard's checksum or record count disagrees with the manifest, or, with --codec, when
the shards were made by another codec.
"""

from __future__ import annotations

import argparse
import sys


def encode_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--codec", required=True, help="diffusers AutoencoderKL folder with safetensors weights, e.g. the "
                   "final/ folder scripts/train_codec.py exports")
    p.add_argument("--data", required=True, help="images: a folder (captions from metadata.jsonl/.csv or from a.txt "
                   "beside a.png), a save_to_disk directory, .parquet/.arrow files, or a hub dataset name")
    p.add_argument("--out", required=True, help="shards folder; re-running into it resumes an interrupted encode")
    p.add_argument("--resolution", type=int, default=512, help="square crop size in pixels; images are first resized "
                   "so the shorter side is this (default 512); must be a multiple of the codec's downsampling factor")
    p.add_argument("--caption-column", help="dataset column holding captions (default: a 'text' or 'caption' column, "
                   "else .txt files beside the images, else no captions)")
    p.add_argument("--image-column", help="dataset column holding images (default: the first column of image type)")
    p.add_argument("--shard-size", type=int, default=1000, help="dataset indices per shard (default 1000); shard k "
                   "holds indices k*N .. (k+1)*N-1 minus rejected images")
    p.add_argument("--batch-size", type=int, default=16, help="images per encoder call (default 16)")
    p.add_argument("--crop", choices=("center", "random"), default="center", help="center crop, or a random crop "
                   "with a random left-right flip drawn per image from --seed (recorded in each record; see --flip)")
    p.add_argument("--flip", choices=("swap-left-right", "uncaptioned-only", "none"), help="with --crop random, what "
                   "a drawn flip does: swap-left-right (default) mirrors the image and swaps left/right words in its "
                   "caption ('top left' -> 'top right'), so the stored caption describes the stored pixels; "
                   "uncaptioned-only mirrors only images without a caption (for captions whose 'left' or 'right' is "
                   "no side, or with mirrored text in the image); none never mirrors. Recorded in the manifest")
    p.add_argument("--seed", type=int, default=0, help="seed of the random crops (default 0)")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader processes per encoding process that decode "
                   "and crop images while the encoder runs (default 2; 0 decodes in the encoding process)")
    p.add_argument("--write-scaling-factor", action="store_true", help="also write the measured scaling_factor "
                   "(1/std of the sampled latents) into the codec folder's config.json; the weights are not touched")
    p.add_argument("--limit", type=int, help="encode only the first N images of the dataset")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="the encoder's autocast "
                   "(default fp32; shards store float16 either way). Images whose latents are not finite in bf16/fp16 "
                   "(the known fp16 overflow of SD-style VAEs) are re-encoded in fp32 with a warning; a resume must "
                   "use the precision the shards were made with")
    p.add_argument("--process-group-timeout-minutes", type=float, default=30.0, help="how long a process waits for "
                   "the slowest one (the end of an uneven last round of shards) before the launch fails (default 30; "
                   "torch's NCCL default is 10)")
    return p


def verify_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="encode_dataset.py verify",
                                description="Check shards against their manifest; exit 1 on any problem.")
    p.add_argument("shards_dir", help="the --out folder of an encode")
    p.add_argument("--codec", help="also require that the shards were made by this codec folder")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "verify":
        args = verify_parser().parse_args(argv[1:])
        from codec.shards.verify import verify_shards

        problems = verify_shards(args.shards_dir, args.codec)
        for problem in problems:
            print(f"problem: {problem}", file=sys.stderr)
        if problems:
            print(f"{args.shards_dir}: {len(problems)} problem(s)", file=sys.stderr)
            return 1
        print(f"{args.shards_dir}: all shards match the manifest")
        return 0
    args = encode_parser().parse_args(argv)
    from codec.shards.encode import encode_dataset

    try:
        encode_dataset(args.codec, args.data, args.out, resolution=args.resolution, caption_column=args.caption_column,
                       image_column=args.image_column, shard_size=args.shard_size, batch_size=args.batch_size,
                       crop=args.crop, flip=args.flip, seed=args.seed, num_workers=args.num_workers,
                       write_scaling_factor=args.write_scaling_factor, limit=args.limit, precision=args.precision,
                       process_group_timeout_minutes=args.process_group_timeout_minutes)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
