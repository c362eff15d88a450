// A one-shot timer that an event loop can watch as a file descriptor.
//
// Event-driven batch dispatch (process executors) has no thread waiting in
// Batcher::NextBatch, so a queue-delay wait must wake the event loop instead.
// Loop timers are millisecond-grained (libuv), too coarse for the
// sub-millisecond delays the batcher asks for; a Linux timerfd fires on time
// and becomes readable, which the loop already knows how to wait for.
//
// Threading: one owner; not thread-safe. The descriptor is closed by the
// destructor. Elsewhere than Linux, Create fails with kUnavailable.
#pragma once

#include <cstdint>
#include <memory>

#include "sluice/status.h"

namespace sluice {

class WakeupTimer {
 public:
  // A disarmed timer. Fails when the OS has no timerfd.
  static Status Create(std::unique_ptr<WakeupTimer>* out);
  ~WakeupTimer();
  WakeupTimer(const WakeupTimer&) = delete;
  WakeupTimer& operator=(const WakeupTimer&) = delete;

  int fd() const { return fd_; }
  // Fires once, `delay_ns` from now (at least 1 ns); replaces any earlier arming.
  Status Arm(int64_t delay_ns);
  // Disarms, and consumes a pending expiry so the descriptor is no longer readable.
  Status Disarm();

 private:
  explicit WakeupTimer(int fd) : fd_(fd) {}
  int fd_;
};

}  // namespace sluice
