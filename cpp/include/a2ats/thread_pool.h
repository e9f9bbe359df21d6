// A persistent pool of worker threads for data-parallel loops.
//
// parallel_for(n, fn) calls fn(begin, end) on disjoint chunks covering [0, n) from the
// calling thread and the workers, and returns when all are done. Workers that finish a task
// spin for kSpinMicros before they sleep, and so does a caller waiting for them: a decode step
// dispatches several loops a few microseconds apart, and waking a sleeping thread costs tens of
// microseconds on a busy or virtual machine. One loop runs at a time per pool; a call made
// while the pool is busy (another Python thread, or a nested call from inside a task) runs
// serially in the caller instead of waiting, so it never deadlocks.
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

  // min_chunk for items of ops_per_item scalar operations (or bytes copied): chunks carry at
  // least min_ops_per_chunk() and smaller calls run inline. The default, kMinOpsPerChunk, is
  // about a millisecond of work: waking a sleeping worker on a virtual machine costs far more
  // than its microseconds on bare metal. Inside a model, where the workers sleep through the
  // torch ops between layers, splitting SmolLM2's 4k decode step (a few hundred microseconds
  // per layer) over 2 threads made it 1.5x slower than 1 thread; with this bound it runs
  // inline, and 32k steps still split.
  static constexpr int64_t kMinOpsPerChunk = int64_t(1) << 22;
  static int64_t min_chunk_for(int64_t ops_per_item) {
    return std::max<int64_t>(1, min_ops_per_chunk() / std::max<int64_t>(1, ops_per_item));
  }
  // A2ATS_MIN_CHUNK_OPS (a positive integer, read once) or kMinOpsPerChunk. Tests set it to 1 so
  // that every loop splits and the thread-count determinism checks reach all of them.
  static int64_t min_ops_per_chunk();

  // How long an idle thread polls for the next task (or a caller for the end of its task)
  // before it sleeps: longer than the gaps inside a decode step, far shorter than the torch
  // work between two layers that a spinning thread would slow down.
  static constexpr int64_t kSpinMicros = 40;

  // Process-wide pool used by the kernels; its size is A2ATS_NUM_THREADS or the core count.
  static ThreadPool& global();
  static int default_num_threads();

 private:
  void stop_workers();
  void worker_loop();
  void run_chunks();

  std::vector<std::thread> workers_;
  std::mutex busy_;   // held by the caller for the duration of one parallel_for
  std::mutex mutex_;  // guards the sleeps on wake_ and done_ (sleepers_, caller_waits_, stop_)
  std::condition_variable wake_;
  std::condition_variable done_;
  // The task: written by the caller before generation_ is bumped, read by the workers after.
  const std::function<void(int64_t, int64_t)>* task_ = nullptr;
  int64_t total_ = 0;
  int64_t chunk_ = 1;
  std::atomic<int64_t> next_{0};
  std::atomic<int> active_{0};           // workers still inside the current task
  std::atomic<uint64_t> generation_{0};  // bumped for every task so workers notice new work
  std::atomic<bool> stop_{false};
  int sleepers_ = 0;           // workers asleep on wake_
  bool caller_waits_ = false;  // the caller is asleep on done_
};

}  // namespace a2ats
