// Runs the CUDA kernel body of cuda/roipool_kernels.cuh on the host, one
// "thread" at a time, so that tests can compare it with the CPU kernels on a
// machine without a GPU. Compiled by tests/test_cuda_kernel_on_host.py with
// the host C++ compiler and the CUDA toolkit's headers (for __half and
// __nv_bfloat16, which have host implementations). Only the launch is
// emulated: every thread of a small grid (fewer threads than tasks, so that
// each walks several) runs in turn, and atomicAdd is a plain add.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#define __global__
#define __device__
#define __launch_bounds__(...)

struct EmulatedDim3 {
  unsigned x, y, z;
};
// A small grid: several blocks, each with more tasks than threads.
constexpr int64_t kEmulatedBlockSize = 7, kEmulatedChunksPerBlock = 2,
                  kEmulatedMaxBlocks = 3;
static EmulatedDim3 blockIdx{0, 0, 0}, threadIdx{0, 0, 0};
static const EmulatedDim3 blockDim{kEmulatedBlockSize, 1, 1};

inline float atomicAdd(float* at, float v) {
  const float old = *at;
  *at = old + v;
  return old;
}
inline double atomicAdd(double* at, double v) {
  const double old = *at;
  *at = old + v;
  return old;
}

#include "roipool_kernels.cuh"

namespace {

using namespace roipool;

template <int32_t kOp, typename T, typename C, typename Out>
void run(int32_t layout, const PoolDims& d, const void* features,
         const void* rois, const int32_t* order, const void* in, void* out,
         int32_t* argmax, double scale) {
  auto* f = static_cast<const T*>(features);
  auto* r = static_cast<const C*>(rois);
  auto* i = static_cast<const T*>(in);
  auto* o = static_cast<Out*>(out);
  for (blockIdx.x = 0; blockIdx.x < d.blocks; ++blockIdx.x) {
    for (threadIdx.x = 0; threadIdx.x < blockDim.x; ++threadIdx.x) {
      if (layout == kNHWC)
        pool_kernel<kOp, T, C, kNHWC, Out>(f, r, order, i, o, argmax, d,
                                           C(scale));
      else
        pool_kernel<kOp, T, C, kNCHW, Out>(f, r, order, i, o, argmax, d,
                                           C(scale));
    }
  }
}

// The scatter writes Value<T>::Acc, as the CUDA handler does.
template <typename T, typename C>
void run_op(int32_t op, int32_t layout, const PoolDims& d, const void* features,
            const void* rois, const int32_t* order, const void* in, void* out,
            int32_t* argmax, double scale) {
  if (op == kForwardOp)
    run<kForwardOp, T, C, T>(layout, d, features, rois, order, in, out, argmax,
                             scale);
  else if (op == kGatherOp)
    run<kGatherOp, T, C, T>(layout, d, features, rois, order, in, out, argmax,
                            scale);
  else
    run<kScatterOp, T, C, typename Value<T>::Acc>(layout, d, features, rois,
                                                  order, in, out, argmax, scale);
}

}  // namespace

// dtype: 0 float16, 1 bfloat16, 2 float32, 3 float64 (rois float32 for the
// first three, float64 for float64). `out` must be zeroed for the scatter.
// `order` (null: the RoIs' own) is the kernel's pooling order. A gather's
// `in` and a scatter's `out` hold `copies` copies of the n feature images
// (SourceImages).
extern "C" int emulate_pool_kernel(int32_t op, int32_t layout, int32_t bins,
                                   int32_t dtype, int32_t n, int32_t copies,
                                   int32_t h,
                                   int32_t w, int64_t c, int64_t r, int32_t ph,
                                   int32_t pw, double scale,
                                   const void* features, const void* rois,
                                   const int32_t* order, const void* in,
                                   void* out, int32_t* argmax) {
  const PoolDims d =
      make_pool_dims(r, SourceImages{n, copies}, h, w, c, ph,
                     pw, bins, kEmulatedBlockSize,
                     kEmulatedChunksPerBlock, kEmulatedMaxBlocks);
  switch (dtype) {
    case 0:
      run_op<__half, float>(op, layout, d, features, rois, order, in, out,
                            argmax, scale);
      return 0;
    case 1:
      run_op<__nv_bfloat16, float>(op, layout, d, features, rois, order, in,
                                   out, argmax, scale);
      return 0;
    case 2:
      run_op<float, float>(op, layout, d, features, rois, order, in, out,
                           argmax, scale);
      return 0;
    case 3:
      run_op<double, double>(op, layout, d, features, rois, order, in, out,
                             argmax, scale);
      return 0;
  }
  return 1;
}

// The launch grid of the real kernel (block size 256, kChunksPerBlock chunks
// of it per block unless the grid would exceed kMaxBlocks) for tasks = rois * ph * pw * ceil(c / kChannelsPerThread): {tasks,
// tasks per block, blocks}.
extern "C" void pool_grid(int64_t rois, int64_t c, int32_t ph, int32_t pw,
                          int64_t* grid) {
  const PoolDims d = make_pool_dims(rois, SourceImages{1, 1}, 1, 1, c,
                                    ph, pw, kFastRcnn);
  grid[0] = d.tasks;
  grid[1] = d.tasks_per_block;
  grid[2] = d.blocks;
}
