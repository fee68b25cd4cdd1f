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

__device__ __forceinline__ int64_t first_index() {
  return int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_stride() {
  return int64_t(gridDim.x) * blockDim.x;
}

// ---------------------------------------------------------------------------
// Kernel.

enum Op : int32_t { kForwardOp, kGatherOp, kScatterOp };

struct PoolDims {
  int64_t total;     // output elements
  int64_t n;         // images
  int32_t h, w;      // feature map extent
  int64_t channels;  // C
  int32_t ph, pw;    // pooled extent
  int32_t bins;      // roipool::Bins
};

// The maximum of the bin behind output element o: `cell` is its flat
// (n * H + h) * W + w index, or -1 for an empty bin or an invalid RoI.
template <typename T>
struct BinMax {
  T value;
  int64_t cell;
  int64_t channel;
};

// In NHWC the channel is the fastest-varying index, so a warp reads
// consecutive channels of the same cell (coalesced).
template <typename T, typename C, int32_t kLayout>
__device__ __forceinline__ BinMax<T> bin_max(const T* __restrict__ features,
                                             const C* __restrict__ rois,
                                             const PoolDims& d, C scale,
                                             int64_t o) {
  using Acc = typename Value<T>::Acc;
  int64_t r, c, rest;
  int32_t ph, pw;
  if (kLayout == kNHWC) {
    c = o % d.channels;
    rest = o / d.channels;
    pw = int32_t(rest % d.pw);
    rest /= d.pw;
    ph = int32_t(rest % d.ph);
    r = rest / d.ph;
  } else {
    pw = int32_t(o % d.pw);
    rest = o / d.pw;
    ph = int32_t(rest % d.ph);
    rest /= d.ph;
    c = rest % d.channels;
    r = rest / d.channels;
  }
  const RoiGrid<C> g =
      make_roi_grid<C>(rois + 5 * r, scale, d.n, d.ph, d.pw, d.bins);
  const Span sy = bin_span(g.y, ph, d.ph, d.h, d.bins);
  const Span sx = bin_span(g.x, pw, d.pw, d.w, d.bins);
  // g.batch < n also rejects every batch index when n == 0.
  if (!g.valid || g.batch >= d.n || sy.empty() || sx.empty())
    return BinMax<T>{Value<T>::zero(), -1, c};
  // Element (h, w) of the RoI's image and channel c is image[hw * step].
  const int64_t plane = int64_t(d.h) * d.w;
  const int64_t step = kLayout == kNHWC ? d.channels : 1;
  const T* image = kLayout == kNHWC
                       ? features + g.batch * plane * d.channels + c
                       : features + (g.batch * d.channels + c) * plane;
  int64_t best_hw = int64_t(sy.begin) * d.w + sx.begin;
  T best_raw = image[best_hw * step];
  Acc best = Value<T>::load(best_raw);
  for (int32_t h = sy.begin; h < sy.end; ++h) {
    const int64_t row = int64_t(h) * d.w;
    const T* px = image + (row + sx.begin) * step;
    for (int32_t w = sx.begin; w < sx.end; ++w, px += step) {
      const T raw = *px;
      const Acc v = Value<T>::load(raw);
      if (replaces_max(v, best)) {
        best = v;
        best_raw = raw;
        best_hw = row + w;
      }
    }
  }
  return BinMax<T>{best_raw, g.batch * plane + best_hw, c};
}

// One thread per output element o (grid-stride):
// - kForwardOp: out[o] = the max, argmax[o] = its cell (argmax may be null);
// - kGatherOp: out[o] = in[cell, c] (in: feature-shaped, the tangent);
// - kScatterOp: out[cell, c] += in[o] (in: output-shaped, the cotangent;
//   out: feature-shaped, of type Value<T>::Acc, zeroed before). atomicAdd on
//   float or double, so a cell's sum is in no fixed order; float atomics
//   flush subnormal sums to zero (PTX atom.add.f32), as torchvision's do.
// Out is T except for the scatter. The argmax of gather and scatter is the
// forward's, recomputed.
template <int32_t kOp, typename T, typename C, int32_t kLayout, typename Out>
__global__ void __launch_bounds__(kBlockSize)
    pool_kernel(const T* __restrict__ features, const C* __restrict__ rois,
                const T* __restrict__ in, Out* __restrict__ out,
                int32_t* __restrict__ argmax, PoolDims d, C scale) {
  const int64_t plane = int64_t(d.h) * d.w;
  for (int64_t o = first_index(); o < d.total; o += grid_stride()) {
    const BinMax<T> m = bin_max<T, C, kLayout>(features, rois, d, scale, o);
    if constexpr (kOp == kForwardOp) {
      out[o] = m.value;
      if (argmax) argmax[o] = int32_t(m.cell);
    } else if (m.cell >= 0) {
      const int64_t at = cell_offset(m.cell, m.channel, d.channels, plane, kLayout);
      if constexpr (kOp == kGatherOp)
        out[o] = in[at];
      else
        atomicAdd(out + at, Value<T>::load(in[o]));
    } else if constexpr (kOp == kGatherOp) {
      out[o] = Value<T>::zero();  // empty bin
    }
  }
}

}  // namespace roipool
