"""Image data for the codec: robust decoding, where images come from, and reproducible crops.

    images.py    any stored image -> RGB pixels, or UnreadableImage with a reason; PIL <-> tensor
    listing.py   what a --data string names (folder, tars, parquet, table, Hub), from one listing, local or URL
    folders.py   an image folder from that listing: splits, .txt captions, metadata, labels
    tars.py      the samples of a webdataset tar, a truncated tar detected
    sources.py   image folders, saved datasets, arrow, the Hub, the bundled photos -> a `datasets` table; tars and
                 parquet -> a RecordIndex
    inputs.py    any input, tars and buckets included, cut into units of records for the encoder (InputSource)
    index.py     random access to the records of tars and parquet (RecordIndex), for the codec trainer's draws
    crops.py     the torch datasets the codec trains and validates on (draw-keyed crops, centre crops)

The names below are the package's public API, importable from `codec.data` directly.
"""

from codec.data.crops import CenterCrops, TrainCrops
from codec.data.images import UnreadableImage, decode_image, pil_to_tensor, resize_shorter_side, tensor_to_pil, to_rgb
from codec.data.index import RecordIndex
from codec.data.inputs import InputSource, InputUnit
from codec.data.sources import BUNDLED_TRAIN, BUNDLED_VAL, bundled_photos, load_image_dataset

__all__ = [
    "BUNDLED_TRAIN",
    "BUNDLED_VAL",
    "CenterCrops",
    "InputSource",
    "InputUnit",
    "RecordIndex",
    "TrainCrops",
    "UnreadableImage",
    "bundled_photos",
    "decode_image",
    "load_image_dataset",
    "pil_to_tensor",
    "resize_shorter_side",
    "tensor_to_pil",
    "to_rgb",
]
