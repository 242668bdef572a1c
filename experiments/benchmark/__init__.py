"""Measurements behind docs/benchmark.md (`python -m experiments.benchmark`): not part of the toolkit a user imports.

    __main__.py            the command line: the whole run, or one part of it (--inference-options, ...)
    gpu_check.py           every stage at the real sizes in bf16 on one CUDA device (`python -m
                           experiments.benchmark.gpu_check`)

    run.py                 one whole run, section by section, into the results dict (and the U-Net, shard rows)
    codec.py               the codecs' FLOPs and encode/decode seconds, the small preset against TAESD, widths
    memory.py              peak memory of a 2048x2048 decode, tiled vs untiled, one process per case
    inference.py           inference-path options of the small preset; tiled vs untiled quality of a codec
    unet.py                the U-Net's cost: latents vs pixels, attention-head layouts, training from shards vs on
                           the fly
    shards.py              the latent encoder's throughput against the bare encoder
    scale.py               the latent store at 10M records: start-up and memory of the trainer and the encoder,
                           bucket vs local reads, the small preset's wait for data
    synthetic_store.py     latent stores of millions of tiny records, written by the encoder's own writer
    environment.py         the machine: versions, threads, bf16 instructions, fp32 matmul peak
    timing.py              the timing loops every row uses: repeated calls, or several functions taking turns
    common.py              the sizes and presets measured, the repository's paths, progress on stderr
    report.py              the results dict -> Markdown, from report_template.md (the report's text)
"""
