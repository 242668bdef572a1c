#!/usr/bin/env python
"""Old name of `python -m experiments.demo.shapes` (the same flags), which runs from the checkout."""

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/ is not installed: it runs from a checkout
runpy.run_module("experiments.demo.shapes", run_name="__main__", alter_sys=True)
