"""The model repository: scanning <repo>/<model>/<version>/, version policies,
the per-version lifecycle states, labels and the registry. Loading and serving
versions is the host's (sluice.host)."""

from sluice.repository.lifecycle import VersionState
from sluice.repository.swap_policy import SwapPolicy

__all__ = ["SwapPolicy", "VersionState"]
