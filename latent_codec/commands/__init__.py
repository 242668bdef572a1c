"""One module per verb of `latent-codec` (see latent_codec/cli.py for the tree)."""
