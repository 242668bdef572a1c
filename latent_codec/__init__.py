"""The `latent-codec` command (cli.py) and its verbs (commands/): the top floor, over codec/ and diffusion/."""
