// Throughput of the batcher alone: requests per second through Enqueue ->
// NextBatch with max_batch_size 32, no delay and the SteadyClock.
//   single_thread_burst   one thread: 32 Enqueues, then NextBatch (one full batch)
//   single_thread_1to1    one thread: Enqueue, then NextBatch (batches of 1)
//   producer_consumer     one producer thread Enqueues, one consumer NextBatches
// Usage: sluice_core_bench [requests]   (default 2,000,000)
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

#include "sluice/batcher.h"

namespace {

using sluice::Batch;
using sluice::Batcher;
using sluice::BatcherOptions;
using sluice::EnqueueArgs;
using sluice::Expired;
using sluice::SteadyClock;

constexpr int32_t kMaxBatchSize = 32;

BatcherOptions Options() {
  BatcherOptions options;
  options.max_batch_size = kMaxBatchSize;
  options.max_queue_delay_ns = 0;
  return options;
}

double Seconds(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

void Enqueue(Batcher* batcher, uint64_t id) {
  EnqueueArgs args;
  args.id = id;
  if (!batcher->Enqueue(args).ok()) {
    std::fprintf(stderr, "enqueue %llu failed\n", static_cast<unsigned long long>(id));
    std::exit(1);
  }
}

// Enqueues `burst` requests, then takes batches until they are all out.
double SingleThread(uint64_t requests, uint64_t burst) {
  Batcher batcher(Options(), SteadyClock::Instance());
  Batch batch;
  std::vector<Expired> expired;
  uint64_t out = 0;
  const auto start = std::chrono::steady_clock::now();
  for (uint64_t id = 0; id < requests;) {
    const uint64_t end = std::min(requests, id + burst);
    for (; id < end; ++id) Enqueue(&batcher, id);
    while (out < id) {
      batcher.NextBatch(&batch, &expired, 0);
      out += batch.ids.size();
    }
  }
  const double seconds = Seconds(start);
  if (out != requests) std::exit(1);
  return static_cast<double>(requests) / seconds;
}

double ProducerConsumer(uint64_t requests, uint64_t* batches_out) {
  Batcher batcher(Options(), SteadyClock::Instance());
  uint64_t out = 0;
  uint64_t batches = 0;
  const auto start = std::chrono::steady_clock::now();
  std::thread consumer([&] {
    Batch batch;
    std::vector<Expired> expired;
    while (batcher.NextBatch(&batch, &expired)) {
      out += batch.ids.size();
      ++batches;
    }
  });
  for (uint64_t id = 0; id < requests; ++id) Enqueue(&batcher, id);
  batcher.Stop();
  consumer.join();
  const double seconds = Seconds(start);
  if (out != requests) std::exit(1);
  *batches_out = batches;
  return static_cast<double>(requests) / seconds;
}

}  // namespace

int main(int argc, char** argv) {
  const uint64_t requests = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 2000000;
  std::printf("single_thread_burst32 requests_per_second=%.0f\n",
              SingleThread(requests, kMaxBatchSize));
  std::printf("single_thread_1to1 requests_per_second=%.0f\n", SingleThread(requests, 1));
  uint64_t batches = 0;
  const double rate = ProducerConsumer(requests, &batches);
  std::printf("producer_consumer requests_per_second=%.0f mean_batch=%.1f\n", rate,
              static_cast<double>(requests) / static_cast<double>(batches));
  return 0;
}
