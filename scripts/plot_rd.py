"""Old name of `latent-codec analyze plot-rd`, kept for one release (see its --help)."""
from latent_codec.cli import old_script

old_script("analyze plot-rd")
