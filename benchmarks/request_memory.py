"""Peak server memory per request, as a multiple of the request's payload.

Starts `sluice serve` on a one-model repository (identity over FP32 [-1] and
BYTES [-1]), sends one request at a time of each size and encoding (raw FP32,
typed FP32, raw BYTES of empty strings, and raw FP32 for a model that does not
exist: grpcio's own cost of receiving it), and reads the server's peak RSS
(VmHWM, reset before the request through /proc/PID/clear_refs; Linux, root or
the server's owner), on a fresh server per case. Also measures, in this process
and side by side, the decode step alone: today's codec against the
copy-per-element decode it replaced.

    python benchmarks/request_memory.py [--sizes-mib 1 8 32] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

CONFIG = """max_batch_size: 0
input [ { name: "x" data_type: TYPE_FP32 dims: [ -1 ] },
        { name: "s" data_type: TYPE_STRING dims: [ -1 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ -1 ] },
         { name: "t" data_type: TYPE_STRING dims: [ -1 ] } ]
"""
_BANNER = re.compile(r"ready: grpc ([\d.]+):(\d+)")


def build_repo(root: Path) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"]), helper.make_node("Identity", ["s"], ["t"])],
        "mem",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["D"]),
            helper.make_tensor_value_info("s", TensorProto.STRING, ["E"]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["D"]),
            helper.make_tensor_value_info("t", TensorProto.STRING, ["E"]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (root / "mem" / "1").mkdir(parents=True)
    onnx.save(model, str(root / "mem" / "1" / "model.onnx"))
    (root / "mem" / "config.pbtxt").write_text(CONFIG)
    return root


def _hwm_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _reset_hwm(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def start_server(repo: Path) -> tuple[subprocess.Popen[str], str]:
    cmd = [sys.executable, "-m", "sluice.cli", "--log-level", "WARNING", "serve"]
    cmd += ["--grpc-port", "0", "--http-port", "0", "--model-repository", str(repo)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        m = _BANNER.search(line)
        if m:
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # drain
            return proc, f"127.0.0.1:{m.group(2)}"
    raise RuntimeError("server did not start")


def _request(case: str, payload: int) -> Any:
    from sluice import _core
    from sluice.proto import grpc_service_pb2 as pb

    msg = pb.ModelInferRequest(model_name="mem")
    if case == RECEIVE_ONLY:  # no such model: the server only receives and refuses it
        msg.model_name = "absent"
    n = payload // 4
    x = msg.inputs.add(name="x", datatype="FP32")
    s = msg.inputs.add(name="s", datatype="BYTES")
    if case in ("FP32 raw", RECEIVE_ONLY):
        x.shape.append(n)
        s.shape.append(1)
        msg.raw_input_contents.extend(
            [np.ones(n, np.float32).tobytes(), _core.encode_bytes_tensor([""])]
        )
    elif case == "FP32 typed":
        x.shape.append(n)
        s.shape.append(1)
        x.contents.fp32_contents.extend(np.ones(n, np.float32).tolist())
        s.contents.bytes_contents.append(b"")
    else:  # BYTES raw of empty strings: 4 bytes (the length prefix) per element
        x.shape.append(1)
        s.shape.append(n)
        msg.raw_input_contents.extend(
            [np.ones(1, np.float32).tobytes(), _core.encode_bytes_tensor([""] * n)]
        )
    return msg


RECEIVE_ONLY = "FP32 raw, refused (receive)"
# The last case is gRPC's own floor: a request for a model that does not exist is
# received (grpcio), parsed and refused; nothing of sluice's request path runs.
CASES = ("FP32 raw", "FP32 typed", "BYTES raw (empty strings)", RECEIVE_ONLY)


def call(stub: Any, msg: Any) -> None:
    import grpc

    try:
        stub.ModelInfer(msg, timeout=120)
    except grpc.RpcError as exc:
        if msg.model_name != "absent" or exc.code() is not grpc.StatusCode.NOT_FOUND:
            raise


def server_peaks(sizes_mib: list[int]) -> list[dict[str, Any]]:
    """A fresh server per case (so memory freed by an earlier request cannot
    hide this one's peak), warmed with a 64 KiB request of the same kind."""
    import grpc
    from sluice.proto import grpc_service_pb2_grpc as pb_grpc

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        repo = build_repo(Path(tmp))
        for mib in sizes_mib:
            for case in CASES:
                proc, url = start_server(repo)
                limit = [("grpc.max_send_message_length", 1 << 30)]
                limit.append(("grpc.max_receive_message_length", 1 << 30))
                channel = grpc.insecure_channel(url, options=limit)
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                try:
                    call(stub, _request(case, 64 << 10))
                    msg = _request(case, mib << 20)
                    base = _rss_bytes(proc.pid)
                    _reset_hwm(proc.pid)
                    call(stub, msg)
                    peak = _hwm_bytes(proc.pid) - base
                finally:
                    channel.close()
                    proc.terminate()
                    proc.wait(30)
                rows.append(
                    {
                        "case": case,
                        "payload_mib": mib,
                        "peak_over_rss_mib": round(peak / 2**20, 1),
                        "ratio": round(peak / (mib << 20), 2),
                    }
                )
    return rows


def decode_peaks(sizes_mib: list[int]) -> list[dict[str, Any]]:
    """The typed FP32 decode alone, tracemalloc peak: the per-element list the
    old codec built (np.array over the repeated field) against np.fromiter."""
    import tracemalloc

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import sluice_proto_pool  # noqa: F401  (tritonclient shares the process)
    from sluice.proto import grpc_service_pb2 as pb
    from sluice.server import codec

    rows = []
    for mib in sizes_mib:
        n = (mib << 20) // 4
        msg = pb.ModelInferRequest(model_name="m")
        t = msg.inputs.add(name="x", datatype="FP32", shape=[n])
        t.contents.fp32_contents.extend(np.ones(n, np.float32).tolist())
        out = {}
        for label in ("before (np.array over the field)", "after (codec.decode_request)"):
            tracemalloc.start()
            if label.startswith("before"):
                np.array(t.contents.fp32_contents, dtype=np.float32)
            else:
                codec.decode_request(msg, 0)
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            out[label] = round(peak / (mib << 20), 2)
        rows.append({"payload_mib": mib, **out})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("note: resetting VmHWM needs root or the server's owner", file=sys.stderr)
    result = {
        "decode_typed_fp32": decode_peaks(args.sizes_mib),
        "server": server_peaks(args.sizes_mib),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print("typed FP32 decode alone, peak allocation / payload (tracemalloc):")
    for row in result["decode_typed_fp32"]:
        print("  ", row)
    print("server peak RSS above its RSS before the request, / payload:")
    for row in result["server"]:
        mib, peak = row["payload_mib"], row["peak_over_rss_mib"]
        print(f"   {row['case']:<28} {mib:>4} MiB  +{peak:>7} MiB  {row['ratio']:>5}x")


if __name__ == "__main__":
    main()
