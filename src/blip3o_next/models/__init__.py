"""The model: tokenizers (text, VQ image, semantic blueprint, TA-Tok), the AR model's sampler, the connector, the
diffusion transformer's loss and sampler, the VAE, and `modeling.Blip3oNext`, which holds them all."""
