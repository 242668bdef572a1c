"""Which codec's latents does a diffusion model learn fastest? scripts/compare_codecs.py's A/B.

    run.py      the stages: split, encode, analyse, train each U-Net, sample and score; resumable
    report.py   curves, steps to the worst codec's final loss, the table, loss.png and report.md
"""
