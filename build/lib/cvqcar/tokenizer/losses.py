"""Tokenizer losses: reconstruction, hinge GAN, adaptive GAN weight."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def reconstruction(x, y, kind: str = "l2") -> jax.Array:
  """Mean per-pixel L2 or L1 between image batches."""
  diff = (x - y).astype(jnp.float32)
  if kind == "l2":
    return jnp.mean(jnp.square(diff))
  if kind == "l1":
    return jnp.mean(jnp.abs(diff))
  raise ValueError(f"config.loss.reconstruction must be 'l2' or 'l1', got"
                   f" {kind!r}")


def hinge_discriminator(real_logits, fake_logits) -> jax.Array:
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - real_logits))
                + jnp.mean(jax.nn.relu(1.0 + fake_logits)))


def hinge_generator(fake_logits, weight_b=None) -> jax.Array:
  """-D(G(z)), averaged per image then weighted over the batch."""
  per_image = -jnp.mean(fake_logits.reshape(fake_logits.shape[0], -1), -1)
  if weight_b is None:
    return jnp.mean(per_image)
  return jnp.sum(per_image * weight_b) / jnp.maximum(jnp.sum(weight_b), 1e-6)


def nested_gan_weight(channels_kept_b, num_channels: int) -> jax.Array:
  """GAN weight per image under nested dropout: sigmoid(0.05 (k - C/2)).

  Images decoded from few channels are blurry by construction; pushing them
  to look real would fight the coarse-to-fine ordering.
  """
  k = channels_kept_b.astype(jnp.float32)
  return jax.nn.sigmoid(0.05 * (k - num_channels / 2))


def adaptive_weight(nll_grads, gan_grads, max_weight: float = 1e4):
  """||grad NLL|| / ||grad GAN|| at the decoder's last layer (VQGAN)."""
  nll_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g))
                          for g in jax.tree.leaves(nll_grads)))
  gan_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g))
                          for g in jax.tree.leaves(gan_grads)))
  weight = jnp.clip(nll_norm / (gan_norm + 1e-4), 0.0, max_weight)
  return jax.lax.stop_gradient(weight)
