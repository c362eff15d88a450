#include "sluice/batcher.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <thread>
#include <vector>

namespace sluice {
namespace {

constexpr int64_t kUs = 1000;
constexpr int64_t kMs = 1000 * kUs;

EnqueueArgs Req(uint64_t id, int32_t rows = 1, uint64_t shape_key = 0, uint32_t priority = 0) {
  EnqueueArgs args;
  args.id = id;
  args.rows = rows;
  args.shape_key = shape_key;
  args.priority = priority;
  return args;
}

EnqueueArgs Timed(uint64_t id, int64_t timeout_ns, bool force = false) {
  EnqueueArgs args = Req(id);
  args.timeout_ns = timeout_ns;
  args.force_timeout = force;
  return args;
}

BatcherOptions Opts(int32_t max_batch_size, int64_t delay_ns = 0) {
  BatcherOptions options;
  options.max_batch_size = max_batch_size;
  options.max_queue_delay_ns = delay_ns;
  return options;
}

// Polls a batcher at the ManualClock's time.
struct Poller {
  Batch batch;
  std::vector<Expired> expired;

  bool Try(Batcher& batcher) {
    expired.clear();
    return batcher.TryNextBatch(&batch, &expired);
  }
  // The ids of the next batch, or {} when none is ready.
  std::vector<uint64_t> Next(Batcher& batcher) {
    return Try(batcher) ? batch.ids : std::vector<uint64_t>{};
  }
  std::vector<uint64_t> ExpiredIds() const {
    std::vector<uint64_t> ids;
    for (const auto& e : expired) ids.push_back(e.id);
    return ids;
  }
};

using Ids = std::vector<uint64_t>;

// ------------------------------------------------------------------ formation

TEST(BatcherTest, BatchNeverExceedsMaxAndKeepsRows) {
  ManualClock clock;
  Batcher batcher(Opts(8), clock);
  std::vector<int32_t> rows_of(40);
  for (uint64_t id = 0; id < 40; ++id) {
    rows_of[id] = 1 + static_cast<int32_t>(id % 4);
    ASSERT_TRUE(batcher.Enqueue(Req(id, rows_of[id])).ok());
  }
  Poller p;
  uint64_t next_id = 0;
  while (p.Try(batcher)) {
    ASSERT_FALSE(p.batch.ids.empty());
    ASSERT_LE(p.batch.total_rows, 8);
    ASSERT_EQ(p.batch.rows.size(), p.batch.ids.size());
    ASSERT_EQ(p.batch.enqueued_ns.size(), p.batch.ids.size());
    int32_t sum = 0;
    for (size_t i = 0; i < p.batch.ids.size(); ++i) {
      EXPECT_EQ(p.batch.ids[i], next_id++);  // FIFO
      EXPECT_EQ(p.batch.rows[i], rows_of[p.batch.ids[i]]);
      sum += p.batch.rows[i];
    }
    EXPECT_EQ(p.batch.total_rows, sum);
  }
  EXPECT_EQ(next_id, 40u);
  EXPECT_EQ(batcher.QueuedRequests(), 0u);
  EXPECT_EQ(batcher.QueuedRows(), 0);
}

TEST(BatcherTest, StopsAtTheFirstRequestThatDoesNotFit) {
  ManualClock clock;
  Batcher batcher(Opts(8, kMs), clock);
  for (uint64_t id = 0; id < 3; ++id) ASSERT_TRUE(batcher.Enqueue(Req(id, 3)).ok());
  ASSERT_TRUE(batcher.Enqueue(Req(3, 2)).ok());  // would fit beside 0 and 1: no skipping ahead
  Poller p;
  EXPECT_EQ(p.Next(batcher), (Ids{0, 1}));  // blocked by 2: runs before the delay
  EXPECT_EQ(p.batch.total_rows, 6);
  EXPECT_EQ(p.Next(batcher), Ids{});  // 2 and 3 (5 rows) can still grow: wait
  clock.AdvanceNs(kMs);
  EXPECT_EQ(p.Next(batcher), (Ids{2, 3}));
  EXPECT_EQ(p.batch.rows, (std::vector<int32_t>{3, 2}));
}

TEST(BatcherTest, RejectsBadRowsAndDuplicateIds) {
  ManualClock clock;
  Batcher batcher(Opts(32), clock);
  Status zero = batcher.Enqueue(Req(1, 0));
  EXPECT_EQ(zero.code(), StatusCode::kInvalidArgument);
  Status big = batcher.Enqueue(Req(1, 33));
  EXPECT_EQ(big.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(big.message().find("32"), std::string::npos) << big.message();
  EXPECT_NE(big.message().find("33"), std::string::npos) << big.message();
  ASSERT_TRUE(batcher.Enqueue(Req(1, 32)).ok());
  Status dup = batcher.Enqueue(Req(1));
  EXPECT_EQ(dup.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(batcher.QueuedRequests(), 1u);
  EXPECT_EQ(batcher.QueuedRows(), 32);
}

TEST(BatcherTest, PreferredSizeChosenWhenReachable) {
  ManualClock clock;
  BatcherOptions options = Opts(16, kMs);
  options.preferred_batch_sizes = {4, 8};
  Batcher batcher(options, clock);
  Poller p;
  for (uint64_t id = 0; id < 3; ++id) ASSERT_TRUE(batcher.Enqueue(Req(id)).ok());
  EXPECT_EQ(p.Next(batcher), Ids{});  // 3 rows: no preferred size yet
  ASSERT_TRUE(batcher.Enqueue(Req(3)).ok());
  EXPECT_EQ(p.Next(batcher), (Ids{0, 1, 2, 3}));  // 4 reached, before the delay

  // 6 queued: 8 is not reachable from the queue, so the prefix of 4 runs now.
  for (uint64_t id = 10; id < 16; ++id) ASSERT_TRUE(batcher.Enqueue(Req(id)).ok());
  EXPECT_EQ(p.Next(batcher), (Ids{10, 11, 12, 13}));
  EXPECT_EQ(p.Next(batcher), Ids{});  // the 2 left wait for the delay
  for (uint64_t id = 16; id < 26; ++id) ASSERT_TRUE(batcher.Enqueue(Req(id)).ok());
  // 12 queued: the largest reachable preferred size is 8.
  EXPECT_EQ(p.Next(batcher), (Ids{14, 15, 16, 17, 18, 19, 20, 21}));
  EXPECT_EQ(p.batch.total_rows, 8);
  EXPECT_EQ(p.Next(batcher), (Ids{22, 23, 24, 25}));  // 4 left: preferred again
  EXPECT_EQ(batcher.QueuedRequests(), 0u);
}

TEST(BatcherTest, PreferredSizeCountsRowsNotRequests) {
  ManualClock clock;
  BatcherOptions options = Opts(16, kMs);
  options.preferred_batch_sizes = {6};
  Batcher batcher(options, clock);
  ASSERT_TRUE(batcher.Enqueue(Req(0, 4)).ok());
  Poller p;
  EXPECT_EQ(p.Next(batcher), Ids{});
  ASSERT_TRUE(batcher.Enqueue(Req(1, 2)).ok());
  EXPECT_EQ(p.Next(batcher), (Ids{0, 1}));
  EXPECT_EQ(p.batch.total_rows, 6);
}

TEST(BatcherTest, FullBatchRunsAtOnce) {
  ManualClock clock;
  Batcher batcher(Opts(4, 10 * kMs), clock);
  for (uint64_t id = 0; id < 5; ++id) ASSERT_TRUE(batcher.Enqueue(Req(id)).ok());
  Poller p;
  EXPECT_EQ(p.Next(batcher), (Ids{0, 1, 2, 3}));
  EXPECT_EQ(p.Next(batcher), Ids{});
}

TEST(BatcherTest, DelayRespected) {
  ManualClock clock(5000);
  Batcher batcher(Opts(8, 1000), clock);
  ASSERT_TRUE(batcher.Enqueue(Req(1)).ok());
  clock.AdvanceNs(500);
  ASSERT_TRUE(batcher.Enqueue(Req(2)).ok());
  Poller p;
  clock.SetNs(5999);
  EXPECT_EQ(p.Next(batcher), Ids{});
  clock.SetNs(6000);  // the delay counts from the oldest request
  EXPECT_EQ(p.Next(batcher), (Ids{1, 2}));
  EXPECT_EQ(p.batch.formed_ns, 6000);
  EXPECT_EQ(p.batch.enqueued_ns, (std::vector<int64_t>{5000, 5500}));
}

TEST(BatcherTest, ZeroDelayDispatchesAtOnce) {
  ManualClock clock;
  Batcher batcher(Opts(8, 0), clock);
  Poller p;
  EXPECT_FALSE(p.Try(batcher));  // empty
  ASSERT_TRUE(batcher.Enqueue(Req(1)).ok());
  EXPECT_EQ(p.Next(batcher), Ids{1});
  EXPECT_FALSE(p.Try(batcher));
}

TEST(BatcherTest, ShapeKeysNeverMixedAndFifoKept) {
  ManualClock clock;
  Batcher batcher(Opts(8), clock);
  const uint64_t keys[] = {7, 7, 9, 7, 9, 9};
  for (uint64_t id = 0; id < 6; ++id) ASSERT_TRUE(batcher.Enqueue(Req(id, 1, keys[id])).ok());
  Poller p;
  EXPECT_EQ(p.Next(batcher), (Ids{0, 1}));
  EXPECT_EQ(p.Next(batcher), Ids{2});
  EXPECT_EQ(p.Next(batcher), Ids{3});
  EXPECT_EQ(p.Next(batcher), (Ids{4, 5}));
}

TEST(BatcherTest, BatchingOffGivesOneRequestPerBatch) {
  ManualClock clock;
  BatcherOptions options = Opts(8, 10 * kMs);
  options.batching = false;
  Batcher batcher(options, clock);
  for (uint64_t id = 0; id < 3; ++id) ASSERT_TRUE(batcher.Enqueue(Req(id, 2)).ok());
  Poller p;
  for (uint64_t id = 0; id < 3; ++id) {
    EXPECT_EQ(p.Next(batcher), Ids{id});  // at once, no delay
    EXPECT_EQ(p.batch.total_rows, 2);
  }
}

TEST(BatcherTest, SequenceIncreasesPerBatch) {
  ManualClock clock;
  Batcher batcher(Opts(2), clock);
  for (uint64_t id = 0; id < 7; ++id) ASSERT_TRUE(batcher.Enqueue(Req(id)).ok());
  Poller p;
  for (uint64_t seq = 0; seq < 4; ++seq) {
    ASSERT_TRUE(p.Try(batcher));
    EXPECT_EQ(p.batch.sequence, seq);
  }
  EXPECT_FALSE(p.Try(batcher));
}

// ------------------------------------------------------------------ priorities

TEST(BatcherTest, HigherPriorityFirst) {
  ManualClock clock;
  BatcherOptions options = Opts(8);
  options.priority_levels = 3;
  Batcher batcher(options, clock);
  ASSERT_TRUE(batcher.Enqueue(Req(30, 1, 3, 3)).ok());
  ASSERT_TRUE(batcher.Enqueue(Req(20, 1, 2, 2)).ok());
  ASSERT_TRUE(batcher.Enqueue(Req(10, 1, 1, 1)).ok());
  Poller p;
  EXPECT_EQ(p.Next(batcher), Ids{10});
  EXPECT_EQ(p.Next(batcher), Ids{20});
  EXPECT_EQ(p.Next(batcher), Ids{30});
  // Same key: one batch, in service order.
  ASSERT_TRUE(batcher.Enqueue(Req(3, 1, 0, 3)).ok());
  ASSERT_TRUE(batcher.Enqueue(Req(2, 1, 0, 2)).ok());
  ASSERT_TRUE(batcher.Enqueue(Req(1, 1, 0, 1)).ok());
  EXPECT_EQ(p.Next(batcher), (Ids{1, 2, 3}));
}

TEST(BatcherTest, PriorityZeroAndOutOfRangeMapToLevels) {
  ManualClock clock;
  BatcherOptions options = Opts(8);
  options.priority_levels = 3;
  options.default_priority_level = 2;
  Batcher batcher(options, clock);
  ASSERT_TRUE(batcher.Enqueue(Req(99, 1, 99, 99)).ok());  // > levels: lowest (3)
  ASSERT_TRUE(batcher.Enqueue(Req(0, 1, 0, 0)).ok());  // default level 2
  ASSERT_TRUE(batcher.Enqueue(Req(1, 1, 1, 1)).ok());
  Poller p;
  EXPECT_EQ(p.Next(batcher), Ids{1});
  EXPECT_EQ(p.Next(batcher), Ids{0});
  EXPECT_EQ(p.Next(batcher), Ids{99});

  options.default_priority_level = 0;  // 0: the lowest level
  Batcher lowest(options, clock);
  ASSERT_TRUE(lowest.Enqueue(Req(0, 1, 0, 0)).ok());
  ASSERT_TRUE(lowest.Enqueue(Req(3, 1, 3, 3)).ok());
  ASSERT_TRUE(lowest.Enqueue(Req(2, 1, 2, 2)).ok());
  EXPECT_EQ(p.Next(lowest), Ids{2});
  EXPECT_EQ(p.Next(lowest), Ids{0});  // level 3, queued first
  EXPECT_EQ(p.Next(lowest), Ids{3});
}

TEST(BatcherTest, MaxQueueSizeIsPerLevel) {
  ManualClock clock;
  BatcherOptions options = Opts(8, kMs);
  options.priority_levels = 2;
  options.priority_queue_policy[1].max_queue_size = 2;
  Batcher batcher(options, clock);
  ASSERT_TRUE(batcher.Enqueue(Req(1, 1, 0, 1)).ok());
  ASSERT_TRUE(batcher.Enqueue(Req(2, 1, 0, 1)).ok());
  Status full = batcher.Enqueue(Req(3, 1, 0, 1));
  EXPECT_EQ(full.code(), StatusCode::kResourceExhausted);
  EXPECT_NE(full.message().find("exceeds maximum queue size"), std::string::npos);
  EXPECT_NE(full.message().find("level 1"), std::string::npos) << full.message();
  EXPECT_NE(full.message().find(" 2 "), std::string::npos) << full.message();
  for (uint64_t id = 10; id < 20; ++id) ASSERT_TRUE(batcher.Enqueue(Req(id, 1, 5, 2)).ok());
  EXPECT_EQ(batcher.QueuedRequests(), 12u);  // the refused one kept nothing
  Poller p;
  EXPECT_EQ(p.Next(batcher), (Ids{1, 2}));  // blocked by key 5
  EXPECT_TRUE(batcher.Enqueue(Req(3, 1, 0, 1)).ok());  // room again
}

// ------------------------------------------------------------------ timeouts

TEST(BatcherTest, RejectTimeoutExpires) {
  ManualClock clock;
  BatcherOptions options = Opts(8, kMs);
  options.default_queue_policy.default_timeout_ns = 100;
  Batcher batcher(options, clock);
  ASSERT_TRUE(batcher.Enqueue(Req(1)).ok());
  clock.AdvanceNs(50);
  ASSERT_TRUE(batcher.Enqueue(Req(2)).ok());
  Poller p;
  clock.SetNs(99);
  EXPECT_FALSE(p.Try(batcher));
  clock.SetNs(100);
  ASSERT_TRUE(p.Try(batcher));
  EXPECT_TRUE(p.batch.ids.empty());
  ASSERT_EQ(p.expired.size(), 1u);
  EXPECT_EQ(p.expired[0].id, 1u);
  EXPECT_EQ(p.expired[0].status.code(), StatusCode::kUnavailable);
  EXPECT_EQ(p.expired[0].status.message(), "request timeout expired");
  EXPECT_EQ(batcher.QueuedRequests(), 1u);
  EXPECT_FALSE(batcher.Cancel(1));  // it already left
  clock.SetNs(150);
  ASSERT_TRUE(p.Try(batcher));
  EXPECT_EQ(p.ExpiredIds(), Ids{2});
  EXPECT_EQ(batcher.QueuedRequests(), 0u);
  EXPECT_FALSE(p.Try(batcher));
}

TEST(BatcherTest, ExpiredReturnedBesideABatch) {
  ManualClock clock;
  BatcherOptions options = Opts(8, kMs);
  options.priority_levels = 2;
  options.priority_queue_policy[2].default_timeout_ns = 500;
  Batcher batcher(options, clock);
  ASSERT_TRUE(batcher.Enqueue(Req(1, 1, 0, 1)).ok());
  ASSERT_TRUE(batcher.Enqueue(Req(2, 1, 0, 2)).ok());
  clock.SetNs(kMs);
  Poller p;
  ASSERT_TRUE(p.Try(batcher));
  EXPECT_EQ(p.batch.ids, Ids{1});
  EXPECT_EQ(p.ExpiredIds(), Ids{2});
}

TEST(BatcherTest, EnqueueSaysWhenTheDecisionMayChange) {
  ManualClock clock;
  Batcher batcher(Opts(4, 1000), clock);
  bool changed = false;
  ASSERT_TRUE(batcher.Enqueue(Req(1, 1, 7), &changed).ok());
  EXPECT_TRUE(changed);  // the first request starts the delay
  ASSERT_TRUE(batcher.Enqueue(Req(2, 1, 7), &changed).ok());
  EXPECT_FALSE(changed);  // same run, under the cap: the wait is the same
  ASSERT_TRUE(batcher.Enqueue(Req(3, 2, 7), &changed).ok());
  EXPECT_TRUE(changed);  // 4 of 4 rows: full
  Poller p;
  EXPECT_EQ(p.Next(batcher), (Ids{1, 2, 3}));
  ASSERT_TRUE(batcher.Enqueue(Req(4, 1, 7), &changed).ok());
  EXPECT_TRUE(changed);
  ASSERT_TRUE(batcher.Enqueue(Req(5, 1, 8), &changed).ok());
  EXPECT_TRUE(changed);  // another shape blocks the run
  ASSERT_TRUE(batcher.Enqueue(Timed(6, 50 * kUs), &changed).ok());
  EXPECT_TRUE(changed);  // a deadline of its own
}

TEST(BatcherTest, DelayTimeoutIsServedAfterTheOtherLevels) {
  ManualClock clock;
  BatcherOptions options = Opts(8, 1000);
  options.priority_levels = 2;
  QueuePolicy& delay = options.priority_queue_policy[2];
  delay.timeout_action = TimeoutAction::kDelay;
  delay.default_timeout_ns = 100;
  delay.max_queue_size = 2;
  Batcher batcher(options, clock);
  ASSERT_TRUE(batcher.Enqueue(Req(1, 1, 1, 2)).ok());
  Poller p;
  clock.SetNs(100);
  EXPECT_FALSE(p.Try(batcher));  // moved to the delayed queue, not expired
  EXPECT_EQ(batcher.QueuedRequests(), 1u);
  clock.SetNs(200);
  ASSERT_TRUE(batcher.Enqueue(Req(2, 1, 2, 2)).ok());
  ASSERT_TRUE(batcher.Enqueue(Req(3, 1, 3, 1)).ok());
  // The delayed request still counts toward its level's depth.
  EXPECT_EQ(batcher.Enqueue(Req(4, 1, 2, 2)).code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(p.Next(batcher), Ids{3});  // level 1, blocked by key 2
  EXPECT_EQ(p.Next(batcher), Ids{2});  // level 2, blocked by the delayed key 1
  EXPECT_EQ(p.Next(batcher), Ids{});   // the delayed request's run waits for the delay
  clock.SetNs(kMs);  // long past its deadline: a delayed request never expires again
  ASSERT_TRUE(p.Try(batcher));
  EXPECT_EQ(p.batch.ids, Ids{1});
  EXPECT_TRUE(p.expired.empty());
}

TEST(BatcherTest, DelayedRequestCanBeCancelled) {
  ManualClock clock;
  BatcherOptions options = Opts(8, kMs);
  options.default_queue_policy.timeout_action = TimeoutAction::kDelay;
  options.default_queue_policy.default_timeout_ns = 10;
  Batcher batcher(options, clock);
  ASSERT_TRUE(batcher.Enqueue(Req(1)).ok());
  ASSERT_TRUE(batcher.Enqueue(Req(2)).ok());
  clock.SetNs(20);
  Poller p;
  EXPECT_FALSE(p.Try(batcher));
  EXPECT_TRUE(batcher.Cancel(1));
  EXPECT_FALSE(batcher.Cancel(1));
  clock.SetNs(kMs);
  EXPECT_EQ(p.Next(batcher), Ids{2});
}

TEST(BatcherTest, AllowTimeoutOverride) {
  ManualClock clock;
  BatcherOptions options = Opts(8, 10 * kMs);
  options.default_queue_policy.default_timeout_ns = 1000;
  options.default_queue_policy.allow_timeout_override = true;
  Batcher on(options, clock);
  options.default_queue_policy.allow_timeout_override = false;
  Batcher off(options, clock);
  for (Batcher* b : {&on, &off}) {
    ASSERT_TRUE(b->Enqueue(Timed(1, 300)).ok());
    ASSERT_TRUE(b->Enqueue(Timed(2, 2000)).ok());
    ASSERT_TRUE(b->Enqueue(Timed(3, 0)).ok());  // 0: the level's default
  }
  Poller p;
  clock.SetNs(300);
  ASSERT_TRUE(p.Try(on));
  EXPECT_EQ(p.ExpiredIds(), Ids{1});
  EXPECT_FALSE(p.Try(off));
  clock.SetNs(1000);
  ASSERT_TRUE(p.Try(on));
  EXPECT_EQ(p.ExpiredIds(), Ids{3});
  ASSERT_TRUE(p.Try(off));
  EXPECT_EQ(p.ExpiredIds(), (Ids{1, 2, 3}));  // override off: all at the default
  clock.SetNs(1999);
  EXPECT_FALSE(p.Try(on));
  clock.SetNs(2000);  // the override may also lengthen the timeout
  ASSERT_TRUE(p.Try(on));
  EXPECT_EQ(p.ExpiredIds(), Ids{2});
}

TEST(BatcherTest, ForceTimeoutAppliesClientDeadlines) {
  ManualClock clock;
  BatcherOptions options = Opts(8, 10 * kMs);
  options.priority_levels = 3;
  options.priority_queue_policy[1].default_timeout_ns = 0;
  options.priority_queue_policy[2].default_timeout_ns = 1000;
  options.priority_queue_policy[3].default_timeout_ns = 300;
  Batcher batcher(options, clock);
  auto deadline = [](uint64_t id, uint32_t level, bool force) {
    EnqueueArgs args = Timed(id, 500, force);
    args.priority = level;
    return args;
  };
  ASSERT_TRUE(batcher.Enqueue(deadline(10, 1, false)).ok());  // ignored: never expires
  ASSERT_TRUE(batcher.Enqueue(deadline(11, 1, true)).ok());   // 500
  ASSERT_TRUE(batcher.Enqueue(deadline(21, 2, true)).ok());   // min(1000, 500)
  ASSERT_TRUE(batcher.Enqueue(deadline(31, 3, true)).ok());   // min(300, 500)
  Poller p;
  clock.SetNs(299);
  EXPECT_FALSE(p.Try(batcher));
  clock.SetNs(300);
  ASSERT_TRUE(p.Try(batcher));
  EXPECT_EQ(p.ExpiredIds(), Ids{31});
  clock.SetNs(500);
  ASSERT_TRUE(p.Try(batcher));
  EXPECT_EQ(p.ExpiredIds(), (Ids{11, 21}));
  clock.SetNs(5 * kMs);
  EXPECT_FALSE(p.Try(batcher));
  EXPECT_EQ(batcher.QueuedRequests(), 1u);
}

TEST(BatcherTest, ClientDeadlineRejectsEvenOnADelayLevel) {
  ManualClock clock;
  BatcherOptions options = Opts(8, 10 * kMs);
  options.default_queue_policy.timeout_action = TimeoutAction::kDelay;
  options.default_queue_policy.default_timeout_ns = 1000;
  Batcher batcher(options, clock);
  ASSERT_TRUE(batcher.Enqueue(Timed(1, 500, /*force=*/true)).ok());   // deadline binds
  ASSERT_TRUE(batcher.Enqueue(Timed(2, 5000, /*force=*/true)).ok());  // level default binds
  Poller p;
  clock.SetNs(500);
  ASSERT_TRUE(p.Try(batcher));
  EXPECT_EQ(p.ExpiredIds(), Ids{1});  // the client is gone: dropped, not delayed
  clock.SetNs(1000);
  EXPECT_FALSE(p.Try(batcher));  // request 2 moved to the delayed queue instead
  EXPECT_EQ(batcher.QueuedRequests(), 1u);
}

TEST(BatcherTest, ManyDeadlinesWithCancelsStillExpireInOrder) {
  ManualClock clock;
  BatcherOptions options = Opts(4096, kMs * kMs);  // never full, never due
  options.default_queue_policy.allow_timeout_override = true;
  Batcher batcher(options, clock);
  // Deadlines in reverse of queue order; cancel most to leave stale heap entries.
  for (uint64_t id = 0; id < 1000; ++id) {
    ASSERT_TRUE(batcher.Enqueue(Timed(id, static_cast<int64_t>(2000 - id))).ok());
  }
  for (uint64_t id = 0; id < 1000; ++id) {
    if (id % 10 != 0) ASSERT_TRUE(batcher.Cancel(id));
  }
  for (uint64_t id = 1000; id < 1200; ++id) {  // pushes compact the stale entries
    ASSERT_TRUE(batcher.Enqueue(Timed(id, 5000)).ok());
  }
  Poller p;
  Ids expired;
  for (int64_t t = 0; t <= 5000; t += 50) {
    clock.SetNs(t);
    while (p.Try(batcher)) {
      ASSERT_TRUE(p.batch.ids.empty());
      for (const auto& e : p.expired) {
        EXPECT_LE(2000 - static_cast<int64_t>(e.id), t);
        expired.push_back(e.id);
      }
    }
  }
  ASSERT_EQ(expired.size(), 300u);
  for (size_t i = 1; i < 100; ++i) EXPECT_GT(expired[i - 1], expired[i]);  // deadline order
  EXPECT_EQ(batcher.QueuedRequests(), 0u);
}

TEST(BatcherTest, ExtremeDurationsDoNotOverflow) {
  ManualClock clock(int64_t{1} << 62);
  constexpr int64_t kHuge = std::numeric_limits<int64_t>::max();
  BatcherOptions options = Opts(8, kHuge);
  options.default_queue_policy.default_timeout_ns = kHuge;
  options.default_queue_policy.allow_timeout_override = true;
  Batcher batcher(options, clock);
  ASSERT_TRUE(batcher.Enqueue(Req(1)).ok());
  ASSERT_TRUE(batcher.Enqueue(Timed(2, kHuge - 1, true)).ok());
  Poller p;
  EXPECT_FALSE(p.Try(batcher));
  ASSERT_TRUE(batcher.NextBatch(&p.batch, &p.expired, 2 * kMs));  // bounded: no busy loop
  EXPECT_TRUE(p.batch.ids.empty());
  EXPECT_TRUE(p.expired.empty());
  EXPECT_EQ(batcher.QueuedRequests(), 2u);
}

// ------------------------------------------------------------------ cancel, stop

TEST(BatcherTest, CancelTrueOnceThenFalse) {
  ManualClock clock;
  Batcher batcher(Opts(8, kMs), clock);
  for (uint64_t id = 0; id < 3; ++id) ASSERT_TRUE(batcher.Enqueue(Req(id, 2)).ok());
  EXPECT_TRUE(batcher.Cancel(1));
  EXPECT_FALSE(batcher.Cancel(1));
  EXPECT_FALSE(batcher.Cancel(42));
  EXPECT_EQ(batcher.QueuedRows(), 4);
  clock.SetNs(kMs);
  Poller p;
  EXPECT_EQ(p.Next(batcher), (Ids{0, 2}));
  EXPECT_FALSE(batcher.Cancel(0));  // left in a batch
  ASSERT_TRUE(batcher.Enqueue(Req(1)).ok());  // the id may be reused once it left
  EXPECT_TRUE(batcher.Cancel(1));
}

TEST(BatcherTest, StopRejectsNewRequestsAndDrainsQueued) {
  ManualClock clock;
  Batcher batcher(Opts(2, 10 * kMs), clock);
  for (uint64_t id = 0; id < 3; ++id) ASSERT_TRUE(batcher.Enqueue(Req(id)).ok());
  batcher.Stop();
  Status s = batcher.Enqueue(Req(9));
  EXPECT_EQ(s.code(), StatusCode::kUnavailable);
  EXPECT_EQ(s.message(), "server is stopping");
  // The manual clock never reaches the delay: bound the waits so that a
  // batcher that kept waiting fails here instead of hanging.
  constexpr int64_t kBound = 1000 * kMs;
  Batch batch;
  std::vector<Expired> expired;
  ASSERT_TRUE(batcher.NextBatch(&batch, &expired, kBound));
  EXPECT_EQ(batch.ids, (Ids{0, 1}));
  ASSERT_TRUE(batcher.NextBatch(&batch, &expired, kBound));  // no delay wait after Stop
  EXPECT_EQ(batch.ids, Ids{2});
  EXPECT_FALSE(batcher.NextBatch(&batch, &expired, kBound));
  EXPECT_FALSE(batcher.NextBatch(&batch, &expired, kBound));
  EXPECT_TRUE(expired.empty());
}

// ------------------------------------------------------------------ blocking, real clock

TEST(BatcherBlockingTest, NextBatchWaitsForTheDelay) {
  Batcher batcher(Opts(8, 20 * kMs), SteadyClock::Instance());
  const int64_t start_ns = MonotonicNowNs();
  ASSERT_TRUE(batcher.Enqueue(Req(1)).ok());
  Batch batch;
  std::vector<Expired> expired;
  ASSERT_TRUE(batcher.NextBatch(&batch, &expired));
  EXPECT_EQ(batch.ids, Ids{1});
  EXPECT_GE(MonotonicNowNs() - start_ns, 20 * kMs);
  EXPECT_GE(batch.formed_ns - batch.enqueued_ns[0], 20 * kMs);
}

TEST(BatcherBlockingTest, MaxWaitReturnsAnEmptyBatch) {
  Batcher batcher(Opts(8), SteadyClock::Instance());
  Batch batch;
  batch.ids = {7};
  std::vector<Expired> expired;
  const int64_t start_ns = MonotonicNowNs();
  ASSERT_TRUE(batcher.NextBatch(&batch, &expired, 5 * kMs));
  EXPECT_GE(MonotonicNowNs() - start_ns, 5 * kMs);
  EXPECT_TRUE(batch.ids.empty());
  EXPECT_TRUE(expired.empty());
}

TEST(BatcherBlockingTest, WakesForTheNextDeadline) {
  BatcherOptions options = Opts(8, 10 * 1000 * kMs);  // the delay alone would wait 10 s
  options.default_queue_policy.default_timeout_ns = 5 * kMs;
  Batcher batcher(options, SteadyClock::Instance());
  ASSERT_TRUE(batcher.Enqueue(Req(1)).ok());
  Batch batch;
  std::vector<Expired> expired;
  ASSERT_TRUE(batcher.NextBatch(&batch, &expired));
  EXPECT_TRUE(batch.ids.empty());
  ASSERT_EQ(expired.size(), 1u);
  EXPECT_EQ(expired[0].id, 1u);
}

TEST(BatcherBlockingTest, EnqueueAndStopWakeWaitingWorkers) {
  Batcher batcher(Opts(8), SteadyClock::Instance());
  std::atomic<int> got{0};
  std::vector<std::thread> workers;
  for (int i = 0; i < 2; ++i) {
    workers.emplace_back([&] {
      Batch batch;
      std::vector<Expired> expired;
      while (batcher.NextBatch(&batch, &expired)) got += static_cast<int>(batch.ids.size());
    });
  }
  ASSERT_TRUE(batcher.Enqueue(Req(1)).ok());
  ASSERT_TRUE(batcher.Enqueue(Req(2)).ok());
  batcher.Stop();
  for (auto& w : workers) w.join();
  EXPECT_EQ(got.load(), 2);
}

// Every request leaves exactly once: in a batch, as expired, or by Cancel.
TEST(BatcherThreadsTest, EveryRequestLeavesExactlyOnce) {
  constexpr int kProducers = 4;
  constexpr uint64_t kPerProducer = 20000;
  constexpr int kConsumers = 3;
  constexpr uint64_t kTotal = kProducers * kPerProducer;
  constexpr int32_t kMax = 8;
  BatcherOptions options = Opts(kMax, 100 * kUs);
  options.preferred_batch_sizes = {4};
  options.priority_levels = 3;
  options.priority_queue_policy[2].default_timeout_ns = 80 * kUs;  // REJECT
  options.priority_queue_policy[3].default_timeout_ns = 60 * kUs;
  options.priority_queue_policy[3].timeout_action = TimeoutAction::kDelay;
  Batcher batcher(options, SteadyClock::Instance());
  auto rows_of = [](uint64_t id) { return 1 + static_cast<int32_t>(id % 3); };
  auto key_of = [](uint64_t id) { return (id / 5) % 2; };

  std::vector<std::atomic<int>> left(kTotal);
  for (auto& n : left) n.store(0);
  std::atomic<uint64_t> batches{0}, expired_count{0}, cancelled{0}, violations{0};

  std::vector<std::thread> consumers;
  for (int c = 0; c < kConsumers; ++c) {
    consumers.emplace_back([&] {
      Batch batch;
      std::vector<Expired> expired;
      while (batcher.NextBatch(&batch, &expired)) {
        int32_t sum = 0;
        for (size_t i = 0; i < batch.ids.size(); ++i) {
          const uint64_t id = batch.ids[i];
          if (batch.rows[i] != rows_of(id) || key_of(id) != key_of(batch.ids[0])) ++violations;
          sum += batch.rows[i];
          left[id].fetch_add(1);
        }
        if (sum != batch.total_rows || sum > kMax) ++violations;
        if (!batch.ids.empty()) ++batches;
        for (const auto& e : expired) {
          if (e.status.code() != StatusCode::kUnavailable) ++violations;
          left[e.id].fetch_add(1);
          ++expired_count;
        }
        expired.clear();
      }
    });
  }
  std::vector<std::thread> producers;
  for (int t = 0; t < kProducers; ++t) {
    producers.emplace_back([&, t] {
      std::mt19937_64 rng(static_cast<uint64_t>(t) + 1);
      const uint64_t base = static_cast<uint64_t>(t) * kPerProducer;
      for (uint64_t i = 0; i < kPerProducer; ++i) {
        const uint64_t id = base + i;
        const uint32_t priority = static_cast<uint32_t>(rng() % 4);  // 0: default (3)
        if (!batcher.Enqueue(Req(id, rows_of(id), key_of(id), priority)).ok()) ++violations;
        if (i > 0 && rng() % 8 == 0) {
          const uint64_t victim = base + rng() % i;
          if (batcher.Cancel(victim)) {
            left[victim].fetch_add(1);
            ++cancelled;
          }
        }
      }
    });
  }
  for (auto& p : producers) p.join();
  batcher.Stop();
  for (auto& c : consumers) c.join();

  EXPECT_EQ(violations.load(), 0u);
  uint64_t lost = 0, duplicated = 0;
  for (const auto& n : left) {
    if (n.load() == 0) ++lost;
    if (n.load() > 1) ++duplicated;
  }
  EXPECT_EQ(lost, 0u);
  EXPECT_EQ(duplicated, 0u);
  EXPECT_EQ(batcher.QueuedRequests(), 0u);
  EXPECT_EQ(batcher.QueuedRows(), 0);
  std::printf("batches=%llu expired=%llu cancelled=%llu\n",
              static_cast<unsigned long long>(batches.load()),
              static_cast<unsigned long long>(expired_count.load()),
              static_cast<unsigned long long>(cancelled.load()));
}

// ------------------------------------------------------------------ SLO

TEST(ExecTimeModelTest, ReadyAfterThreeSamples) {
  ExecTimeModel model;
  EXPECT_FALSE(model.Ready());
  model.Observe(4, kMs);
  model.Observe(4, kMs);
  EXPECT_FALSE(model.Ready());
  model.Observe(4, kMs);
  EXPECT_TRUE(model.Ready());
  EXPECT_EQ(model.samples(), 3);
}

TEST(ExecTimeModelTest, RecoversLinearFitOnNoiselessData) {
  ExecTimeModel model;
  const double a = 2e6, b = 5e4;
  for (int i = 0; i < 500; ++i) {
    const int32_t n = 1 + i % 32;
    model.Observe(n, static_cast<int64_t>(a + b * n));
  }
  for (const int32_t n : {1, 8, 32, 64}) {
    const double want = a + b * n;
    EXPECT_NEAR(static_cast<double>(model.PredictNs(n)), want, 0.01 * want) << n;
  }
}

TEST(ExecTimeModelTest, RecoversLinearFitOnNoisyDataWithin5Percent) {
  ExecTimeModel model;
  const double a = 2e6, b = 5e4;
  std::mt19937_64 rng(7);
  std::uniform_real_distribution<double> noise(-0.01, 0.01);
  std::uniform_int_distribution<int32_t> rows(1, 32);
  for (int i = 0; i < 2000; ++i) {
    const int32_t n = rows(rng);
    model.Observe(n, static_cast<int64_t>((a + b * n) * (1 + noise(rng))));
  }
  // The spread term cancels in a difference: the slope itself.
  const double slope = static_cast<double>(model.PredictNs(32) - model.PredictNs(1)) / 31;
  EXPECT_NEAR(slope, b, 0.05 * b);
  for (const int32_t n : {1, 8, 16, 32}) {
    const double want = a + b * n;
    const double got = static_cast<double>(model.PredictNs(n));
    EXPECT_NEAR(got, want, 0.05 * want) << n;
    EXPECT_GE(got, 0.99 * want) << n;  // pessimistic: fit plus spread
  }
}

TEST(ExecTimeModelTest, OneBatchSizeFallsBackToConstantBelowProportionalAbove) {
  ExecTimeModel model;
  for (int i = 0; i < 3; ++i) model.Observe(8, 8 * kMs);
  EXPECT_EQ(model.PredictNs(8), 8 * kMs);
  EXPECT_EQ(model.PredictNs(2), 8 * kMs);
  EXPECT_EQ(model.PredictNs(16), 16 * kMs);
}

// A model of exactly 4 ms for any batch of up to 4 rows (one batch size seen).
BatcherOptions SloOpts(int32_t instances = 1, int64_t delay_ns = 0) {
  BatcherOptions options = Opts(4, delay_ns);
  options.slo_target_ns = 20 * kMs;
  options.instance_count = instances;
  return options;
}
void TeachFourMs(Batcher* batcher) {
  for (int i = 0; i < 3; ++i) batcher->RecordExecution(4, 4 * kMs);
}

TEST(BatcherSloTest, AdmissionRejectsWhenPredictedOverTarget) {
  ManualClock clock;
  Batcher batcher(SloOpts(), clock);
  TeachFourMs(&batcher);
  // Queued rows Q: ceil((Q + 1) / 4) * 4 ms + 2 ms <= 20 ms while Q <= 15.
  for (uint64_t id = 0; id < 16; ++id) ASSERT_TRUE(batcher.Enqueue(Req(id)).ok()) << id;
  Status s = batcher.Enqueue(Req(16));
  EXPECT_EQ(s.code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(s.message(),
            "cannot meet the latency target of 20.0 ms: predicted 22.0 ms with 16 requests queued");
  EXPECT_EQ(batcher.QueuedRequests(), 16u);
  EXPECT_TRUE(batcher.Cancel(0));
  EXPECT_TRUE(batcher.Enqueue(Req(16)).ok());  // under the target again
}

TEST(BatcherSloTest, EmptyQueueAlwaysAdmitsSoTheModelKeepsLearning) {
  ManualClock clock;
  BatcherOptions options = Opts(8);
  options.slo_target_ns = 10 * kMs;
  Batcher batcher(options, clock);
  for (int i = 0; i < 5; ++i) batcher.RecordExecution(8, 100 * kMs);  // hopeless estimate
  ASSERT_TRUE(batcher.Enqueue(Req(1)).ok());  // nothing to wait behind: admitted
  EXPECT_EQ(batcher.Enqueue(Req(2)).code(), StatusCode::kResourceExhausted);
}

TEST(ExecTimeModelTest, OneStallDoesNotPoisonTheModel) {
  ExecTimeModel model;
  for (int i = 0; i < 20; ++i) model.Observe(4, kMs);
  model.Observe(4, 500 * kMs);  // counted as at most kClip x the fit
  EXPECT_LT(model.PredictNs(4), 2 * kMs);
}

TEST(BatcherSloTest, BatchesAreCappedToFitHalfTheTarget) {
  ManualClock clock;
  BatcherOptions options = Opts(64);
  options.slo_target_ns = 10 * kMs;
  Batcher batcher(options, clock);
  for (int i = 0; i < 300; ++i) {  // t(n) = n ms exactly: t(5) = 5 ms = target / 2
    const int32_t n = 1 + i % 8;
    batcher.RecordExecution(n, n * kMs);
  }
  for (uint64_t id = 1; id <= 7; ++id) ASSERT_TRUE(batcher.Enqueue(Req(id)).ok());
  Poller p;
  ASSERT_TRUE(p.Try(batcher));  // full at the cap: runs at once, no waiting
  EXPECT_EQ(p.batch.total_rows, 5);
}

TEST(BatcherSloTest, AdmissionSharesTheQueueAmongInstances) {
  ManualClock clock;
  Batcher batcher(SloOpts(2), clock);
  TeachFourMs(&batcher);
  // ceil(ceil((Q + 1) / 4) / 2) * 4 ms + 2 ms <= 20 ms while Q <= 31.
  for (uint64_t id = 0; id < 32; ++id) ASSERT_TRUE(batcher.Enqueue(Req(id)).ok()) << id;
  EXPECT_EQ(batcher.Enqueue(Req(32)).code(), StatusCode::kResourceExhausted);
}

TEST(BatcherSloTest, NoAdmissionControlBeforeTheModelIsReady) {
  ManualClock clock;
  Batcher batcher(SloOpts(), clock);
  batcher.RecordExecution(4, 4 * kMs);
  batcher.RecordExecution(4, 4 * kMs);
  for (uint64_t id = 0; id < 100; ++id) ASSERT_TRUE(batcher.Enqueue(Req(id)).ok());
  Poller p;
  for (int i = 0; i < 25; ++i) ASSERT_EQ(p.Next(batcher).size(), 4u);
  // And dispatch is the plain delay-0 rule: a lone request runs at once.
  ASSERT_TRUE(batcher.Enqueue(Req(100)).ok());
  EXPECT_EQ(p.Next(batcher), Ids{100});
}

TEST(BatcherSloTest, DispatchWaitsWhileSafeAndRunsWhenDue) {
  ManualClock clock;
  Batcher batcher(SloOpts(), clock);
  TeachFourMs(&batcher);
  Poller p;
  ASSERT_TRUE(batcher.Enqueue(Req(1)).ok());
  EXPECT_FALSE(p.Try(batcher));  // delay 0, yet it waits for more rows
  clock.SetNs(10 * kMs);
  ASSERT_TRUE(batcher.Enqueue(Req(2)).ok());
  EXPECT_FALSE(p.Try(batcher));
  clock.SetNs(16 * kMs - 1);  // 16 ms + t(3) = 4 ms reaches the oldest's 20 ms target
  EXPECT_FALSE(p.Try(batcher));
  clock.SetNs(16 * kMs);
  EXPECT_EQ(p.Next(batcher), (Ids{1, 2}));
  // A full batch still runs at once.
  for (uint64_t id = 10; id < 14; ++id) ASSERT_TRUE(batcher.Enqueue(Req(id)).ok());
  EXPECT_EQ(p.Next(batcher), (Ids{10, 11, 12, 13}));
}

TEST(BatcherSloTest, ConfiguredDelayCapsTheWait) {
  ManualClock clock;
  Batcher batcher(SloOpts(1, 5 * kMs), clock);
  TeachFourMs(&batcher);
  ASSERT_TRUE(batcher.Enqueue(Req(1)).ok());
  Poller p;
  clock.SetNs(5 * kMs - 1);
  EXPECT_FALSE(p.Try(batcher));
  clock.SetNs(5 * kMs);
  EXPECT_EQ(p.Next(batcher), Ids{1});
}

TEST(BatcherSloTest, StopSkipsTheSloWait) {
  ManualClock clock;
  Batcher batcher(SloOpts(), clock);
  TeachFourMs(&batcher);
  ASSERT_TRUE(batcher.Enqueue(Req(1)).ok());
  Poller p;
  EXPECT_FALSE(p.Try(batcher));
  batcher.Stop();
  EXPECT_EQ(p.Next(batcher), Ids{1});
}

}  // namespace
}  // namespace sluice

// ------------------------------------------------------------------ PollNextBatch

namespace sluice {
namespace {

TEST(BatcherPollTest, SaysHowLongToWaitThenHandsOutTheBatch) {
  ManualClock clock;
  Batcher batcher(Opts(8, 500 * kUs), clock);
  Batch batch;
  std::vector<Expired> expired;
  int64_t wait_ns = 0;
  EXPECT_EQ(batcher.PollNextBatch(&batch, &expired, &wait_ns), Batcher::Poll::kWait);
  EXPECT_EQ(wait_ns, -1);  // empty: only an event can change the answer
  ASSERT_TRUE(batcher.Enqueue(Req(1)).ok());
  clock.AdvanceNs(100 * kUs);
  EXPECT_EQ(batcher.PollNextBatch(&batch, &expired, &wait_ns), Batcher::Poll::kWait);
  EXPECT_EQ(wait_ns, 400 * kUs);  // the rest of the queue delay
  clock.AdvanceNs(400 * kUs);
  ASSERT_EQ(batcher.PollNextBatch(&batch, &expired, &wait_ns), Batcher::Poll::kBatch);
  EXPECT_EQ(batch.ids, (std::vector<uint64_t>{1}));
  batcher.Stop();
  EXPECT_EQ(batcher.PollNextBatch(&batch, &expired, &wait_ns), Batcher::Poll::kDrained);
}

TEST(BatcherPollTest, WaitEndsAtTheNextDeadlineAndReportsExpiry) {
  ManualClock clock;
  BatcherOptions options = Opts(8, 10 * kMs);
  options.default_queue_policy.default_timeout_ns = 2 * kMs;
  Batcher batcher(options, clock);
  ASSERT_TRUE(batcher.Enqueue(Req(7)).ok());
  Batch batch;
  std::vector<Expired> expired;
  int64_t wait_ns = 0;
  EXPECT_EQ(batcher.PollNextBatch(&batch, &expired, &wait_ns), Batcher::Poll::kWait);
  EXPECT_EQ(wait_ns, 2 * kMs);
  clock.AdvanceNs(2 * kMs + 1);
  EXPECT_EQ(batcher.PollNextBatch(&batch, &expired, &wait_ns), Batcher::Poll::kExpiredOnly);
  ASSERT_EQ(expired.size(), 1u);
  EXPECT_EQ(expired[0].id, 7u);
  EXPECT_TRUE(batch.ids.empty());
}

}  // namespace
}  // namespace sluice
