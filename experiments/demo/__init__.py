"""The showcase `make demo` runs (`python -m experiments.demo`): not part of the toolkit a user imports to train on
their own data.

    __main__.py    the command line: --config configs/demo.yaml and --set overrides
    shapes.py      a captioned world of coloured shapes whose every caption is checkable from pixels
                   (`python -m experiments.demo.shapes` writes one)
    adherence.py   reads a generated image's colour, position, shape and background back from its pixels
    beta_study.py  the β trade-off: codecs at several β and a conditional VAE (`python -m experiments.demo.beta_study`)
    run.py         the demo's stages (configs/demo.yaml), each skipped when done, resumable
    report.py      generation for the fixed prompts, adherence scores, runs/demo/report.md
"""
