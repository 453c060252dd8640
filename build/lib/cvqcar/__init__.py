"""cvqcar: channel-wise VQ image tokenizers and channel-wise autoregression."""

import os

# TensorFlow (imported by clu and TFDS) prints C++ INFO lines at import.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow 2.21 logs "oneDNN custom operations are on" through absl before
# logging is set up, past TF_CPP_MIN_LOG_LEVEL. TensorFlow computes nothing
# here (metric writers and TFDS readers only), so its oneDNN kernels go.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
