"""The showcase `make demo` runs: not part of the toolkit a user imports to train on their own data.

    shapes.py      a captioned world of coloured shapes whose every caption is checkable from pixels
    adherence.py   reads a generated image's colour, position, shape and background back from its pixels
    run.py         the demo's stages (configs/demo.yaml), each skipped when done, resumable
    report.py      generation for the fixed prompts, adherence scores, runs/demo/report.md
"""
