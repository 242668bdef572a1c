"""Entropy coding of the codec's latents: a real compressed file, not a count of numbers.

The encoder's posterior mean, normalised as the shards and the U-Net see it (their normalisation), is quantised with
step Δ (y = round(z / Δ)) and range-coded with `constriction` under a learned probability model.

    discrete.py    closed-form probabilities of quantisation bins (Gaussian, logistic mixture) and their bits
    models.py      the probability models (factorized per channel; channel + checkerboard context), their file
    fit.py         fitting a model on latent shards (`latent-codec entropy fit`)
    symbols.py     integer symbols <-> range-coded words, and the bits the model assigns them
    bitstream.py   the file: versioned header, payload, CRC32; every way a file is refused
    coder.py       image -> file and file -> image (padding, tiling, rate control) (`latent-codec compress`)
    rate_distortion.py  bpp of real files vs PSNR / MS-SSIM over Δ, beside JPEG and WebP over quality; the KL rate
                   (`latent-codec analyze rate-distortion`)
"""
