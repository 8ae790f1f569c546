"""OBS-Diff: one-shot pruning of diffusion transformers with a timestep-aware Hessian.

    prune_linear(weight, hessian, sparsity=0.5, pattern="unstructured")   one layer (OBS/SparseGPT)
    magnitude_prune, wanda_prune                                          baselines, same patterns
    HessianCollector, step_weights, run_calibration_loop                  timestep-weighted Hessians
    obs_prune_model(model, calib, sparsity, pattern, groups, weighting, method)
                                                                          the whole model, group-wise
    to_semi_structured(model)                                             2:4 weights -> sparse kernels (CUDA)
"""
from hprune.obs.baselines import magnitude_prune, wanda_prune
from hprune.obs.hessian import (DEFAULT_WEIGHTING, WEIGHTINGS, HessianCollector, run_calibration_loop,
                                step_weights)
from hprune.obs.patterns import METHODS, Pattern, parse_pattern
from hprune.obs.sequential import find_linear_units, obs_prune_model, split_groups
from hprune.obs.solver import prune_linear
from hprune.obs.sparse24 import to_semi_structured
from hprune.obs.structured import find_sites

__all__ = [
    "prune_linear", "magnitude_prune", "wanda_prune",
    "HessianCollector", "step_weights", "run_calibration_loop", "WEIGHTINGS", "DEFAULT_WEIGHTING",
    "obs_prune_model", "find_linear_units", "find_sites", "split_groups",
    "to_semi_structured", "Pattern", "parse_pattern", "METHODS",
]
