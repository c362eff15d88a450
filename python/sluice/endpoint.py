"""The one place a client opens a channel to a sluice server: every command
that talks to a server (infer, bench, drift, feedback) goes through here, so
transport security is added here once."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

ChannelOptions = Sequence[tuple[str, Any]]


def channel(url: str, options: ChannelOptions = ()) -> grpc.Channel:
    """A blocking channel to the server at host:port."""
    return grpc.insecure_channel(url, options=list(options))


def aio_channel(url: str, options: ChannelOptions = ()) -> grpc.aio.Channel:
    """An asyncio channel to the server at host:port."""
    return grpc.aio.insecure_channel(url, options=list(options))
