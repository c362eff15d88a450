"""The process executor: one child process per model instance.

Per batch, on the event loop and with no other thread involved:
  1. the batcher's poll hands out a batch when an instance is idle;
  2. the C++ core copies each request's inputs straight into the instance's
     input slab (shared memory), one memcpy per request and tensor;
  3. one small descriptor goes down the instance's socket;
  4. the child maps the inputs in place, runs onnxruntime, writes the outputs
     into its output slab and answers with a descriptor;
  5. the loop, woken by the socket becoming readable, copies the outputs out
     of the slab once (so the slab is free for the next batch), splits them
     into per-request views and answers the batch.
Queue-delay waits wake the loop through a timerfd (_core.WakeupTimer), since
loop timers are millisecond-grained.

Faults stay in the child: a crash (signal, abort in a custom op, OOM kill) is
an EOF on the socket, which fails only the batch in flight with UNAVAILABLE
and restarts the instance with backoff. Children ignore SIGINT/SIGTERM and
exit when the server says so or when the server's end of the socket closes
(the server died).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import math
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sluice import _core
from sluice.errors import InternalError, ModelLoadError, SluiceError, UnavailableError
from sluice.executors import wire
from sluice.executors.attempt import LoadAttempt
from sluice.executors.base import PROCESS, BatchOutcome, ExecutorHost
from sluice.proto import model_config_pb2 as mc
from sluice.runtime import RuntimeInfo, RuntimeOptions
from sluice.scheduling.scheduler import as_bytes

log = logging.getLogger(__name__)

Array = np.ndarray[Any, Any]

# A child that has not loaded its model by then is killed; the load fails. A
# load's own budget (--model-load-timeout-secs) is what the first start uses;
# restarts use the budget of the load that started the executor.
LOAD_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 10.0
RESTART_BACKOFF_S = (0.1, 5.0)  # first wait, longest wait
HEALTHY_AFTER_S = 30.0  # a child that ran this long resets the backoff


@dataclasses.dataclass(frozen=True)
class LaunchSpec:
    """Everything a child needs to load one instance (picklable)."""

    model_name: str
    version: int
    model_path: str
    model_dir: str
    config: bytes  # serialized ModelConfig, before completion from the graph
    options: RuntimeOptions
    instances: int


@dataclasses.dataclass
class _InFlight:
    batch: Any
    ids: list[int]
    rows: list[int]
    total_rows: int
    tickets: list[Any]
    compute_start_ns: int
    infer_start_ns: int  # inputs are in the slab
    slots: list[wire.TensorSlot]


class _Instance:
    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None
        self.in_slab: wire.Slab | None = None
        self.out_slab: wire.Slab | None = None
        self.inflight: _InFlight | None = None
        self.started_ns = 0
        self.tokens = itertools.count(1)
        self.receive = wire.Receiver()  # the loop's, for this instance's socket


def _spawn(
    spec: LaunchSpec,
    index: int,
    timeout_s: float = LOAD_TIMEOUT_S,
    attempt: LoadAttempt | None = None,
) -> tuple[subprocess.Popen[bytes], socket.socket, Any]:
    """Starts one child and waits (blocking: call off the loop) until its model
    is loaded and warmed up, at most `timeout_s` (or what is left of the
    attempt's budget). Returns (process, socket, the child's ready info).
    Raises ModelLoadError with the child's reason. An abandoned attempt kills
    the child, which ends the wait at once."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        proc = subprocess.Popen(
            # The last argument only names the instance for ps/top and tests.
            [
                sys.executable,
                "-m",
                "sluice.executors.child",
                str(child.fileno()),
                f"{spec.model_name}/{spec.version}#{index}",
            ],
            pass_fds=[child.fileno()],
            stdin=subprocess.DEVNULL,
        )
    except OSError as exc:
        parent.close()
        child.close()
        raise ModelLoadError(f"cannot start an executor process: {exc}") from exc
    child.close()
    if attempt is not None:
        timeout_s = attempt.remaining_s()
        if not attempt.on_abandon(proc.kill):
            proc.kill()  # abandoned before it started: the wait below reads EOF
    try:
        parent.settimeout(timeout_s)
        wire.send(parent, ("init", spec, index))
        message, fds = wire.receive(parent)
        for fd in fds:
            os.close(fd)
    except (OSError, TimeoutError) as exc:
        message = None
        why = f"no answer within {timeout_s:.0f} s" if isinstance(exc, TimeoutError) else exc
        log.error("model '%s' instance %d: executor process: %s", spec.model_name, index, why)
    if message is None or message[0] != "ready":
        parent.close()
        if proc.poll() is None:
            proc.kill()
        code = proc.wait()
        reason = (
            message[1] if message is not None else f"the executor process exited ({_how(code)})"
        )
        raise ModelLoadError(reason)
    parent.setblocking(False)
    return proc, parent, message[1]


def _how(returncode: int | None) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


class ProcessExecutor:
    kind = PROCESS

    def __init__(self, spec: LaunchSpec) -> None:
        self._spec = spec
        self.instance_count = spec.instances
        self._instances = [_Instance(i) for i in range(spec.instances)]
        self._idle: list[_Instance] = []
        self._host: ExecutorHost | None = None
        self._batcher: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._output_names: list[str] = []
        self._timer: _core.WakeupTimer | None = None
        self._restarts = 0
        self._stopping = False
        self._drained: asyncio.Event | None = None
        self._restart_tasks: set[asyncio.Task[None]] = set()
        self._backoff_s = RESTART_BACKOFF_S[0]
        self._gave_up = False  # every instance is down and the last restart failed
        self._load_timeout_s = LOAD_TIMEOUT_S  # for restarts: the first load's budget

    # ---- loading (off the loop) ----------------------------------------------------

    def launch(
        self, attempt: LoadAttempt | None = None
    ) -> tuple[mc.ModelConfig, list[str], RuntimeInfo]:
        """Starts every instance (blocking), within the attempt's budget.
        Returns the config completed from the graph, load notes and runtime
        info. Raises ModelLoadError; started children are stopped then."""
        if attempt is not None and attempt.budget_s > 0:
            self._load_timeout_s = attempt.budget_s
        ready: list[Any] = []
        try:
            for inst in self._instances:
                inst.proc, inst.sock, info = _spawn(
                    self._spec, inst.index, self._load_timeout_s, attempt
                )
                inst.started_ns = _core.monotonic_ns()
                ready.append(info)
        except BaseException:
            self._close_all()
            raise
        first = ready[0]
        config = mc.ModelConfig()
        config.ParseFromString(first["config"])
        return config, list(first["notes"]), first["info"]

    def attach(
        self,
        host: ExecutorHost,
        batcher: Any,
        loop: asyncio.AbstractEventLoop,
        output_names: list[str],
    ) -> None:
        self._host, self._batcher, self._loop = host, batcher, loop
        self._output_names = output_names

    # ---- the loop side --------------------------------------------------------------

    def start(self) -> None:
        loop = self._loop
        assert loop is not None
        self._drained = asyncio.Event()
        self._timer = _core.WakeupTimer()
        loop.add_reader(self._timer.fd, self._on_timer)
        for inst in self._instances:
            self._watch(inst)

    def _watch(self, inst: _Instance) -> None:
        assert self._loop is not None
        assert inst.sock is not None
        self._loop.add_reader(inst.sock.fileno(), self._on_readable, inst)
        self._idle.append(inst)

    @property
    def restarts(self) -> int:
        return self._restarts

    @property
    def available(self) -> bool:
        return not self._gave_up

    def notify_enqueued(self) -> None:
        if self._idle:
            self._kick()

    def _on_timer(self) -> None:
        assert self._timer is not None
        self._timer.disarm()
        self._kick()

    def _kick(self) -> None:
        """Hands batches to idle instances while the batcher has them."""
        batcher, host = self._batcher, self._host
        assert host is not None
        while self._idle or not self._alive():
            batch, expired, wait_ns, drained = batcher.poll_batch()
            if expired:
                host.expire(expired)
            if batch is not None:
                if self._idle:
                    self._dispatch(self._idle.pop(), batch)
                else:  # no instance left to run it (stopping, or every restart failed)
                    self._fail_now(batch, self._down_error())
                continue
            if drained:
                if self._drained is not None and not self._busy():
                    self._drained.set()
                return
            if expired:
                continue
            if wait_ns >= 0 and self._timer is not None:
                self._timer.arm(wait_ns)
            return

    def _alive(self) -> bool:
        # While a restart is pending the queue waits for it, unless we gave up.
        return not (self._gave_up or self._stopping) or any(
            i.sock is not None for i in self._instances
        )

    def _busy(self) -> bool:
        return any(i.inflight is not None for i in self._instances)

    def _down_error(self) -> SluiceError:
        host = self._host
        assert host is not None
        return UnavailableError(
            f"model {host.label}: no executor process is running (see the server log)"
        )

    def _fail_now(self, batch: Any, error: SluiceError) -> None:
        host = self._host
        assert host is not None
        ids = batch.ids
        now = _core.monotonic_ns()
        host.deliver(
            BatchOutcome(batch, ids, host.take_tickets(ids), None, error, now, now, now, now)
        )

    def _dispatch(self, inst: _Instance, batch: Any) -> None:
        host = self._host
        assert host is not None
        assert inst.sock is not None
        compute_start = _core.monotonic_ns()
        ids = batch.ids
        rows = batch.rows
        total_rows = int(batch.total_rows)
        tickets = host.take_tickets(ids)
        try:
            slots, new_fd = self._gather(inst, tickets, total_rows)
            infer_start = _core.monotonic_ns()
            wire.send(
                inst.sock,
                ("run", next(inst.tokens), wire.wire_slots(slots), self._output_names),
                [new_fd] if new_fd is not None else None,
            )
        except SluiceError as exc:
            self._idle.append(inst)
            now = _core.monotonic_ns()
            host.deliver(BatchOutcome(batch, ids, tickets, None, exc, compute_start, now, now, now))
            return
        except (OSError, ValueError) as exc:
            # The child is gone or the inputs cannot be laid out: this batch fails;
            # a dead child also shows up as EOF on the socket and restarts.
            self._idle.append(inst)
            now = _core.monotonic_ns()
            if isinstance(exc, ConnectionError):  # EPIPE/ECONNRESET: the child is gone
                what = f"the executor process died before it took this batch ({exc}); "
                what += "the instance is restarting"
            else:
                what = f"cannot hand the batch to its executor process: {exc}"
            error = UnavailableError(f"model {host.label} instance {inst.index}: {what}")
            host.deliver(
                BatchOutcome(batch, ids, tickets, None, error, compute_start, now, now, now)
            )
            return
        inst.inflight = _InFlight(
            batch, ids, rows, total_rows, tickets, compute_start, infer_start, slots
        )

    def _gather(
        self, inst: _Instance, tickets: Sequence[Any], total_rows: int
    ) -> tuple[list[wire.TensorSlot], int | None]:
        """Lays the batch's inputs out in the instance's input slab (one copy per
        request and tensor); returns the slots and a new slab's fd to send."""
        first = tickets[0].feeds
        plan: list[tuple[str, Any, tuple[int, ...], int, list[Array] | bytes]] = []
        total = 0
        for name, arr in first.items():
            parts = [t.feeds[name] for t in tickets]
            if arr.dtype == object:
                blob = b"".join(_core.encode_bytes_tensor(p.ravel().tolist()) for p in parts)
                shape = (total_rows, *arr.shape[1:]) if len(parts) > 1 else tuple(arr.shape)
                total = wire.aligned(total)
                plan.append((name, arr.dtype, shape, total, blob))
                total += len(blob)
                continue
            shape = (total_rows, *arr.shape[1:]) if len(parts) > 1 else tuple(arr.shape)
            nbytes = math.prod(shape) * arr.dtype.itemsize
            total = wire.aligned(total)
            plan.append((name, arr.dtype, shape, total, parts))
            total += nbytes
        new_fd = None
        if inst.in_slab is None or inst.in_slab.size < total:
            if inst.in_slab is not None:
                inst.in_slab.close()
            inst.in_slab = wire.Slab(wire.grown(total))
            new_fd = inst.in_slab.fd
        mm = inst.in_slab.mm
        slots: list[wire.TensorSlot] = []
        for name, dtype, shape, offset, data in plan:
            if isinstance(data, bytes):
                mm[offset : offset + len(data)] = data
                slots.append(
                    wire.TensorSlot(name, wire.dtype_code(dtype), shape, offset, len(data), True)
                )
                continue
            nbytes = math.prod(shape) * dtype.itemsize
            out = np.frombuffer(mm, dtype=np.uint8, count=nbytes, offset=offset)
            _core.gather_rows([as_bytes(p) for p in data], out)
            slots.append(wire.TensorSlot(name, wire.dtype_code(dtype), shape, offset, nbytes))
        return slots, new_fd

    def _on_readable(self, inst: _Instance) -> None:
        while inst.sock is not None:
            try:
                message, fds = inst.receive(inst.sock)
            except BlockingIOError:
                return
            except (OSError, ValueError) as exc:
                log.error("%s instance %d: bad message: %s", self._label(), inst.index, exc)
                message, fds = None, []
            if message is None:
                self._died(inst)
                return
            if fds:
                if inst.out_slab is not None:
                    inst.out_slab.close()
                inst.out_slab = wire.Slab(os.fstat(fds[0]).st_size, fds[0])
                for fd in fds[1:]:
                    os.close(fd)
            self._completed(inst, message)

    def _completed(self, inst: _Instance, message: tuple[Any, ...]) -> None:
        host = self._host
        assert host is not None
        job = inst.inflight
        if job is None:
            log.error(
                "%s instance %d: unexpected message %r", self._label(), inst.index, message[0]
            )
            return
        inst.inflight = None
        kind = message[0]
        results: list[Array] | None = None
        outputs = None
        error: SluiceError | None = None
        infer_start, infer_end = job.infer_start_ns, job.infer_start_ns
        if kind == "done":
            _, _, wired, infer_start, infer_end = message
            slots = wire.from_wire(wired)
            try:
                assert inst.out_slab is not None
                # One copy out of the slab, so it is free for the next batch.
                results = [np.array(wire.view(inst.out_slab.mm, s), copy=True) for s in slots]
                host.record_execution(job.total_rows, infer_end - infer_start)
                outputs = host.split(results, job.rows, job.total_rows)
            except SluiceError as exc:
                error, results = exc, None
        else:
            error = InternalError(f"onnxruntime failed to run model {host.label}: {message[2]}")
        feeds = None
        if results is not None and inst.in_slab is not None and host.observes:
            # Views of the slab for the drift monitor; valid until the next batch.
            feeds = {s.name: wire.view(inst.in_slab.mm, s) for s in job.slots if not s.serialized}
        outcome = BatchOutcome(
            job.batch,
            job.ids,
            job.tickets,
            outputs,
            error,
            job.compute_start_ns,
            infer_start,
            infer_end,
            _core.monotonic_ns(),
            feeds,
            results,
        )
        host.deliver(outcome)
        host.observe(outcome)
        if inst.started_ns and _core.monotonic_ns() - inst.started_ns > HEALTHY_AFTER_S * 1e9:
            self._backoff_s = RESTART_BACKOFF_S[0]
        self._idle.append(inst)
        self._kick()

    def _label(self) -> str:
        return self._host.label if self._host is not None else f"'{self._spec.model_name}'"

    # ---- faults ----------------------------------------------------------------------

    def _died(self, inst: _Instance) -> None:
        host = self._host
        assert host is not None
        assert self._loop is not None
        sock, proc = inst.sock, inst.proc
        assert sock is not None
        self._loop.remove_reader(sock.fileno())
        sock.close()
        inst.sock = None
        if inst in self._idle:
            self._idle.remove(inst)
        # The next child gets fresh slabs (it has none of the old ones mapped).
        for slab in (inst.in_slab, inst.out_slab):
            if slab is not None:
                slab.close()
        inst.in_slab = inst.out_slab = None
        # A child that died is a zombie by the time its socket reads EOF, so
        # poll() has its status; one that closed the socket and lives on is
        # broken: kill it and reap it off the loop.
        code = proc.poll() if proc is not None else None
        if code is None and proc is not None:
            proc.kill()
            self._loop.run_in_executor(None, proc.wait)
        how = _how(code) if code is not None else "closed its connection"
        job = inst.inflight
        inst.inflight = None
        if not self._stopping:
            self._restarts += 1
            log.error(
                "model %s instance %d: executor process died (%s)%s; restarting it",
                host.label,
                inst.index,
                how,
                " while running a batch" if job is not None else "",
            )
        if job is not None:
            now = _core.monotonic_ns()
            error = UnavailableError(
                f"model {host.label} instance {inst.index}: the executor process died ({how}) "
                "while running this batch; the instance is restarting"
            )
            host.deliver(
                BatchOutcome(
                    job.batch,
                    job.ids,
                    job.tickets,
                    None,
                    error,
                    job.compute_start_ns,
                    now,
                    now,
                    now,
                )
            )
        if self._stopping:
            self._kick()
            return
        task = self._loop.create_task(self._restart(inst))
        self._restart_tasks.add(task)
        task.add_done_callback(self._restart_tasks.discard)

    async def _restart(self, inst: _Instance) -> None:
        while not self._stopping:
            await asyncio.sleep(self._backoff_s)
            self._backoff_s = min(self._backoff_s * 2, RESTART_BACKOFF_S[1])
            try:
                proc, sock, _ = await asyncio.to_thread(
                    _spawn, self._spec, inst.index, self._load_timeout_s
                )
            except ModelLoadError as exc:
                log.error(
                    "model %s instance %d: restart failed: %s", self._label(), inst.index, exc
                )
                if not self._alive_instances():
                    self._gave_up = True  # answer what waits instead of holding it
                    self._kick()
                continue
            if self._is_stopping():  # stop() began while it started
                wire.send(sock, ("stop",))
                sock.close()
                await asyncio.to_thread(proc.wait)
                return
            inst.proc, inst.sock = proc, sock
            inst.started_ns = _core.monotonic_ns()
            self._gave_up = False
            self._watch(inst)
            log.info("model %s instance %d: executor process restarted", self._label(), inst.index)
            self._kick()
            return

    def _is_stopping(self) -> bool:
        return self._stopping

    def _alive_instances(self) -> int:
        return sum(1 for i in self._instances if i.sock is not None)

    # ---- stopping --------------------------------------------------------------------

    async def stop(self) -> None:
        """The batcher is stopped: run what it still holds, then stop the children."""
        self._stopping = True
        for task in list(self._restart_tasks):
            task.cancel()
        if self._drained is not None:
            self._kick()
            await self._drained.wait()
        loop = self._loop
        if loop is not None and self._timer is not None:
            loop.remove_reader(self._timer.fd)
        for inst in self._instances:
            if inst.sock is not None and loop is not None:
                loop.remove_reader(inst.sock.fileno())
        await asyncio.to_thread(self._close_all)

    def close(self) -> None:
        """Stops the children without draining (a load that failed after launch)."""
        self._close_all()

    def _close_all(self) -> None:
        for inst in self._instances:
            if inst.sock is not None:
                with contextlib.suppress(OSError):
                    wire.send(inst.sock, ("stop",))
                inst.sock.close()
                inst.sock = None
            if inst.proc is not None:
                try:
                    inst.proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    inst.proc.kill()
                    inst.proc.wait()
                inst.proc = None
            for slab in (inst.in_slab, inst.out_slab):
                if slab is not None:
                    slab.close()
            inst.in_slab = inst.out_slab = None


def launch_spec(
    name: str,
    version: int,
    model_path: Path,
    model_dir: Path,
    config: mc.ModelConfig,
    options: RuntimeOptions,
    instances: int,
) -> LaunchSpec:
    return LaunchSpec(
        name,
        version,
        str(model_path),
        str(model_dir),
        config.SerializeToString(),
        options,
        instances,
    )
