"""Tokenizer training: pure train/eval steps and `train_and_evaluate`."""

from __future__ import annotations

import functools
import itertools
import logging
import os
import time
from typing import TYPE_CHECKING, Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from cvqcar import metrics, optim, sharding
from cvqcar.tokenizer import evaluate as evaluate_lib
from cvqcar.tokenizer import kmeans, losses, lpips, vqgan
from cvqcar.tokenizer import model as tokenizer_lib

if TYPE_CHECKING:  # annotations only
  import ml_collections

  from cvqcar import loop


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: nnx.State  # generator (tokenizer) parameters
  buffers: nnx.State  # non-trained tokenizer state: EMA codebook, bases
  ema_params: nnx.State  # EMA of params; what eval and export use
  opt_state: Any
  disc_params: nnx.State
  disc_opt_state: Any


class Setup(NamedTuple):
  """Static pieces of training: graph definitions and optimizers."""

  gen_graphdef: Any
  disc_graphdef: Any | None  # None when the GAN loss is off
  tx: optax.GradientTransformation
  disc_tx: optax.GradientTransformation
  # LPIPS's graph; its weights travel as a step argument (never compiled in
  # as constants): Trainer.perceptual.
  perceptual_graphdef: Any | None


def uses_gan(config) -> bool:
  return config.loss.gan_weight > 0


make_optimizer = optim.make_optimizer


def _build(config, key):
  rngs = nnx.Rngs(params=key)
  gen = tokenizer_lib.Tokenizer(config.model, rngs=rngs)
  disc = None
  if uses_gan(config):
    disc = vqgan.PatchDiscriminator(
        base_channels=config.loss.disc_base_channels,
        num_layers=config.loss.disc_num_layers, rngs=rngs)
  return gen, disc


def make_setup(config) -> tuple[Setup, nnx.State | None]:
  """(Setup, LPIPS weights or None)."""
  gen, disc = nnx.eval_shape(lambda: _build(config, jax.random.key(0)))
  gen_graphdef = nnx.split(gen, nnx.Param, ...)[0]
  disc_graphdef = None if disc is None else nnx.split(disc)[0]
  o = config.optimizer
  disc_tx = optax.adam(o.disc_learning_rate, b1=0.5, b2=0.9)
  perceptual_graphdef = perceptual = None
  if config.loss.perceptual_weight > 0 and config.loss.perceptual_weights:
    perceptual_graphdef, perceptual = nnx.split(
        # A loss, not the metric: the backend's default precision.
        lpips.load(config.loss.perceptual_weights, precision=None))
  return Setup(gen_graphdef, disc_graphdef, make_optimizer(config), disc_tx,
               perceptual_graphdef), perceptual


def init_state(config, setup: Setup, key) -> TrainState:
  gen, disc = _build(config, key)
  _, params, buffers = nnx.split(gen, nnx.Param, ...)
  disc_params = nnx.state(disc) if disc is not None else nnx.State({})
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, buffers=buffers,
      ema_params=jax.tree.map(jnp.copy, params),
      opt_state=setup.tx.init(params), disc_params=disc_params,
      disc_opt_state=setup.disc_tx.init(disc_params))


def kmeans_init(state: TrainState, images: list, key, *, config,
                setup: Setup) -> tuple[TrainState, jax.Array]:
  """The fresh state with its codebook from k-means of the encoder's rows
  of `images` (a list of batches), and the k-means inertia. Pure; jit."""
  model = nnx.merge(setup.gen_graphdef, state.params, state.buffers)
  rows_nd = jnp.concatenate([model.quantizer.rows(model.encoder(x))
                             for x in images])
  rows_nd = jax.lax.stop_gradient(rows_nd)
  vq, cb = model.quantizer.vq, config.model.codebook
  depth = getattr(vq, "depth", 1)
  if depth > 1:  # residual VQ: coarse and fine codes in one codebook
    vq = vq.vq
    fit = kmeans.fit_residual(rows_nd, vq.num_codes, depth, key=key,
                              iters=cb.kmeans_iters,
                              argmin_impl=cb.argmin_impl)
  else:
    fit = kmeans.fit(rows_nd, vq.num_codes, key=key, iters=cb.kmeans_iters,
                     cosine=vq.cosine, argmin_impl=cb.argmin_impl)
  # EMA counts are hits per step; every level adds its rows to a step.
  vq.set_codebook(fit.centroids_kd, fit.counts_k / len(images))
  _, params, buffers = nnx.split(model, nnx.Param, ...)
  return state.replace(params=params, buffers=buffers,
                       ema_params=jax.tree.map(jnp.copy, params)
                       ), fit.inertia


def train_step(state: TrainState, batch, key, perceptual=None, *, config,
               setup: Setup):
  """One generator + discriminator update. Pure; jit with donation.
  `perceptual`: the LPIPS weights (None without the perceptual loss)."""
  lc = config.loss
  images = batch["image"]
  key = jax.random.fold_in(key, state.step)
  use_gan = setup.disc_graphdef is not None
  gan_factor = (state.step >= lc.gan_start_step).astype(jnp.float32)
  num_channels = config.model.latent_channels

  def nll_of(reconstructions):
    nll = lc.reconstruction_weight * losses.reconstruction(
        reconstructions, images, lc.reconstruction)
    if perceptual is not None:
      lp = nnx.merge(setup.perceptual_graphdef, perceptual)
      nll += lc.perceptual_weight * jnp.mean(lp(reconstructions, images))
    return nll

  def gen_loss(params):
    model = nnx.merge(setup.gen_graphdef, params, state.buffers, copy=True)
    out = model(images, train=True, key=key)
    nll = nll_of(out.reconstructions)
    quant = out.codebook_loss + lc.beta * out.commitment_loss
    total = nll + lc.quantization_weight * quant
    if config.model.quantize == "dynamic":
      total += lc.budget_weight * out.budget_loss
    aux = {"nll": nll, "quantization": quant,
           "codebook_loss": out.codebook_loss,
           "commitment_loss": out.commitment_loss,
           "channels_kept": jnp.mean(out.channels_kept.astype(jnp.float32)),
           # The lookup's scale: token vectors against codewords (collapse).
           "latent_norm": out.latent_norm,
           "codeword_norm": jnp.mean(jnp.linalg.norm(
               jax.lax.stop_gradient(model.quantizer.vq.codebook()),
               axis=-1))}
    if config.model.quantize == "dynamic":
      aux.update(budget_loss=out.budget_loss, fine_share=out.fine_share)
    if use_gan:
      disc = nnx.merge(setup.disc_graphdef, state.disc_params)
      weight_b = None
      if config.model.nested_dropout_alpha > 0:
        weight_b = losses.nested_gan_weight(out.channels_kept, num_channels)
      # The adaptive weight compares gradients at the decoder's last conv.
      conv_def, conv_params = nnx.split(model.decoder.conv_out)
      feats = jax.lax.stop_gradient(out.decoder_features)
      last = lambda p: nnx.merge(conv_def, p)(feats)
      gan_of = lambda y: losses.hinge_generator(disc(y), weight_b)
      d_weight = losses.adaptive_weight(
          jax.grad(lambda p: nll_of(last(p)))(conv_params),
          jax.grad(lambda p: gan_of(last(p)))(conv_params))
      g_loss = gan_of(out.reconstructions)
      total += gan_factor * lc.gan_weight * d_weight * g_loss
      aux.update(g_loss=g_loss, d_weight=d_weight)
    new_buffers = nnx.state(model, nnx.Not(nnx.Param))
    return total, (aux, new_buffers, out)

  (loss, (aux, buffers, out)), grads = jax.value_and_grad(
      gen_loss, has_aux=True)(state.params)
  updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = config.ema_decay
  ema_params = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p,
                            state.ema_params, params)

  disc_params, disc_opt_state = state.disc_params, state.disc_opt_state
  if use_gan:
    fake = jax.lax.stop_gradient(out.reconstructions)

    def disc_loss(dparams):
      disc = nnx.merge(setup.disc_graphdef, dparams)
      return gan_factor * losses.hinge_discriminator(disc(images), disc(fake))

    d_loss, d_grads = jax.value_and_grad(disc_loss)(disc_params)
    d_updates, disc_opt_state = setup.disc_tx.update(d_grads, disc_opt_state)
    disc_params = optax.apply_updates(disc_params, d_updates)
    aux["d_loss"] = d_loss

  counts = out.code_counts
  aux.update(
      loss=loss, grad_norm=optax.tree.norm(grads),
      batch_usage=jnp.mean((counts > 0).astype(jnp.float32)),
      psnr=jnp.mean(metrics.psnr(out.reconstructions, images)),
      skipped=jnp.sum(batch["skipped"]).astype(jnp.float32))
  new_state = state.replace(
      step=state.step + 1, params=params, buffers=buffers,
      ema_params=ema_params, opt_state=opt_state, disc_params=disc_params,
      disc_opt_state=disc_opt_state)
  return new_state, aux


def eval_step(params, buffers, images, mask, perceptual=None, *, config,
              setup: Setup):
  """Masked batch sums of the evaluation metrics (the same code as
  `python -m cvqcar.evaluate`), the code histogram and the decoded images.

  Eval (and export) run the EMA-averaged encoder and decoder with the
  tokenizer's codebook buffers as they are at that step: the codebook is not
  averaged again (the 'ema' codebook variant is itself a running average).
  """
  model = nnx.merge(setup.gen_graphdef, params, buffers)
  prefixes = (tuple(metrics.prefix_lengths(config.model.latent_channels))
              if config.model.quantize == "channel" else ())
  sums, counts, _, decoded = evaluate_lib.batch_metrics(
      model, images, mask, evaluate_lib.Weights(lpips=perceptual),
      setup.perceptual_graphdef, prefixes)
  return sums, counts, decoded


def router_scores(params, buffers, images, *, setup: Setup):
  """DQ-VAE: the router scores [B, R] the eval thresholds cut, as eval
  computes them (pass the EMA weights)."""
  return nnx.merge(setup.gen_graphdef, params, buffers).router_scores(images)


def set_thresholds(params, buffers, scores, *, setup: Setup):
  """DQ-VAE: buffers with the eval thresholds at the exact target
  quantiles of `scores` (a list of [B, R])."""
  model = nnx.merge(setup.gen_graphdef, params, buffers, copy=True)
  model.quantizer.calibrate(jnp.concatenate(scores), decay=0.0)
  return nnx.state(model, nnx.Not(nnx.Param))


class Trainer:
  """Jitted, sharded steps over a mesh; state stays on device."""

  def __init__(self, config: ml_collections.ConfigDict, mesh=None):
    tokenizer_lib.check_model_config(config.model)
    self.config = config
    self.mesh = sharding.make_mesh(config) if mesh is None else mesh
    self.setup, self.perceptual = make_setup(config)
    key = jax.random.key(config.seed)
    self.init_key, self.step_key = jax.random.split(key)
    init = functools.partial(init_state, config, self.setup)
    abstract = jax.eval_shape(init, self.init_key)
    self.state_sharding = sharding.state_shardings(abstract, self.mesh,
                                                   config)
    self.abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        abstract, self.state_sharding)
    self._init = jax.jit(init, out_shardings=self.state_sharding)
    rep, data_sharding = (sharding.replicated(self.mesh),
                          sharding.batch_sharded(self.mesh))
    self.train_step = jax.jit(
        functools.partial(train_step, config=config, setup=self.setup),
        in_shardings=(self.state_sharding, data_sharding, rep, rep),
        out_shardings=(self.state_sharding, rep), donate_argnums=(0,))
    self.eval_step = jax.jit(
        functools.partial(eval_step, config=config, setup=self.setup),
        out_shardings=(rep, rep, data_sharding))
    self._router_scores = jax.jit(
        functools.partial(router_scores, setup=self.setup),
        out_shardings=data_sharding)
    self._set_thresholds = jax.jit(
        functools.partial(set_thresholds, setup=self.setup),
        out_shardings=self.state_sharding.buffers)
    self._kmeans_init = jax.jit(
        functools.partial(kmeans_init, config=config, setup=self.setup),
        out_shardings=(self.state_sharding, rep), donate_argnums=(0,))

  def init(self) -> TrainState:
    with jax.set_mesh(self.mesh):
      return self._init(self.init_key)

  def kmeans_init(self, state: TrainState, local_batches) -> TrainState:
    """`state` with its codebook from k-means of the first batches' rows
    (config.model.codebook.kmeans_batches of them, every process's)."""
    images = [sharding.global_batch({"image": b["image"]}, self.mesh)[
        "image"] for b in local_batches]
    if not images:
      raise ValueError("k-means codebook init got no training batch")
    t0 = time.time()
    with jax.set_mesh(self.mesh):
      state, inertia = self._kmeans_init(
          state, images, jax.random.fold_in(self.init_key, 1))
    logging.info("codebook from k-means of %d batches (%d iterations):"
                 " inertia %.4g, %.1fs", len(images),
                 self.config.model.codebook.kmeans_iters, float(inertia),
                 time.time() - t0)
    return state

  def calibrate(self, state: TrainState, local_batches) -> TrainState:
    """DQ-VAE: `state` with the router's eval thresholds at the exact
    target quantiles of the scores the EMA weights give these batches (the
    fine and medium shares `encode` delivers on such images); unchanged
    for other tokenizers or no batch."""
    if self.config.model.quantize != "dynamic":
      return state
    scores = []
    for local in local_batches:
      batch = sharding.global_batch({"image": local["image"]}, self.mesh)
      with jax.set_mesh(self.mesh):
        scores.append(self._router_scores(state.ema_params, state.buffers,
                                          batch["image"]))
    if not scores:
      return state
    with jax.set_mesh(self.mesh):
      buffers = self._set_thresholds(state.ema_params, state.buffers, scores)
    return state.replace(buffers=buffers)

  def step(self, state, local_batch):
    batch = sharding.global_batch(local_batch, self.mesh)
    # The mesh context lets the Pallas codebook search run per shard.
    with jax.set_mesh(self.mesh):
      return self.train_step(state, batch, self.step_key, self.perceptual)

  def evaluate(self, state: TrainState, eval_batches) -> tuple[dict, dict]:
    """Metrics over the whole eval set (padded, masked batches: every image
    counted once) and the first batch's images (on every process:
    gathering them is a collective)."""
    sums, counts_k, first = {}, 0.0, None
    for local in eval_batches:
      local.pop("corrupt", None)
      batch = sharding.global_batch(local, self.mesh)
      with jax.set_mesh(self.mesh):
        batch_sums, code_counts, decoded = self.eval_step(
            state.ema_params, state.buffers, batch["image"], batch["mask"],
            self.perceptual)
      counts_k = counts_k + np.asarray(code_counts, np.float64)
      for k, v in batch_sums.items():
        sums[k] = sums.get(k, 0.0) + float(v)
      if first is None:
        first = multihost_utils.process_allgather(
            {"image": batch["image"], **decoded}, tiled=True)
    count = sums.pop("images", 0.0)
    if count == 0:
      raise ValueError("the eval set is empty: check config.data and"
                       " config.eval_batch_size")
    result = {f"eval/{k}": v / count for k, v in sums.items()}
    result["eval/images"] = count
    result["eval/codebook_usage"] = metrics.codebook_usage(counts_k)
    result["eval/codebook_perplexity"] = metrics.codebook_perplexity(counts_k)
    return result, first


def task(config: ml_collections.ConfigDict, workdir: str,
         trainer: Trainer | None = None) -> loop.Task:
  """The tokenizer's part of the shared training loop (cvqcar.loop)."""
  # The loop (clu), the data (grain) and the image grid (PIL) load here, so
  # the steps above import where only jax and flax are installed
  # (bench/accelerator.py on a GPU image).
  from cvqcar import loop, visualize  # noqa: PLC0415
  from cvqcar.data import images as image_data  # noqa: PLC0415

  trainer = Trainer(config) if trainer is None else trainer

  def init():
    state = trainer.init()
    num = config.model.codebook.get("kmeans_batches", 0)
    if num:  # a fresh start only: a restored codebook is kept
      batches = image_data.train_dataset(config, 0)
      state = trainer.kmeans_init(state, itertools.islice(batches, num))
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    logging.info("tokenizer: %.2fM parameters, %d tokens per image",
                 n_params / 1e6, tokenizer_lib.num_tokens(config.model))
    return state

  def evaluate(step, state, writer):
    t0 = time.time()
    eval_metrics, first = trainer.evaluate(state,
                                           image_data.eval_batches(config))
    grid = visualize.reconstruction_grid(first, config.num_grid_images)
    path = os.path.join(workdir, "images", f"recon_{step:07d}.png")
    if jax.process_index() == 0:
      visualize.save_png(grid, path)
    writer.write_images(step, {"reconstructions": grid[None]})
    logging.info("eval at step %d (%.1fs): %s; grid %s", step,
                 time.time() - t0, _fmt(eval_metrics), path)
    return eval_metrics

  refresh = None
  calibration = (config.model.get("dynamic") or {}).get(
      "calibration_batches", 0)
  if config.model.quantize == "dynamic" and calibration:
    # The eval thresholds, exact for the weights eval and export use, from
    # the same first training batches each time.
    refresh = lambda state: trainer.calibrate(state, itertools.islice(
        image_data.train_dataset(config, 0), calibration))

  return loop.Task(
      what="tokenizer", mesh=trainer.mesh, init=init, refresh=refresh,
      restore_target=trainer.abstract_state, step=trainer.train_step,
      step_args=(trainer.step_key, trainer.perceptual), evaluate=evaluate,
      train_data=lambda start: image_data.train_dataset(config, start),
      summed=("skipped",),
      finish_keys=("eval/psnr", "eval/ssim", "eval/codebook_usage"))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       on_log=None) -> loop.Summary:
  """Trains the tokenizer, evaluating, logging and checkpointing in workdir.

  Resumes from the latest checkpoint in `workdir` (model, optimizer, EMA and
  data position). With config.run_steps > 0 it stops after that many steps
  with a checkpoint (for time-limited jobs); the next call goes on. A
  signal or preemption notice stops it with a checkpoint too
  (Summary.preempted). `on_log(step, num_train_steps, scalars)`, when
  given, sees every logged set of train or eval scalars (e.g.
  cvqcar.figures.LiveProgress).
  """
  from cvqcar import loop  # noqa: PLC0415 (see task)

  return loop.run(config, workdir, task(config, workdir), on_log=on_log)


def _fmt(d: dict[str, float]) -> str:
  return ", ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in sorted(d.items()))
