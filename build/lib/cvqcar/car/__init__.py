"""CAR: channel-wise autoregression on a Qwen3 backbone."""
