# The cvqcar image: this repository in /app, installed (editable) with one of
# jax's builds, chosen by JAX_EXTRA (pyproject.toml's extras):
#   docker build -t cvqcar:cpu .
#   docker build --build-arg JAX_EXTRA=tpu -t gcr.io/PROJECT/cvqcar:tpu .
#   docker build --build-arg JAX_EXTRA=cuda -t REGISTRY/cvqcar:cuda .
# jax[tpu] (libtpu) and jax[cuda12] (the CUDA libraries) are pip wheels, so
# one Python base serves all three; a GPU host needs only its NVIDIA driver
# and the container toolkit (docker run --gpus all). Every variant has the
# `cpu` extra, TensorFlow's CPU build: clu's metric writers and TFDS import
# TensorFlow. launch/xpk.sh builds and pushes the TPU one (BUILD=1). Only
# what .dockerignore lets through is copied: no runs, exports, datasets,
# venvs or git history.
ARG PYTHON_VERSION=3.12
FROM python:${PYTHON_VERSION}-slim
ARG JAX_EXTRA=cpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
# The dependencies first, from pyproject.toml alone (empty packages stand
# in for the sources), so that a source change does not reinstall them.
COPY pyproject.toml constraints.txt ./
RUN case "$JAX_EXTRA" in \
      cpu) extras=cpu ;; \
      tpu | cuda) extras="cpu,$JAX_EXTRA" ;; \
      *) echo "JAX_EXTRA=$JAX_EXTRA: expected cpu, tpu or cuda" >&2; exit 1 ;; \
    esac \
 && mkdir cvqcar configs && touch cvqcar/__init__.py configs/__init__.py \
 && pip install -c constraints.txt -e ".[$extras]"
# The editable install points at /app: the sources copied here (or by xpk's
# --base-docker-image route, which copies a checkout onto /app) are what runs.
COPY . .
RUN python3 -c "import cvqcar.train, jax; print('jax', jax.__version__)"
CMD ["python3", "-m", "cvqcar.train", "--help"]
