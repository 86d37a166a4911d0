"""Distributional alignment (GDC/DPG family): features, EBM targets, moment matching, IS
estimators, policy-gradient tuners and samplers. See docs in each module."""

from lm_jax.align.ebm import EBM, make_ebm
from lm_jax.align.estimators import (
    ZState,
    alignment_metrics,
    expectation,
    kl_p_a,
    kl_p_pi,
    kl_pi_a,
    log_z_hat,
    tvd_p_pi,
)
from lm_jax.align.features import (
    Constraint,
    Feature,
    FeatureError,
    feature_matrix,
    parse_constraint,
    regex_feature,
    subsequence_present,
    token_sequences_feature,
    word_feature,
)
from lm_jax.align.moments import MomentError, check_support, check_targets, fit_ebm, fit_lambda
from lm_jax.align.samplers import SamplerConfig, Samples, qrs, qrs_accept, qrs_acceptance_rate
from lm_jax.align.tuners import (
    METHODS,
    AlignState,
    TunerConfig,
    align_step,
    init_state,
    jit_align_step,
    make_step,
)

__all__ = [
    "EBM",
    "METHODS",
    "AlignState",
    "Constraint",
    "Feature",
    "FeatureError",
    "MomentError",
    "SamplerConfig",
    "Samples",
    "TunerConfig",
    "ZState",
    "align_step",
    "alignment_metrics",
    "check_support",
    "check_targets",
    "expectation",
    "feature_matrix",
    "fit_ebm",
    "fit_lambda",
    "init_state",
    "jit_align_step",
    "kl_p_a",
    "kl_p_pi",
    "kl_pi_a",
    "log_z_hat",
    "make_ebm",
    "make_step",
    "parse_constraint",
    "qrs",
    "qrs_accept",
    "qrs_acceptance_rate",
    "regex_feature",
    "subsequence_present",
    "token_sequences_feature",
    "tvd_p_pi",
    "word_feature",
]
