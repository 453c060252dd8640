"""cvqcar: channel-wise VQ image tokenizers and channel-wise autoregression."""

import os

# TensorFlow (imported by clu and TFDS) prints C++ INFO lines at import.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
