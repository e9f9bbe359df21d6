// A persistent pool of worker threads for data-parallel loops.
//
// parallel_for(n, fn) calls fn(begin, end) on disjoint chunks covering [0, n) from the
// calling thread and the workers, and returns when all are done. One loop runs at a time
// per pool; a call made while the pool is busy (another Python thread, or a nested call
// from inside a task) runs serially in the caller instead of waiting, so it never deadlocks.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace a2ats {

class ThreadPool {
 public:
  // More threads than this only queue on the cores; it also bounds what a caller can ask for.
  static constexpr int kMaxThreads = 1024;
  // num_threads counts the calling thread too; 0 means the default (see default_num_threads);
  // at most kMaxThreads. Throws std::system_error when a thread cannot be started.
  explicit ThreadPool(int num_threads = 0);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return int(workers_.size()) + 1; }

  // fn(begin, end) over chunks of at least min_chunk items.
  void parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn, int64_t min_chunk = 1);

  // min_chunk for items of ops_per_item scalar operations (or bytes copied): waking a worker
  // costs microseconds (far more on a busy machine), more than a decode step's whole work for
  // one layer, so chunks carry at least kMinOpsPerChunk and small calls run inline.
  static constexpr int64_t kMinOpsPerChunk = int64_t(1) << 17;
  static int64_t min_chunk_for(int64_t ops_per_item) {
    return std::max<int64_t>(1, kMinOpsPerChunk / std::max<int64_t>(1, ops_per_item));
  }

  // Process-wide pool used by the kernels; its size is A2ATS_NUM_THREADS or the core count.
  static ThreadPool& global();
  static int default_num_threads();

 private:
  void stop_workers();
  void worker_loop();
  void run_chunks();

  std::vector<std::thread> workers_;
  std::mutex busy_;  // held by the caller for the duration of one parallel_for
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable done_;
  const std::function<void(int64_t, int64_t)>* task_ = nullptr;
  int64_t total_ = 0;
  int64_t chunk_ = 1;
  std::atomic<int64_t> next_{0};
  int active_ = 0;          // workers still inside the current task
  uint64_t generation_ = 0; // bumped for every task so workers notice new work
  bool stop_ = false;
};

}  // namespace a2ats
