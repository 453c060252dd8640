"""CAR stage I: align CVQ channel tokens with a frozen LLM.

Run (embedded captioned photos, CPU, after the tiny tokenizer quick start):
  python -m cvqcar.export --workdir=runs/cvq_tiny --out=exports/cvq_tiny
  python -m cvqcar.train --config=configs/car_stage1.py:tiny \
      --workdir=runs/car1_tiny

The LLM is frozen; the projector (codeword -> LLM width, two-layer MLP), the
begin-of-image embedding and the image head train with AdamW (b1=0.9,
b2=0.96, weight decay 1e-3, lr 1e-4). `config.tokenizer` is the tokenizer's
model config (imported, so its shape cannot drift); the export named in
`config.tokenizer_export` must match it or the run stops at start-up.
Arguments: `tiny` (CPU-sized LLM and the tiny tokenizer), `llm=PRESET`
(0.6b, 1.7b, 4b, 8b, tiny), `fashion` (Fashion-MNIST with class-name
captions and the tokenizer `cvq_tokenizer.py:tiny,fashion`; eval and sample
prompts use a phrasing never seen in training), `c2i` (class-conditional:
ImageNet 256 from TFDS in config.data.data_dir, or with `fashion` the ten
Fashion-MNIST classes; the prompt is a class index, see below). Sharding:
`config.mesh`
sizes the data, fsdp and model axes; the rules shard the embedding width
over fsdp and heads, kv heads, MLP width, vocabulary and codes over model.

Class-conditional (`c2i`): the condition is a learned class embedding
(`config.num_classes` rows) in the prompt's one slot before the
begin-of-image embedding, as LlamaGen, RAR and VAR condition on ImageNet,
so the numbers compare like for like; TFDS's ImageNet labels are WordNet
ids with no names offline, so a class-name prompt has nothing to read.
Classifier-free guidance drops the class as it drops a prompt (the slot
masked out), and every command that takes prompts takes class indices
("207").

  python -m cvqcar.train --config=configs/car_stage1.py:tiny,c2i,fashion \
      --workdir=runs/car1_c2i_fashion
"""

import ml_collections

from configs import cvq_tokenizer
from cvqcar.data import fashion as fashion_data


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  args = cvq_tokenizer.parse_args(arg, {"tiny", "llm", "fashion", "c2i"})
  tiny, fashion, c2i = "tiny" in args, "fashion" in args, "c2i" in args
  config = ml_collections.ConfigDict()
  config.trainer = "car"  # what `python -m cvqcar.train` runs
  config.stage = 1
  config.seed = 0
  tok_args = ",".join(a for a in ("tiny", "fashion") if a in args)
  config.tokenizer = cvq_tokenizer.get_config(tok_args).model
  config.tokenizer_export = (f"exports/cvq_{'fashion' if fashion else 'tiny'}"
                             if tiny else "")
  config.init_from = ""  # stage II: a stage-I workdir or export
  # The workdir (and stage I, and pre-tokenized shards) record the
  # tokenizer export's fingerprint; True lets a run go on with another one.
  config.allow_tokenizer_mismatch = False

  config.llm = ml_collections.ConfigDict()
  config.llm.preset = args.get("llm", "tiny" if tiny else "4b")
  config.llm.hf_dir = ""  # local HF Qwen3 checkpoint; empty: random init
  # Precision: parameters and Adam moments in param_dtype (float32 master
  # weights); matmuls and activations in dtype ('' keeps the preset's or
  # the checkpoint's: bfloat16 for 0.6b-8b, float32 for tiny).
  config.llm.dtype = ""
  config.llm.param_dtype = "float32"
  # What the backward pass recomputes per decoder layer: 'none' (keep all
  # activations), 'full' (keep only layer inputs) or 'save-dots' (keep the
  # matmul outputs).
  config.llm.remat = "none" if tiny else "full"
  config.llm.scan_layers = True  # lax.scan over the layers (compile once)
  # 'auto': jax.nn.dot_product_attention's choice (cuDNN flash attention on
  # a GPU, else XLA); or 'xla', 'cudnn', 'plain' (einsum reference).
  config.llm.attention = "auto"
  # 'auto': the tokenizer.json in llm.hf_dir, else byte-level; or 'bytes',
  # or the path of a tokenizer.json.
  config.text_tokenizer = "auto"
  config.max_text_len = 64 if tiny else 256
  config.cfg_drop_prob = 0.1  # prompt dropped -> unconditional training
  # > 0: class-conditional, the prompt a class index (see the docstring).
  config.num_classes = 0

  config.data = ml_collections.ConfigDict()
  # 'embedded' (captioned photos), 'shards' (ArrayRecord pairs) or
  # 'fashion_mnist' (IDX files in data_dir; empty: Debian's location).
  config.data.name = "fashion_mnist" if fashion else "embedded"
  config.data.data_dir = ""
  config.data.shards = ""  # convert_pairs / tokenize_dataset output
  config.data.eval_shards = ""  # held-out shards; empty: first train records
  config.data.pretokenized = False  # shards hold CVQ tokens, not images
  config.data.num_eval_examples = 64
  config.data.num_threads = 4

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 1e-4
  config.optimizer.warmup_steps = 1000
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.96
  config.optimizer.weight_decay = 1e-3
  config.optimizer.grad_clip = 1.0

  config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "model": 1})
  config.dcn_mesh = ml_collections.ConfigDict(
      {"data": 1, "fsdp": 1, "model": 1})
  config.logical_axis_rules = (
      ("vocab", "model"), ("embed", "fsdp"), ("heads", "model"),
      ("kv_heads", "model"), ("mlp", "model"), ("codes", "model"),
      ("code_dim", None), ("norm", None), ("head_dim", None),
      ("layers", None),
      ("conv_in", "fsdp"), ("conv_out", "model"),
  )

  config.batch_size = 256
  config.num_train_steps = 100_000
  # Eval rows per step (0: batch_size); a short last batch is padded and
  # masked, so every eval example counts once.
  config.eval_batch_size = 0
  config.run_steps = 0
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
  config.sample = ml_collections.ConfigDict()
  config.sample.prompts = ("a ginger tabby cat", "a cup of coffee on a saucer")
  config.sample.temperature = 1.0
  config.sample.top_k = 0
  config.sample.top_p = 1.0
  config.sample.cfg_scale = 3.0
  # 'constant', or 'linear' / 'cosine': cfg_scale at the first channel down
  # to 1 at the last (cvqcar.car.sampling.guidance_scales).
  config.sample.cfg_schedule = "constant"

  if fashion:
    config.data.num_eval_examples = 256
    config.sample.prompts = tuple(
        fashion_data.caption(c, fashion_data.HELD_OUT_TEMPLATE)
        for c in (0, 1, 5, 7, 8, 9))
  if c2i:
    config.num_classes = len(fashion_data.CLASSES) if fashion else 1000
    config.data.name = "fashion_mnist" if fashion else "imagenet2012"
    config.data.train_split, config.data.eval_split = "train", "validation"
    config.max_text_len = 1  # the class
    # LlamaGen's demo classes (ImageNet), or every Fashion-MNIST class.
    config.sample.prompts = tuple(str(c) for c in (
        range(config.num_classes) if fashion else
        (207, 360, 387, 974, 88, 979)))
  if tiny:
    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 20
    config.batch_size = 16
    config.num_train_steps = 200
    config.log_every = 20
    config.eval_every = 100
    config.checkpoint_every = 100
  if tiny and fashion:  # 60,000 images: more steps and a larger batch
    config.batch_size = 32
    config.num_train_steps = 400
    config.eval_every = config.checkpoint_every = 200
  return config
