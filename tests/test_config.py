"""GAMConfig through HfArgumentParser: every gam_* flag parses, every bad value is refused with a clear message."""

from __future__ import annotations

import dataclasses

import pytest
from transformers import HfArgumentParser

from hf_gam import GAMConfig, GAMHyper

FLAGS = {
    "gam_mode": ("gam_fast", "gam_fast"),
    "gam_rho": ("0.15", 0.15),
    "gam_alpha": ("0.25", 0.25),
    "sam_rho": ("0.07", 0.07),
    "gam_rho_prime": ("0.03", 0.03),
    "gam_beta": ("0.1", 0.1),
    "gam_gamma": ("0.05", 0.05),
    "gam_fast_variant": ("official", "official"),
    "gam_eps": ("1e-8", 1e-8),
    "gam_adaptive": ("true", True),
    "gam_every": ("10", 10),
    "gam_perturbation": ("global", "global"),
    "gam_rho_schedule": ("lr_proportional", "lr_proportional"),
    "gam_rho_min_ratio": ("0.25", 0.25),
}


def parse(argv):
    (cfg,) = HfArgumentParser(GAMConfig).parse_args_into_dataclasses(
        args=["--output_dir", "out", "--use_cpu", "true", "--report_to", "none", *argv])
    return cfg


def test_every_gam_field_is_covered():
    assert {f.name for f in dataclasses.fields(GAMConfig) if f.name.startswith(("gam_", "sam_"))} == set(FLAGS)


@pytest.mark.parametrize("name", list(FLAGS))
def test_flag_parses(name):
    text, value = FLAGS[name]
    cfg = parse([f"--{name}", text])
    assert getattr(cfg, name) == value
    assert type(getattr(cfg, name)) is type(value)


def test_float_flags_are_floats_not_ints():
    cfg = parse(["--gam_rho", "0.5", "--gam_alpha", "1"])
    assert cfg.gam_rho == 0.5 and isinstance(cfg.gam_alpha, float)


@pytest.mark.parametrize("mode,rho,alpha", [("gam", 0.04, 0.1), ("gam_fast", 0.2, 0.6), ("sam", 0.05, 0.1)])
def test_mode_dependent_defaults(mode, rho, alpha):
    cfg = parse(["--gam_mode", mode])
    assert (cfg.gam_rho, cfg.gam_alpha, cfg.sam_rho) == (rho, alpha, rho)


def test_sam_rho_explicit_kept():
    assert parse(["--gam_mode", "gam_sam", "--sam_rho", "0.3"]).sam_rho == 0.3


def test_help_mentions_paper_symbols(capsys):
    with pytest.raises(SystemExit):
        HfArgumentParser(GAMConfig).parse_args_into_dataclasses(args=["--help"])
    out = capsys.readouterr().out
    for symbol in ["ρ", "α", "ρ'", "β", "γ", "ξ"]:
        assert symbol in out


BAD = [
    ("gam_mode", "adam"), ("gam_fast_variant", "fast"), ("gam_perturbation", "both"),
    ("gam_rho", -0.1), ("gam_rho", float("nan")), ("sam_rho", -1.0), ("gam_rho_prime", -0.01),
    ("gam_beta", 1.5), ("gam_beta", -0.1), ("gam_gamma", -1.0), ("gam_eps", -1e-12), ("gam_eps", float("inf")),
    ("gam_alpha", -0.3), ("gam_every", 0), ("gam_every", 2.5), ("gam_rho", "0.1"),
    ("gam_rho_schedule", "cosine"), ("gam_rho_min_ratio", 1.5),
]


@pytest.mark.parametrize("name,value", BAD, ids=[f"{n}={v}" for n, v in BAD])
def test_invalid_values_rejected(tmp_path, name, value):
    with pytest.raises(ValueError, match=name) as err:
        GAMConfig(output_dir=str(tmp_path), use_cpu=True, **{name: value})
    assert repr(value) in str(err.value)


def test_alpha_above_one_rejected_only_for_gam_fast(tmp_path):
    GAMConfig(output_dir=str(tmp_path), use_cpu=True, gam_mode="gam", gam_alpha=2.0)
    with pytest.raises(ValueError, match="gam_alpha"):
        GAMConfig(output_dir=str(tmp_path), use_cpu=True, gam_mode="gam_fast", gam_alpha=2.0)


def test_cli_rejects_bad_choice(capsys):
    with pytest.raises(SystemExit):
        parse(["--gam_mode", "adam"])
    assert "gam_mode" in capsys.readouterr().err


def test_lr_proportional_radii():
    cfg = parse(["--gam_mode", "gam_fast", "--gam_rho_schedule", "lr_proportional", "--gam_rho_min_ratio", "0.5",
                 "--learning_rate", "0.1"])
    peak, half, zero = cfg.gam_hyper(0.1), cfg.gam_hyper(0.05), cfg.gam_hyper(0.0)
    assert (peak.rho, peak.rho_prime, peak.sam_rho) == (0.2, 0.02, 0.2)
    assert half.rho == pytest.approx(0.15) and half.rho_prime == pytest.approx(0.015)
    assert zero.rho == pytest.approx(0.1) and zero.alpha == peak.alpha
    assert parse(["--gam_mode", "gam"]).gam_hyper(0.0).rho == 0.04  # constant schedule ignores lr


def test_at_learning_rate_is_the_schedule_rule():
    """GAMHyper.at_learning_rate is the one lr_proportional rule (the config and the optimizer wrapper call it)."""
    h = GAMHyper.for_mode("gam_fast", sam_rho=0.3)
    half = h.at_learning_rate(0.05, 0.1, 0.5)
    assert (half.rho, half.sam_rho, half.rho_prime) == pytest.approx((0.15, 0.225, 0.015))
    assert (half.alpha, half.beta, half.gamma) == (h.alpha, h.beta, h.gamma)
    assert h.at_learning_rate(0.3, 0.1, 0.5) == h  # clipped at the peak
    assert h.at_learning_rate(0.0, 0.0, 0.5) == h  # no peak: unchanged
    cfg = GAMConfig(output_dir="unused", gam_mode="gam_fast", gam_rho_schedule="lr_proportional", learning_rate=1.0)
    assert cfg.gam_hyper(0.05, peak_lr=0.2).rho == pytest.approx(0.2 * (0.5 + 0.5 * 0.25))


def test_reentrant_checkpointing_refused(tmp_path):
    with pytest.raises(ValueError, match="gradient_checkpointing_kwargs"):
        GAMConfig(output_dir=str(tmp_path), use_cpu=True, gradient_checkpointing=True,
                  gradient_checkpointing_kwargs={"use_reentrant": True})
    GAMConfig(output_dir=str(tmp_path), use_cpu=True, gradient_checkpointing=True)  # non-reentrant default is fine
