"""The optimizer every trainer uses: clipped AdamW on a warmup-cosine
schedule, read from config.optimizer."""

from __future__ import annotations

import optax


def make_optimizer(config) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW; the learning rate warms up linearly
  over optimizer.warmup_steps and decays to zero at num_train_steps."""
  o = config.optimizer
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, o.learning_rate, o.warmup_steps,
      max(config.num_train_steps, o.warmup_steps + 1))
  return optax.chain(
      optax.clip_by_global_norm(o.grad_clip),
      optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay))
