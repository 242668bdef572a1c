"""`python -m latent_codec ...` and `accelerate launch -m latent_codec ...`: the installed command's tree."""

import sys

from latent_codec.cli import main

sys.exit(main())
