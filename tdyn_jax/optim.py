"""Learning-rate schedule and optimizer chain from the `optim` config."""

from __future__ import annotations

import ml_collections
import optax


def schedule(cfg: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    """Linear warmup to `lr`, then cosine decay to `lr * min_lr_ratio` at `num_steps`, or constant."""
    warmup = optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1))
    if cfg.schedule == "constant":
        after = optax.constant_schedule(cfg.lr)
    else:
        decay_steps = max(num_steps - cfg.warmup_steps, 1)
        after = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
    return optax.join_schedules([warmup, after], [cfg.warmup_steps])


def optimizer(cfg: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
    """Gradient clipping followed by the configured optimizer."""
    lr = schedule(cfg, num_steps)
    if cfg.name == "adamw":
        opt = optax.adamw(lr, cfg.b1, cfg.b2, cfg.eps, weight_decay=cfg.weight_decay)
    elif cfg.name == "adam":
        opt = optax.adam(lr, cfg.b1, cfg.b2, cfg.eps)
    elif cfg.name == "sgd":
        opt = optax.sgd(lr, momentum=cfg.momentum or None)
    elif cfg.name == "lion":
        opt = optax.lion(lr, cfg.b1, cfg.b2, weight_decay=cfg.weight_decay)
    else:
        opt = optax.adafactor(lr, weight_decay_rate=cfg.weight_decay or None)
    clip = optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity()
    return optax.chain(clip, opt)
