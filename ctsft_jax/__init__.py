"""ctsft_jax: budget-matched studies of the rank K of low-rank fine-tuning."""

__version__ = '0.1.0'
