"""Lets tests import sluice internals in the same pytest process as tritonclient.

sluice's generated modules (sluice.proto.*_pb2) and tritonclient's define the same
protobuf package, ``inference``; both register in protobuf's default descriptor
pool, so whichever is imported second fails with "duplicate symbol" -- even when
the two imports sit in different test modules, since pytest imports every module
into one process. Importing this module before sluice loads sluice's generated
modules with a private descriptor pool instead. Their messages behave the same
(text_format, json_format, equality, enums) and every sluice module gets these
same modules from sys.modules, so nothing mixes pools; tritonclient keeps the
default pool to itself.

Use: ``import sluice_proto_pool  # noqa: F401`` above the first sluice import.
It does nothing if sluice's generated modules were already imported.
"""

from __future__ import annotations

import importlib.util
import sys

from google.protobuf import descriptor_pool

# Dependency order: grpc_service.proto imports model_config.proto.
_GENERATED = ("sluice.proto.model_config_pb2", "sluice.proto.grpc_service_pb2")


def _load_with_private_pool() -> None:
    if any(name in sys.modules for name in _GENERATED):
        return  # already imported the normal way; nothing to redirect
    pool = descriptor_pool.DescriptorPool()
    default = descriptor_pool.Default
    descriptor_pool.Default = lambda: pool
    try:
        for name in _GENERATED:
            spec = importlib.util.find_spec(name)
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot find {name}; is sluice installed?")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[name]
                raise
            package, _, attr = name.rpartition(".")
            setattr(sys.modules[package], attr, module)
    finally:
        descriptor_pool.Default = default


_load_with_private_pool()
