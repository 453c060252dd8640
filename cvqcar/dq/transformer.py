"""DQ-Transformer: two-stream autoregression over dynamic-quantization codes.

Huang et al., CVPR 2023 ("Towards Accurate Image Coding: Improved
Autoregressive Image Generation with Dynamic Vector Quantization"). A DQ-VAE
codes each region of its s x s fine latent grid at one of L levels (two:
coarse, one code, or fine, four; three: 1, 4 or 16 codes of a 4 x 4
region), so an image is a variable-length sequence of (code, position)
tokens. The sequence format, shared with the tokenizer
(cvqcar.tokenizer.dynamic.Format):

- R regions, raster order over the coarsest grid.
- Position ids: cell k of region r at level g -> offset_g + 4^g r + k,
  offset_g = R (1 + 4 + ... + 4^(g-1)); two levels: coarse region r -> r,
  fine cell k = 2*di + dj of region r -> R + 4r + k, END = 5R (three:
  END = 21R). Codes are 0..K-1.
- Ascending position ids: the level-0 codes, then level 1's by region and
  cell, and so on. Every region appears exactly once, at one level;
  L_seq is in R..4^(L-1) R. Batches are padded to 4^(L-1) R steps with
  position END (code 0) and `lengths`.

The model chooses each level's set of regions below the finest (ascending
regions, by the id of a region's first cell, or a switch to a later
level); the rest of a region's cells, the finest level's cells and END are
then forced (`next_position_mask`), so every sampled sequence is valid.
With `free_positions` the model also orders the finest cells.

Streams. The position transformer reads [begin(class)] + (embed_code(c_t) +
embed_pos(p_t)) causally; its output at step t predicts p_t (logits over
the END + 1 ids, the step after the last token predicting END). The
content transformer reads that hidden state plus embed_next(p_t), the
position of the code to predict, and
predicts c_t; it is causal too, so step t sees tokens < t and p_t. Both are
cvqcar.car.qwen3 trunks (RMSNorm, GQA with RoPE over the step index, SwiGLU).

Conditioning (`condition`): with `text_vocab` 0, a class id whose
embedding is the begin token, id num_classes being the null class of
classifier-free guidance; otherwise a left-padded prompt (text ids and mask
[B, L], L <= max_text_len) followed by a learned begin token, as
cvqcar.car.model.CAR.prefix does, the empty prompt being the null case.
Training drops the condition for a `cond_drop_prob` share of rows
(cvqcar.dq.trainer).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cvqcar import sharding
from cvqcar.car import model as car_lib
from cvqcar.car import qwen3, sampling
from cvqcar.tokenizer import dynamic


@dataclasses.dataclass(frozen=True)
class DQConfig:
  """Sizes of a DQ-Transformer; the defaults are a CPU-sized toy."""

  grid: int = 4  # s: the tokenizer's fine latent side
  num_codes: int = 64  # K
  num_classes: int = 10  # plus one null class for guidance
  text_vocab: int = 0  # > 0: prompt-conditioned (class ids unused)
  max_text_len: int = 0  # the longest prompt, in text tokens
  width: int = 64
  position_layers: int = 2
  content_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 16
  mlp_dim: int = 128
  dtype: str = "float32"
  levels: int = 2  # the tokenizer's granularities (2 or 3)

  def __post_init__(self):
    if self.levels not in dynamic.LEVELS:
      raise ValueError(f"DQConfig.levels={self.levels!r}; expected one of"
                       f" {dynamic.LEVELS}")
    n = 2 ** (self.levels - 1)
    if not isinstance(self.grid, int) or self.grid < n or self.grid % n:
      raise ValueError(f"DQConfig.grid={self.grid!r}; expected an int"
                       f" multiple of {n} (the fine latent side s at"
                       f" {self.levels} levels)")
    for name in ("num_codes", "num_classes"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        raise ValueError(f"DQConfig.{name}={getattr(self, name)!r}; expected"
                         " a positive int")
    if self.text_vocab and self.max_text_len < 1:
      raise ValueError(f"DQConfig.text_vocab={self.text_vocab} needs"
                       f" max_text_len >= 1, got {self.max_text_len}")

  @property
  def format(self) -> dynamic.Format:
    return dynamic.Format((self.grid // 2 ** (self.levels - 1)) ** 2,
                          self.levels)

  @property
  def num_regions(self) -> int:  # R
    return self.format.num_regions

  @property
  def max_len(self) -> int:  # 4^(L-1) R: the padded sequence length
    return self.format.max_len

  @property
  def end(self) -> int:  # 5R at two levels
    return self.format.end

  @property
  def num_positions(self) -> int:  # END + 1
    return self.end + 1

  @property
  def null_class(self) -> int:
    return self.num_classes

  def trunk(self, layers: int) -> qwen3.Qwen3Config:
    """A qwen3 trunk; its tied embedding table is the code table."""
    return qwen3.Qwen3Config(
        vocab_size=self.num_codes, hidden_size=self.width,
        intermediate_size=self.mlp_dim, num_hidden_layers=layers,
        num_attention_heads=self.num_heads,
        num_key_value_heads=self.num_kv_heads, head_dim=self.head_dim,
        rope_theta=1e4,
        max_position_embeddings=self.max_len + 1 + self.max_text_len,
        tie_word_embeddings=True, dtype=self.dtype)


def dq_positions(fine_mask_br: jax.Array):
  """Two levels: fine masks [B, R] (true: region coded fine) -> (positions
  [B, 4R] in sequence order, END-padded; lengths [B]): the tokenizer's own
  format (cvqcar.tokenizer.dynamic.sequence)."""
  fine_mask_br = jnp.asarray(fine_mask_br, bool)
  if fine_mask_br.ndim != 2:
    raise ValueError(f"fine mask {fine_mask_br.shape}; expected [B, R]")
  b, r = fine_mask_br.shape
  tokens = dynamic.sequence(jnp.zeros((b, r), jnp.int32),
                            jnp.zeros((b, r, 4), jnp.int32), fine_mask_br)
  return tokens.positions, tokens.lengths


def _id_tables(fmt: dynamic.Format):
  """(level, region, cell) of every position id, END included (level L)."""
  level, region, cell = fmt.tables()
  return (jnp.asarray(np.append(level, fmt.levels), jnp.int32),
          jnp.asarray(np.append(region, 0), jnp.int32),
          jnp.asarray(np.append(cell, 0), jnp.int32))


def assigned_by(pos, fmt: dynamic.Format) -> jax.Array:
  """[...] position ids -> [..., R]: the region each id assigns to a level
  below the finest (all false for finest cells and END)."""
  level, region, _ = _id_tables(fmt)
  pos = jnp.asarray(pos)
  below = jnp.take(level, pos) < fmt.levels - 1
  return jax.nn.one_hot(jnp.take(region, pos), fmt.num_regions,
                        dtype=bool) & below[..., None]


def next_position_mask(assigned_r: jax.Array, last: jax.Array,
                       num_regions: int, *, levels: int = 2,
                       emitted_c: jax.Array | None = None) -> jax.Array:
  """Allowed next position ids [..., END + 1] after a prefix whose regions
  assigned to a level below the finest are assigned_r [..., R] (bool; at
  two levels: the coarse ones) and whose last position is `last` [...]
  (-1 for the empty prefix).

  Inside a region of a level below the finest: its next cell. Otherwise,
  before the finest level: the first cell of an unassigned region, at the
  current level after the last region or at any later level below the
  finest, or the first finest cell of the lowest unassigned region (END if
  there is none). Finest level: the next cell of an unassigned region,
  else END. After END only END. With `emitted_c` [..., R 4^(L-1)] (the
  finest cells emitted so far) the finest cells come in any order: any
  one not emitted of an unassigned region wherever the finest one is
  allowed above, END once none is left.
  """
  fmt = dynamic.Format(num_regions, levels)
  finest, end, cells = levels - 1, fmt.end, fmt.cells
  level_i, region_i, cell_i = _id_tables(fmt)
  ids = jnp.arange(end + 1)
  last = jnp.asarray(last)
  at = jnp.clip(last, 0, end)
  last_level = jnp.where(last < 0, 0, jnp.take(level_i, at))
  last_region = jnp.where(last < 0, -1, jnp.take(region_i, at))
  last_cell = jnp.take(cell_i, at)
  inside = ((last >= 0) & (last_level < finest)
            & (last_cell < 4 ** last_level - 1))
  choosing = (last_level < finest) & ~inside
  unassigned = ~jnp.take(assigned_r, region_i, axis=-1)  # [..., END + 1]
  ll, lr = last_level[..., None], last_region[..., None]
  chosen = ((cell_i == 0) & (level_i < finest) & unassigned
            & (((level_i == ll) & (region_i > lr)) | (level_i > ll)))
  fine = jnp.arange(num_regions * cells)
  open_c = ~jnp.take(assigned_r, fine // cells, axis=-1)
  if emitted_c is None:
    after = jnp.where(last_level == finest, last - fmt.offsets[finest], -1)
    ok = open_c & (fine > after[..., None])
    nxt = jnp.min(jnp.where(ok, fine, num_regions * cells), axis=-1)
    forced = jnp.where((last == end) | (nxt == num_regions * cells), end,
                       fmt.offsets[finest] + nxt)
    finest_ok = ids == forced[..., None]
  else:
    open_c &= ~emitted_c
    done = ~jnp.any(open_c, axis=-1) | (last == end)
    finest_ok = jnp.concatenate(
        [jnp.zeros(last.shape + (fmt.offsets[finest],), bool),
         open_c & ~(last == end)[..., None], done[..., None]], axis=-1)
  step_in = ids == (last + 1)[..., None]
  return jnp.where(inside[..., None], step_in,
                   (chosen & choosing[..., None]) | finest_ok)


def valid_next_positions(positions_bl: jax.Array, num_regions: int, *,
                         levels: int = 2) -> jax.Array:
  """Allowed next positions [B, L + 1, END + 1] after each prefix of
  positions [B, L] (prefix lengths 0..L)."""
  fmt = dynamic.Format(num_regions, levels)
  b = positions_bl.shape[0]
  assigned = jnp.cumsum(assigned_by(positions_bl, fmt).astype(jnp.int32),
                        axis=1) > 0
  assigned = jnp.concatenate([jnp.zeros((b, 1, num_regions), bool),
                              assigned], 1)
  last = jnp.concatenate([jnp.full((b, 1), -1, positions_bl.dtype),
                          positions_bl], 1)
  return next_position_mask(assigned, last, num_regions, levels=levels)


def mask_logits(logits: jax.Array, allowed: jax.Array) -> jax.Array:
  return jnp.where(allowed, logits, -jnp.inf)


def null_condition(config: DQConfig, cond):
  """The unconditional counterpart of `cond`: the null class, or the same
  prompts with an all-padding mask (the empty prompt)."""
  if config.text_vocab:
    text_bl, mask_bl = cond
    return text_bl, jnp.zeros_like(mask_bl)
  return jnp.full_like(cond, config.null_class)


def drop_condition(config: DQConfig, cond, drop_b: jax.Array):
  """`cond` with the rows where drop_b [B] is true made unconditional."""
  null = null_condition(config, cond)
  pick = lambda c, n: jnp.where(drop_b.reshape(drop_b.shape + (1,) *
                                               (c.ndim - 1)), n, c)
  return jax.tree.map(pick, cond, null)


def check_condition(config: DQConfig, cond) -> None:
  """Raises unless `cond` is class ids [B] in 0..num_classes (class mode)
  or (text ids, mask), both [B, L] with L <= max_text_len (text mode)."""
  if not config.text_vocab:
    ids = np.asarray(cond)
    if ids.ndim != 1:
      raise ValueError(f"class ids {ids.shape}; expected [B]")
    if ids.size and (ids.min() < 0 or ids.max() > config.null_class):
      raise ValueError(f"class ids span {ids.min()}..{ids.max()}; expected"
                       f" 0..{config.null_class} ({config.null_class}: the"
                       " null class)")
    return
  if not (isinstance(cond, tuple | list) and len(cond) == 2):
    raise ValueError("a prompt-conditioned DQ-Transformer takes (text ids,"
                     " text mask)")
  text_bl, mask_bl = (np.shape(c) for c in cond)
  if len(text_bl) != 2 or text_bl != mask_bl:
    raise ValueError(f"text ids {text_bl} and mask {mask_bl}; expected both"
                     " [B, L]")
  if text_bl[1] > config.max_text_len:
    raise ValueError(f"prompts of {text_bl[1]} tokens; this model takes at"
                     f" most max_text_len = {config.max_text_len}")


class DQTransformer(nnx.Module):
  """(condition, codes [B, T], positions [B, T]) -> raw logits, T = 4^(L-1)
  R the padded sequence length (4R at two levels); the
  condition is class ids [B] or (text ids, text mask) [B, L]."""

  def __init__(self, config: DQConfig, *, rngs: nnx.Rngs):
    self.config = config
    init = lambda *names: sharding.axes(nnx.initializers.normal(0.02), *names)
    embed = lambda n, names: nnx.Embed(
        n, config.width, dtype=config.dtype, rngs=rngs,
        embedding_init=init(*names))
    self.position_stream = qwen3.Qwen3(config.trunk(config.position_layers),
                                       rngs=rngs)  # embeds the codes
    self.content_stream = qwen3.Qwen3(config.trunk(config.content_layers),
                                      rngs=rngs)  # its table is the code head
    if config.text_vocab:
      self.embed_text = embed(config.text_vocab, ("vocab", "embed"))
      self.begin = nnx.Param(
          jax.random.normal(rngs.params(), (config.width,)) * 0.02,
          logical_axes=("embed",))
    else:
      self.embed_class = embed(config.num_classes + 1, ("classes", "embed"))
    self.embed_pos = embed(config.num_positions, ("positions", "embed"))
    self.embed_next = embed(config.num_positions, ("positions", "embed"))
    self.position_head = nnx.Linear(
        config.width, config.num_positions, use_bias=False,
        dtype=config.dtype, rngs=rngs,
        kernel_init=init("embed", "positions"))

  def _check(self, codes_bl, positions_bl):
    want = (codes_bl.shape[0], self.config.max_len)
    if codes_bl.shape != want or positions_bl.shape != want:
      raise ValueError(f"codes {codes_bl.shape} and positions"
                       f" {positions_bl.shape}; expected both [B, T] ="
                       f" {want}")

  def condition(self, cond):
    """Prefix embeddings [B, P, D] ending in the begin token, and its mask
    [B, P]: P = 1 for a class, L + 1 for a left-padded prompt."""
    if not self.config.text_vocab:
      begin = self.embed_class(cond)[:, None]
      return begin, jnp.ones(begin.shape[:2], bool)
    text_bl, mask_bl = cond
    text = self.embed_text(text_bl)
    b, _, d = text.shape
    begin = jnp.broadcast_to(self.begin[...].astype(text.dtype), (b, 1, d))
    mask = jnp.concatenate([mask_bl.astype(bool), jnp.ones((b, 1), bool)], 1)
    return jnp.concatenate([text, begin], axis=1), mask

  def position_hidden(self, cond, codes_bl, positions_bl):
    """Position-stream states [B, T + 1, D] from the begin token on: step
    t has seen the condition and tokens < t."""
    self._check(codes_bl, positions_bl)
    prefix, mask = self.condition(cond)
    tokens = (self.position_stream.embed(codes_bl) +
              self.embed_pos(positions_bl))
    x = jnp.concatenate([prefix, tokens.astype(prefix.dtype)], axis=1)
    mask = jnp.concatenate([mask, jnp.ones(tokens.shape[:2], bool)], axis=1)
    hidden = self.position_stream.forward_embeddings(
        sharding.constrain_batch(x), car_lib.positions_from_mask(mask),
        attention_mask=mask)[0]
    return hidden[:, prefix.shape[1] - 1:]

  def position_logits(self, hidden):
    """[..., D] -> next-position logits [..., END + 1] (unmasked)."""
    return self.position_head(hidden).astype(jnp.float32)

  def code_logits(self, hidden_bld, positions_bl):
    """Position-stream states [B, T, D] and the positions to fill [B, T]
    -> code logits [B, T, K]."""
    x = hidden_bld + self.embed_next(positions_bl).astype(hidden_bld.dtype)
    h = self.content_stream.forward_embeddings(x)[0]
    return self.content_stream.logits(h).astype(jnp.float32)

  def __call__(self, cond, codes_bl, positions_bl):
    """(position logits [B, T + 1, END + 1], code logits [B, T, K]),
    teacher-forced and unmasked: step t predicts p_t and c_t."""
    hidden = self.position_hidden(cond, codes_bl, positions_bl)
    return (self.position_logits(hidden),
            self.code_logits(hidden[:, :-1], positions_bl))


def loss_fn(model: DQTransformer, cond, codes_bl, positions_bl, lengths_b):
  """(position CE + code CE, metrics): means over the unpadded steps, the
  END prediction at step L included; invalid positions masked out."""
  c = model.config
  pos_logits, code_logits = model(cond, codes_bl, positions_bl)
  allowed = valid_next_positions(positions_bl, c.num_regions,
                                 levels=c.levels)
  b = positions_bl.shape[0]
  targets = jnp.concatenate(
      [positions_bl, jnp.full((b, 1), c.end, positions_bl.dtype)], 1)
  steps = jnp.arange(c.max_len + 1)

  def mean_nll(logits, target, valid):
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
    # where, not a product: a masked-out step may hold inf.
    return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(valid.sum(), 1)

  pos_loss = mean_nll(mask_logits(pos_logits, allowed), targets,
                      steps[None] <= lengths_b[:, None])
  code_valid = steps[None, :-1] < lengths_b[:, None]
  code_loss = mean_nll(code_logits, codes_bl, code_valid)
  accuracy = jnp.sum((jnp.argmax(code_logits, -1) == codes_bl) & code_valid
                     ) / jnp.maximum(code_valid.sum(), 1)
  loss = pos_loss + code_loss
  return loss, {"loss": loss, "position_loss": pos_loss,
                "code_loss": code_loss, "code_accuracy": accuracy}


def check_sequences(positions_bl, lengths_b, num_regions: int, *,
                    levels: int = 2) -> None:
  """Raises naming the first row whose positions are not a valid sequence
  of the format above (length and END padding included)."""
  fmt = dynamic.Format(num_regions, levels)
  positions_bl = jnp.asarray(positions_bl)
  b, steps = positions_bl.shape
  if steps != fmt.max_len or jnp.shape(lengths_b) != (b,):
    raise ValueError(f"positions {positions_bl.shape}, lengths"
                     f" {jnp.shape(lengths_b)}; expected [B, {fmt.max_len}]"
                     f" and [B] (R = {num_regions}, {levels} levels)")
  end = fmt.end
  targets = jnp.concatenate([positions_bl, jnp.full((b, 1), end)], 1)
  in_range = (targets >= 0) & (targets <= end)
  targets = jnp.clip(targets, 0, end)
  allowed = valid_next_positions(targets[:, :-1], num_regions, levels=levels)
  ok = jnp.take_along_axis(allowed, targets[..., None], -1)[..., 0]
  # END exactly from step `length` on.
  padded = jnp.arange(steps + 1) >= jnp.asarray(lengths_b)[:, None]
  ok &= in_range & ((targets == end) == padded)
  bad = np.flatnonzero(~np.asarray(ok).all(axis=1))
  if bad.size:
    raise ValueError(f"row {bad[0]} is not a valid DQ sequence (R ="
                     f" {num_regions}, {levels} levels): positions"
                     f" {np.asarray(positions_bl[bad[0]]).tolist()}, length"
                     f" {int(lengths_b[bad[0]])}")


@functools.partial(jax.jit, static_argnames=(
    "graphdef", "temperature", "top_k", "top_p", "cfg_scale", "use_cache",
    "position_top_k", "position_top_p", "position_temperature",
    "free_positions"))
def _generate(graphdef, state, cond, key, *, temperature, top_k, top_p,
              cfg_scale, use_cache, position_top_k, position_top_p,
              position_temperature, free_positions):
  model = nnx.merge(graphdef, state)
  c = model.config
  b = jax.tree.leaves(cond)[0].shape[0]
  guided = cfg_scale != 1.0
  if guided:  # conditional rows, then unconditional rows, as one batch
    cond = jax.tree.map(lambda x, n: jnp.concatenate([x, n]), cond,
                        null_condition(c, cond))
  twice = lambda x: jnp.concatenate([x, x]) if guided else x
  guide = lambda logits: (car_lib.guided_logits(logits[:b], logits[b:],
                                                cfg_scale)
                          if guided else logits)
  pick_code = functools.partial(
      _draw, key=key, which=1, temperature=temperature, top_k=top_k,
      top_p=top_p)
  pick_position = functools.partial(
      _draw, key=key, which=0, temperature=position_temperature,
      top_p=position_top_p, top_k=min(position_top_k, c.num_positions))
  init = (jnp.zeros((b, c.max_len), jnp.int32),
          jnp.full((b, c.max_len), c.end, jnp.int32),
          jnp.zeros((b, c.num_regions), bool), jnp.full((b,), -1, jnp.int32))
  fmt = c.format
  first_fine, fine_cells = fmt.offsets[-2], c.max_len

  def allowed_next(positions, assigned_br, last_b):
    if not free_positions:
      return next_position_mask(assigned_br, last_b, c.num_regions,
                                levels=c.levels)
    # Emitted finest cells (ids below them land in the dropped slot -1).
    slot = positions - first_fine
    slot = jnp.where((slot < 0) | (slot >= fine_cells), fine_cells, slot)
    emitted = jnp.zeros((b, fine_cells + 1), bool).at[
        jnp.arange(b)[:, None], slot].set(True)
    return next_position_mask(assigned_br, last_b, c.num_regions,
                              levels=c.levels,
                              emitted_c=emitted[:, :fine_cells])

  if use_cache:
    return _generate_cached(model, cond, key, init, twice, guide,
                            pick_code, pick_position, allowed_next)

  def step(carry, i):
    codes, positions, coarse_br, last_b = carry
    # Full recompute: the step's state depends only on tokens < i.
    hidden = model.position_hidden(cond, twice(codes), twice(positions))
    logits = guide(model.position_logits(hidden[:, i]))
    allowed = allowed_next(positions, coarse_br, last_b)
    pos = pick_position(mask_logits(logits, allowed), step=i)
    positions = positions.at[:, i].set(pos)
    code_logits = model.code_logits(hidden[:, :-1], twice(positions))[:, i]
    code = pick_code(guide(code_logits), step=i)
    codes = codes.at[:, i].set(jnp.where(pos == c.end, 0, code))
    coarse_br |= assigned_by(pos, fmt)
    return (codes, positions, coarse_br, pos), None

  (codes, positions, _, _), _ = jax.lax.scan(step, init,
                                             jnp.arange(c.max_len))
  return codes, positions, jnp.sum(positions != c.end, axis=1)


def _draw(logits_bk, *, key, step, which: int, **settings):
  """Step `step`'s draws [B]: the position (`which` 0) or the code (1)
  from split(fold_in(key, step)), with one key for the batch () or one per
  row [B] (a row's draws then do not depend on the other rows)."""
  split = lambda k: jax.random.split(jax.random.fold_in(k, step))[which]
  if key.ndim == 0:
    return sampling.pick(logits_bk, split(key), **settings)
  return jax.vmap(lambda logits_k, k: sampling.pick(
      logits_k[None], split(k), **settings)[0])(logits_bk, key)


def _generate_cached(model: DQTransformer, cond, key, init, twice, guide,
                     pick_code, pick_position, allowed_next):
  """`_generate` with a KV cache per stream: the condition is read once,
  then each step feeds one token to each stream (T steps of one token
  instead of T full passes over the buffer); the same tokens as the full
  recompute (tests/dq_transformer_test.py)."""
  c = model.config
  prefix, prefix_mask = model.condition(cond)
  rows = prefix.shape[0]
  positions_p = car_lib.positions_from_mask(prefix_mask)
  pos_cache = model.position_stream.init_cache(
      rows, prefix.shape[1] + c.max_len)
  hidden, pos_cache = model.position_stream.forward_embeddings(
      prefix, positions_p, pos_cache, attention_mask=prefix_mask)
  content_cache = model.content_stream.init_cache(rows, c.max_len)

  def step(carry, i):
    (codes, positions, coarse_br, last_b), hidden_b1d, caches, next_pos = (
        carry)
    pos_cache, content_cache = caches
    logits = guide(model.position_logits(hidden_b1d[:, 0]))
    allowed = allowed_next(positions, coarse_br, last_b)
    pos = pick_position(mask_logits(logits, allowed), step=i)
    x = hidden_b1d + model.embed_next(twice(pos)[:, None]).astype(
        hidden_b1d.dtype)
    h, content_cache = model.content_stream.forward_embeddings(
        x, cache=content_cache)
    code_logits = model.content_stream.logits(h)[:, 0].astype(jnp.float32)
    code = pick_code(guide(code_logits), step=i)
    code = jnp.where(pos == c.end, 0, code)
    tokens = (model.position_stream.embed(twice(code)[:, None]) +
              model.embed_pos(twice(pos)[:, None]))
    hidden_b1d, pos_cache = model.position_stream.forward_embeddings(
        tokens.astype(prefix.dtype), next_pos[:, None], pos_cache)
    state = (codes.at[:, i].set(code), positions.at[:, i].set(pos),
             coarse_br | assigned_by(pos, c.format), pos)
    return (state, hidden_b1d, (pos_cache, content_cache), next_pos + 1), None

  carry = (init, hidden[:, -1:], (pos_cache, content_cache),
           positions_p[:, -1] + 1)
  (state, _, _, _), _ = jax.lax.scan(step, carry, jnp.arange(c.max_len))
  codes, positions = state[0], state[1]
  return codes, positions, jnp.sum(positions != c.end, axis=1)


def generate(model: DQTransformer, cond, key, *, temperature=1.0, top_k=0,
             top_p=1.0, cfg_scale=1.0, position_temperature=None,
             position_top_k=None, position_top_p=None, use_cache=True,
             free_positions=False):
  """Samples (codes [B, T], positions [B, T], lengths [B]) for a
  condition: class ids [B] (num_classes: the null class) or (text ids,
  text mask) [B, L] (an all-zero mask: the empty prompt).

  `key`: one PRNG key for the batch, or one per row [B]
  (cvqcar.car.sampling.sample_keys): a row's step t then draws from
  fold_in(key[b], t) alone, whatever the other rows (what the sharded
  DQSampler passes).

  One jitted lax.scan of exactly T = 4^(L-1) R steps; a finished row keeps
  emitting END with code 0. With `use_cache` each stream keeps a KV cache
  and a step feeds it one token; without, every step recomputes both
  streams over the whole buffer (the reference the cached path is tested
  against). Positions are drawn from the guided logits masked to
  `next_position_mask` (with `free_positions` the model also orders the
  finest cells), so every sample decodes; temperature, top_k and top_p
  apply to the codes, and to the positions unless `position_temperature`
  / `position_top_k` / `position_top_p` are given (top_k is clamped to the
  END + 1 position ids), temperature 0 being greedy. cfg_scale s gives
  null + s (cond - null) (cvqcar.car.model.guided_logits): 1 is
  conditional only (and runs no null rows), 0 unconditional.
  """
  c = model.config
  position_temperature = (temperature if position_temperature is None
                          else position_temperature)
  position_top_k = top_k if position_top_k is None else position_top_k
  position_top_p = top_p if position_top_p is None else position_top_p
  sampling.check_settings(temperature=temperature, top_k=top_k, top_p=top_p,
                          num_codes=c.num_codes)
  sampling.check_settings(temperature=position_temperature,
                          top_k=min(position_top_k, c.num_positions),
                          top_p=position_top_p, num_codes=c.num_positions)
  check_condition(c, cond)
  cond = jax.tree.map(lambda x: jnp.asarray(x, jnp.int32),
                      tuple(cond) if c.text_vocab else cond)
  key = sampling.row_keys(key, jax.tree.leaves(cond)[0].shape[0])
  graphdef, state = nnx.split(model)
  return _generate(graphdef, state, cond, key,
                   temperature=float(temperature), top_k=int(top_k),
                   top_p=float(top_p), cfg_scale=float(cfg_scale),
                   use_cache=bool(use_cache),
                   position_top_k=int(position_top_k),
                   position_top_p=float(position_top_p),
                   position_temperature=float(position_temperature),
                   free_positions=bool(free_positions))
