"""mmkd: multimodal knowledge distillation as Prefect flows."""

from mmkd.offline import apply_offline_defaults

__version__ = "0.1.0"

apply_offline_defaults()
