r"""The K-budget study of the reference paper (paper 82), rerun with many seeds.

Every study of the paper (budget-matched curve, K=2 at 1-8x the budget, the
K=32 vs K=2 crossover, and the curve matched on FLOPs and on seconds), 4
seeds, base pretraining included. Measured 3 min 43 s on a 2-core CPU (over
half of it K=2's 5,120-step run); add
`--config.studies.budget_multipliers.enabled=False
--config.studies.crossover.enabled=False` for the budget-matched curve alone:

  python -m experiments.k_budget_sweep \
    --config=experiments/configs/paper82.py --workdir=runs/paper82

Smoke variant (the same studies, K grid and budget anchor with a 72-wide
one-layer model and 2 seeds; 35 s to 2 min on 2 CPU cores depending on load,
most of it compiling the six K's, less on a rerun with the compile cache):

  python -m experiments.k_budget_sweep \
    --config=experiments/configs/paper82.py:smoke --workdir=/tmp/smoke

Override any key from the command line, e.g. `--config.seeds=8`.
"""

import ml_collections


def model_config() -> ml_collections.ConfigDict:
  """The frozen base model (a pre-norm decoder-only transformer)."""
  model = ml_collections.ConfigDict()
  model.vocab_size = 260  # tokens; byte-level: 256 bytes + 4 specials
  model.d_model = 128  # residual width; K=64 must stay below it
  model.n_heads = 4  # attention heads; d_model must divide by it
  model.n_layers = 2  # transformer blocks
  model.d_mlp = 256  # MLP hidden width
  model.max_len = 64  # positions; at least data.seq_len
  model.dtype = 'float32'  # compute dtype: float32 or bfloat16
  # einsum (written out; faster on CPU) | dot_product_attention (jax.nn's,
  # which lets JAX choose the implementation for the backend)
  model.attention = 'einsum'
  # custom (the factors' K-major backward pass, model.lowrank_delta; faster
  # on CPU) | autodiff (JAX differentiates the product; the same values)
  model.factor_grad = 'custom'
  return model


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the locked config; `arg='smoke'` shrinks it for a quick run."""
  config = ml_collections.ConfigDict()
  config.seed = 0  # integer seed of lane 0; lane i uses seed + i
  config.seeds = 4  # independent seeds trained together per K
  config.model = model_config()

  config.lowrank = ml_collections.ConfigDict()
  config.lowrank.targets = (  # module-path patterns that get factors
      '*/attn/q',
      '*/attn/k',
      '*/attn/v',
      '*/attn/o',
      '*/mlp/up',
      '*/mlp/down',
      'head',
  )
  config.lowrank.scaling = 'standard'  # s(K): standard | rslora | none
  config.lowrank.alpha = 16.0  # numerator of s(K)

  config.budget = ml_collections.ConfigDict()
  config.budget.anchor_rank = 32  # K whose params x anchor_steps is the budget
  config.budget.anchor_steps = 40  # steps of the anchor K
  config.budget.param_steps = 0  # absolute budget in param-steps; 0 = anchor

  config.studies = ml_collections.ConfigDict()
  config.studies.budget_matched = ml_collections.ConfigDict()
  config.studies.budget_matched.enabled = True  # K grid at steps(K)
  config.studies.budget_matched.ranks = (2, 4, 8, 16, 32, 64)  # the K grid
  config.studies.budget_multipliers = ml_collections.ConfigDict()
  config.studies.budget_multipliers.enabled = True  # one K at n x budget
  config.studies.budget_multipliers.rank = 2  # the K that gets more budget
  config.studies.budget_multipliers.multipliers = (1, 2, 4, 8)  # x budget
  config.studies.crossover = ml_collections.ConfigDict()
  config.studies.crossover.enabled = True  # high K vs low K, equal params
  config.studies.crossover.high_rank = 32  # the larger K
  config.studies.crossover.low_rank = 2  # the smaller K, run param-step-equal
  config.studies.crossover.high_steps = (5, 10, 20, 40, 80)  # steps of high K
  # The budget_matched K grid matched on other budget axes, anchored like
  # param-steps (anchor K x anchor steps):
  config.studies.flops_matched = ml_collections.ConfigDict()
  config.studies.flops_matched.enabled = True  # equal model FLOPs per seed
  config.studies.wallclock_matched = ml_collections.ConfigDict()
  config.studies.wallclock_matched.enabled = True  # equal measured seconds
  config.studies.wallclock_matched.calibration_steps = 20  # timed steps per K

  config.data = ml_collections.ConfigDict()
  config.data.source = 'stdlib'  # stdlib | jsonl | synthetic | hf:<dataset>
  config.data.path = ''  # JSONL file of {"prompt", "response"} for jsonl
  config.data.hf_split = 'train'  # hf: split read; train/eval are cut from it
  config.data.hf_prompt_field = 'prompt'  # hf: column of the prompt text
  config.data.hf_response_field = 'response'  # hf: column of the response
  config.data.hf_subset = ''  # hf: Hub configuration name; '' = its default
  config.data.tokenizer = 'bytes'  # bytes | bpe (trained on the train split)
  config.data.bpe_vocab_size = 4096  # bpe: most ids incl. 4 specials (>= 261)
  config.data.seq_len = 64  # tokens per example
  config.data.max_prompt_tokens = 32  # prompt tokens kept, from its start
  config.data.eval_fraction = 0.1  # share held out for eval, by hash
  config.data.max_eval_examples = 256  # rows of the fixed eval set
  config.data.synthetic_examples = 2048  # examples of the synthetic task
  config.data.batch_size = 8  # examples per step per seed
  config.data.shared_across_seeds = False  # True: all seeds see one stream

  config.base = ml_collections.ConfigDict()
  config.base.kind = 'pretrained'  # pretrained | random
  config.base.checkpoint = ''  # Orbax dir from experiments.pretrain; '' = cache
  config.base.seed = 1234  # init seed of the base (random and pretraining)
  config.base.pretrain_steps = 600  # full-parameter steps on stdlib source
  config.base.pretrain_batch_size = 16  # sequences per pretraining step
  config.base.pretrain_lr = 3e-3  # peak AdamW learning rate, cosine decay
  config.base.pretrain_max_windows = 20000  # corpus windows kept on device

  config.optim = ml_collections.ConfigDict()
  config.optim.learning_rate = 1e-3  # peak AdamW learning rate of factors
  # Peak learning rates tried for every K and seed, trained together; each
  # cell reports the rate with the lowest loss on half of the eval set and
  # its losses on the other half. Empty: learning_rate alone, fixed for all K.
  config.optim.lr_grid = ()
  config.optim.schedule = 'constant'  # constant | cosine | linear (decay)
  config.optim.warmup_steps = 0  # linear warmup steps
  config.optim.end_factor = 0.0  # final lr / peak lr for decaying schedules
  config.optim.weight_decay = 0.0  # decoupled AdamW weight decay
  config.optim.b1 = 0.9  # Adam first-moment decay
  config.optim.b2 = 0.999  # Adam second-moment decay
  config.optim.eps = 1e-8  # Adam epsilon
  config.optim.max_grad_norm = 1.0  # global-norm clip; 0 disables

  config.train = ml_collections.ConfigDict()
  config.train.chunk_steps = 80  # scan slots per compiled chunk (max steps)
  config.train.eval_batch = 64  # eval rows per forward pass
  config.train.checkpoint_every_chunks = 4  # save run state every n chunks
  config.train.cache_dir = ''  # data/base cache; '' = ~/.cache/ctsft_jax
  config.train.tensorboard = False  # also write TensorBoard event files
  # Multi-host: call jax.distributed.initialize() first (TPU pods, clusters).
  config.train.distributed = False
  # CPU backend only: JAX devices the host is split into, lanes spread over
  # them so that cores train different lanes at once; 0 = one per core (at
  # most the lanes, and dividing them), 1 = a single device.
  config.train.cpu_devices = 0
  # Persistent XLA compilation cache; '' = $JAX_COMPILATION_CACHE_DIR if set,
  # else <cache_dir>/jax_cache; 'none' = off.
  config.train.compilation_cache_dir = ''

  if arg == 'smoke':
    config.seeds = 2
    config.model.d_model = 72
    config.model.d_mlp = 96
    config.model.n_layers = 1
    config.model.max_len = 32
    config.data.seq_len = 32
    config.data.max_prompt_tokens = 16
    config.data.max_eval_examples = 64
    config.data.batch_size = 4
    config.base.pretrain_steps = 40
    config.base.pretrain_batch_size = 8
    config.base.pretrain_max_windows = 2000
    config.train.eval_batch = 32
  elif arg:
    raise ValueError(f'unknown config argument {arg!r}; use smoke or nothing')
  config.lock()
  return config
