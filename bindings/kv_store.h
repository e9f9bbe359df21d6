// The Python face of the host K/V store, shared by its binding and the Pipeline's (which owns one).
#pragma once

#include <pybind11/numpy.h>

#include <atomic>
#include <memory>
#include <mutex>
#include <string>

#include "a2ats/kv_store.h"
#include "dispatch.h"

namespace a2ats::bind {

// KVStore plus a lock, so that concurrent Python threads see whole operations.
class PyKVStore {
 public:
  PyKVStore(int64_t num_layers, int64_t batch, int64_t num_kv_heads, int64_t head_dim, int64_t capacity,
            py::handle dtype, bool pinned, int threads);

  // k, v: (B, Hkv, t, D); num_tokens: (B,) int32 or None.
  void append(int64_t layer, py::handle k, py::handle v, py::handle num_tokens, py::handle stream);
  // indices: (B, Hkv, Kmax) int32; counts: (B, Hkv) int32; out_k, out_v: (B, Hkv, Kmax, D).
  void gather(int64_t layer, py::handle indices, py::handle counts, py::handle out_k, py::handle out_v,
              py::handle stream);
  // q: (B, Hq, D) f32 -> (out (B, Hq, D) f32, lse (B, Hq) f32).
  void write_slots(int64_t layer, py::handle slots, py::handle k, py::handle v, py::handle stream);
  py::tuple attend(int64_t layer, py::handle q, py::handle indices, py::handle counts, double scale, py::handle out,
                   py::handle out_lse);
  py::array_t<int64_t> lengths();  // (num_layers, batch)
  void reset();

  const KVStore& store() const { return *store_; }
  KVStore& store() { return *store_; }

  // A Pipeline keeps codes for exactly the rows of its store, so only it may change them while it
  // lives. set_owned is called with the store's lock held.
  void set_owned() {
    if (owned_) throw_value("store already belongs to another Pipeline; give each Pipeline its own KVStore");
    owned_ = true;
  }
  void release_owned() { owned_ = false; }
  void refuse_if_owned(const char* what) const {
    if (owned_)
      throw_value(std::string("this KVStore belongs to a Pipeline, which keeps codes for exactly its rows; ") + what +
                  " through the Pipeline (prefill, decode, reset) instead");
  }

  // Takes the store's lock with the GIL released. A thread holding the lock may be waiting to get
  // the GIL back (at the end of its gil_scoped_release), so waiting for the lock while holding the
  // GIL would deadlock two Python threads using one store.
  std::unique_lock<std::mutex> acquire() {
    std::unique_lock<std::mutex> lock(mutex_, std::defer_lock);
    py::gil_scoped_release release;
    lock.lock();
    return lock;
  }

 private:
  // The B of a gather's or attend's arrays: the store's batch, or any on a batch-1 store.
  int64_t expect_num_queries(const TensorArg& arg) const;

  std::unique_ptr<KVStore> store_;
  std::mutex mutex_;
  std::atomic<bool> owned_{false};
};

}  // namespace a2ats::bind
