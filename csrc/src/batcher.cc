// The dynamic batcher. batcher.h holds the contract; this comment holds the
// algorithm.
//
// Queues. Each priority level 1..L has its own FIFO deque and its own
// QueuePolicy (default timeout, REJECT or DELAY, depth). A request that times
// out under DELAY moves to one delayed deque, served after every level, where
// it never expires again; it still counts toward its level's max_queue_size
// (as in Triton). Service order: level 1, ..., level L, delayed; FIFO in each.
// Deadlines sit in a min-heap (stale entries are skipped and, once they are
// half the heap, compacted away), so expiry costs nothing while none is due.
//
// Formation. The head request in service order fixes the shape key. The run
// grows in service order while the next request has the same key and its rows
// fit under max_batch_size, and stops at the first one that does not: no
// skipping ahead, as in Triton. The run is a prefix of the service order.
//
// Decision: one answer, "run now" or "wait N". First match wins:
//   Unbatched         batching off: the head request alone, now.
//   Full              run rows == max_batch_size.
//   Blocked           a next request exists but cannot join (other key, or it
//                     does not fit): the run cannot grow.
//   PreferredReached  a prefix of the run has a preferred row total. The run is
//                     neither full nor blocked, so it holds everything queued and
//                     no larger preferred size is reachable from the queue: take
//                     the longest such prefix (Triton's best preferred size).
//   Stopping          after Stop(): drain, skipping the waits below.
//   DelayElapsed      now - oldest.enqueued >= max_queue_delay_ns (always with 0).
//   otherwise         wait until the delay elapses.
// An empty queue waits for an event (-1). NextBatch also wakes at the next
// request deadline, and hands out expired requests as soon as it finds them.
//
// SLO mode (slo_target_ns > 0). Each request should finish within
// slo_target_ns of its Enqueue. ExecTimeModel learns t(n), the execution time
// of an n-row batch, from RecordExecution. Until it has 3 samples (Ready), SLO
// mode behaves exactly like the mode above.
//   Batch cap. A batch takes at most cap = the largest n <= max_batch_size with
//     t(n) <= target / 2 (recomputed with each new sample): the other half of
//     the budget is for waiting. A model too slow for full batches within the
//     target still serves, in smaller batches, instead of refusing everything.
//   Dispatch. DelayElapsed is replaced by SloDue. Let next = min(rows + 1,
//     cap): the run one row larger. Waiting for one more row is safe
//     while now + t(next) < oldest.enqueued + slo_target_ns; once it is not,
//     run now. So a batch waits as long as the oldest request's target allows,
//     and grows meanwhile. When max_queue_delay_ns > 0 the batch also runs once
//     the delay elapses (the configured delay caps the wait). Unbatched, Full,
//     Blocked, PreferredReached and Stopping still run at once.
//   Admission (Enqueue, when Ready and the queue is not empty: an empty queue
//     always admits, which also keeps the model learning). The new request of r
//     rows waits behind the queued rows: B = ceil((queued_rows + r) / cap)
//     batches, its own included, shared by instance_count workers: W =
//     ceil(B / instance_count) rounds. Predicted latency = (W - 1) * t(cap) +
//     t(rows of the last batch) + t(cap) / 2, the half for
//     the batch in flight on average (a non-empty queue means busy instances).
//     Above slo_target_ns the request is refused with kResourceExhausted: fail
//     fast rather than miss in the queue. Priority is ignored here (a
//     conservative estimate for high levels).
//   Model. t(n) = a + b*n by weighted least squares, each sample's weight
//     multiplied by kForget per later sample, so the fit follows drift within
//     about 1 / (1 - kForget) = 50 batches. With one distinct batch size (row
//     variance under kMinRowVariance) the slope is unknown: the fit is constant
//     below the mean observed size and proportional above it, pessimistic both
//     ways. A negative slope (noise) fits as the constant mean. The spread is an
//     EWMA of |residual| of each sample against the fit before it (a plain mean
//     over the first 1 / (1 - kForget) samples). Once Ready, a sample counts at
//     most kClip times the fit, so one stall cannot inflate the model for 50
//     batches. PredictNs(n) = max(0, fit(n) + kSpread * spread).
#include "sluice/batcher.h"

#include <algorithm>
#include <cassert>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <limits>
#include <utility>

namespace sluice {
namespace {

// Below this weighted variance of the row counts (rows^2) the slope is unknown.
constexpr double kMinRowVariance = 1e-2;
// The deadline heap is compacted when it holds at least this many entries and
// at least half of them are stale.
constexpr size_t kMinHeapToCompact = 64;
constexpr int64_t kMaxNs = std::numeric_limits<int64_t>::max();
// The longest single condvar wait; a longer decision is re-checked after it
// (wait_for computes now + wait, which must not overflow).
constexpr int64_t kMaxWaitNs = int64_t{3600} * 1000 * 1000 * 1000;

Decision RunNow() { return Decision{true, 0}; }
Decision WaitNs(int64_t wait_ns) { return Decision{false, std::max<int64_t>(wait_ns, 1)}; }
Decision WaitForEvent() { return Decision{false, -1}; }

// The sooner of two waits, where -1 means "until an event".
int64_t SoonerWait(int64_t a_ns, int64_t b_ns) {
  if (a_ns < 0) return b_ns;
  if (b_ns < 0) return a_ns;
  return std::min(a_ns, b_ns);
}

// a + b for a duration b >= 0, saturating at the largest time.
int64_t SaturatingAdd(int64_t a, int64_t b) { return a > kMaxNs - b ? kMaxNs : a + b; }

int64_t SaturatingMul(int64_t a, int64_t b) {  // a, b >= 0
  return (a != 0 && b > kMaxNs / a) ? kMaxNs : a * b;
}

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

std::string FormatMs(int64_t ns) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.1f ms", static_cast<double>(ns) / 1e6);
  return buf;
}

// The timeout a request gets at its level; 0: none. The request's own timeout
// replaces the level's default when the level allows overrides or the caller
// forces it (a client deadline); forced, it never extends the level's default.
int64_t RequestTimeoutNs(const EnqueueArgs& args, const QueuePolicy& policy) {
  const int64_t level_ns = std::max<int64_t>(policy.default_timeout_ns, 0);
  const int64_t own_ns = std::max<int64_t>(args.timeout_ns, 0);
  if (own_ns == 0 || !(args.force_timeout || policy.allow_timeout_override)) return level_ns;
  if (args.force_timeout && level_ns > 0) return std::min(level_ns, own_ns);
  return own_ns;
}

// std heap order for a min-heap by (deadline, serial).
template <typename Entry>
bool LaterDeadline(const Entry& a, const Entry& b) {
  if (a.deadline_ns != b.deadline_ns) return a.deadline_ns > b.deadline_ns;
  return a.serial > b.serial;
}

// A level queue is sorted by serial; end() when absent.
template <typename Queue>
typename Queue::iterator FindSerial(Queue& queue, uint64_t serial) {
  auto it = std::lower_bound(queue.begin(), queue.end(), serial,
                             [](const auto& pending, uint64_t s) { return pending.serial < s; });
  return (it != queue.end() && it->serial == serial) ? it : queue.end();
}

void ResetBatch(Batch* batch) {
  batch->ids.clear();
  batch->rows.clear();
  batch->enqueued_ns.clear();
  batch->total_rows = 0;
  batch->formed_ns = 0;
  batch->sequence = 0;
}

}  // namespace

// ---------------------------------------------------------------- ExecTimeModel

void ExecTimeModel::Observe(int32_t rows, int64_t exec_ns) {
  if (rows < 1 || exec_ns < 0) return;
  const double x = static_cast<double>(rows);
  double y = static_cast<double>(exec_ns);
  if (samples_ > 0) {
    const double fit = FitNs(x);
    // One stall (a page fault storm, a first run at a new shape, a noisy
    // neighbour) must not poison the model for the next 50 batches: once the
    // fit is Ready, a sample counts at most kClip times the fit.
    if (Ready() && fit > 0) y = std::min(y, kClip * fit);
    const double residual_ns = std::abs(y - fit);
    const double alpha = std::max(1.0 - kForget, 1.0 / static_cast<double>(samples_));
    spread_ns_ += alpha * (residual_ns - spread_ns_);
  }
  sw_ = kForget * sw_ + 1.0;
  sx_ = kForget * sx_ + x;
  sy_ = kForget * sy_ + y;
  sxx_ = kForget * sxx_ + x * x;
  sxy_ = kForget * sxy_ + x * y;
  ++samples_;
}

double ExecTimeModel::FitNs(double rows) const {
  if (sw_ <= 0) return 0;
  const double mean_x = sx_ / sw_;
  const double mean_y = sy_ / sw_;
  const double var_x = sxx_ / sw_ - mean_x * mean_x;
  if (var_x >= kMinRowVariance) {
    const double slope = (sxy_ / sw_ - mean_x * mean_y) / var_x;
    return slope > 0 ? mean_y + slope * (rows - mean_x) : mean_y;
  }
  return rows <= mean_x ? mean_y : mean_y * rows / mean_x;  // mean_x >= 1: rows are >= 1
}

int64_t ExecTimeModel::PredictNs(int32_t rows) const {
  const double ns = FitNs(static_cast<double>(rows)) + kSpread * spread_ns_;
  if (!(ns > 0)) return 0;
  if (ns >= static_cast<double>(kMaxNs)) return kMaxNs;
  return static_cast<int64_t>(std::llround(ns));
}

// ---------------------------------------------------------------- Batcher

Batcher::Batcher(BatcherOptions options, const Clock& clock)
    : options_(std::move(options)),
      clock_(clock),
      max_batch_size_(std::max<int32_t>(1, options_.max_batch_size)),
      num_levels_(std::max<uint32_t>(1, options_.priority_levels)),
      default_level_(options_.default_priority_level == 0
                         ? num_levels_
                         : std::min(options_.default_priority_level, num_levels_)),
      preferred_(static_cast<size_t>(max_batch_size_) + 1, 0),
      levels_(num_levels_),
      level_depth_(num_levels_, 0) {
  policies_.reserve(num_levels_);
  for (uint32_t level = 1; level <= num_levels_; ++level) {
    const auto it = options_.priority_queue_policy.find(level);
    policies_.push_back(it != options_.priority_queue_policy.end() ? it->second
                                                                   : options_.default_queue_policy);
  }
  for (const int32_t size : options_.preferred_batch_sizes) {
    if (size >= 1 && size <= max_batch_size_) preferred_[static_cast<size_t>(size)] = 1;
  }
  where_.reserve(1024);
}

Batcher::~Batcher() = default;

const QueuePolicy& Batcher::PolicyFor(uint32_t level) const { return policies_[level - 1]; }

uint32_t Batcher::LevelFor(uint32_t priority) const {
  return priority == 0 ? default_level_ : std::min(priority, num_levels_);
}

std::deque<Batcher::Pending>& Batcher::QueueFor(uint32_t level) {
  return level == 0 ? delayed_ : levels_[level - 1];
}

template <typename F>
void Batcher::ForEachInOrderLocked(F&& f) const {
  for (const auto& queue : levels_) {
    for (const Pending& pending : queue) {
      if (!f(pending)) return;
    }
  }
  for (const Pending& pending : delayed_) {
    if (!f(pending)) return;
  }
}

Status Batcher::Enqueue(const EnqueueArgs& args, bool* decision_may_change) {
  bool wake = true;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopped_) return Status(StatusCode::kUnavailable, "server is stopping");
    if (args.rows < 1 || args.rows > max_batch_size_) {
      return Status::InvalidArgument("request rows must be between 1 and max_batch_size " +
                                     std::to_string(max_batch_size_) + ", got " +
                                     std::to_string(args.rows));
    }
    const uint32_t level = LevelFor(args.priority);
    const uint64_t serial = next_serial_;
    const auto [where, inserted] = where_.try_emplace(args.id, Location{serial, level});
    if (!inserted) {
      return Status::InvalidArgument("request id " + std::to_string(args.id) +
                                     " is already queued");
    }
    const QueuePolicy& policy = PolicyFor(level);
    if (policy.max_queue_size > 0 && level_depth_[level - 1] >= policy.max_queue_size) {
      where_.erase(where);
      return Status(StatusCode::kResourceExhausted,
                    "exceeds maximum queue size of " + std::to_string(policy.max_queue_size) +
                        " requests at priority level " + std::to_string(level));
    }
    if (SloModelReady()) {
      Status admitted = AdmitSloLocked(args.rows);
      if (!admitted.ok()) {
        where_.erase(where);
        return admitted;
      }
    }
    ++next_serial_;
    const int64_t now_ns = clock_.NowNs();
    const int64_t timeout_ns = RequestTimeoutNs(args, policy);
    // A client deadline that binds means the client is gone by then: drop the
    // request (REJECT) even on a DELAY level; a level default that binds first
    // keeps the level's action.
    const bool deadline_binds =
        args.force_timeout && args.timeout_ns > 0 && timeout_ns == args.timeout_ns &&
        (policy.default_timeout_ns <= 0 || args.timeout_ns < policy.default_timeout_ns);
    const TimeoutAction on_timeout = deadline_binds ? TimeoutAction::kReject : policy.timeout_action;
    const Pending pending{args.id,
                          serial,
                          args.shape_key,
                          now_ns,
                          timeout_ns > 0 ? SaturatingAdd(now_ns, timeout_ns) : 0,
                          args.rows,
                          level,
                          on_timeout};
    std::deque<Pending>& queue = levels_[level - 1];
    const size_t before = queue.size();
    const uint64_t tail_shape_key = before > 0 ? queue.back().shape_key : 0;
    queue.push_back(pending);
    ++level_depth_[level - 1];
    queued_rows_ += args.rows;
    if (pending.deadline_ns > 0) PushDeadlineLocked(pending);
    wake = WakeNeededLocked(pending, before, tail_shape_key);
  }
  // Waking a waiting worker for a request that cannot change its decision
  // costs two context switches per request and forms nothing.
  if (wake) cv_.notify_one();
  if (decision_may_change != nullptr) *decision_may_change = wake;
  return Status::Ok();
}

// A request that joins the end of a run still under the cap, behind requests
// of the same level and shape, with no deadline of its own, changes none of
// the predicates of DecideLocked while a delay is configured: Full and Blocked
// stay false, the oldest request (and so DelayElapsed) is the same, and no
// deadline moves. Priority levels, the delayed queue, preferred sizes and SLO
// mode can reorder or re-decide on any request, so they always wake.
bool Batcher::WakeNeededLocked(const Pending& pending, size_t before,
                               uint64_t tail_shape_key) const {
  const bool simple = options_.batching && options_.max_queue_delay_ns > 0 &&
                      options_.slo_target_ns <= 0 && options_.preferred_batch_sizes.empty() &&
                      num_levels_ == 1 && delayed_.empty();
  if (!simple) return true;
  if (before == 0 || pending.deadline_ns > 0) return true;
  if (pending.shape_key != tail_shape_key) return true;
  return queued_rows_ >= BatchCapLocked();
}

Status Batcher::AdmitSloLocked(int32_t rows) const {
  // An empty queue admits: the request runs as soon as an instance is free, so
  // refusing it cannot help it, and admitted batches keep the model learning
  // (a model that only refused would never correct a pessimistic estimate).
  if (queued_rows_ == 0) return Status::Ok();
  const int64_t cap = BatchCapLocked();
  const int64_t total_rows = queued_rows_ + rows;
  const int64_t batches = CeilDiv(total_rows, cap);
  const int64_t rounds = CeilDiv(batches, std::max<int32_t>(1, options_.instance_count));
  const int64_t full_batch_ns = exec_model_.PredictNs(static_cast<int32_t>(cap));
  // Rows already queued mean the instances are busy: on average half a batch
  // is left of the one in flight, then the rounds ahead, the last possibly partial.
  const int64_t last_rows = total_rows - (batches - 1) * cap;
  const int64_t last_ns =
      exec_model_.PredictNs(static_cast<int32_t>(std::min<int64_t>(last_rows, cap)));
  const int64_t predicted_ns = SaturatingAdd(
      SaturatingAdd(SaturatingMul(rounds - 1, full_batch_ns), last_ns), full_batch_ns / 2);
  if (predicted_ns <= options_.slo_target_ns) return Status::Ok();
  // where_ already holds the new request.
  return Status(StatusCode::kResourceExhausted,
                "cannot meet the latency target of " + FormatMs(options_.slo_target_ns) +
                    ": predicted " + FormatMs(predicted_ns) + " with " +
                    std::to_string(where_.size() - 1) + " requests queued");
}

bool Batcher::NextBatch(Batch* batch, std::vector<Expired>* expired, int64_t max_wait_ns) {
  ResetBatch(batch);
  // max_wait_ns is real time; the decision's waits are in clock_ time. With a
  // ManualClock the latter are re-checked after as many real nanoseconds.
  const int64_t give_up_ns = max_wait_ns >= 0 ? SaturatingAdd(MonotonicNowNs(), max_wait_ns) : -1;
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    int64_t wait_ns = -1;
    switch (PollLocked(clock_.NowNs(), batch, expired, &wait_ns)) {
      case Poll::kBatch: {
        const bool more = !where_.empty();
        lock.unlock();
        if (more) cv_.notify_one();  // another worker may form the next batch
        return true;
      }
      case Poll::kExpiredOnly: return true;
      case Poll::kDrained: return false;
      case Poll::kWait: break;
    }
    if (give_up_ns >= 0) {
      const int64_t left_ns = give_up_ns - MonotonicNowNs();
      if (left_ns <= 0) return true;
      wait_ns = SoonerWait(wait_ns, left_ns);
    }
    if (wait_ns < 0) {
      cv_.wait(lock);
    } else {
      cv_.wait_for(lock, std::chrono::nanoseconds(std::min(wait_ns, kMaxWaitNs)));
    }
  }
}

bool Batcher::TryNextBatch(Batch* batch, std::vector<Expired>* expired) {
  ResetBatch(batch);
  std::unique_lock<std::mutex> lock(mu_);
  int64_t wait_ns = -1;
  const Poll poll = PollLocked(clock_.NowNs(), batch, expired, &wait_ns);
  if (poll == Poll::kBatch) {
    const bool more = !where_.empty();
    lock.unlock();
    if (more) cv_.notify_one();
    return true;
  }
  return poll == Poll::kExpiredOnly;
}

Batcher::Poll Batcher::PollNextBatch(Batch* batch, std::vector<Expired>* expired,
                                     int64_t* wait_ns) {
  ResetBatch(batch);
  std::lock_guard<std::mutex> lock(mu_);
  *wait_ns = -1;
  return PollLocked(clock_.NowNs(), batch, expired, wait_ns);
}

Batcher::Poll Batcher::PollLocked(int64_t now_ns, Batch* batch, std::vector<Expired>* expired,
                                  int64_t* wait_ns) {
  const size_t expired_before = expired->size();
  ExpireLocked(now_ns, expired);
  size_t take_count = 0;
  const Decision decision = DecideLocked(FormRunLocked(), now_ns, &take_count);
  if (decision.run_now) {
    TakeLocked(take_count, now_ns, batch);
    return Poll::kBatch;
  }
  if (expired->size() > expired_before) return Poll::kExpiredOnly;
  if (stopped_ && where_.empty()) return Poll::kDrained;
  *wait_ns = decision.wait_ns;
  const int64_t deadline_ns = NextDeadlineLocked();
  if (deadline_ns > 0) *wait_ns = SoonerWait(*wait_ns, std::max<int64_t>(deadline_ns - now_ns, 1));
  return Poll::kWait;
}

void Batcher::ExpireLocked(int64_t now_ns, std::vector<Expired>* expired) {
  while (!deadlines_.empty()) {
    const DeadlineEntry top = deadlines_.front();
    const bool live = DeadlineLiveLocked(top);
    if (live && top.deadline_ns > now_ns) break;
    std::pop_heap(deadlines_.begin(), deadlines_.end(), LaterDeadline<DeadlineEntry>);
    deadlines_.pop_back();
    if (!live) continue;
    Location& location = where_.find(top.id)->second;
    std::deque<Pending>& queue = levels_[location.level - 1];
    const auto it = FindSerial(queue, top.serial);
    assert(it != queue.end());
    Pending pending = *it;
    queue.erase(it);
    if (pending.on_timeout == TimeoutAction::kDelay) {
      --live_deadlines_;
      pending.deadline_ns = 0;
      location.level = 0;
      delayed_.push_back(pending);
      continue;
    }
    ForgetLocked(pending);
    expired->push_back(
        Expired{pending.id, Status(StatusCode::kUnavailable, "request timeout expired")});
  }
}

Batcher::Run Batcher::FormRunLocked() const {
  const int32_t cap = BatchCapLocked();
  Run run;
  uint64_t shape_key = 0;
  ForEachInOrderLocked([&](const Pending& pending) {
    if (run.count == 0) {
      shape_key = pending.shape_key;
      run.oldest_enqueued_ns = pending.enqueued_ns;
    } else if (pending.shape_key != shape_key || pending.rows > cap - run.rows) {
      run.blocked = true;
      return false;
    }
    ++run.count;
    run.rows += pending.rows;
    run.oldest_enqueued_ns = std::min(run.oldest_enqueued_ns, pending.enqueued_ns);
    if (preferred_[static_cast<size_t>(run.rows)] != 0) run.preferred_count = run.count;
    if (!options_.batching) {
      run.unbatched = true;
      return false;
    }
    return run.rows < cap;
  });
  return run;
}

Decision Batcher::DecideLocked(const Run& run, int64_t now_ns, size_t* take_count) const {
  *take_count = run.count;
  if (run.count == 0) return WaitForEvent();
  if (run.unbatched || Full(run) || Blocked(run)) return RunNow();
  if (PreferredReached(run)) {
    *take_count = run.preferred_count;
    return RunNow();
  }
  if (stopped_) return RunNow();
  if (SloModelReady()) {
    if (SloDue(run, now_ns)) return RunNow();
    if (options_.max_queue_delay_ns <= 0) return WaitNs(SloWaitNs(run, now_ns));
    if (DelayElapsed(run, now_ns)) return RunNow();
    return WaitNs(std::min(SloWaitNs(run, now_ns), DelayWaitNs(run, now_ns)));
  }
  if (DelayElapsed(run, now_ns)) return RunNow();
  return WaitNs(DelayWaitNs(run, now_ns));
}

// Full: the run reached max_batch_size rows.
bool Batcher::Full(const Run& run) const { return run.rows >= BatchCapLocked(); }

int32_t Batcher::BatchCapLocked() const {
  return SloModelReady() && slo_cap_rows_ > 0 ? slo_cap_rows_ : max_batch_size_;
}

// Blocked: a request follows the run but cannot join it, so the run cannot grow.
bool Batcher::Blocked(const Run& run) const { return run.blocked; }

// PreferredReached: some prefix of the run has a preferred size. Checked after
// Full and Blocked, so the run is everything queued and the longest such
// prefix is the largest preferred size reachable from the queue.
bool Batcher::PreferredReached(const Run& run) const { return run.preferred_count > 0; }

// DelayElapsed: the oldest request in the run has waited max_queue_delay_ns.
bool Batcher::DelayElapsed(const Run& run, int64_t now_ns) const {
  return options_.max_queue_delay_ns <= 0 ||
         now_ns - run.oldest_enqueued_ns >= options_.max_queue_delay_ns;
}

int64_t Batcher::DelayWaitNs(const Run& run, int64_t now_ns) const {
  return SaturatingAdd(run.oldest_enqueued_ns, options_.max_queue_delay_ns) - now_ns;
}

bool Batcher::SloModelReady() const { return options_.slo_target_ns > 0 && exec_model_.Ready(); }

// SloDue: waiting for one more row would risk the oldest request's target.
bool Batcher::SloDue(const Run& run, int64_t now_ns) const { return SloWaitNs(run, now_ns) <= 0; }

int64_t Batcher::SloWaitNs(const Run& run, int64_t now_ns) const {
  const int32_t next_rows = std::min(run.rows + 1, BatchCapLocked());
  const int64_t due_ns = SaturatingAdd(run.oldest_enqueued_ns, options_.slo_target_ns);
  return due_ns - exec_model_.PredictNs(next_rows) - now_ns;
}

void Batcher::TakeLocked(size_t count, int64_t now_ns, Batch* batch) {
  batch->ids.reserve(count);
  batch->rows.reserve(count);
  batch->enqueued_ns.reserve(count);
  int32_t total_rows = 0;
  size_t left = count;
  const auto take_front = [&](std::deque<Pending>& queue) {
    while (left > 0 && !queue.empty()) {
      const Pending& pending = queue.front();
      batch->ids.push_back(pending.id);
      batch->rows.push_back(pending.rows);
      batch->enqueued_ns.push_back(pending.enqueued_ns);
      total_rows += pending.rows;
      ForgetLocked(pending);
      queue.pop_front();
      --left;
    }
  };
  for (auto& queue : levels_) {
    if (left == 0) break;
    take_front(queue);
  }
  take_front(delayed_);
  batch->total_rows = total_rows;
  batch->formed_ns = now_ns;
  batch->sequence = next_sequence_++;
}

void Batcher::ForgetLocked(const Pending& pending) {
  where_.erase(pending.id);
  --level_depth_[pending.level - 1];
  queued_rows_ -= pending.rows;
  if (pending.deadline_ns > 0) --live_deadlines_;
}

bool Batcher::DeadlineLiveLocked(const DeadlineEntry& entry) const {
  const auto it = where_.find(entry.id);
  return it != where_.end() && it->second.serial == entry.serial && it->second.level != 0;
}

void Batcher::PushDeadlineLocked(const Pending& pending) {
  if (deadlines_.size() >= kMinHeapToCompact && deadlines_.size() >= 2 * live_deadlines_) {
    deadlines_.erase(std::remove_if(deadlines_.begin(), deadlines_.end(),
                                    [this](const DeadlineEntry& e) { return !DeadlineLiveLocked(e); }),
                     deadlines_.end());
    std::make_heap(deadlines_.begin(), deadlines_.end(), LaterDeadline<DeadlineEntry>);
  }
  deadlines_.push_back(DeadlineEntry{pending.deadline_ns, pending.serial, pending.id});
  std::push_heap(deadlines_.begin(), deadlines_.end(), LaterDeadline<DeadlineEntry>);
  ++live_deadlines_;
}

int64_t Batcher::NextDeadlineLocked() const {
  return deadlines_.empty() ? 0 : deadlines_.front().deadline_ns;
}

bool Batcher::Cancel(uint64_t id) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    const auto where = where_.find(id);
    if (where == where_.end()) return false;
    const Location location = where->second;
    std::deque<Pending>& queue = QueueFor(location.level);
    const auto it =
        location.level == 0
            ? std::find_if(queue.begin(), queue.end(),
                           [id](const Pending& pending) { return pending.id == id; })
            : FindSerial(queue, location.serial);
    assert(it != queue.end());
    const Pending pending = *it;
    queue.erase(it);
    ForgetLocked(pending);
  }
  cv_.notify_one();  // the run may have changed (e.g. now a preferred size)
  return true;
}

void Batcher::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopped_ = true;
  }
  cv_.notify_all();
}

void Batcher::RecordExecution(int32_t rows, int64_t exec_ns) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    exec_model_.Observe(rows, exec_ns);
    if (options_.slo_target_ns > 0 && exec_model_.Ready()) {
      // Largest n with t(n) <= target / 2: the other half is for waiting.
      // t is non-decreasing in n (the fit never has a negative slope).
      int32_t lo = 1, hi = max_batch_size_;
      while (lo < hi) {
        const int32_t mid = lo + (hi - lo + 1) / 2;
        if (exec_model_.PredictNs(mid) <= options_.slo_target_ns / 2) {
          lo = mid;
        } else {
          hi = mid - 1;
        }
      }
      slo_cap_rows_ = lo;
    }
  }
  // A new fit moves the SLO waits; let a waiting worker re-decide.
  if (options_.slo_target_ns > 0) cv_.notify_one();
}

size_t Batcher::QueuedRequests() const {
  std::lock_guard<std::mutex> lock(mu_);
  return where_.size();
}

int64_t Batcher::QueuedRows() const {
  std::lock_guard<std::mutex> lock(mu_);
  return queued_rows_;
}

}  // namespace sluice
