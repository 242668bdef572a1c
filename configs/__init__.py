"""The presets, installed as the package latent_codec.configs so `latent-codec ... --config NAME` finds them."""
