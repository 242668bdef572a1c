"""Old name of `latent-codec compress`, kept for one release (see its --help)."""
from latent_codec.cli import old_script

old_script("compress")
