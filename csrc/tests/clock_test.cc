#include "sluice/clock.h"

#include <gtest/gtest.h>

#include <thread>
#include <vector>

namespace sluice {
namespace {

TEST(ClockTest, SteadyClockNeverGoesBack) {
  int64_t prev = SteadyClock::Instance().NowNs();
  for (int i = 0; i < 10000; ++i) {
    const int64_t now = SteadyClock::Instance().NowNs();
    ASSERT_GE(now, prev);
    prev = now;
  }
}

TEST(ClockTest, ManualClockMovesOnlyWhenTold) {
  ManualClock clock(100);
  EXPECT_EQ(clock.NowNs(), 100);
  clock.AdvanceNs(50);
  EXPECT_EQ(clock.NowNs(), 150);
  clock.SetNs(7);
  EXPECT_EQ(clock.NowNs(), 7);
}

TEST(ClockTest, ManualClockAdvancesAtomicallyAcrossThreads) {
  ManualClock clock(0);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&clock] {
      for (int i = 0; i < 10000; ++i) clock.AdvanceNs(1);
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(clock.NowNs(), 40000);
}

}  // namespace
}  // namespace sluice
