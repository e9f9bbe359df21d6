#include "a2ats/thread_pool.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace a2ats {
namespace {

inline void cpu_relax() {
#if defined(__x86_64__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Polls done() for up to ThreadPool::kSpinMicros; true when it came true. After the first few
// microseconds each poll yields the core: a process holds two pools (the store's and the
// global one), and an idle thread of one must not keep the other's busy threads off a core.
template <typename Done>
bool spin_until(const Done& done) {
  const auto start = std::chrono::steady_clock::now();
  const auto yield_after = start + std::chrono::microseconds(4);
  const auto deadline = start + std::chrono::microseconds(ThreadPool::kSpinMicros);
  for (;;) {
    for (int i = 0; i < 32; ++i) {
      if (done()) return true;
      cpu_relax();
    }
    const auto now = std::chrono::steady_clock::now();
    if (now >= deadline) return done();
    if (now >= yield_after) std::this_thread::yield();
  }
}

}  // namespace

int ThreadPool::default_num_threads() {
  if (const char* env = std::getenv("A2ATS_NUM_THREADS")) {
    const int n = std::atoi(env);
    if (n > 0) return std::min(n, kMaxThreads);
  }
  const unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : int(hw);
}

int64_t ThreadPool::min_ops_per_chunk() {
  static const int64_t ops = [] {
    if (const char* env = std::getenv("A2ATS_MIN_CHUNK_OPS")) {
      const long long n = std::atoll(env);
      if (n > 0) return int64_t(n);
    }
    return kMinOpsPerChunk;
  }();
  return ops;
}

ThreadPool::ThreadPool(int num_threads) {
  if (num_threads <= 0) num_threads = default_num_threads();
  num_threads = std::min(num_threads, kMaxThreads);
  try {
    for (int i = 1; i < num_threads; ++i) workers_.emplace_back([this] { worker_loop(); });
  } catch (...) {
    // No destructor runs for a half-built pool: stop and join the workers already waiting on
    // wake_ before it is destroyed, then let the caller see the error.
    stop_workers();
    throw;
  }
}

ThreadPool::~ThreadPool() { stop_workers(); }

void ThreadPool::stop_workers() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_.store(true);
  }
  wake_.notify_all();
  for (auto& t : workers_) t.join();
}

ThreadPool& ThreadPool::global() {
  static ThreadPool pool(0);
  return pool;
}

void ThreadPool::run_chunks() {
  for (;;) {
    const int64_t begin = next_.fetch_add(chunk_, std::memory_order_relaxed);
    if (begin >= total_) return;
    (*task_)(begin, std::min(total_, begin + chunk_));
  }
}

void ThreadPool::worker_loop() {
  uint64_t seen = 0;
  for (;;) {
    const auto new_task = [&] {
      return stop_.load(std::memory_order_acquire) || generation_.load(std::memory_order_acquire) != seen;
    };
    if (!spin_until(new_task)) {
      // The caller bumps generation_ before it looks at sleepers_ under the mutex, and this
      // thread counts itself asleep and checks generation_ under the same mutex: no lost wake-up.
      std::unique_lock<std::mutex> lock(mutex_);
      ++sleepers_;
      wake_.wait(lock, new_task);
      --sleepers_;
    }
    if (stop_.load(std::memory_order_acquire)) return;
    seen = generation_.load(std::memory_order_acquire);
    run_chunks();
    if (active_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (caller_waits_) done_.notify_one();
    }
  }
}

void ThreadPool::parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn, int64_t min_chunk) {
  if (n <= 0) return;
  min_chunk = std::max<int64_t>(1, min_chunk);
  std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
  if (workers_.empty() || n <= min_chunk || !busy.owns_lock()) {
    fn(0, n);
    return;
  }
  // About four chunks per thread balances uneven work without much scheduling overhead.
  const int64_t parts = int64_t(num_threads()) * 4;
  task_ = &fn;
  total_ = n;
  chunk_ = std::max(min_chunk, (n + parts - 1) / parts);
  next_.store(0, std::memory_order_relaxed);
  active_.store(int(workers_.size()), std::memory_order_relaxed);
  generation_.fetch_add(1, std::memory_order_release);  // publishes the task to the workers
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (sleepers_ > 0) wake_.notify_all();
  }
  run_chunks();
  const auto finished = [&] { return active_.load(std::memory_order_acquire) == 0; };
  if (!spin_until(finished)) {
    std::unique_lock<std::mutex> lock(mutex_);
    caller_waits_ = true;
    done_.wait(lock, finished);
    caller_waits_ = false;
  }
  task_ = nullptr;
}

}  // namespace a2ats
