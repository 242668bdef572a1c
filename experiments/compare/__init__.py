"""Which codec's latents does a diffusion model learn fastest? The A/B `python -m experiments.compare` runs.

    __main__.py the command line: the codecs, the data, the budget
    run.py      the stages: split, encode, analyse, train each U-Net, sample and score; resumable
    report.py   curves, steps to the worst codec's final loss, the table, loss.png and report.md
"""
