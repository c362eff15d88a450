"""The model repository: scanning <repo>/<model>/<version>/, version policies,
the per-version lifecycle, loading and resolving versions for requests."""

from sluice.repository.lifecycle import VersionState
from sluice.repository.manager import ModelManager, ModelVersion

__all__ = ["ModelManager", "ModelVersion", "VersionState"]
