#include "sluice/wakeup_timer.h"

#include <gtest/gtest.h>
#include <poll.h>

#include <chrono>
#include <memory>

namespace sluice {
namespace {

bool ReadableWithin(int fd, int timeout_ms) {
  pollfd p{fd, POLLIN, 0};
  return poll(&p, 1, timeout_ms) == 1 && (p.revents & POLLIN) != 0;
}

TEST(WakeupTimer, FiresAfterTheDelayAndDisarmClearsIt) {
  std::unique_ptr<WakeupTimer> timer;
  ASSERT_TRUE(WakeupTimer::Create(&timer).ok());
  EXPECT_FALSE(ReadableWithin(timer->fd(), 0));
  const auto start = std::chrono::steady_clock::now();
  ASSERT_TRUE(timer->Arm(300'000).ok());  // 300 us
  ASSERT_TRUE(ReadableWithin(timer->fd(), 1000));
  const auto waited = std::chrono::steady_clock::now() - start;
  EXPECT_GE(waited, std::chrono::microseconds(300));
  ASSERT_TRUE(timer->Disarm().ok());
  EXPECT_FALSE(ReadableWithin(timer->fd(), 0));
}

TEST(WakeupTimer, RearmingReplacesTheEarlierDeadline) {
  std::unique_ptr<WakeupTimer> timer;
  ASSERT_TRUE(WakeupTimer::Create(&timer).ok());
  ASSERT_TRUE(timer->Arm(10'000'000'000).ok());  // 10 s
  ASSERT_TRUE(timer->Arm(0).ok());  // clamped to 1 ns, fires at once
  EXPECT_TRUE(ReadableWithin(timer->fd(), 1000));
  ASSERT_TRUE(timer->Disarm().ok());
  EXPECT_FALSE(ReadableWithin(timer->fd(), 20));  // the 10 s arming is gone too
}

}  // namespace
}  // namespace sluice
