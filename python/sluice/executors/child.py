"""An executor process: loads one instance of one model version and runs the
batches the server sends (see process.py for the protocol).

Started as `python -m sluice.executors.child FD`, FD being its end of the
server's socket. Ignores SIGINT and SIGTERM: the server decides when it stops
(after draining), and a server that dies closes the socket, which ends it.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import numpy as np

from sluice import _core
from sluice.errors import SluiceError
from sluice.executors import wire
from sluice.proto import model_config_pb2 as mc
from sluice.runtime import load_runtime
from sluice.runtime.warmup import warm_up

log = logging.getLogger("sluice.executor")


def _serve(sock: socket.socket) -> int:
    message, fds = wire.receive(sock)
    if message is None or message[0] != "init":
        return 2
    spec, index = message[1], message[2]
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s executor {spec.model_name}/{spec.version}#{index} "
        "%(levelname)s %(message)s",
    )
    config = mc.ModelConfig()
    config.ParseFromString(spec.config)
    try:
        runtime, notes = load_runtime(
            Path(spec.model_path),
            config,
            spec.model_name,
            spec.options,
            sessions_here=1,
            model_dir=Path(spec.model_dir),
        )
        warm_up(runtime, config, Path(spec.model_dir))
    except SluiceError as exc:
        wire.send(sock, ("failed", exc.message))
        return 1
    except Exception as exc:  # any failure while loading is this model's, with a reason
        wire.send(sock, ("failed", f"loading failed: {type(exc).__name__}: {exc}"))
        return 1
    info = {
        "config": config.SerializeToString(),
        "notes": notes,
        "info": runtime.info(spec.instances),
    }
    wire.send(sock, ("ready", info))

    in_slab: wire.Slab | None = None
    out_slab: wire.Slab | None = None

    def new_out_slab(size: int) -> wire.Slab:
        return wire.Slab(size)

    receive = wire.Receiver()
    while True:
        message, fds = receive(sock)
        if message is None or message[0] == "stop":
            return 0
        if fds:
            if in_slab is not None:
                in_slab.close()
            in_slab = wire.Slab(os.fstat(fds[0]).st_size, fds[0])
        _, token, wired, output_names = message
        slots = wire.from_wire(wired)
        if in_slab is None:
            wire.send(sock, ("error", token, "no input slab was shared"))
            continue
        feeds: dict[str, Any] = {s.name: wire.view(in_slab.mm, s) for s in slots}
        try:
            infer_start = _core.monotonic_ns()
            results = runtime.run(feeds, output_names)
            infer_end = _core.monotonic_ns()
            arrays = [(n, np.asarray(r)) for n, r in zip(output_names, results, strict=True)]
            out_slab, out_slots, replaced = wire.write_arrays(out_slab, arrays, new_out_slab)
        except Exception as exc:  # the model failed on this batch only
            del feeds
            wire.send(sock, ("error", token, str(exc)))
            continue
        del feeds, results, arrays
        wire.send(
            sock,
            ("done", token, wire.wire_slots(out_slots), infer_start, infer_end),
            [out_slab.fd] if replaced else None,
        )


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _core.set_timer_slack_ns(1_000)
    sock = socket.socket(fileno=int(argv[1]))
    try:
        return _serve(sock)
    except (ConnectionError, EOFError):
        return 0  # the server went away
    finally:
        sock.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
