#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#ifdef __linux__
#include <sys/prctl.h>
#endif

#include "sluice/batcher.h"
#include "sluice/gather.h"
#include "sluice/wakeup_timer.h"
#include "status_error.h"

namespace py = pybind11;

namespace sluice::bindings {
namespace {

using ExpiredTuple = std::tuple<uint64_t, std::string, std::string>;
using NextResult = std::optional<std::pair<std::optional<Batch>, std::vector<ExpiredTuple>>>;

// `value` as an int64 in [low, high]; ValueError naming `name` otherwise.
int64_t CheckedInt(const py::int_& value, const char* name, int64_t low, int64_t high) {
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(value.ptr(), &overflow);
  if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
  if (overflow != 0 || v < low || v > high) {
    throw py::value_error(std::string(name) + " must be in [" + std::to_string(low) + ", " +
                          std::to_string(high) + "], got " + py::str(value).cast<std::string>());
  }
  return static_cast<int64_t>(v);
}

// Owns the clock it runs on: the steady clock, or a ManualClock shared with Python.
class PyBatcher {
 public:
  PyBatcher(BatcherOptions options, std::shared_ptr<ManualClock> manual)
      : manual_(std::move(manual)),
        batcher_(std::move(options), manual_ ? static_cast<const Clock&>(*manual_)
                                             : SteadyClock::Instance()) {}

  // priority and timeout_ns come from clients: taken as Python ints and range
  // checked here, so a value out of range is a ValueError naming it (pybind11's
  // own conversion would raise a TypeError quoting the signature).
  // True when a consumer should look at the queue again (see Batcher::Enqueue).
  bool Enqueue(uint64_t id, int32_t rows, uint64_t shape_key, const py::int_& priority,
               const py::int_& timeout_ns, bool force_timeout) {
    EnqueueArgs args;
    args.id = id;
    args.rows = rows;
    args.shape_key = shape_key;
    args.priority = static_cast<uint32_t>(CheckedInt(priority, "priority", 0, UINT32_MAX));
    args.timeout_ns = CheckedInt(timeout_ns, "timeout_ns", 0, INT64_MAX);
    args.force_timeout = force_timeout;
    bool decision_may_change = true;
    ThrowIfError(batcher_.Enqueue(args, &decision_may_change));
    return decision_may_change;
  }

  // None: stopped and drained. Otherwise (batch or None, expired list).
  NextResult Next(int64_t max_wait_ns, bool blocking) {
    Batch batch;
    std::vector<Expired> expired;
    bool got;
    {
      // Workers block here for the next batch; the batcher never calls back
      // into Python, so waiting without the GIL is safe.
      py::gil_scoped_release release;
      got = blocking ? batcher_.NextBatch(&batch, &expired, max_wait_ns)
                     : batcher_.TryNextBatch(&batch, &expired);
    }
    if (blocking && !got) return std::nullopt;
    std::vector<ExpiredTuple> out;
    out.reserve(expired.size());
    for (const Expired& e : expired) {
      out.emplace_back(e.id, StatusCodeName(e.status.code()), e.status.message());
    }
    std::optional<Batch> b;
    if (!batch.ids.empty()) b = std::move(batch);
    return std::make_pair(std::move(b), std::move(out));
  }

  // (batch or None, expired, wait_ns, drained): one non-blocking look, for
  // an event loop that dispatches batches itself. Called with the GIL held:
  // PollNextBatch only takes the batcher's mutex for a few microseconds.
  std::tuple<std::optional<Batch>, std::vector<ExpiredTuple>, int64_t, bool> Poll() {
    Batch batch;
    std::vector<Expired> expired;
    int64_t wait_ns = -1;
    const Batcher::Poll poll = batcher_.PollNextBatch(&batch, &expired, &wait_ns);
    std::vector<ExpiredTuple> out;
    out.reserve(expired.size());
    for (const Expired& e : expired) {
      out.emplace_back(e.id, StatusCodeName(e.status.code()), e.status.message());
    }
    std::optional<Batch> b;
    if (poll == Batcher::Poll::kBatch) b = std::move(batch);
    return {std::move(b), std::move(out), poll == Batcher::Poll::kWait ? wait_ns : -1,
            poll == Batcher::Poll::kDrained};
  }

  Batcher& batcher() { return batcher_; }

 private:
  std::shared_ptr<ManualClock> manual_;
  Batcher batcher_;
};

// Copies of at least this many bytes release the GIL (see GatherRows).
constexpr size_t kReleaseGilBytes = size_t{256} << 10;

// Copies C-contiguous arrays back to back into `out`, without the GIL when large.
void GatherRows(const std::vector<py::buffer>& parts, py::buffer out) {
  py::buffer_info dst = out.request(true);
  std::vector<ConstSpan> spans;
  spans.reserve(parts.size());
  std::vector<py::buffer_info> keep;  // holds the views for the copy
  keep.reserve(parts.size());
  size_t total = 0;
  for (const py::buffer& p : parts) {
    keep.push_back(p.request());
    const py::buffer_info& info = keep.back();
    const auto size = static_cast<size_t>(info.size * info.itemsize);
    py::ssize_t expect = info.itemsize;
    for (py::ssize_t d = info.ndim - 1; d >= 0; --d) {
      if (info.shape[static_cast<size_t>(d)] > 1 && info.strides[static_cast<size_t>(d)] != expect) {
        ThrowIfError(Status::InvalidArgument("gather_rows needs C-contiguous parts"));
      }
      expect *= info.shape[static_cast<size_t>(d)];
    }
    spans.push_back(ConstSpan{static_cast<const uint8_t*>(info.ptr), size});
    total += size;
  }
  if (total != static_cast<size_t>(dst.size * dst.itemsize)) {
    ThrowIfError(Status::InvalidArgument("gather_rows: parts hold " + std::to_string(total) +
                                         " bytes, out holds " +
                                         std::to_string(dst.size * dst.itemsize)));
  }
  auto* base = static_cast<uint8_t*>(dst.ptr);
  if (total < kReleaseGilBytes) {
    // A small copy takes less than a microsecond; handing the GIL back to a
    // busy event loop and waiting to get it again costs far more.
    GatherSpans(spans, base);
    return;
  }
  py::gil_scoped_release release;
  GatherSpans(spans, base);
}

}  // namespace

void register_batcher(py::module_& m) {
  py::enum_<TimeoutAction>(m, "TimeoutAction")
      .value("REJECT", TimeoutAction::kReject)
      .value("DELAY", TimeoutAction::kDelay);

  py::class_<QueuePolicy>(m, "QueuePolicy")
      .def(py::init<>())
      .def_readwrite("timeout_action", &QueuePolicy::timeout_action)
      .def_readwrite("default_timeout_ns", &QueuePolicy::default_timeout_ns)
      .def_readwrite("allow_timeout_override", &QueuePolicy::allow_timeout_override)
      .def_readwrite("max_queue_size", &QueuePolicy::max_queue_size);

  py::class_<BatcherOptions>(m, "BatcherOptions")
      .def(py::init<>())
      .def_readwrite("max_batch_size", &BatcherOptions::max_batch_size)
      .def_readwrite("batching", &BatcherOptions::batching)
      .def_readwrite("preferred_batch_sizes", &BatcherOptions::preferred_batch_sizes)
      .def_readwrite("max_queue_delay_ns", &BatcherOptions::max_queue_delay_ns)
      .def_readwrite("preserve_ordering", &BatcherOptions::preserve_ordering)
      .def_readwrite("priority_levels", &BatcherOptions::priority_levels)
      .def_readwrite("default_priority_level", &BatcherOptions::default_priority_level)
      .def_readwrite("default_queue_policy", &BatcherOptions::default_queue_policy)
      .def_readwrite("priority_queue_policy", &BatcherOptions::priority_queue_policy)
      .def_readwrite("slo_target_ns", &BatcherOptions::slo_target_ns)
      .def_readwrite("instance_count", &BatcherOptions::instance_count);

  py::class_<Batch>(m, "Batch")
      .def_readonly("ids", &Batch::ids)
      .def_readonly("rows", &Batch::rows)
      .def_readonly("enqueued_ns", &Batch::enqueued_ns)
      .def_readonly("total_rows", &Batch::total_rows)
      .def_readonly("formed_ns", &Batch::formed_ns)
      .def_readonly("sequence", &Batch::sequence);

  py::class_<ManualClock, std::shared_ptr<ManualClock>>(m, "ManualClock")
      .def(py::init<int64_t>(), py::arg("start_ns") = 0)
      .def("now_ns", &ManualClock::NowNs)
      .def("advance_ns", &ManualClock::AdvanceNs)
      .def("set_ns", &ManualClock::SetNs);

  py::class_<PyBatcher>(m, "Batcher")
      .def(py::init<BatcherOptions, std::shared_ptr<ManualClock>>(), py::arg("options"),
           py::arg("clock") = nullptr)
      .def("enqueue", &PyBatcher::Enqueue, py::arg("id"), py::arg("rows"), py::arg("shape_key"),
           py::arg("priority") = 0, py::arg("timeout_ns") = 0, py::arg("force_timeout") = false)
      .def("next_batch", [](PyBatcher& b, int64_t max_wait_ns) { return b.Next(max_wait_ns, true); },
           py::arg("max_wait_ns") = -1)
      .def("try_next_batch", [](PyBatcher& b) { return b.Next(0, false); })
      .def("poll_batch", &PyBatcher::Poll,
           "Non-blocking: (batch or None, expired, wait_ns, drained). wait_ns >= 0 says\n"
           "when to look again without an event; -1: only enqueue/cancel/stop changes it.")
      .def("cancel", [](PyBatcher& b, uint64_t id) { return b.batcher().Cancel(id); })
      .def("stop", [](PyBatcher& b) { b.batcher().Stop(); })
      .def("record_execution",
           [](PyBatcher& b, int32_t rows, int64_t exec_ns) { b.batcher().RecordExecution(rows, exec_ns); })
      .def_property_readonly("queued_requests",
                             [](PyBatcher& b) { return b.batcher().QueuedRequests(); })
      .def_property_readonly("queued_rows", [](PyBatcher& b) { return b.batcher().QueuedRows(); });

  py::class_<WakeupTimer>(m, "WakeupTimer")
      .def(py::init([] {
        std::unique_ptr<WakeupTimer> timer;
        ThrowIfError(WakeupTimer::Create(&timer));
        return timer;
      }))
      .def_property_readonly("fd", &WakeupTimer::fd)
      .def("arm", [](WakeupTimer& t, int64_t delay_ns) { ThrowIfError(t.Arm(delay_ns)); },
           py::arg("delay_ns"))
      .def("disarm", [](WakeupTimer& t) { ThrowIfError(t.Disarm()); });

  m.def(
      "set_timer_slack_ns",
      [](uint64_t ns) {
#ifdef __linux__
        return prctl(PR_SET_TIMERSLACK, static_cast<unsigned long>(ns), 0, 0, 0) == 0;
#else
        (void)ns;
        return false;
#endif
      },
      py::arg("ns"),
      "Sets the calling thread's timer slack (Linux; False elsewhere). Linux lets a\n"
      "timed wait overshoot by 50 us by default, which a max_queue_delay wait pays.");
  m.def("gather_rows", &GatherRows, py::arg("parts"), py::arg("out"),
        "Copy C-contiguous arrays back to back into `out` (GIL released for copies >= 256 KiB).");
}

}  // namespace sluice::bindings
