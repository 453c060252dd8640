"""cvqcar: channel-wise VQ image tokenizers and channel-wise autoregression."""

import os

# TensorFlow (imported by clu and TFDS) prints C++ INFO lines at import.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow 2.21 logs "oneDNN custom operations are on" through absl before
# logging is set up, past TF_CPP_MIN_LOG_LEVEL. TensorFlow computes nothing
# here (metric writers and TFDS readers only), so its oneDNN kernels go.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

# The first jax minor release CI has not tested: constraints.txt's bound. An
# accelerator host (Colab, a TPU VM) may bring a newer jax, which
# `pip install -e .` keeps; this says so once, at import, with the fix.
JAX_UNTESTED_FROM = (0, 13)


def _warn_if_untested_jax() -> None:
  import logging  # noqa: PLC0415
  from importlib import metadata  # noqa: PLC0415

  try:
    version = metadata.version("jax")
  except metadata.PackageNotFoundError:
    return
  parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
  if parts >= JAX_UNTESTED_FROM:
    logging.getLogger("cvqcar").warning(
        "jax %s is newer than the versions cvqcar is tested with (jax <"
        " %d.%d); if something breaks, install the tested versions: pip"
        " install -c constraints.txt -e .", version, *JAX_UNTESTED_FROM)


_warn_if_untested_jax()
