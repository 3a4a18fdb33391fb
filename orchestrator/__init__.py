"""adversarial-sweep: whole ablation studies of adversarial training, one Ray Train run per grid cell."""

__version__ = "0.2.0"
