#include "sluice/wakeup_timer.h"

#include <cerrno>
#include <cstring>
#include <string>

#ifdef __linux__
#include <sys/timerfd.h>
#include <unistd.h>
#endif

namespace sluice {

namespace {
Status ErrnoStatus(const char* what) {
  return Status(StatusCode::kInternal, std::string(what) + ": " + std::strerror(errno));
}
}  // namespace

#ifdef __linux__

Status WakeupTimer::Create(std::unique_ptr<WakeupTimer>* out) {
  const int fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
  if (fd < 0) return ErrnoStatus("timerfd_create");
  out->reset(new WakeupTimer(fd));
  return Status::Ok();
}

WakeupTimer::~WakeupTimer() { close(fd_); }

Status WakeupTimer::Arm(int64_t delay_ns) {
  if (delay_ns < 1) delay_ns = 1;  // zero would disarm
  itimerspec spec{};
  spec.it_value.tv_sec = static_cast<time_t>(delay_ns / 1000000000);
  spec.it_value.tv_nsec = static_cast<long>(delay_ns % 1000000000);
  if (timerfd_settime(fd_, 0, &spec, nullptr) != 0) return ErrnoStatus("timerfd_settime");
  return Status::Ok();
}

Status WakeupTimer::Disarm() {
  itimerspec spec{};
  if (timerfd_settime(fd_, 0, &spec, nullptr) != 0) return ErrnoStatus("timerfd_settime");
  uint64_t expirations = 0;
  // Non-blocking: EAGAIN just means nothing was pending.
  if (read(fd_, &expirations, sizeof expirations) < 0 && errno != EAGAIN) {
    return ErrnoStatus("timerfd read");
  }
  return Status::Ok();
}

#else

Status WakeupTimer::Create(std::unique_ptr<WakeupTimer>*) {
  return Status(StatusCode::kUnavailable, "WakeupTimer needs Linux timerfd");
}
WakeupTimer::~WakeupTimer() = default;
Status WakeupTimer::Arm(int64_t) { return Status(StatusCode::kUnavailable, "no timerfd"); }
Status WakeupTimer::Disarm() { return Status(StatusCode::kUnavailable, "no timerfd"); }

#endif

}  // namespace sluice
