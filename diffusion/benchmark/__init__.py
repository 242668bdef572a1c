"""Measurements behind docs/benchmark.md (`scripts/benchmark.py`): not part of the toolkit a user imports.

    unet.py     the U-Net's cost: latents vs pixels, attention-head layouts, training from shards vs on the fly
    shards.py   the shard encoder's throughput against the bare encoder
"""
