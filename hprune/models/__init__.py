"""Model adapters (blocks and removable components of SD3/SD3.5 and FLUX.1), surgery, built-in
configs. Loading a MODEL argument is `hprune.loading.load_model` (above this package)."""
from hprune.models.adapters import Adapter, BlockInfo, FluxAdapter, SD3Adapter, get_adapter, meta_clone, sample_inputs
from hprune.models.blocks import COMPONENT_DOC, COMPONENTS, PrunedJointBlock, PrunedSingleBlock, RemovedBlock
from hprune.models.registry import BUILTINS, build_from_config, model_config, resolve
from hprune.models.stats import bytes_at, model_report, param_count, weight_bytes
from hprune.models.surgery import PlanEntry, PrunePlan, apply_plan

__all__ = [
    "Adapter", "BlockInfo", "FluxAdapter", "SD3Adapter", "get_adapter", "meta_clone", "sample_inputs",
    "COMPONENT_DOC", "COMPONENTS", "PrunedJointBlock", "PrunedSingleBlock", "RemovedBlock",
    "BUILTINS", "build_from_config", "model_config", "resolve",
    "bytes_at", "model_report", "param_count", "weight_bytes",
    "PlanEntry", "PrunePlan", "apply_plan",
]
