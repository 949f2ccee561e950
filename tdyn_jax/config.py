"""Checks a configuration before anything is compiled or written, with one clear line per mistake."""

from __future__ import annotations

import fnmatch
import json
from typing import Any

import ml_collections

from tdyn_jax import fake_quant
from tdyn_jax.probes.lowprec import BLOCK_FORMATS, FORMATS, SCALINGS
from tdyn_jax.probes.spec import GROUPS

CHOICES = {
    "model.norm": ("layernorm", "rmsnorm", "none"),
    "model.norm_placement": ("pre", "post"),
    "model.mlp": ("gelu", "relu", "swiglu"),
    "model.positions": ("rope", "learned"),
    "model.remat": ("none", "full", "dots", "dots_no_batch"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.compute_dtype": ("float32", "bfloat16"),
    "model.logits_dtype": ("float32", "compute"),
    "data.source": ("shakespeare", "synthetic", "text", "tokens"),
    "data.token_dtype": ("uint16", "uint32"),
    "optim.name": ("adamw", "adam", "sgd", "lion", "adafactor"),
    "optim.schedule": ("cosine", "constant"),
    "mesh.distributed": ("auto", "on", "off"),
    "train.nonfinite": ("stop", "skip", "ignore"),
    "analysis.criterion": ("aic", "bic"),
    "analysis.reference": ("none", "pythia"),
}
POSITIVE_INTS = (
    "model.vocab_size", "model.d_model", "model.num_layers", "model.num_heads", "model.d_ff",
    "model.max_len", "data.seq_len", "data.batch_size", "data.synthetic_size", "train.num_steps",
    "train.log_every", "train.eval_every", "train.max_skipped", "train.eval_batches", "checkpoint.every",
    "checkpoint.keep", "mesh.fsdp", "probes.every", "probes.sample_size", "probes.lin_bins", "probes.topk",
    "probes.rows", "probes.cols", "analysis.workers",
)  # fmt: skip
# Tuple fields and the values each element may take (None: any non-negative int, str: any string).
SUBSETS = {
    "probes.stats": GROUPS,
    "probes.formats": (*FORMATS, *BLOCK_FORMATS),
    "probes.scalings": SCALINGS,
    "probes.at_steps": None,
    "probes.dump_steps": None,
    "probes.r_bits": None,
    "probes.e_frac_bits": None,
    "probes.sites": str,
    "probes.dump_sites": str,
}
NUMBERS = (
    "optim.lr", "optim.b1", "optim.b2", "optim.eps", "optim.weight_decay", "optim.momentum",
    "optim.grad_clip", "optim.z_loss", "optim.min_lr_ratio", "data.val_fraction", "model.init_std",
    "model.norm_eps", "model.rope_base",
)  # fmt: skip
# Fields that may change when a run is resumed; every other field must match the saved config.
RESUMABLE_CHANGES = (
    "name", "train.", "checkpoint.", "mesh.", "probes.enabled", "probes.every", "probes.at_steps",
    "probes.dump_", "analysis.",
)  # fmt: skip


class ConfigError(ValueError):
    """A user mistake in the configuration; the message names the field and the fix."""


def get(cfg: ml_collections.ConfigDict, dotted: str) -> Any:
    """Reads a dotted field such as 'model.d_model'."""
    value = cfg
    for part in dotted.split("."):
        value = value[part]
    return value


def validate(cfg: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Raises ConfigError naming the first bad field; `num_devices` enables the mesh checks."""
    for field, allowed in CHOICES.items():
        if get(cfg, field) not in allowed:
            raise ConfigError(
                f"{field}={get(cfg, field)!r} is not one of {', '.join(allowed)}: pick one of them"
            )
    for field in POSITIVE_INTS:
        value = get(cfg, field)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{field}={value!r} must be a positive integer")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or not 0 <= cfg.seed < 2**31 - 1:
        raise ConfigError(f"seed={cfg.seed!r} must be an integer in [0, 2^31 - 2]")
    m, d, o = cfg.model, cfg.data, cfg.optim
    if m.d_model % m.num_heads:
        raise ConfigError(
            f"model.d_model={m.d_model} is not divisible by model.num_heads={m.num_heads}: "
            "choose num_heads that divides d_model"
        )
    if m.positions == "rope" and (m.d_model // m.num_heads) % 2:
        raise ConfigError(
            f"model.positions=rope needs an even head size, got d_model/num_heads="
            f"{m.d_model // m.num_heads}: change num_heads or use positions=learned"
        )
    if d.seq_len > m.max_len:
        raise ConfigError(
            f"data.seq_len={d.seq_len} exceeds model.max_len={m.max_len}: raise max_len or lower seq_len"
        )
    if d.source in ("shakespeare", "synthetic", "text") and m.vocab_size < 257:
        raise ConfigError(
            f"model.vocab_size={m.vocab_size} is too small for the byte tokenizer: use 257 or more"
        )
    if d.source in ("text", "tokens") and not d.path:
        raise ConfigError(f"data.source={d.source} needs data.path: set --config.data.path=PATH")
    if not 0.0 < d.val_fraction < 0.5:
        raise ConfigError(f"data.val_fraction={d.val_fraction} must be in (0, 0.5)")
    for field in NUMBERS:
        value = get(cfg, field)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{field}={value!r} must be a number")
    if not 0.0 < o.lr <= 1.0:
        raise ConfigError(f"optim.lr={o.lr!r} must be a number in (0, 1]")
    for field in ("optim.b1", "optim.b2", "optim.momentum"):
        if not 0.0 <= get(cfg, field) < 1.0:
            raise ConfigError(f"{field}={get(cfg, field)} must be in [0, 1)")
    for field in ("optim.eps", "optim.weight_decay", "optim.grad_clip", "optim.z_loss"):
        if get(cfg, field) < 0:
            raise ConfigError(f"{field}={get(cfg, field)} must be >= 0")
    if o.warmup_steps < 0 or o.warmup_steps >= cfg.train.num_steps:
        raise ConfigError(
            f"optim.warmup_steps={o.warmup_steps} must be in [0, train.num_steps="
            f"{cfg.train.num_steps}): lower it"
        )
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")
    validate_matmul_precision(m)
    validate_probes(cfg.probes)
    validate_analysis(cfg.analysis)
    if num_devices is not None:
        validate_mesh(cfg, num_devices)


def validate_matmul_precision(m: ml_collections.ConfigDict) -> None:
    """Checks model.matmul_format, matmul_grad_format and matmul_sites (simulated low precision)."""
    for field in ("matmul_format", "matmul_grad_format"):
        try:
            fake_quant.parse(m[field])
        except ValueError as e:
            raise ConfigError(f"model.{field}={e}") from None
    if m.matmul_format == "none" and m.matmul_grad_format != "none":
        raise ConfigError(
            f"model.matmul_grad_format={m.matmul_grad_format!r} needs a model.matmul_format: set one "
            "(e.g. e4m3/tensor) or matmul_grad_format=none"
        )
    if not isinstance(m.matmul_sites, list | tuple) or not m.matmul_sites:
        raise ConfigError(f"model.matmul_sites={m.matmul_sites!r} must be a non-empty tuple of patterns")
    for pattern in m.matmul_sites:
        if not isinstance(pattern, str) or not fnmatch.filter(fake_quant.WEIGHT_MATMULS, pattern):
            raise ConfigError(
                f"model.matmul_sites entry {pattern!r} matches no weight matmul: use patterns over "
                f"{', '.join(fake_quant.WEIGHT_MATMULS)}"
            )


def validate_probes(p: ml_collections.ConfigDict) -> None:
    """Checks the probes section (site patterns are checked against the model's sites in `build`)."""
    for field in ("enabled", "grads", "params"):
        if not isinstance(p[field], bool):
            raise ConfigError(f"probes.{field}={p[field]!r} must be True or False")
    for field, allowed in SUBSETS.items():
        values = p[field.split(".")[1]]
        if not isinstance(values, list | tuple):
            raise ConfigError(f"{field}={values!r} must be a tuple, e.g. --config.{field}='(a, b)'")
        for v in values:
            if allowed is None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ConfigError(f"{field} entry {v!r} must be an integer >= 0")
            if allowed is str and not (isinstance(v, str) and v):
                raise ConfigError(f"{field} entry {v!r} must be a non-empty site pattern string")
            if isinstance(allowed, tuple) and v not in allowed:
                raise ConfigError(f"{field} entry {v!r} is not one of {', '.join(allowed)}")
    if not p.sites:
        raise ConfigError('probes.sites is empty: use ("*",) for every site, or probes.enabled=False')
    ints = isinstance(p.exp_min, int) and isinstance(p.exp_max, int)
    if not (ints and -149 <= p.exp_min < p.exp_max <= 127):
        raise ConfigError(
            f"probes.exp_min={p.exp_min!r}, probes.exp_max={p.exp_max!r} must be integers with "
            "-149 <= exp_min < exp_max <= 127"
        )
    for bits in p.r_bits:
        if not 2 <= bits <= 16:
            raise ConfigError(f"probes.r_bits entry {bits!r} must be an integer in [2, 16]")
    for bits in p.e_frac_bits:
        if not bits <= 10:
            raise ConfigError(f"probes.e_frac_bits entry {bits!r} must be an integer in [0, 10]")
    if bool(p.dump_steps) != bool(p.dump_sites):
        raise ConfigError(
            "probes.dump_steps and probes.dump_sites go together: set both (or neither) to dump tensors"
        )


def validate_analysis(a: ml_collections.ConfigDict) -> None:
    """Checks the analysis section (the report written after training)."""
    if not isinstance(a.report, bool):
        raise ConfigError(f"analysis.report={a.report!r} must be True or False")
    if not isinstance(a.kinds, list | tuple) or not all(isinstance(k, str) and k for k in a.kinds):
        raise ConfigError(
            f"analysis.kinds={a.kinds!r} must be a tuple of site patterns, e.g. '(\"resid/out\",)'"
        )


def mesh_shape(cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int]:
    """The (data, fsdp) mesh shape for `num_devices`, resolving data=-1."""
    fsdp = cfg.mesh.fsdp
    data = num_devices // fsdp if cfg.mesh.data == -1 else cfg.mesh.data
    return data, fsdp


def validate_mesh(cfg: ml_collections.ConfigDict, num_devices: int) -> None:
    """Checks that the mesh fits the devices and that the batch splits evenly over it."""
    if cfg.mesh.data != -1 and cfg.mesh.data <= 0:
        raise ConfigError(f"mesh.data={cfg.mesh.data} must be -1 (all devices) or positive")
    if num_devices % cfg.mesh.fsdp:
        raise ConfigError(
            f"mesh.fsdp={cfg.mesh.fsdp} does not divide the {num_devices} devices: pick a divisor"
        )
    data, fsdp = mesh_shape(cfg, num_devices)
    if data * fsdp != num_devices:
        raise ConfigError(
            f"mesh.data x mesh.fsdp = {data} x {fsdp} != {num_devices} devices: "
            "set mesh.data=-1 to use all devices"
        )
    if cfg.data.batch_size % num_devices:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} is not divisible by the {num_devices} devices: "
            f"use a multiple of {num_devices}"
        )


def to_dict(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """A plain JSON-able dict of the resolved config."""
    return json.loads(cfg.to_json())


def flatten(tree: dict[str, Any], sep: str = ".", prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': x}} -> {'a.b': x} (keys joined with `sep`)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, sep, f"{prefix}{key}{sep}"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _effective(flat: dict[str, Any]) -> dict[str, Any]:
    """A flat config with model.logits_dtype as the dtype it names (a config saved before the field
    existed ran the unembedding in the compute dtype)."""
    logits = flat.get("model.logits_dtype", "compute")
    return flat | {"model.logits_dtype": flat.get("model.compute_dtype") if logits == "compute" else logits}


def resume_conflicts(saved: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Fields that differ between a run's saved config and a new one and forbid resuming it."""
    old_flat, new_flat = _effective(flatten(saved)), _effective(flatten(new))
    conflicts = []
    for key in sorted(set(old_flat) | set(new_flat)):
        if key.startswith(RESUMABLE_CHANGES):
            continue
        if old_flat.get(key) != new_flat.get(key):
            conflicts.append(f"{key}={old_flat.get(key)!r} (saved) vs {new_flat.get(key)!r}")
    return conflicts
