"""The model host: everything between a transport and an executor.

- dataplane: every KServe v2 and sluice operation with protocol-neutral types;
- lifecycle: aspired versions, load / warm / swap / drain (ModelManager);
- routing: labels -> route (stable, canary, shadow), leases, canary guards;
- loader: builds a version's executor and scheduler; injected by the
  composition root (server/app.py) into the lifecycle manager.
"""

from sluice.host.dataplane import DataPlane
from sluice.host.lifecycle import IndexEntry, Model, ModelManager, ModelVersion
from sluice.host.loader import ExecutorLoader

__all__ = ["DataPlane", "ExecutorLoader", "IndexEntry", "Model", "ModelManager", "ModelVersion"]
