"""cvqcar: channel-wise VQ image tokenizers and channel-wise autoregression."""
