// Device side of the roi_pool CUDA kernels: element traits and the three
// kernels (forward with argmax, gather at argmax, scatter-add at argmax).
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
// is a bit-exact copy of the chosen input element. The scatter adds with
// native atomics of the element type.

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

// True when `v` replaces the running maximum `m`: strictly greater (ties keep
// the first cell in row-major order) or the first NaN (NaN propagates).
template <typename A>
__device__ __forceinline__ bool replaces_max(A v, A m) {
  return v > m || (v != v && m == m);
}

// Offset of (cell, channel) in a feature-shaped buffer, where cell is the
// flat (n * H + h) * W + w index stored in argmax.
template <int32_t kLayout>
__device__ __forceinline__ int64_t cell_offset(int64_t cell, int64_t c,
                                               int64_t channels,
                                               int64_t plane) {
  if (kLayout == kNHWC) return cell * channels + c;
  const int64_t n = cell / plane;
  return (n * channels + c) * plane + (cell - n * plane);
}

// Channel of output element `o` (output-shaped: [R, PH, PW, C] or
// [R, C, PH, PW]); bin_plane = PH * PW.
template <int32_t kLayout>
__device__ __forceinline__ int64_t channel_of(int64_t o, int64_t channels,
                                              int64_t bin_plane) {
  return kLayout == kNHWC ? o % channels : (o / bin_plane) % channels;
}

__device__ __forceinline__ int64_t first_index() {
  return int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_stride() {
  return int64_t(gridDim.x) * blockDim.x;
}

// ---------------------------------------------------------------------------
// Kernels.

struct ForwardDims {
  int64_t total;     // output elements
  int64_t n;         // images
  int32_t h, w;      // feature map extent
  int64_t channels;  // C
  int32_t ph, pw;    // pooled extent
  int32_t bins;      // roipool::Bins
};

// In NHWC the channel is the fastest-varying index, so a warp reads
// consecutive channels of the same cell (coalesced).
template <typename T, typename C, int32_t kLayout>
__global__ void __launch_bounds__(kBlockSize)
    forward_kernel(const T* __restrict__ features, const C* __restrict__ rois,
                   T* __restrict__ out, int32_t* __restrict__ argmax,
                   ForwardDims d, C scale) {
  using Acc = typename Value<T>::Acc;
  const int64_t plane = int64_t(d.h) * d.w;
  for (int64_t o = first_index(); o < d.total; o += grid_stride()) {
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
    if (!g.valid || g.batch >= d.n || sy.empty() || sx.empty()) {
      out[o] = Value<T>::zero();
      if (argmax) argmax[o] = -1;
      continue;
    }
    // Element (h, w) of the RoI's image and channel c is image[hw * step].
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
    out[o] = best_raw;
    if (argmax) argmax[o] = int32_t(g.batch * plane + best_hw);
  }
}

struct IndexDims {
  int64_t total;      // output-shaped elements
  int64_t channels;   // C
  int64_t bin_plane;  // PH * PW
  int64_t plane;      // H * W
  int64_t cells;      // N * H * W: valid argmax values are [0, cells)
};

template <typename T, int32_t kLayout>
__global__ void __launch_bounds__(kBlockSize)
    gather_kernel(const T* __restrict__ source,
                  const int32_t* __restrict__ argmax, T* __restrict__ out,
                  IndexDims d) {
  for (int64_t o = first_index(); o < d.total; o += grid_stride()) {
    const int32_t cell = argmax[o];
    T v = Value<T>::zero();
    if (argmax_in_range(cell, d.cells)) {
      const int64_t c = channel_of<kLayout>(o, d.channels, d.bin_plane);
      v = source[cell_offset<kLayout>(cell, c, d.channels, d.plane)];
    }
    out[o] = v;
  }
}

// grad must be zeroed before; native atomicAdd for all four types (__half on
// sm_70+, __nv_bfloat16 on sm_80+).
template <typename T, int32_t kLayout>
__global__ void __launch_bounds__(kBlockSize)
    scatter_kernel(const T* __restrict__ cotangent,
                   const int32_t* __restrict__ argmax, T* __restrict__ grad,
                   IndexDims d) {
  for (int64_t o = first_index(); o < d.total; o += grid_stride()) {
    const int32_t cell = argmax[o];
    if (!argmax_in_range(cell, d.cells)) continue;
    const int64_t c = channel_of<kLayout>(o, d.channels, d.bin_plane);
    atomicAdd(grad + cell_offset<kLayout>(cell, c, d.channels, d.plane),
              cotangent[o]);
  }
}

}  // namespace roipool
