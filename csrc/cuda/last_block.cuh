// Single-launch grid reductions: every block writes one row of partial sums, and the last block
// to finish reduces all the rows, so a reduction needs no second launch (at small batches a
// launch's fixed cost is most of the op's GPU time).
//
// The last block is found with an arrival counter. Launches on one stream run in order and each
// launch's last block resets its counter to 0, so a counter is zeroed only once, when created:
// one counter per (device, stream), as slots of a per-device array. Two launches may share a
// counter only if they never run at the same time, which holds for launches on one stream, and for
// a CUDA graph replayed on the stream it was captured on; replaying one graph on two streams at
// once is not supported.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <utility>

namespace pxpo::cuda {

// Distinct streams per device that may run a single-launch reduction (torch's pools hold 32 per
// priority; a program creating streams without end would run out).
constexpr int kCounterSlots = 1024;

// The arrival counter of launches on `stream` of `device` (the current device), zero between launches.
inline unsigned int* arrival_counter(int device, cudaStream_t stream) {
  static std::mutex mutex;
  static std::map<int, unsigned int*> arrays;
  static std::map<std::pair<int, cudaStream_t>, int> slots;
  static std::map<int, int> slots_used;
  const std::lock_guard<std::mutex> lock(mutex);
  unsigned int*& counters = arrays[device];
  if (counters == nullptr) {
    // Relaxed: allocating is legal while a stream of this thread captures a CUDA graph. The array is
    // zeroed on a private stream and waited for, so it is zero for every stream, the capturing one too.
    const c10::cuda::CUDAStreamCaptureModeGuard relaxed(cudaStreamCaptureModeRelaxed);
    unsigned int* fresh = nullptr;
    C10_CUDA_CHECK(cudaMalloc(&fresh, kCounterSlots * sizeof(unsigned int)));
    cudaStream_t zeroing = nullptr;
    C10_CUDA_CHECK(cudaStreamCreateWithFlags(&zeroing, cudaStreamNonBlocking));
    C10_CUDA_CHECK(cudaMemsetAsync(fresh, 0, kCounterSlots * sizeof(unsigned int), zeroing));
    C10_CUDA_CHECK(cudaStreamSynchronize(zeroing));
    C10_CUDA_CHECK(cudaStreamDestroy(zeroing));
    counters = fresh;  // kept for the life of the process, like torch's own per-device state
  }
  const auto found = slots.find({device, stream});
  if (found != slots.end()) return counters + found->second;
  int& used = slots_used[device];
  TORCH_CHECK(used < kCounterSlots, "pxpo: more than ", kCounterSlots, " CUDA streams ran pxpo_loss on device ", device,
              "; reuse streams (keep torch.cuda.Stream objects alive) instead of creating new ones");
  slots.emplace(std::make_pair(device, stream), used);
  return counters + used++;
}

// Called by every thread of a block once thread 0 has written the block's partial row; true, in
// every thread, for the last block to arrive. That block may then read every row (with __ldcg:
// from L2, where the other blocks' rows are, not from a stale L1 line).
__device__ __forceinline__ bool arrived_last(unsigned int* counter) {
  __shared__ bool last;
  if (threadIdx.x == 0) {
    __threadfence();  // this block's row is visible device-wide before its arrival counts
    const unsigned int blocks = gridDim.x * gridDim.y * gridDim.z;
    last = atomicAdd(counter, 1u) == blocks - 1;
    if (last) {
      __threadfence();      // the other blocks' rows are read after their arrivals were counted
      atomicExch(counter, 0u);  // every block has arrived: ready for the stream's next launch
    }
  }
  __syncthreads();
  return last;
}

}  // namespace pxpo::cuda
