// CUDA kernels of roi_pool behind the XLA FFI: the forward pass with argmax,
// the gather at the argmax (JVP tangent) and the scatter-add at the argmax
// (its transpose); gather and scatter recompute the argmax rather than
// reading a stored one. One thread per output element (or per bin and
// group of channels, see kChannelsPerThread), contiguous task ranges per
// block, 64-bit element offsets. The bin geometry is roipool_geometry.h,
// shared with the CPU kernels, so both pick exactly the same cells.
//
// Build without --use_fast_math and with --fmad=false: bin edges and the NaN
// handling of the max depend on exact IEEE semantics.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>

#include "roipool_ffi.h"
#include "roipool_kernels.cuh"

namespace ffi = xla::ffi;

namespace roipool {
namespace {

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

// Launches pool_kernel<kOp> over the tasks of a checked call.
template <int32_t kOp, typename T, typename C, typename Out>
ffi::Error launch(cudaStream_t stream, const PoolCall& s, int32_t layout,
                  int32_t bins, const T* features, const C* rois, const T* in,
                  Out* out, int32_t* argmax, double spatial_scale,
                  const char* what) {
  const PoolDims d =
      make_pool_dims(s.p.r, s.images, int32_t(s.f.h), int32_t(s.f.w), s.f.c,
                     int32_t(s.p.ph), int32_t(s.p.pw), bins);
  if (d.tasks == 0) return ffi::Error::Success();
  const C scale = C(spatial_scale);
  if (layout == kNHWC)
    pool_kernel<kOp, T, C, kNHWC><<<unsigned(d.blocks), kBlockSize, 0, stream>>>(
        features, rois, s.order, in, out, argmax, d, scale);
  else
    pool_kernel<kOp, T, C, kNCHW><<<unsigned(d.blocks), kBlockSize, 0, stream>>>(
        features, rois, s.order, in, out, argmax, d, scale);
  return check_launch(what);
}

// Dispatches on the value type of `features` and the coordinate type of
// `rois`: fn(features, rois) with typed pointers.
template <typename F>
ffi::Error with_typed(const ffi::AnyBuffer& features, const ffi::AnyBuffer& rois,
                      F&& fn) {
  return dispatch_types<__half, __nv_bfloat16>(
      features, rois, [&](auto value_tag, auto coord_tag) {
        using T = typename decltype(value_tag)::type;
        using C = typename decltype(coord_tag)::type;
        return fn(reinterpret_cast<const T*>(features.untyped_data()),
                  reinterpret_cast<const C*>(rois.untyped_data()));
      });
}

template <typename T>
T* typed(void* data, const T*) {
  return reinterpret_cast<T*>(data);
}

// features [N,H,W,C] (NHWC) or [N,C,H,W] (NCHW); rois [R,5] rows
// (batch_index, x1, y1, x2, y2); output and argmax [R,PH,PW,C] (NHWC) or
// [R,C,PH,PW] (NCHW); argmax may be empty (shape [0]) when not needed;
// order [R] or [0], the pooling order (roi_in_order).
ffi::Error Forward(cudaStream_t stream, ffi::AnyBuffer features,
                   ffi::AnyBuffer rois, ffi::Buffer<ffi::S32> order,
                   ffi::Result<ffi::AnyBuffer> out,
                   ffi::Result<ffi::Buffer<ffi::S32>> argmax, int32_t pooled_h,
                   int32_t pooled_w, double spatial_scale, int32_t layout,
                   int32_t bins) {
  PoolCall s;
  if (auto err = check_forward_call(features, rois, order, out, argmax,
                                    pooled_h, pooled_w, layout, bins, &s);
      err.failure())
    return err;
  // An empty argmax result asks for the maxima alone (no gradient needed).
  const bool with_argmax = argmax->element_count() != 0;
  return with_typed(features, rois, [&](auto x, auto boxes) {
    return launch<kForwardOp>(stream, s, layout, bins, x, boxes, x,
                              typed(out->untyped_data(), x),
                              with_argmax ? argmax->typed_data() : nullptr,
                              spatial_scale, "roipool_forward launch");
  });
}

// out[o] = source[cell(o), channel(o)], 0 for an empty bin, where cell(o)
// is the cell the forward picks for output element o.
ffi::Error Gather(cudaStream_t stream, ffi::AnyBuffer source,
                  ffi::AnyBuffer features, ffi::AnyBuffer rois,
                  ffi::Buffer<ffi::S32> order, ffi::Result<ffi::AnyBuffer> out,
                  int32_t pooled_h, int32_t pooled_w, double spatial_scale,
                  int32_t layout, int32_t bins) {
  PoolCall s;
  if (auto err = check_argmax_op_call(true, source, features, rois, order, out,
                                      features.element_type(), pooled_h,
                                      pooled_w, layout, bins, &s);
      err.failure())
    return err;
  return with_typed(features, rois, [&](auto x, auto boxes) {
    return launch<kGatherOp>(stream, s, layout, bins, x, boxes,
                             typed(source.untyped_data(), x),
                             typed(out->untyped_data(), x), nullptr,
                             spatial_scale, "roipool_gather launch");
  });
}

// grad = 0; grad[cell(o), channel(o)] += cotangent[o] for every output
// element o of a non-empty bin. Atomic: the summation order (hence the
// rounding of a cell hit by several bins) is not deterministic. For 16-bit
// cotangents grad is float32 (accumulator_type), which the lowering converts
// once to the cotangent's dtype.
ffi::Error Scatter(cudaStream_t stream, ffi::AnyBuffer cotangent,
                   ffi::AnyBuffer features, ffi::AnyBuffer rois,
                   ffi::Buffer<ffi::S32> order, ffi::Result<ffi::AnyBuffer> grad,
                   int32_t pooled_h, int32_t pooled_w, double spatial_scale,
                   int32_t layout, int32_t bins) {
  PoolCall s;
  if (auto err = check_argmax_op_call(false, cotangent, features, rois, order,
                                      grad,
                                      accumulator_type(features.element_type()),
                                      pooled_h, pooled_w, layout, bins, &s);
      err.failure())
    return err;
  if (grad->size_bytes() == 0) return ffi::Error::Success();
  if (auto err = cuda_status(cudaMemsetAsync(grad->untyped_data(), 0,
                                             grad->size_bytes(), stream),
                             "roipool_scatter memset");
      err.failure())
    return err;
  return with_typed(features, rois, [&](auto x, auto boxes) {
    using Acc = typename Value<std::remove_cv_t<std::remove_pointer_t<decltype(x)>>>::Acc;
    return launch<kScatterOp>(stream, s, layout, bins, x, boxes,
                              typed(cotangent.untyped_data(), x),
                              reinterpret_cast<Acc*>(grad->untyped_data()), nullptr,
                              spatial_scale, "roipool_scatter launch");
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
