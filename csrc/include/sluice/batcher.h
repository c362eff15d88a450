// The dynamic batcher: per-model priority queues with Triton's policy surface,
// plus an opt-in latency-target (SLO) mode.
//
// The batcher only schedules. It knows requests by an opaque 64-bit id, their
// row count, a shape key (requests batch together only when their non-batch
// dims are equal), a priority and a timeout. It never sees tensor data.
//
// Threading: Enqueue, Cancel, Stop, RecordExecution and the accessors may be
// called from any thread. Many worker threads may block in NextBatch at once;
// each formed batch goes to exactly one of them. One mutex guards all state;
// it is never held while a model runs (workers run models outside it).
//
// Ownership and exactly-once: a successful Enqueue hands the request to the
// batcher. From then on the request leaves the batcher exactly once, by one of:
//   - a Batch returned by NextBatch/TryNextBatch (the caller runs it);
//   - an Expired entry returned beside a batch (timed out with REJECT, or shed);
//   - Cancel(id) returning true (the caller answers it);
// After Stop(), queued requests still leave through NextBatch (drain); new
// Enqueues fail with kUnavailable.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "sluice/clock.h"
#include "sluice/status.h"

namespace sluice {

enum class TimeoutAction { kReject, kDelay };

// One priority level's queue policy (Triton's ModelQueuePolicy).
struct QueuePolicy {
  TimeoutAction timeout_action = TimeoutAction::kReject;
  int64_t default_timeout_ns = 0;  // 0: requests of this level never time out
  bool allow_timeout_override = false;  // may a request's own timeout replace the default?
  size_t max_queue_size = 0;  // 0: unbounded; counted in requests
};

struct BatcherOptions {
  // Most rows in one batch. With `batching` false every batch is exactly one
  // request (Triton's behaviour without dynamic_batching).
  int32_t max_batch_size = 1;
  bool batching = true;
  std::vector<int32_t> preferred_batch_sizes;
  int64_t max_queue_delay_ns = 0;  // 0: dispatch whatever is queued at once
  bool preserve_ordering = false;  // batches leave in request order (see Batch::sequence)
  // Priority levels 1..priority_levels, 1 highest. 0 levels means one level.
  uint32_t priority_levels = 0;
  uint32_t default_priority_level = 0;  // 0: the lowest level
  QueuePolicy default_queue_policy;
  std::map<uint32_t, QueuePolicy> priority_queue_policy;  // level -> policy
  // SLO mode (off when 0): latency target for each request, enqueue to result.
  int64_t slo_target_ns = 0;
  int32_t instance_count = 1;  // workers that run batches; the SLO model needs it
};

struct EnqueueArgs {
  uint64_t id = 0;  // caller's ticket; must be unique among queued requests
  int32_t rows = 1;  // rows this request contributes (>= 1, <= max_batch_size)
  uint64_t shape_key = 0;  // equal keys <=> same non-batch dims and dtypes
  uint32_t priority = 0;  // 0: the default level; > levels is clamped to the lowest
  int64_t timeout_ns = 0;  // 0: the level's default; honoured per allow_timeout_override
                           // (a client deadline is passed here with override forced)
  bool force_timeout = false;  // true: timeout_ns applies even without override (deadlines)
};

struct Batch {
  std::vector<uint64_t> ids;  // in queue order
  std::vector<int32_t> rows;  // rows of each request, same order
  std::vector<int64_t> enqueued_ns;  // when each request was enqueued
  int32_t total_rows = 0;
  int64_t formed_ns = 0;  // when the batch left the queue
  uint64_t sequence = 0;  // 0,1,2,... in formation order (for preserve_ordering)
};

struct Expired {
  uint64_t id;
  Status status;  // kUnavailable "request timeout expired"; kResourceExhausted when shed
};

// Online model of execution time by batch size for SLO mode: least squares
// t(n) = a + b*n with exponential forgetting, plus an EWMA of the absolute
// residual as the spread. Predictions are (fit + kSpread * spread).
class ExecTimeModel {
 public:
  void Observe(int32_t rows, int64_t exec_ns);
  bool Ready() const { return samples_ >= 3; }
  int64_t PredictNs(int32_t rows) const;  // pessimistic (fit + spread)
  int64_t samples() const { return samples_; }

 private:
  static constexpr double kForget = 0.98;
  static constexpr double kSpread = 3.0;
  static constexpr double kClip = 4.0;  // a sample counts at most this times the fit
  // The fitted t(rows) without the spread (batcher.cc documents the fallbacks).
  double FitNs(double rows) const;
  double sw_ = 0, sx_ = 0, sy_ = 0, sxx_ = 0, sxy_ = 0;
  double spread_ns_ = 0;
  int64_t samples_ = 0;
};

// What the formation rule decided for the queue's head at a given time.
struct Decision {
  bool run_now = false;
  int64_t wait_ns = -1;  // when !run_now: how long until the decision may change; -1: until an event
};

class Batcher {
 public:
  // `clock` must outlive the batcher.
  Batcher(BatcherOptions options, const Clock& clock);
  ~Batcher();
  Batcher(const Batcher&) = delete;
  Batcher& operator=(const Batcher&) = delete;

  // Queues a request. Fails (and keeps nothing) with kInvalidArgument for bad
  // rows, kResourceExhausted when the level's queue is full ("exceeds maximum
  // queue size") or SLO admission predicts a miss, kUnavailable after Stop().
  // On success, *decision_may_change (when given) says whether this request can
  // change what a consumer waiting for the next batch decides; only then is a
  // waiting NextBatch woken, and only then does an event-driven caller need to
  // poll again (see WakeNeededLocked).
  Status Enqueue(const EnqueueArgs& args, bool* decision_may_change = nullptr);

  // Blocks until a batch is ready and returns true with it in *batch; requests
  // that expired while waiting are appended to *expired (the caller answers
  // them) and may be returned with an empty batch (ids empty, still true).
  // Returns false once stopped and empty. `max_wait_ns` >= 0 bounds the wait
  // (then true with an empty batch); -1 waits indefinitely.
  bool NextBatch(Batch* batch, std::vector<Expired>* expired, int64_t max_wait_ns = -1);

  // Non-blocking NextBatch at the clock's current time (for tests with a
  // ManualClock). Returns true when it filled *batch or *expired.
  bool TryNextBatch(Batch* batch, std::vector<Expired>* expired);

  // What one non-blocking look at the queue found.
  enum class Poll { kBatch, kExpiredOnly, kWait, kDrained };

  // Non-blocking look for an event-driven caller, where no thread waits in
  // NextBatch (the event loop drives process executors). Fills *batch and/or
  // *expired as NextBatch does. With kWait, *wait_ns says when the answer may
  // change by time alone (-1: only an Enqueue, Cancel or Stop can change it).
  Poll PollNextBatch(Batch* batch, std::vector<Expired>* expired, int64_t* wait_ns);

  // Removes a queued request. True if it was queued (the caller now answers it);
  // false if it already left (in a batch, expired, or unknown).
  bool Cancel(uint64_t id);

  // Rejects new requests; queued ones still drain through NextBatch; wakes waiters.
  void Stop();

  // Feeds the SLO execution-time model (call after each batch ran).
  void RecordExecution(int32_t rows, int64_t exec_ns);

  size_t QueuedRequests() const;
  int64_t QueuedRows() const;
  const BatcherOptions& options() const { return options_; }

 private:
  // One queued request. `serial` grows with every Enqueue, so each level queue
  // is sorted by it (the delayed queue is not: it is in expiry order).
  struct Pending {
    uint64_t id;
    uint64_t serial;
    uint64_t shape_key;
    int64_t enqueued_ns;
    int64_t deadline_ns;  // 0: none; always 0 in the delayed queue
    int32_t rows;
    uint32_t level;  // 1-based level it was queued at; it counts toward that level's depth
    TimeoutAction on_timeout;
  };
  // Where a queued request is: level 1..L, or 0 for the delayed queue.
  struct Location {
    uint64_t serial;
    uint32_t level;
  };
  // A deadline in the min-heap. Stale (skipped) once its request left its level.
  struct DeadlineEntry {
    int64_t deadline_ns;
    uint64_t serial;
    uint64_t id;
  };
  // The longest batch the formation rule can build from the head of the
  // service order: always a prefix of it.
  struct Run {
    size_t count = 0;  // requests
    int32_t rows = 0;
    int64_t oldest_enqueued_ns = 0;
    bool blocked = false;  // a next request exists but cannot join
    bool unbatched = false;  // batching off: the head alone is the batch
    size_t preferred_count = 0;  // longest prefix with a preferred row total; 0: none
  };

  // False only when `pending` (queued just now, behind `before` requests of
  // its level) leaves the formation rule's answer as it was: "wait until the
  // oldest request's delay elapses". Locked.
  bool WakeNeededLocked(const Pending& pending, size_t before, uint64_t tail_shape_key) const;
  const QueuePolicy& PolicyFor(uint32_t level) const;
  uint32_t LevelFor(uint32_t priority) const;
  std::deque<Pending>& QueueFor(uint32_t level);  // 0: the delayed queue
  // Expires due requests, forms the run, decides, and takes the batch when the
  // decision is "run now". *wait_ns: when kWait, how long until a re-check (-1: event).
  Poll PollLocked(int64_t now_ns, Batch* batch, std::vector<Expired>* expired, int64_t* wait_ns);
  // Moves timed-out requests out (REJECT) or to the delayed queue (DELAY). Locked.
  void ExpireLocked(int64_t now_ns, std::vector<Expired>* expired);
  Run FormRunLocked() const;
  // The formation rule (see batcher.cc for the predicates). *take_count: the
  // requests to take when it says run now. Locked.
  Decision DecideLocked(const Run& run, int64_t now_ns, size_t* take_count) const;
  bool Full(const Run& run) const;
  bool Blocked(const Run& run) const;
  bool PreferredReached(const Run& run) const;
  bool DelayElapsed(const Run& run, int64_t now_ns) const;
  bool SloModelReady() const;
  // The most rows a batch takes now: the SLO cap once the model is Ready.
  int32_t BatchCapLocked() const;
  bool SloDue(const Run& run, int64_t now_ns) const;
  int64_t DelayWaitNs(const Run& run, int64_t now_ns) const;
  int64_t SloWaitNs(const Run& run, int64_t now_ns) const;
  void TakeLocked(size_t count, int64_t now_ns, Batch* batch);
  // Bookkeeping for a request that leaves the batcher (not for a DELAY move).
  void ForgetLocked(const Pending& pending);
  // Queues in service order: levels 1..L, then the delayed queue. `f` returns
  // false to stop.
  template <typename F>
  void ForEachInOrderLocked(F&& f) const;
  bool DeadlineLiveLocked(const DeadlineEntry& entry) const;
  void PushDeadlineLocked(const Pending& pending);
  int64_t NextDeadlineLocked() const;  // 0: none
  Status AdmitSloLocked(int32_t rows) const;

  const BatcherOptions options_;
  const Clock& clock_;
  const int32_t max_batch_size_;  // options_.max_batch_size, at least 1
  const uint32_t num_levels_;
  const uint32_t default_level_;
  std::vector<QueuePolicy> policies_;  // index level-1
  std::vector<char> preferred_;  // preferred_[rows] != 0: a preferred batch size
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::deque<Pending>> levels_;  // index level-1
  std::deque<Pending> delayed_;  // timed out with DELAY: served after every level
  std::vector<size_t> level_depth_;  // index level-1: queued requests of that level, delayed included
  std::unordered_map<uint64_t, Location> where_;  // id -> location, for every queued request
  std::vector<DeadlineEntry> deadlines_;  // min-heap by (deadline_ns, serial); may hold stale entries
  size_t live_deadlines_ = 0;  // level-queue requests with a deadline
  int64_t queued_rows_ = 0;
  uint64_t next_serial_ = 0;
  uint64_t next_sequence_ = 0;
  bool stopped_ = false;
  ExecTimeModel exec_model_;
  // SLO mode: the most rows one batch may take so that it runs within half the
  // target (recomputed with the model); max_batch_size_ otherwise.
  int32_t slo_cap_rows_ = 0;
};

}  // namespace sluice
