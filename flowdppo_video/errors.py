"""The errors a user can cause; the CLI prints each as one line."""

from rewards import RewardError

from .config import ConfigError
from .data import DataError
from .models.base import ModelError
from .parallel.groups import CollectiveTimeout
from .exceptions import TrainingError

USER_ERRORS = (ConfigError, DataError, ModelError, RewardError, TrainingError, CollectiveTimeout)
