"""SLO mode vs Triton-style fixed delay under overload (open-loop load).

Usage::

    python benchmarks/slo.py --quick      # ~1 min: 3 s capacity probe, 6 s per mode
    python benchmarks/slo.py              # 5 s capacity probe, 20 s per mode

One run is one comparison, measured side by side by this process:

1. (Re)builds the model repository (build_models.py) and starts ``sluice serve``.
2. Capacity: a closed loop of --capacity-concurrency in-flight requests against
   ``wide_mlp_batched`` for --capacity-seconds (the first second is not
   counted) -> successful requests/s. ``--capacity RPS`` skips the probe.
3. Open loop at --overload x capacity (default 1.5x) for --duration seconds,
   against ``wide_mlp_slo`` (slo_target_ms) and then ``wide_mlp_batched``
   (fixed max_queue_delay). Requests are sent on a precomputed Poisson (or
   constant) schedule regardless of completions, with a client-side deadline
   (--client-timeout-s); the count is capped by --max-requests. Latency is
   counted from each request's scheduled send time, so a lagging client does
   not hide queueing (the send lag is reported). Between modes the script
   waits until sluice's statistics stop moving (backlog drained, bounded).
4. For each mode: share of sent requests answered OK within the target,
   goodput (OK within target per second of schedule), RESOURCE_EXHAUSTED
   rejections, errors by status, p50/p99 of the successful ones, average
   batch size from ModelStatistics. Prints a table; writes
   results/slo-<timestamp>.json.

The load generator is Python (tritonclient.grpc.aio on uvloop) on the same
machine as the server; when it cannot send at the offered rate the table says
so (``sent/s`` below ``offered/s``, large send lag).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import math
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import build_models
import harness
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

MODEL = "wide_mlp"


@dataclass
class Sample:
    scheduled: float  # loop time the request was due
    sent: float
    done: float
    status: str  # OK, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, ...


@dataclass
class ModeResult:
    mode: str
    model: str
    offered_rps: float
    duration_s: float
    sent: int = 0
    sent_rps: float = 0.0
    send_lag_p50_ms: float | None = None
    send_lag_p99_ms: float | None = None
    ok: int = 0
    ok_within_target: int = 0
    share_within_target: float = 0.0
    goodput_rps: float = 0.0
    rejected: int = 0
    errors_by_status: dict[str, int] = field(default_factory=dict)
    error_examples: dict[str, str] = field(default_factory=dict)  # first message per status
    p50_ok_ms: float | None = None
    p99_ok_ms: float | None = None
    p50_ok_from_send_ms: float | None = None
    avg_batch: float | None = None
    server_rows: int | None = None
    drained_s: float | None = None
    drain_complete: bool | None = None
    timeline: list[dict[str, int]] = field(default_factory=list)


def _status(exc: InferenceServerException) -> str:
    raw = exc.status() or "UNKNOWN"
    return raw.removeprefix("StatusCode.")


def _pct(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def make_inputs(seed: int) -> list[grpcclient.InferInput]:
    x = np.random.default_rng(seed).standard_normal((1, 512), dtype=np.float32)
    inp = grpcclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return [inp]


async def capacity_probe(
    url: str, model: str, concurrency: int, seconds: float, timeout_s: float, seed: int
) -> dict[str, Any]:
    """Closed loop: `concurrency` requests always in flight; OK completions per second
    after a 1 s (or 20 %) warm-up."""
    inputs = make_inputs(seed)
    client = aioclient.InferenceServerClient(url)
    loop = asyncio.get_running_loop()
    start = loop.time()
    warm = start + min(1.0, 0.2 * seconds)
    end = start + seconds
    ok = 0
    errors: collections.Counter[str] = collections.Counter()
    examples: dict[str, str] = {}

    async def worker() -> None:
        nonlocal ok
        while loop.time() < end:
            try:
                await client.infer(model, inputs, client_timeout=timeout_s)
            except InferenceServerException as exc:
                errors[_status(exc)] += 1
                examples.setdefault(_status(exc), str(exc.message())[:300])
                continue
            if loop.time() >= warm:
                ok += 1

    try:
        await asyncio.wait_for(
            asyncio.gather(*(worker() for _ in range(concurrency))),
            timeout=seconds + timeout_s + 5,
        )
    finally:
        await client.close()
    measured = max(1e-9, end - warm)
    return {
        "model": model,
        "concurrency": concurrency,
        "seconds": seconds,
        "ok": ok,
        "rps": ok / measured,
        "errors_by_status": dict(errors),
        "error_examples": examples,
    }


def schedule(rate: float, duration: float, max_requests: int, arrival: str, seed: int) -> Any:
    """Send offsets (seconds from the start) of an open-loop run."""
    n = max(1, min(max_requests, math.ceil(rate * duration * 1.2) + 10))
    if arrival == "constant":
        offsets = np.arange(n, dtype=np.float64) / rate
    else:
        offsets = np.cumsum(np.random.default_rng(seed).exponential(1.0 / rate, n))
    return offsets[offsets < duration][:max_requests]


async def open_loop(
    url: str,
    model: str,
    offsets: Any,
    timeout_s: float,
    seed: int,
) -> tuple[list[Sample], dict[str, str]]:
    inputs = make_inputs(seed)
    client = aioclient.InferenceServerClient(url)
    loop = asyncio.get_running_loop()
    samples: list[Sample] = []
    examples: dict[str, str] = {}

    async def one(scheduled: float) -> None:
        sent = loop.time()
        status = "CANCELLED_BY_CLIENT"  # kept if the task is cancelled (never expected)
        try:
            await client.infer(model, inputs, client_timeout=timeout_s)
            status = "OK"
        except InferenceServerException as exc:
            status = _status(exc)
            examples.setdefault(status, str(exc.message())[:300])
        finally:
            samples.append(Sample(scheduled, sent, loop.time(), status))

    tasks: list[asyncio.Task[None]] = []
    t0 = loop.time() + 0.05
    i, n = 0, len(offsets)
    try:
        while i < n:
            now = loop.time()
            # Send everything that is due (several at once when the loop fell behind).
            while i < n and t0 + offsets[i] <= now:
                tasks.append(asyncio.create_task(one(t0 + float(offsets[i]))))
                i += 1
            if i < n:
                await asyncio.sleep(max(0.0, t0 + float(offsets[i]) - loop.time()))
        if tasks:
            # Each request has its own deadline; this only bounds a misbehaving channel.
            _done, pending = await asyncio.wait(tasks, timeout=timeout_s + 10)
            for task in pending:
                task.cancel()
            for task in pending:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    finally:
        await client.close()
    return samples, examples


def summarise(
    mode: str,
    model: str,
    rate: float,
    duration: float,
    samples: Sequence[Sample],
    target_s: float,
) -> ModeResult:
    r = ModeResult(mode=mode, model=model, offered_rps=rate, duration_s=duration)
    if not samples:
        return r
    t0 = min(s.scheduled for s in samples)
    r.sent = len(samples)
    span = max(s.sent for s in samples) - min(s.sent for s in samples)
    r.sent_rps = r.sent / span if span > 0 else float(r.sent)
    lags = [1000 * (s.sent - s.scheduled) for s in samples]
    r.send_lag_p50_ms, r.send_lag_p99_ms = _pct(lags, 0.5), _pct(lags, 0.99)
    ok = [s for s in samples if s.status == "OK"]
    lat = [1000 * (s.done - s.scheduled) for s in ok]
    r.ok = len(ok)
    r.ok_within_target = sum(1 for s in ok if s.done - s.scheduled <= target_s)
    r.share_within_target = r.ok_within_target / r.sent
    r.goodput_rps = r.ok_within_target / duration
    errors = collections.Counter(s.status for s in samples if s.status != "OK")
    r.errors_by_status = dict(errors.most_common())
    r.rejected = errors.get("RESOURCE_EXHAUSTED", 0)
    r.p50_ok_ms, r.p99_ok_ms = _pct(lat, 0.5), _pct(lat, 0.99)
    r.p50_ok_from_send_ms = _pct([1000 * (s.done - s.sent) for s in ok], 0.5)
    seconds = max(1, math.ceil(duration))
    timeline = [
        {"sent": 0, "ok_within": 0, "ok_late": 0, "rejected": 0, "other": 0} for _ in range(seconds)
    ]
    for s in samples:
        bucket = timeline[min(seconds - 1, int(s.scheduled - t0))]
        bucket["sent"] += 1
        if s.status == "OK":
            bucket["ok_within" if s.done - s.scheduled <= target_s else "ok_late"] += 1
        elif s.status == "RESOURCE_EXHAUSTED":
            bucket["rejected"] += 1
        else:
            bucket["other"] += 1
    r.timeline = timeline
    return r


def wait_idle(url: str, model: str, quiet_s: float, max_s: float) -> tuple[float, bool]:
    """Wait until the model's statistics stop changing for quiet_s (at most max_s)."""
    start = time.monotonic()
    last = harness.model_counts(url, model)
    last_change = time.monotonic()
    while time.monotonic() - start < max_s:
        time.sleep(0.25)
        now = harness.model_counts(url, model)
        if now != last:
            last, last_change = now, time.monotonic()
        elif time.monotonic() - last_change >= quiet_s:
            return time.monotonic() - start, True
    return time.monotonic() - start, False


def table(results: Sequence[ModeResult], target_ms: float) -> str:
    f = harness.fmt
    rows = []
    for r in results:
        other = {k: v for k, v in r.errors_by_status.items() if k != "RESOURCE_EXHAUSTED"}
        rows.append(
            [
                r.mode,
                r.model,
                f"{r.offered_rps:.0f}",
                f"{r.sent_rps:.0f}",
                str(r.sent),
                f"{100 * r.share_within_target:.1f}%",
                f"{r.goodput_rps:.0f}",
                str(r.ok),
                str(r.rejected),
                ", ".join(f"{k} {v}" for k, v in other.items()) or "-",
                f(r.p50_ok_ms, ".1f"),
                f(r.p99_ok_ms, ".1f"),
                f(r.avg_batch, ".2f"),
                f(r.send_lag_p99_ms, ".1f"),
            ]
        )
    return harness.markdown_table(
        [
            "mode",
            "model",
            "offered/s",
            "sent/s",
            "sent",
            f"OK <= {target_ms:g} ms",
            "goodput/s",
            "OK",
            "rejected",
            "other errors",
            "p50 OK ms",
            "p99 OK ms",
            "avg batch",
            "send lag p99 ms",
        ],
        rows,
        align="llrrrrrrrlrrrr",
    )


async def _measure(args: argparse.Namespace, url: str, result: dict[str, Any]) -> None:
    target_s = float(args.slo_target_ms) / 1000
    fixed = f"{MODEL}_batched"
    slo = f"{MODEL}_slo"
    # Warm both models (first runs allocate arenas).
    result["warmup"] = [
        await capacity_probe(url, model, 4, 0.5, args.client_timeout_s, args.seed)
        for model in (slo, fixed)
    ]

    if args.capacity:
        capacity = float(args.capacity)
        result["capacity"] = {"given": capacity}
    else:
        print(
            f"[slo] capacity probe: {fixed}, {args.capacity_concurrency} in flight, "
            f"{args.capacity_seconds:g} s",
            file=sys.stderr,
            flush=True,
        )
        before = harness.model_counts(url, fixed)
        probe = await capacity_probe(
            url,
            fixed,
            args.capacity_concurrency,
            args.capacity_seconds,
            args.client_timeout_s,
            args.seed,
        )
        probe["avg_batch"] = harness.avg_batch(before, harness.model_counts(url, fixed))
        result["capacity"] = probe
        capacity = probe["rps"]
        print(
            f"[slo] capacity {capacity:.0f} req/s (avg batch {harness.fmt(probe['avg_batch'])})",
            file=sys.stderr,
            flush=True,
        )
        wait_idle(url, fixed, 0.5, args.drain_max_s)
    if capacity <= 0:
        raise RuntimeError("capacity probe completed no request")
    rate = args.overload * capacity
    result["offered_rps"] = rate
    offsets = schedule(rate, args.duration, args.max_requests, args.arrival, args.seed)
    result["scheduled_requests"] = len(offsets)

    modes = [("slo", slo), ("fixed-delay", fixed)]
    if args.fixed_first:
        modes.reverse()
    for mode, model in modes:
        print(
            f"[slo] {mode}: {model}, open loop {rate:.0f} req/s ({args.arrival}) "
            f"for {args.duration:g} s, {len(offsets)} requests",
            file=sys.stderr,
            flush=True,
        )
        before = harness.model_counts(url, model)
        samples, examples = await open_loop(url, model, offsets, args.client_timeout_s, args.seed)
        drained, complete = await asyncio.to_thread(wait_idle, url, model, 1.0, args.drain_max_s)
        after = harness.model_counts(url, model)
        r = summarise(mode, model, rate, args.duration, samples, target_s)
        r.error_examples = examples
        r.avg_batch = harness.avg_batch(before, after)
        r.server_rows = after[0] - before[0] if before and after else None
        r.drained_s, r.drain_complete = drained, complete
        result["modes"].append(asdict(r))
        print(
            f"[slo] {mode}: {100 * r.share_within_target:.1f}% OK within target, goodput "
            f"{r.goodput_rps:.0f}/s, rejected {r.rejected}, errors {r.errors_by_status}, "
            f"drained in {drained:.1f} s{'' if complete else ' (NOT drained)'}",
            file=sys.stderr,
            flush=True,
        )


async def _guarded(args: argparse.Namespace, url: str, result: dict[str, Any]) -> None:
    """Run _measure; SIGINT/SIGTERM cancel it (so the finally blocks close the clients)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await _measure(args, url, result)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="3 s capacity probe, 6 s per mode")
    p.add_argument("--slo-target-ms", default=build_models.DEFAULT_SLO_MS)
    p.add_argument("--max-queue-delay-us", type=int, default=build_models.DEFAULT_DELAY_US)
    p.add_argument("--intra-op-threads", type=int, default=build_models.DEFAULT_INTRA_OP)
    p.add_argument("--wide-units", type=int, default=build_models.DEFAULT_WIDE_UNITS)
    p.add_argument("--capacity", type=float, help="req/s; skips the capacity probe")
    p.add_argument("--capacity-concurrency", type=int, default=64)
    p.add_argument("--capacity-seconds", type=float, help="default 5 (quick 3)")
    p.add_argument("--overload", type=float, default=1.5, help="offered load / capacity")
    p.add_argument("--duration", type=float, help="seconds per mode (default 20, quick 6)")
    p.add_argument("--arrival", choices=("poisson", "constant"), default="poisson")
    p.add_argument("--client-timeout-s", type=float, default=1.0, help="per-request deadline")
    p.add_argument("--max-requests", type=int, default=200_000, help="cap per mode")
    p.add_argument("--drain-max-s", type=float, default=30.0, help="wait for backlog, at most")
    p.add_argument("--fixed-first", action="store_true", help="run fixed-delay before SLO")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repo", type=Path, default=harness.DEFAULT_MODEL_REPO)
    p.add_argument("--no-build", action="store_true", help="use --repo as it is")
    p.add_argument("--sluice", default="sluice", help="sluice executable")
    p.add_argument("--out", type=Path, help="JSON path (default results/slo-<ts>.json)")
    args = p.parse_args(argv)
    if args.duration is None:
        args.duration = 6.0 if args.quick else 20.0
    if args.capacity_seconds is None:
        args.capacity_seconds = 3.0 if args.quick else 5.0
    float(args.slo_target_ms)
    stamp = harness.timestamp()
    out_path = args.out or harness.RESULTS_DIR / f"slo-{stamp}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)

    harness.install_cleanup()
    if not args.no_build:
        build_models.build(
            args.repo,
            delay_us=args.max_queue_delay_us,
            intra_op_threads=args.intra_op_threads,
            slo_target_ms=str(args.slo_target_ms),
            wide_units=args.wide_units,
        )
    result: dict[str, Any] = {
        "kind": "slo",
        "timestamp": stamp,
        "machine": harness.machine_info(),
        "args": {k: (harness.rel(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "target_ms": float(args.slo_target_ms),
        "modes": [],
    }
    started = time.monotonic()
    with harness.sluice_server(args.repo, sluice=args.sluice) as server:
        print("[slo] starting sluice ...", file=sys.stderr, flush=True)
        url = server.start(timeout_s=180)
        result["sluice_url"] = url
        try:
            import uvloop

            runner: Any = uvloop.run
        except ImportError:  # pragma: no cover
            runner = asyncio.run
        try:
            runner(_guarded(args, url, result))
        except asyncio.CancelledError:
            result["interrupted"] = True
        finally:
            result["wall_s"] = time.monotonic() - started
            out_path.write_text(harness.to_json(result), encoding="utf-8")

    if result.get("interrupted") or "capacity" not in result:
        print(f"interrupted; partial results in {out_path}", file=sys.stderr)
        return 130
    modes = [ModeResult(**m) for m in result["modes"]]
    cap = result["capacity"]
    print(
        f"\n## SLO mode vs fixed delay ({stamp}; {result['machine']['cpu']}, "
        f"{result['machine']['cores']} cores; load generator on the same machine)\n"
    )
    print(
        f"capacity of {MODEL}_batched: {cap.get('rps', cap.get('given', 0)):.0f} req/s"
        + (
            f" (closed loop, {cap['concurrency']} in flight, avg batch "
            f"{harness.fmt(cap.get('avg_batch'), '.2f')})"
            if "rps" in cap
            else " (given)"
        )
        + f"; offered {args.overload:g}x = {result['offered_rps']:.0f} req/s, {args.arrival}, "
        f"{args.duration:g} s per mode, client deadline {args.client_timeout_s:g} s, "
        f"target {float(args.slo_target_ms):g} ms\n"
    )
    print(table(modes, float(args.slo_target_ms)))
    by = {m.mode: m for m in modes}
    if "slo" in by and "fixed-delay" in by:
        g_slo, g_fixed = by["slo"].goodput_rps, by["fixed-delay"].goodput_rps
        ratio = harness.fmt(g_slo / g_fixed if g_fixed else None, ".2f")
        print(f"\ngoodput SLO / fixed delay: {ratio}x ({g_slo:.0f} vs {g_fixed:.0f} per s)")
    for m in modes:
        if m.sent_rps < 0.95 * m.offered_rps:
            print(
                f"WARNING: {m.mode}: sent {m.sent_rps:.0f}/s of {m.offered_rps:.0f}/s offered; "
                "the load generator, not the server, limited the rate"
            )
        for status, message in m.error_examples.items():
            print(f"{m.mode}: first {status}: {message}")
        if m.drain_complete is False:
            print(f"WARNING: {m.mode}: the server was still busy {m.drained_s:.0f} s after")
    print(f"\nwrote {out_path} ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
