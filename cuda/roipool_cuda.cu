// CUDA kernels of roi_pool behind the XLA FFI: the forward pass with argmax,
// the gather at argmax (JVP tangent) and the scatter-add at argmax (its
// transpose). One thread per output element, grid-stride loops, 64-bit
// element offsets. The bin geometry is roipool_geometry.h, shared with the
// CPU kernels, so both pick exactly the same cells.
//
// Build without --use_fast_math and with --fmad=false: bin edges and the NaN
// handling of the max depend on exact IEEE semantics.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>

#include "roipool_ffi.h"
#include "roipool_kernels.cuh"

namespace ffi = xla::ffi;

namespace roipool {
namespace {

// Grid cap: ~4 waves of 256-thread blocks on an H100; grid-stride beyond.
constexpr int64_t kMaxBlocks = 4096;

// ---------------------------------------------------------------------------
// Host side.

ffi::Error cuda_status(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();  // reset, so that a later call does not report it
    return ffi::Error::Internal(std::string("roi_pool: CUDA ") + what +
                                " failed: " + cudaGetErrorString(err));
  }
  return ffi::Error::Success();
}

ffi::Error check_launch(const char* what) {
  return cuda_status(cudaGetLastError(), what);
}

unsigned grid_for(int64_t total) {
  return unsigned(std::min<int64_t>((total + kBlockSize - 1) / kBlockSize,
                                    kMaxBlocks));
}

template <typename F>
ffi::Error dispatch_value_type(ffi::DataType dtype, F&& fn) {
  return roipool::dispatch_value_type<__half, __nv_bfloat16>(dtype,
                                                             std::forward<F>(fn));
}

bool same_dims(ffi::Span<const int64_t> a, ffi::Span<const int64_t> b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i] != b[i]) return false;
  return true;
}

// argmax holds int32 cell indices and the kernels use int32 extents.
ffi::Error check_feature_extent(const FeatureShape& f) {
  constexpr int64_t kMax = INT32_MAX;
  if (f.h > kMax || f.w > kMax || f.n * f.h * f.w > kMax)
    return ffi::Error::InvalidArgument(
        "roi_pool: N * H * W must fit in int32 (argmax cell indices)");
  return ffi::Error::Success();
}

IndexDims index_dims(const FeatureShape& f, const PooledShape& p) {
  return IndexDims{p.r * p.ph * p.pw * p.c, p.c, p.ph * p.pw, f.h * f.w,
                   f.n * f.h * f.w};
}

// features [N,H,W,C] (NHWC) or [N,C,H,W] (NCHW); rois [R,5] rows
// (batch_index, x1, y1, x2, y2); output and argmax [R,PH,PW,C] (NHWC) or
// [R,C,PH,PW] (NCHW); argmax may be empty (shape [0]) when not needed.
ffi::Error Forward(cudaStream_t stream, ffi::AnyBuffer features,
                   ffi::AnyBuffer rois, ffi::Result<ffi::AnyBuffer> out,
                   ffi::Result<ffi::Buffer<ffi::S32>> argmax, int32_t pooled_h,
                   int32_t pooled_w, double spatial_scale, int32_t layout,
                   int32_t bins) {
  if (auto err = check_layout(layout); err.failure()) return err;
  if (bins != kFastRcnn && bins != kPartition)
    return ffi::Error::InvalidArgument("roi_pool: unknown bins code");
  const auto fd = features.dimensions();
  const auto rd = rois.dimensions();
  if (fd.size() != 4 || rd.size() != 2 || rd[1] != 5)
    return ffi::Error::InvalidArgument(
        "roi_pool: features must be rank 4 and rois [R, 5]");
  if (pooled_h <= 0 || pooled_w <= 0)
    return ffi::Error::InvalidArgument("roi_pool: pooled size must be > 0");
  const FeatureShape f = feature_shape(fd, layout);
  if (auto err = check_feature_extent(f); err.failure()) return err;
  const PooledShape p{rd[0], pooled_h, pooled_w, f.c};
  const int64_t expected[4] = {p.r, layout == kNHWC ? p.ph : p.c,
                               layout == kNHWC ? p.pw : p.ph,
                               layout == kNHWC ? p.c : p.pw};
  const ffi::Span<const int64_t> expected_dims(expected, 4);
  if (!same_dims(out->dimensions(), expected_dims) ||
      !(argmax->element_count() == 0 ||
        same_dims(argmax->dimensions(), expected_dims)) ||
      out->element_type() != features.element_type())
    return ffi::Error::InvalidArgument(
        "roi_pool: output/argmax shape or dtype does not match the inputs");
  const ForwardDims d{p.r * p.ph * p.pw * p.c,
                      f.n,
                      int32_t(f.h),
                      int32_t(f.w),
                      f.c,
                      pooled_h,
                      pooled_w,
                      bins};
  return dispatch_value_type(features.element_type(), [&](auto value_tag) {
    using T = typename decltype(value_tag)::type;
    return dispatch_coord_type(rois.element_type(), [&](auto coord_tag) {
      using C = typename decltype(coord_tag)::type;
      if (d.total == 0) return ffi::Error::Success();
      const T* x = reinterpret_cast<const T*>(features.untyped_data());
      const C* boxes = reinterpret_cast<const C*>(rois.untyped_data());
      T* y = reinterpret_cast<T*>(out->untyped_data());
      // An empty argmax result asks for the maxima alone (no gradient needed).
      int32_t* idx = argmax->element_count() ? argmax->typed_data() : nullptr;
      const C scale = C(spatial_scale);
      if (layout == kNHWC)
        forward_kernel<T, C, kNHWC><<<grid_for(d.total), kBlockSize, 0,
                                      stream>>>(x, boxes, y, idx, d, scale);
      else
        forward_kernel<T, C, kNCHW><<<grid_for(d.total), kBlockSize, 0,
                                      stream>>>(x, boxes, y, idx, d, scale);
      return check_launch("roipool_forward launch");
    });
  });
}

// out[o] = source[cell(argmax[o]), channel(o)], or 0 where argmax < 0.
ffi::Error Gather(cudaStream_t stream, ffi::AnyBuffer source,
                  ffi::Buffer<ffi::S32> argmax, ffi::Result<ffi::AnyBuffer> out,
                  int32_t layout) {
  if (auto err = check_layout(layout); err.failure()) return err;
  if (source.dimensions().size() != 4 || argmax.dimensions().size() != 4)
    return ffi::Error::InvalidArgument("roi_pool gather: rank-4 operands");
  if (!same_dims(out->dimensions(), argmax.dimensions()) ||
      out->element_type() != source.element_type())
    return ffi::Error::InvalidArgument(
        "roi_pool gather: output must match argmax's shape, source's dtype");
  const FeatureShape f = feature_shape(source.dimensions(), layout);
  const PooledShape p = pooled_shape(argmax.dimensions(), layout);
  if (f.c != p.c)
    return ffi::Error::InvalidArgument("roi_pool gather: channel mismatch");
  if (auto err = check_feature_extent(f); err.failure()) return err;
  const IndexDims d = index_dims(f, p);
  return dispatch_value_type(source.element_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (d.total == 0) return ffi::Error::Success();
    const T* src = reinterpret_cast<const T*>(source.untyped_data());
    const int32_t* idx = argmax.typed_data();
    T* y = reinterpret_cast<T*>(out->untyped_data());
    if (layout == kNHWC)
      gather_kernel<T, kNHWC>
          <<<grid_for(d.total), kBlockSize, 0, stream>>>(src, idx, y, d);
    else
      gather_kernel<T, kNCHW>
          <<<grid_for(d.total), kBlockSize, 0, stream>>>(src, idx, y, d);
    return check_launch("roipool_gather launch");
  });
}

// grad = 0; grad[cell(argmax[o]), channel(o)] += cotangent[o] where
// argmax >= 0. Atomic: the summation order (hence the rounding of a cell
// hit by several bins) is not deterministic.
ffi::Error Scatter(cudaStream_t stream, ffi::AnyBuffer cotangent,
                   ffi::Buffer<ffi::S32> argmax,
                   ffi::Result<ffi::AnyBuffer> grad, int32_t layout) {
  if (auto err = check_layout(layout); err.failure()) return err;
  if (cotangent.dimensions().size() != 4 || grad->dimensions().size() != 4)
    return ffi::Error::InvalidArgument("roi_pool scatter: rank-4 operands");
  if (!same_dims(cotangent.dimensions(), argmax.dimensions()) ||
      grad->element_type() != cotangent.element_type())
    return ffi::Error::InvalidArgument(
        "roi_pool scatter: cotangent must match argmax's shape, grad its "
        "dtype");
  const FeatureShape f = feature_shape(grad->dimensions(), layout);
  const PooledShape p = pooled_shape(cotangent.dimensions(), layout);
  if (f.c != p.c)
    return ffi::Error::InvalidArgument("roi_pool scatter: channel mismatch");
  if (auto err = check_feature_extent(f); err.failure()) return err;
  const IndexDims d = index_dims(f, p);
  return dispatch_value_type(cotangent.element_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    T* g = reinterpret_cast<T*>(grad->untyped_data());
    const size_t bytes = grad->size_bytes();
    if (bytes == 0) return ffi::Error::Success();
    if (auto err = cuda_status(cudaMemsetAsync(g, 0, bytes, stream),
                               "roipool_scatter memset");
        err.failure())
      return err;
    if (d.total == 0) return ffi::Error::Success();
    const T* cot = reinterpret_cast<const T*>(cotangent.untyped_data());
    const int32_t* idx = argmax.typed_data();
    if (layout == kNHWC)
      scatter_kernel<T, kNHWC>
          <<<grid_for(d.total), kBlockSize, 0, stream>>>(cot, idx, g, d);
    else
      scatter_kernel<T, kNCHW>
          <<<grid_for(d.total), kBlockSize, 0, stream>>>(cot, idx, g, d);
    return check_launch("roipool_scatter launch");
  });
}

}  // namespace
}  // namespace roipool

// Exported as C symbols; roipool_module.cc wraps them in capsules for
// jax.ffi.register_ffi_target(..., platform="CUDA").
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    RoipoolForwardCuda, roipool::Forward,
    roipool::bind_forward(ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>()),
    {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    RoipoolGatherCuda, roipool::Gather,
    roipool::bind_argmax_op(ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>()),
    {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    RoipoolScatterCuda, roipool::Scatter,
    roipool::bind_argmax_op(ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>()),
    {ffi::Traits::kCmdBufferCompatible});
