"""CVQ tokenizer: channel-wise VQ (or the patch-wise baseline) with a VQGAN.

Run (embedded photos, laptop CPU, a few minutes):
  python -m cvqcar.train --config=configs/cvq_tokenizer.py:tiny \
      --workdir=runs/cvq_tiny

ImageNet at 256 px, 256 channel tokens of 16x16 (a pod job):
  python -m cvqcar.train --config=configs/cvq_tokenizer.py \
      --config.data.data_dir=/path/to/tfds --workdir=gs://bucket/cvq256

Arguments after ':' are comma-separated: `tiny` shrinks everything to run on
a CPU, `patch` selects the patch-wise VQGAN baseline on the same encoder,
`dynamic` DQ-VAE's dynamic quantization (at most h*w tokens: a region of
2 x 2 latent cells takes one code or four; about half fine by default;
`dynamic=3` its three-granularity form: a region of 4 x 4 cells takes 1,
4 or 16 codes, 30% of the regions fine and 30% medium, as the original's
triple-grain model),
`ema` / `plain` / `cosine` / `simvq` select the codebook variant, `res=N`
sets the resolution, `fashion` trains on Fashion-MNIST (local IDX files,
config.data.data_dir; empty: where Debian's dataset-fashion-mnist puts
them), `smoke` (with `tiny`) shrinks it to a seconds-long
run for notebooks' fast mode and CI (16 px, 8 channels, 6 steps), and
`budget=B` (a square number) sets an equal token
budget for both axes: a sqrt(B) x sqrt(B) latent grid with B channels, so
channel tokens and patch tokens alike are B tokens of B numbers, and
`fsq` / `lfq` / `bsq` replace the codebook by a codebook-free quantizer
(cvqcar/tokenizer/scalar.py) with about as many codes (FSQ: the FSQ paper's
levels for that size; LFQ and BSQ: log2 K sign bits), `ibq` trains a plain
codebook by index backpropagation and `rotation` takes the rotation trick
for the straight-through estimator, `rvq=D` residual VQ of depth D (D
codes a token from one shared codebook, a token's levels adjacent in the
sequence) and `kmeans` / `kmeans=N` starts the codebook from k-means of
the encoder's rows of the first N (8) batches, along either axis:

  python -m cvqcar.train --config=configs/cvq_tokenizer.py:tiny,budget=64
  python -m cvqcar.train --config=configs/cvq_tokenizer.py:tiny,budget=64,patch

Any field is overridable: --config.num_train_steps=50.
"""

import math

import ml_collections

KNOWN_ARGS = {"tiny", "patch", "dynamic", "ema", "plain", "cosine", "simvq",
              "res", "budget", "smoke", "fashion", "fsq", "lfq", "bsq",
              "rotation", "ibq", "rvq", "kmeans"}
# The FSQ paper's levels per code size (Mentzer et al. 2023, table 1), and
# 2^6 for the smoke config.
FSQ_LEVELS = {6: (4, 4, 4), 8: (8, 6, 5), 10: (8, 5, 5, 5),
              12: (7, 5, 5, 5, 5), 14: (8, 8, 8, 6, 5),
              16: (8, 8, 8, 5, 5, 5)}


def set_scalar_quantizer(m: ml_collections.ConfigDict, name: str) -> None:
  """Selects FSQ, LFQ or BSQ with about m.num_codes codes (num_codes is set
  to the exact count)."""
  bits = max(1, round(math.log2(m.num_codes)))
  m.quantizer = name
  if name == "fsq":
    near = min(FSQ_LEVELS, key=lambda b: abs(b - bits))
    m.scalar.fsq_levels = FSQ_LEVELS[near]
    m.num_codes = math.prod(FSQ_LEVELS[near])
  else:
    m.scalar.bits = bits
    m.num_codes = 2 ** bits


def parse_args(arg: str, known: set[str]) -> dict[str, str]:
  """'tiny,res=64' -> {'tiny': '', 'res': '64'}; unknown names raise."""
  out = {}
  for item in filter(None, arg.split(",")):
    key, _, value = item.partition("=")
    out[key] = value
  unknown = set(out) - known
  if unknown:
    raise ValueError(f"unknown config argument(s) {sorted(unknown)}; known:"
                     f" {sorted(known)}")
  return out


def set_budget(m: ml_collections.ConfigDict, budget: int,
               tiny: bool) -> None:
  """An s x s latent grid with s*s channels, s = sqrt(budget): the same
  number of tokens (and numbers per token) along either axis."""
  side = int(round(budget ** 0.5))
  factor = m.resolution // side if side else 0
  if (budget < 1 or side * side != budget or factor * side != m.resolution
      or factor & (factor - 1)):
    raise ValueError(
        f"budget={budget} needs a square number s*s whose side s divides the"
        f" resolution {m.resolution} by a power of two (e.g. 16, 64, 256)")
  levels = factor.bit_length()  # factor = 2 ** (levels - 1)
  widths = (1,) + (2,) * 8 if tiny else (1, 1, 2, 2, 4, 4, 8, 8, 8)
  m.channel_mults = widths[:levels]
  m.latent_channels = budget


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  args = parse_args(arg, KNOWN_ARGS)
  config = ml_collections.ConfigDict()
  config.trainer = "tokenizer"  # what `python -m cvqcar.train` runs
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  config.data.name = "imagenet2012"  # or 'embedded'; eval also 'folder'
  # A TFDS data dir (local or gs://); nothing is downloaded. TFRecord-built
  # data is converted once: python -m cvqcar.data.tfds_images --data_dir=...
  config.data.data_dir = ""
  config.data.tfds_name = "imagenet2012"  # the TFDS dataset data.name reads
  config.data.eval_dir = ""  # data.name='folder': a directory of images
  config.data.train_split = "train"
  config.data.eval_split = "validation"
  config.data.train_crop = "random"  # 'random' or 'center'
  config.data.min_scale = 0.15  # embedded photos: smallest crop side fraction
  # Images whose short side is under this many pixels are skipped and
  # counted (data/skipped); 0 keeps all.
  config.data.min_image_size = 0
  config.data.num_eval_images = 10_000
  config.data.num_threads = 16
  # Grain worker processes: 0 (read threads only) up to about 2 host cores
  # of input work; about the cores needed beyond (docs/benchmarks.md,
  # 'input pipeline': ~10 for an 8-GPU H100 node).
  config.data.worker_count = 0

  m = config.model = ml_collections.ConfigDict()
  m.resolution = 256
  m.base_channels = 128
  m.channel_mults = (1, 1, 2, 2, 4)  # downsample factor f = 16
  m.num_res_blocks = 2
  m.norm_groups = 32
  m.latent_channels = 256  # C: the number of channel tokens
  # 'channel' (CVQ), 'patch' (VQGAN baseline) or 'dynamic' (DQ-VAE)
  m.quantize = "channel"
  m.num_codes = 16_384
  m.nested_dropout_alpha = 0.25
  cb = m.codebook = ml_collections.ConfigDict()
  cb.cosine = False
  cb.simvq = False
  cb.ema = True  # EMA + dead-code restart: stable on small data
  cb.ema_decay = 0.99
  cb.restart_fraction = 0.03
  # Std of the initial codewords. 1.0 (norm ~8 for 8 x 8 maps) sits far
  # outside the encoder's maps (norm ~4): the few smallest codewords win
  # every lookup and the plain codebook collapses (18.8% of 1,024 codes);
  # at 0.1 it holds (92.8%). See docs/results.md, configs/sweeps/
  # plain_collapse.py. EMA codebooks start from data and ignore it.
  cb.init_scale = 0.1
  cb.argmin_impl = "auto"
  # The rotation trick instead of the straight-through estimator; IBQ's
  # index backpropagation (a gradient-trained codebook: not with ema).
  cb.rotation = False
  cb.index_backprop = False
  # >0: a fresh run starts the codebook from k-means of the encoder's rows
  # of this many training batches (cvqcar/tokenizer/kmeans.py).
  cb.kmeans_batches = 0
  cb.kmeans_iters = 10
  # quantize='dynamic': a region of 2 x 2 latent cells takes 1 code or 4
  # (levels=3: a region of 4 x 4 cells takes 1, 4 or 16).
  m.dynamic = ml_collections.ConfigDict()
  m.dynamic.levels = 2
  m.dynamic.fine_fraction = 0.5  # target share of regions coded fine
  m.dynamic.medium_fraction = 0.0  # levels=3: target share coded medium
  m.dynamic.temperature = 1.0  # of the router's Gumbel-softmax
  # What the decoder adds to the mixed latent: 'fourier+learned' (as the
  # original) or 'none'.
  m.dynamic.position = "fourier+learned"
  # The eval thresholds: the router-score quantiles that code the target
  # shares at each level on this many training batches (the first ones,
  # the same each time), with the EMA weights eval uses, set before each
  # eval and checkpoint (cvqcar/tokenizer/dynamic.py).
  m.dynamic.calibration_batches = 16
  m.dynamic.calibration_decay = 0.99  # DynamicQuantizer.calibrate's mean
  # 'learned' (a gate on the features, trained with the budget loss) or
  # 'entropy' (the original's released router: a region is fine when its
  # grey-level entropy is over the fine_fraction quantile; no budget loss).
  m.dynamic.router = "learned"
  # 'dual': coarse codes from one more downsampling of the encoder, with
  # its own attention mid-block and head (as the original); 'pooled': a
  # linear map of a region's four fine cells.
  m.dynamic.encoder = "dual"
  # The quantizer of each token's row: 'vq' (the codebook above) or the
  # codebook-free 'fsq', 'lfq', 'bsq' (cvqcar/tokenizer/scalar.py), whose
  # num_codes follows from their own settings.
  m.quantizer = "vq"
  m.rvq_depth = 1  # residual VQ (quantizer 'vq'): codes per token
  sc = m.scalar = ml_collections.ConfigDict()
  sc.fsq_levels = FSQ_LEVELS[14]  # 15,360 codes
  sc.bits = 14  # LFQ / BSQ: 16,384 codes
  sc.entropy_weight = 0.1  # LFQ / BSQ: times (row - gamma * batch entropy)
  sc.diversity_gamma = 1.0
  sc.temperature = 0.01  # of the entropy's softmax over codes

  loss = config.loss = ml_collections.ConfigDict()
  loss.reconstruction = "l2"  # or 'l1'
  loss.reconstruction_weight = 5.0
  loss.quantization_weight = 5.0
  loss.beta = 0.25  # commitment
  # dynamic: times (fine share - target)^2. The original's budget term is
  # 2 x gamma (= 10) x that against an L1 pixel loss of weight 1: 20 x the
  # pixel weight, which here is reconstruction_weight = 5.
  loss.budget_weight = 100.0
  loss.perceptual_weight = 1.0
  loss.perceptual_weights = ""  # .npz of LPIPS weights; empty turns it off
  loss.gan_weight = 0.75  # times the adaptive weight
  loss.gan_start_step = 20_000
  loss.disc_base_channels = 64
  loss.disc_num_layers = 3

  opt = config.optimizer = ml_collections.ConfigDict()
  opt.learning_rate = 1e-4
  opt.disc_learning_rate = 1e-4
  opt.warmup_steps = 5_000
  opt.b1 = 0.9
  opt.b2 = 0.99
  opt.weight_decay = 1e-4
  opt.grad_clip = 1.0
  config.ema_decay = 0.999  # EMA of generator params, used for eval/export

  # Mesh axes within a slice (ICI) and across slices (DCN); one -1 takes
  # the remaining devices. data x fsdp split the batch; model splits widths.
  config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "model": 1})
  config.dcn_mesh = ml_collections.ConfigDict(
      {"data": 1, "fsdp": 1, "model": 1})
  # Logical parameter axis -> mesh axes (None: replicated).
  config.logical_axis_rules = (
      ("conv_in", "fsdp"),
      ("conv_out", "model"),
      ("codes", "model"),
      ("code_dim", "fsdp"),
      ("norm", None),
  )

  config.batch_size = 256
  config.eval_batch_size = 256
  config.num_train_steps = 500_000
  config.run_steps = 0  # >0: stop (with a checkpoint) after this many steps
  config.log_every = 100
  config.eval_every = 5_000
  config.checkpoint_every = 5_000
  config.keep_checkpoints = 3
  config.eval_at_start = True  # an eval at step 0: the untrained baseline
  # "A:B": a jax.profiler trace of steps A..B into WORKDIR/profile.
  config.profile_steps = ""
  # A workdir lock whose holder sent no heartbeat for this long is stale.
  config.lock_stale_after_s = 600.0
  # Weights & Biases beside TensorBoard (cvqcar/wandb_writer.py): a project
  # name turns it on; mode 'offline' (or WANDB_MODE) writes for `wandb sync`.
  config.wandb = ml_collections.ConfigDict(
      {"project": "", "entity": "", "name": "", "mode": ""})
  config.num_grid_images = 8

  if "res" in args:
    m.resolution = int(args["res"])
  if "tiny" in args:
    config.data.name = "embedded"
    config.data.num_eval_images = 256
    config.data.num_threads = 4
    m.resolution = int(args.get("res", 32))
    m.base_channels = 32
    # f = 4: 256 channel tokens of 8 x 8 at 32 px (the token count of the
    # paper's 256 px models). On a CPU budget more, smaller tokens won
    # (32 of 16 x 16: 20.0 dB; 256 of 8 x 8: 21.8 dB, 600 steps of 32), and
    # then more, smaller steps: 2,400 of batch 8 see as many images as 600
    # of 32 in about the same time and reach 22.9 dB (docs/results.md,
    # the quick start's budget).
    m.channel_mults = (1, 2, 2)
    m.num_res_blocks = 1
    m.norm_groups = 8
    m.latent_channels = 256
    m.num_codes = 4096
    loss.gan_weight = 0.0
    loss.perceptual_weight = 0.0
    opt.learning_rate = 1e-3
    opt.disc_learning_rate = 1e-3
    opt.warmup_steps = 50
    opt.weight_decay = 0.0
    config.ema_decay = 0.99
    config.batch_size = 8
    config.eval_batch_size = 64
    config.num_train_steps = 2400
    config.log_every = 100
    config.eval_every = 800
    config.checkpoint_every = 800
  if "fashion" in args:
    config.data.name = "fashion_mnist"  # 60,000 train, 10,000 test images
    config.data.num_eval_images = 1000
    if "tiny" in args:  # grey clothes on black: 32 tokens of 16 x 16, K =
      # 1024, 600 steps of 32 (the shape of the Fashion-MNIST scores in
      # docs/results.md)
      m.channel_mults, m.latent_channels, m.num_codes = (1, 2), 32, 1024
      config.batch_size, config.num_train_steps = 32, 600
      config.log_every, config.eval_every = 50, 200
      config.checkpoint_every = 200
  if "smoke" in args:
    if "tiny" not in args:
      raise ValueError("config argument 'smoke' shrinks 'tiny': use"
                       " 'tiny,smoke'")
    m.resolution = int(args.get("res", 16))
    m.channel_mults = (1, 2)  # 8 x 8 channel maps
    m.base_channels, m.norm_groups = 8, 4
    m.latent_channels, m.num_codes = 8, 64
    config.batch_size = config.eval_batch_size = 8
    config.data.num_eval_images = 16
    config.data.num_threads = 2
    config.num_train_steps, config.log_every = 6, 2
    config.eval_every = config.checkpoint_every = 1000
    config.num_grid_images = 4
  if "budget" in args:
    set_budget(m, int(args["budget"]), tiny="tiny" in args)
  for axis in ("patch", "dynamic"):
    if axis in args:
      m.quantize = axis
      m.nested_dropout_alpha = 0.0
  if args.get("dynamic"):  # dynamic=L: L granularities
    if args["dynamic"] not in ("2", "3"):
      raise ValueError("config argument dynamic=L takes L = 2 or 3"
                       f" granularities, got {args['dynamic']!r}")
    m.dynamic.levels = int(args["dynamic"])
    if m.dynamic.levels == 3:  # the original's triple-grain targets
      m.dynamic.fine_fraction = m.dynamic.medium_fraction = 0.3
  if "ema" in args:
    cb.ema, cb.simvq = True, False
  if "plain" in args:
    cb.ema = False
  if "cosine" in args:
    cb.cosine = True
  if "simvq" in args:
    cb.ema, cb.simvq = False, True
  if "rotation" in args:
    cb.rotation = True
  if "ibq" in args:  # a plain codebook the gradient trains
    cb.index_backprop, cb.ema, cb.simvq = True, False, False
  if "kmeans" in args:  # kmeans=N: N batches (default 8)
    cb.kmeans_batches = int(args["kmeans"] or 8)
  if "rvq" in args:
    if not args["rvq"].isdigit():
      raise ValueError(f"config argument rvq=D needs a depth D (e.g."
                       f" rvq=4), got {args['rvq']!r}")
    m.rvq_depth = int(args["rvq"])
  names = [n for n in ("fsq", "lfq", "bsq") if n in args]
  if len(names) > 1:
    raise ValueError(f"config arguments {names} each pick the quantizer;"
                     " give one")
  if names:
    set_scalar_quantizer(m, names[0])
  return config
