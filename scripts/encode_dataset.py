"""Old name of `latent-codec shards encode`, kept for one release (see its --help)."""
from latent_codec.cli import old_script

old_script("shards encode")
