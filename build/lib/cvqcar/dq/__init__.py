"""DQ-Transformer: the autoregressive generator over DQ-VAE token sequences."""
