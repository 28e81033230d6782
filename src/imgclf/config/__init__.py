"""The one typed configuration of a run, grouped by concern; every default is documented here and only here.

Precedence: defaults < YAML file (`--config`) < CLI flags. The resolved configuration (every default written
out) is saved as `config.yaml` in the run folder; `imgclf config` prints the documented defaults.

Below the CLI, functions receive the fields they use, never a whole `RunConfig`, and never mutate it.
"""

from imgclf.config.files import build_config, dump_config, load_config, read_config_file, save_config
from imgclf.config.keys import all_keys, check_key
from imgclf.config.sections import (
    BUDGET_EPOCHS,
    MIN_STEPS_PER_EPOCH,
    AugmentConfig,
    DataConfig,
    EarlyStoppingConfig,
    ModelConfig,
    RunConfig,
    TrackingConfig,
    TrainConfig,
    auto_batch_size,
)
from imgclf.config.text import NULL, parse_assignments, parse_duration

__all__ = [
    "BUDGET_EPOCHS",
    "MIN_STEPS_PER_EPOCH",
    "NULL",
    "AugmentConfig",
    "DataConfig",
    "EarlyStoppingConfig",
    "ModelConfig",
    "RunConfig",
    "TrackingConfig",
    "TrainConfig",
    "all_keys",
    "auto_batch_size",
    "build_config",
    "check_key",
    "dump_config",
    "load_config",
    "parse_assignments",
    "parse_duration",
    "read_config_file",
    "save_config",
]
