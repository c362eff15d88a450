"""The model repository: scanning <repo>/<model>/<version>/, version policies,
the per-version lifecycle, loading and resolving versions for requests."""

from sluice.repository.lifecycle import VersionState
from sluice.repository.manager import IndexEntry, ModelManager, ModelVersion
from sluice.repository.swap_policy import SwapPolicy

__all__ = ["IndexEntry", "ModelManager", "ModelVersion", "SwapPolicy", "VersionState"]
