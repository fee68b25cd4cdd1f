// Device side of the roi_pool CUDA kernels: element traits and one kernel
// for the three ops (forward with argmax, gather at the argmax, scatter-add
// at the argmax), which differ only in what they do with a bin's maximum.
// Included by roipool_cuda.cu only; kept apart from the FFI host code.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "roipool_geometry.h"

namespace roipool {

constexpr int kBlockSize = 256;

// ---------------------------------------------------------------------------
// Element types: 16-bit floats are compared in float; the output of the max
// is a bit-exact copy of the chosen input element. The scatter adds into a
// gradient of type Acc (float for the 16-bit types), with native atomics.

template <typename T>
struct Value {  // float and double
  using Acc = T;
  static __device__ __forceinline__ Acc load(T v) { return v; }
  static __device__ __forceinline__ T zero() { return T(0); }
};

template <>
struct Value<__half> {
  using Acc = float;
  static __device__ __forceinline__ float load(__half v) {
    return __half2float(v);
  }
  static __device__ __forceinline__ __half zero() {
    return __ushort_as_half(static_cast<unsigned short>(0));
  }
};

template <>
struct Value<__nv_bfloat16> {
  using Acc = float;
  static __device__ __forceinline__ float load(__nv_bfloat16 v) {
    return __bfloat162float(v);
  }
  static __device__ __forceinline__ __nv_bfloat16 zero() {
    return __ushort_as_bfloat16(static_cast<unsigned short>(0));
  }
};

// ---------------------------------------------------------------------------
// Kernel.

enum Op : int32_t { kForwardOp, kGatherOp, kScatterOp };

// A thread pools kChannelsPerThread channels of one bin: channels g, g + G,
// g + 2G, ... of channel group g, with G = ceil(C / kChannelsPerThread)
// groups. Consecutive threads take consecutive groups (NHWC) or bins (NCHW):
// in NHWC each of a thread's loads is coalesced across the warp (one bin's
// consecutive channels while G is a multiple of 32), and stores are in both
// layouts. The default, 1, is one thread per output element. With 4 (CMake
// option JAX_ROIPOOL_CUDA_CHANNELS_PER_THREAD) the RoI decoding, the bin
// edges and the index arithmetic are paid once per four outputs, but fewer
// threads are resident (64 registers each instead of 48: four blocks of 256
// per SM instead of five); which is faster is for a GPU run to say
// (benchmarks/gpu_proof.sh, step "wide").
#ifndef ROIPOOL_CHANNELS_PER_THREAD
#define ROIPOOL_CHANNELS_PER_THREAD 1
#endif
constexpr int kChannelsPerThread = ROIPOOL_CHANNELS_PER_THREAD;
static_assert(kChannelsPerThread >= 1 && kChannelsPerThread <= 8,
              "ROIPOOL_CHANNELS_PER_THREAD: 1 to 8");

// The resident blocks per SM that launch bounds ask for cap the registers
// per thread: 48 with one channel per thread (ptxas would take 56), else 64,
// or 80 for double. With one channel per thread, ptxas (nvcc 13.0) meets the
// cap with no spill in the float32 forward and scatter of float32 RoIs, and
// 4 to 8 bytes in a few other kernels; the kernels of float64 RoIs spill up
// to 52 bytes a thread. Whether a higher cap pays is for a GPU run.
template <typename T>
constexpr int kMinBlocksPerSm =
    kChannelsPerThread == 1 ? 5 : (sizeof(T) <= 4 ? 4 : 3);

// The grid: a block walks kChunksPerBlock consecutive chunks of kBlockSize
// tasks; in NHWC a few neighbouring bins of one RoI, whose shared edge cells
// can then hit the multiprocessor's L1. Blocks start about in index order,
// so the RoIs in flight at any time are those of the resident blocks (on an
// H100, some 660 blocks: about 55 RoIs of 7x7 bins and 512 channels). Taken
// image by image (see `order`), they read one image's features, which can
// stay in L2 while its RoIs are pooled; short blocks also leave no long tail
// of a last, partly filled wave.
constexpr int64_t kChunksPerBlock = 8;
constexpr int64_t kMaxBlocks = 2147483647;  // the grid's x extent

struct PoolDims {
  int64_t rois;             // R
  int64_t tasks;            // rois * bins per roi * groups
  int64_t tasks_per_block;  // a multiple of the block size
  int64_t blocks;           // the grid
  SourceImages images;      // those the RoIs name, and their features images
  int32_t h, w;             // feature map extent
  int64_t channels;         // C
  int64_t groups;           // G
  int32_t ph, pw;           // pooled extent
  int32_t bins;             // roipool::Bins
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline PoolDims make_pool_dims(int64_t rois, SourceImages images, int32_t h, int32_t w,
                               int64_t channels, int32_t ph, int32_t pw,
                               int32_t bins, int64_t block_size = kBlockSize,
                               int64_t chunks_per_block = kChunksPerBlock,
                               int64_t max_blocks = kMaxBlocks) {
  PoolDims d;
  d.rois = rois;
  d.images = images;
  d.h = h;
  d.w = w;
  d.channels = channels;
  d.groups = ceil_div(channels, kChannelsPerThread);
  d.ph = ph;
  d.pw = pw;
  d.bins = bins;
  d.tasks = rois * ph * pw * d.groups;
  // More chunks per block only where the grid would exceed max_blocks.
  const int64_t chunks = ceil_div(ceil_div(d.tasks, max_blocks), block_size);
  d.tasks_per_block =
      (chunks > chunks_per_block ? chunks : chunks_per_block) * block_size;
  d.blocks = d.tasks == 0 ? 0 : ceil_div(d.tasks, d.tasks_per_block);
  return d;
}

// Every task (RoI r, bin k, channel group) is one thread's, in turn:
// for each of its channels c < C, with o the output element (r, k, c) and
// cell the argmax (flat (n * H + h) * W + w index of the bin's maximum, the
// first in row-major order; none for an empty bin or an invalid RoI):
// - kForwardOp: out[o] = the max, argmax[o] = cell (argmax may be null);
//   0 and -1 without a cell;
// - kGatherOp: out[o] = in[cell, c] (in: feature-shaped, the tangent), 0
//   without a cell;
// - kScatterOp: out[cell, c] += in[o] (in: output-shaped, the cotangent;
//   out: feature-shaped, of type Value<T>::Acc, zeroed before). atomicAdd on
//   float or double, so a cell's sum is in no fixed order; float atomics
//   flush subnormal sums to zero (PTX atom.add.f32), as torchvision's do.
// Out is T except for the scatter. The argmax of gather and scatter is the
// forward's, recomputed. RoIs are pooled in the order `order` gives
// (roi_in_order).
template <int32_t kOp, typename T, typename C, int32_t kLayout, typename Out>
__global__ void __launch_bounds__(kBlockSize, kMinBlocksPerSm<T>)
    pool_kernel(const T* __restrict__ features, const C* __restrict__ rois,
                const int32_t* __restrict__ order, const T* __restrict__ in,
                Out* __restrict__ out, int32_t* __restrict__ argmax, PoolDims d,
                C scale) {
  constexpr int kV = kChannelsPerThread;
  using Acc = typename Value<T>::Acc;
  const int64_t plane = int64_t(d.h) * d.w;
  const int64_t bin_plane = int64_t(d.ph) * d.pw;
  const int64_t tasks_per_roi = bin_plane * d.groups;
  // Step between the cells of one channel of an image.
  const int64_t step = kLayout == kNHWC ? d.channels : 1;
  const int64_t begin = int64_t(blockIdx.x) * d.tasks_per_block;
  const int64_t end = begin + d.tasks_per_block < d.tasks
                          ? begin + d.tasks_per_block
                          : d.tasks;
  for (int64_t task = begin + threadIdx.x; task < end; task += blockDim.x) {
    const int64_t slot = task / tasks_per_roi;
    const int64_t t = task - slot * tasks_per_roi;
    const int64_t r = roi_in_order(order, slot, d.rois);
    if (r < 0) continue;
    const int64_t k = kLayout == kNHWC ? t / d.groups : t % bin_plane;
    const int64_t group = kLayout == kNHWC ? t % d.groups : t / bin_plane;
    const int32_t ph = int32_t(k) / d.pw, pw = int32_t(k) % d.pw;  // k < PH * PW
    const RoiGrid<C> g = make_roi_grid<C>(rois + 5 * r, scale, d.images.count(),
                                          d.ph, d.pw, d.bins);
    const Span sy = bin_span(g.y, ph, d.ph, d.h, d.bins);
    const Span sx = bin_span(g.x, pw, d.pw, d.w, d.bins);
    const bool has_cell = g.valid && !sy.empty() && !sx.empty();
    // Channel j of the thread is group + j * G; slot j is spare when that is
    // C or more, which happens only when C is not a multiple of
    // kChannelsPerThread.
    const auto channel = [=](int j) { return group + j * d.groups; };
    const auto out_at = [=](int j) {
      return pooled_offset(r, k, channel(j), d.channels, bin_plane, kLayout);
    };
    if (!has_cell) {
      if constexpr (kOp != kScatterOp) {
#pragma unroll
        for (int j = 0; j < kV; ++j) {
          if (channel(j) >= d.channels) continue;
          out[out_at(j)] = Value<T>::zero();
          if (kOp == kForwardOp && argmax) argmax[out_at(j)] = -1;
        }
      }
      continue;
    }
    // Cell hw of channel j of the RoI's features image is
    // image[hw * step + shift[j]], image_at being the offset of (cell 0,
    // channel `group`) of that image. A spare slot reads channel `group`
    // again (shift 0), so that the cell loop needs no branch; its result is
    // dropped.
    const int64_t pooled_image =
        kOp == kForwardOp ? g.batch : d.images.features_image(g.batch);
    const int64_t image_at = kLayout == kNHWC
                                 ? pooled_image * plane * d.channels + group
                                 : (pooled_image * d.channels + group) * plane;
    const T* image = features + image_at;
    // The same offset in image g.batch of `in` (gather) or `out` (scatter),
    // which may hold copies of the features' images.
    const int64_t value_at = image_at + (g.batch - pooled_image) * plane * d.channels;
    const int64_t channel_step = kLayout == kNHWC ? 1 : plane;
    int64_t shift[kV];
#pragma unroll
    for (int j = 0; j < kV; ++j)
      shift[j] = channel(j) < d.channels ? j * d.groups * channel_step : 0;
    // Cells of one image as int32: the FFI checks N * H * W <= INT32_MAX.
    const int32_t first = sy.begin * d.w + sx.begin;
    int32_t best_hw[kV];
    T best_raw[kV];
    Acc best[kV];
#pragma unroll
    for (int j = 0; j < kV; ++j) {
      best_hw[j] = first;
      best_raw[j] = image[int64_t(first) * step + shift[j]];
      best[j] = Value<T>::load(best_raw[j]);
    }
    for (int32_t h = sy.begin; h < sy.end; ++h) {
      const int32_t row = h * d.w;
      for (int32_t w = sx.begin; w < sx.end; ++w) {
        const int32_t hw = row + w;
        const T* cell = image + int64_t(hw) * step;
#pragma unroll
        for (int j = 0; j < kV; ++j) {
          const T raw = cell[shift[j]];
          const Acc v = Value<T>::load(raw);
          if (replaces_max(v, best[j])) {
            best[j] = v;
            best_raw[j] = raw;
            best_hw[j] = hw;
          }
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kV; ++j) {
      if (channel(j) >= d.channels) continue;
      if constexpr (kOp == kForwardOp) {
        out[out_at(j)] = best_raw[j];
        if (argmax) argmax[out_at(j)] = int32_t(g.batch * plane + best_hw[j]);
      } else {
        const int64_t at = value_at + int64_t(best_hw[j]) * step + shift[j];
        if constexpr (kOp == kGatherOp)
          out[out_at(j)] = in[at];
        else
          atomicAdd(out + at, Value<T>::load(in[out_at(j)]));
      }
    }
  }
}

}  // namespace roipool
