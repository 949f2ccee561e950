"""Tests of `tdyn_jax.config`: one clear ConfigError per broken field, and resume conflicts."""

from __future__ import annotations

import itertools
from typing import Any

import ml_collections
import pytest

from configs import base, lowprec_training, outlier_levers, seed_claims, small, tiny, tpu_v5e_64, vocab32k
from tdyn_jax import config as config_lib
from tdyn_jax.config import ConfigError, resume_conflicts, to_dict, validate


def _with(overrides: dict[str, Any]) -> ml_collections.ConfigDict:
    """The tiny config with dotted fields replaced, bypassing ConfigDict's type safety.

    Rebuilding from a plain dict lets a test put a wrongly typed value (a string lr) in a field.
    """
    tree = tiny.get_config().to_dict()
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = tree
        for part in parents:
            node = node[part]
        assert leaf in node, f"unknown field {dotted}"
        node[leaf] = value
    return ml_collections.ConfigDict(tree)


# (overrides, num_devices, field the message must name)
BAD_CASES = [
    pytest.param({"model.num_heads": 3}, None, "model.d_model", id="d_model_not_divisible_by_heads"),
    pytest.param({"model.d_model": 30}, None, "model.positions", id="rope_odd_head_size"),
    pytest.param({"model.norm": "batchnorm"}, None, "model.norm", id="norm"),
    pytest.param({"model.norm_placement": "middle"}, None, "model.norm_placement", id="norm_placement"),
    pytest.param({"model.mlp": "tanh"}, None, "model.mlp", id="mlp"),
    pytest.param({"model.positions": "alibi"}, None, "model.positions", id="positions"),
    pytest.param({"model.remat": "everything"}, None, "model.remat", id="remat"),
    pytest.param({"model.param_dtype": "float16"}, None, "model.param_dtype", id="param_dtype"),
    pytest.param({"model.compute_dtype": "fp8"}, None, "model.compute_dtype", id="compute_dtype"),
    pytest.param({"optim.name": "rmsprop"}, None, "optim.name", id="optim_name"),
    pytest.param({"optim.schedule": "linear"}, None, "optim.schedule", id="optim_schedule"),
    pytest.param({"data.source": "wikipedia"}, None, "data.source", id="data_source"),
    pytest.param({"data.token_dtype": "int8"}, None, "data.token_dtype", id="token_dtype"),
    pytest.param({"mesh.distributed": "maybe"}, None, "mesh.distributed", id="mesh_distributed"),
    pytest.param({"model.num_layers": 0}, None, "model.num_layers", id="num_layers_zero"),
    pytest.param({"data.batch_size": -1}, None, "data.batch_size", id="batch_size_negative"),
    pytest.param({"data.seq_len": 0}, None, "data.seq_len", id="seq_len_zero"),
    pytest.param({"model.d_ff": 2.5}, None, "model.d_ff", id="d_ff_float"),
    pytest.param({"checkpoint.keep": True}, None, "checkpoint.keep", id="keep_bool"),
    pytest.param({"optim.lr": 0.0}, None, "optim.lr", id="lr_zero"),
    pytest.param({"optim.lr": -1e-3}, None, "optim.lr", id="lr_negative"),
    pytest.param({"optim.lr": 1.5}, None, "optim.lr", id="lr_above_one"),
    pytest.param({"optim.lr": "0.1"}, None, "optim.lr", id="lr_string"),
    pytest.param({"data.seq_len": 64}, None, "data.seq_len", id="seq_len_exceeds_max_len"),
    pytest.param({"optim.warmup_steps": 20}, None, "optim.warmup_steps", id="warmup_equals_steps"),
    pytest.param({"optim.warmup_steps": 50}, None, "optim.warmup_steps", id="warmup_exceeds_steps"),
    pytest.param({"optim.warmup_steps": -1}, None, "optim.warmup_steps", id="warmup_negative"),
    pytest.param({"data.source": "text", "data.path": ""}, None, "data.path", id="text_without_path"),
    pytest.param({"probes.enabled": "yes"}, None, "probes.enabled", id="probes_enabled_string"),
    pytest.param({"probes.every": 0}, None, "probes.every", id="probes_every_zero"),
    pytest.param({"probes.stats": ("moments", "energy")}, None, "probes.stats", id="probes_unknown_group"),
    pytest.param({"probes.formats": ("fp4",)}, None, "probes.formats", id="probes_unknown_format"),
    pytest.param({"probes.scalings": ("block",)}, None, "probes.scalings", id="probes_unknown_scaling"),
    pytest.param({"probes.at_steps": (10, -1)}, None, "probes.at_steps", id="probes_negative_step"),
    pytest.param({"probes.at_steps": 10}, None, "probes.at_steps", id="probes_steps_not_tuple"),
    pytest.param({"probes.sites": ()}, None, "probes.sites", id="probes_no_sites"),
    pytest.param({"probes.sites": ("",)}, None, "probes.sites", id="probes_empty_pattern"),
    pytest.param({"probes.r_bits": (1,)}, None, "probes.r_bits", id="probes_r_bits_too_few"),
    pytest.param({"probes.e_frac_bits": (11,)}, None, "probes.e_frac_bits", id="probes_e_frac_bits_too_many"),
    pytest.param({"probes.exp_min": 16}, None, "probes.exp_min", id="probes_exp_range_empty"),
    pytest.param({"probes.sample_size": 0}, None, "probes.sample_size", id="probes_sample_size_zero"),
    pytest.param({"probes.dump_steps": (3,)}, None, "probes.dump_steps", id="probes_dump_without_sites"),
    pytest.param({"data.source": "tokens", "data.path": ""}, None, "data.path", id="tokens_without_path"),
    pytest.param({"data.val_fraction": 0.0}, None, "data.val_fraction", id="val_fraction_zero"),
    pytest.param({"data.val_fraction": 0.5}, None, "data.val_fraction", id="val_fraction_half"),
    pytest.param({"data.val_fraction": -0.1}, None, "data.val_fraction", id="val_fraction_negative"),
    pytest.param({"model.vocab_size": 100}, None, "model.vocab_size", id="vocab_too_small_for_bytes"),
    pytest.param({"optim.b2": 1.0}, None, "optim.b2", id="b2_one"),
    pytest.param({"optim.weight_decay": -0.1}, None, "optim.weight_decay", id="weight_decay_negative"),
    pytest.param({"optim.min_lr_ratio": 1.5}, None, "optim.min_lr_ratio", id="min_lr_ratio"),
    pytest.param({"seed": -1}, None, "seed", id="seed_negative"),
    pytest.param({"train.nonfinite": "maybe"}, None, "train.nonfinite", id="nonfinite"),
    pytest.param({"train.max_skipped": 0}, None, "train.max_skipped", id="max_skipped_zero"),
    pytest.param({"probes.rows": 0}, None, "probes.rows", id="probes_rows_zero"),
    pytest.param({"probes.cols": -3}, None, "probes.cols", id="probes_cols_negative"),
    pytest.param({"model.matmul_format": "fp8"}, None, "model.matmul_format", id="matmul_format"),
    pytest.param({"analysis.reference": "gpt2"}, None, "analysis.reference", id="analysis_reference"),
    pytest.param({}, 3, "data.batch_size", id="batch_not_divisible_by_devices"),
    pytest.param({"mesh.fsdp": 3}, 4, "mesh.fsdp", id="fsdp_not_dividing_devices"),
    pytest.param({"mesh.data": 3}, 4, "mesh.data", id="data_times_fsdp_mismatch"),
    pytest.param({"mesh.data": 0}, 4, "mesh.data", id="mesh_data_zero"),
]


@pytest.mark.parametrize(("overrides", "num_devices", "field"), BAD_CASES)
def test_validate_rejects_one_broken_field(overrides, num_devices, field):
    cfg = _with(overrides)
    with pytest.raises(ConfigError) as info:
        validate(cfg, num_devices=num_devices)
    message = str(info.value)
    assert field in message, f"message {message!r} does not name {field}"
    # The message is a single line a user can act on.
    assert "\n" not in message


def test_unmodified_base_config_of_bad_cases_is_valid():
    # Guards the parametrized cases: each of them fails because of its override, not the baseline.
    validate(_with({}))
    validate(_with({}), num_devices=4)
    validate(_with({"optim.lr": 1}))  # an int lr is cast to float and accepted
    validate(_with({"optim.lr": 1.0, "data.val_fraction": 0.49, "optim.warmup_steps": 19}))


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize(
    ("module", "num_devices"),
    [(tiny, None), (tiny, 1), (tiny, 8), (small, None), (small, 1), (base, None), (base, 1), (vocab32k, 1)],
)
def test_shipped_configs_validate(module, num_devices):
    validate(module.get_config(), num_devices=num_devices)


@pytest.mark.parametrize("scale", ["tiny", "cpu", "large"])
def test_study_configs_validate_at_every_scale_and_every_lever(scale):
    validate(seed_claims.get_config(scale), num_devices=1)
    levers = outlier_levers.get_config(scale)
    grid = outlier_levers.grid(scale)
    for lr, eps, norm in itertools.product(grid["lr"], grid["eps"], grid["norm"]):
        cfg = outlier_levers.with_lever(levers, lr, eps, norm)
        validate(cfg, num_devices=1)
        assert (cfg.optim.lr, cfg.optim.eps) == (lr, eps)
        placement = "none" if cfg.model.norm == "none" else cfg.model.norm_placement
        assert placement == norm and cfg.name.endswith(f"_{norm}")
    runs = lowprec_training.get_config(scale)
    for run, (dtype, forward, grad) in lowprec_training.RUNS.items():
        cfg = lowprec_training.with_format(runs, run)
        validate(cfg, num_devices=1)
        assert (cfg.model.compute_dtype, cfg.model.matmul_format, cfg.model.matmul_grad_format) == (
            dtype, forward, grad
        )  # fmt: skip
        assert cfg.name == f"lowprec_training_{scale}/{run}"
    with pytest.raises(ValueError, match="unknown scale 'huge'"):
        seed_claims.get_config("huge")


def test_tpu_config_validates_on_64_devices_and_not_on_24():
    cfg = tpu_v5e_64.get_config()
    validate(cfg, num_devices=64)
    assert config_lib.mesh_shape(cfg, 64) == (4, 16)
    with pytest.raises(ConfigError, match=r"mesh\.fsdp"):
        validate(cfg, num_devices=24)  # 16 does not divide 24


def test_mesh_shape_resolves_data_minus_one():
    cfg = _with({"mesh.fsdp": 2})
    assert config_lib.mesh_shape(cfg, 8) == (4, 2)
    cfg = _with({"mesh.fsdp": 2, "mesh.data": 4})
    assert config_lib.mesh_shape(cfg, 8) == (4, 2)
    validate(cfg, num_devices=8)


def test_to_dict_is_plain_and_round_trips():
    cfg = tiny.get_config()
    d = to_dict(cfg)
    assert isinstance(d, dict) and isinstance(d["model"], dict)
    assert d["model"]["d_model"] == 32
    assert to_dict(ml_collections.ConfigDict(d)) == d  # tuples come back as JSON lists


def test_resume_conflicts_identical_is_empty():
    saved = to_dict(tiny.get_config())
    assert resume_conflicts(saved, to_dict(tiny.get_config())) == []


def test_resume_conflicts_model_change_conflicts():
    saved = to_dict(tiny.get_config())
    new_cfg = tiny.get_config()
    new_cfg.model.num_layers = 3
    conflicts = resume_conflicts(saved, to_dict(new_cfg))
    assert len(conflicts) == 1
    assert conflicts[0].startswith("model.num_layers=2")
    assert "3" in conflicts[0]


@pytest.mark.parametrize(
    ("dotted", "value"),
    [("model.d_ff", 128), ("data.seq_len", 16), ("optim.lr", 1e-2), ("seed", 1), ("optim.name", "lion")],
)
def test_resume_conflicts_other_frozen_fields(dotted, value):
    saved = to_dict(tiny.get_config())
    new = to_dict(_with({dotted: value}))
    conflicts = resume_conflicts(saved, new)
    assert [c.split("=")[0] for c in conflicts] == [dotted]


def test_resume_compares_the_dtype_the_unembedding_ran_in():
    """A config saved before model.logits_dtype existed ran the unembedding in the compute dtype: it
    resumes under the float32 default when that was float32, not when it was bfloat16."""
    for compute, logits, resumes in (("float32", "float32", True), ("bfloat16", "float32", False)):
        saved = to_dict(_with({"model.compute_dtype": compute}))
        del saved["model"]["logits_dtype"]
        new = to_dict(_with({"model.compute_dtype": compute, "model.logits_dtype": logits}))
        assert (resume_conflicts(saved, new) == []) == resumes
    old_bf16 = to_dict(_with({"model.compute_dtype": "bfloat16"}))
    del old_bf16["model"]["logits_dtype"]
    same = _with({"model.compute_dtype": "bfloat16", "model.logits_dtype": "compute"})
    assert resume_conflicts(old_bf16, to_dict(same)) == []


def test_resume_conflicts_allows_train_checkpoint_mesh_and_name_changes():
    saved = to_dict(tiny.get_config())
    new_cfg = tiny.get_config()
    new_cfg.train.num_steps = 500
    new_cfg.checkpoint.every = 7
    new_cfg.checkpoint.keep = 5
    new_cfg.mesh.fsdp = 2
    new_cfg.name = "renamed"
    assert resume_conflicts(saved, to_dict(new_cfg)) == []
    # Each resumable change alone, too.
    for dotted, value in (("train.num_steps", 40), ("checkpoint.every", 3)):
        assert resume_conflicts(saved, to_dict(_with({dotted: value}))) == []


def test_resume_conflicts_reports_added_and_removed_fields():
    saved = to_dict(tiny.get_config())
    new = to_dict(tiny.get_config())
    new["model"]["extra"] = 1
    del new["model"]["qk_norm"]
    conflicts = resume_conflicts(saved, new)
    assert sorted(c.split("=")[0] for c in conflicts) == ["model.extra", "model.qk_norm"]


def test_resume_may_change_when_to_capture_but_not_what():
    saved = to_dict(tiny.get_config())
    when = tiny.get_config()
    when.probes.enabled, when.probes.every, when.probes.at_steps = False, 7, (3,)
    when.probes.dump_steps, when.probes.dump_sites = (5,), ("layer_00/resid/out",)
    assert resume_conflicts(saved, to_dict(when)) == []
    what = tiny.get_config()
    what.probes.sites = ("resid/*",)
    assert [c.split("=")[0] for c in resume_conflicts(saved, to_dict(what))] == ["probes.sites"]
