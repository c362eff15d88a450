// The one clock of the core. Every timestamp is int64 nanoseconds from the
// monotonic (steady) clock, so durations never jump with wall-clock changes.
// Components take a `const Clock&` so tests can inject a ManualClock.
#pragma once

#include <atomic>
#include <cstdint>

namespace sluice {

// Monotonic nanoseconds since an arbitrary fixed epoch (process-wide).
int64_t MonotonicNowNs();

class Clock {
 public:
  virtual ~Clock() = default;
  virtual int64_t NowNs() const = 0;
};

class SteadyClock final : public Clock {
 public:
  int64_t NowNs() const override { return MonotonicNowNs(); }
  // Shared instance; stateless, so safe from any thread.
  static const SteadyClock& Instance();
};

// A clock that moves only when told. Thread-safe: readers and the advancing
// thread may differ (tests drive a batcher thread with it).
class ManualClock final : public Clock {
 public:
  explicit ManualClock(int64_t start_ns = 0) : now_ns_(start_ns) {}
  int64_t NowNs() const override { return now_ns_.load(std::memory_order_acquire); }
  void AdvanceNs(int64_t delta_ns) { now_ns_.fetch_add(delta_ns, std::memory_order_acq_rel); }
  void SetNs(int64_t now_ns) { now_ns_.store(now_ns, std::memory_order_release); }

 private:
  std::atomic<int64_t> now_ns_;
};

}  // namespace sluice
