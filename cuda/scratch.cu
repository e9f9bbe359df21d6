// Stream-ordered scratch memory for the kernels' intermediates (lookup tables, histograms).
#include <mutex>
#include <vector>

#include "cuda_common.cuh"

namespace a2ats {
namespace cuda_detail {
namespace {

struct DevicePool {
  bool initialised = false;
  bool supported = false;
  cudaMemPool_t pool = nullptr;
};

std::mutex g_pools_mutex;
std::vector<DevicePool> g_pools;  // by device ordinal; pools live until the process exits

cudaError_t current_pool(DevicePool** out) {
  int device = 0;
  A2ATS_CUDA_TRY(cudaGetDevice(&device));
  std::lock_guard<std::mutex> lock(g_pools_mutex);
  if (g_pools.size() <= size_t(device)) g_pools.resize(size_t(device) + 1);
  DevicePool& entry = g_pools[size_t(device)];
  if (!entry.initialised) {
    int supported = 0;
    A2ATS_CUDA_TRY(cudaDeviceGetAttribute(&supported, cudaDevAttrMemoryPoolsSupported, device));
    if (supported) {
      cudaMemPoolProps props = {};
      props.allocType = cudaMemAllocationTypePinned;
      props.handleTypes = cudaMemHandleTypeNone;
      props.location.type = cudaMemLocationTypeDevice;
      props.location.id = device;
      A2ATS_CUDA_TRY(cudaMemPoolCreate(&entry.pool, &props));
      // Keep freed memory in the pool across synchronisations (the default threshold 0 would
      // hand it back to the driver at every stream or event synchronisation).
      uint64_t threshold = ~uint64_t(0);
      A2ATS_CUDA_TRY(cudaMemPoolSetAttribute(entry.pool, cudaMemPoolAttrReleaseThreshold, &threshold));
    }
    entry.supported = supported != 0;
    entry.initialised = true;
  }
  *out = &entry;
  return cudaSuccess;
}

}  // namespace

cudaError_t scratch_alloc(void** ptr, size_t bytes, cudaStream_t stream) {
  *ptr = nullptr;
  DevicePool* pool = nullptr;
  A2ATS_CUDA_TRY(current_pool(&pool));
  if (pool->supported) return cudaMallocFromPoolAsync(ptr, bytes, pool->pool, stream);
  return cudaMalloc(ptr, bytes);
}

cudaError_t scratch_free(void* ptr, cudaStream_t stream) {
  if (ptr == nullptr) return cudaSuccess;
  DevicePool* pool = nullptr;
  A2ATS_CUDA_TRY(current_pool(&pool));
  if (pool->supported) return cudaFreeAsync(ptr, stream);
  return cudaFree(ptr);  // synchronises the device, so the kernels using ptr are done
}

}  // namespace cuda_detail
}  // namespace a2ats
