// Host-side helpers shared by the CPU and CUDA FFI handlers: element-type
// dispatch and the logical shapes of the operands in either layout.
#pragma once

#include <cstdint>
#include <utility>

#include "roipool_geometry.h"
#include "xla/ffi/api/ffi.h"

namespace roipool {

namespace ffi = xla::ffi;

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls fn(TypeTag<T>{}) for the element type of a feature-like buffer; the
// 16-bit types are the caller's own (raw bits on CPU, CUDA's types on GPU).
template <typename Half, typename BFloat16, typename F>
ffi::Error dispatch_value_type(ffi::DataType dtype, F&& fn) {
  switch (dtype) {
    case ffi::DataType::F16:
      return fn(TypeTag<Half>{});
    case ffi::DataType::BF16:
      return fn(TypeTag<BFloat16>{});
    case ffi::DataType::F32:
      return fn(TypeTag<float>{});
    case ffi::DataType::F64:
      return fn(TypeTag<double>{});
    default:
      return ffi::Error::InvalidArgument(
          "roi_pool: values must be float16, bfloat16, float32 or float64");
  }
}

// Calls fn(TypeTag<C>{}) for the coordinate type of the rois buffer.
template <typename F>
ffi::Error dispatch_coord_type(ffi::DataType dtype, F&& fn) {
  switch (dtype) {
    case ffi::DataType::F32:
      return fn(TypeTag<float>{});
    case ffi::DataType::F64:
      return fn(TypeTag<double>{});
    default:
      return ffi::Error::InvalidArgument(
          "roi_pool: rois must be float32 or float64");
  }
}

inline ffi::Error check_layout(int32_t layout) {
  if (layout != kNHWC && layout != kNCHW)
    return ffi::Error::InvalidArgument("roi_pool: unknown layout code");
  return ffi::Error::Success();
}

// Logical extents. Feature-shaped buffers are [N, H, W, C] (NHWC) or
// [N, C, H, W] (NCHW); output-shaped ones [R, PH, PW, C] or [R, C, PH, PW].
struct FeatureShape {
  int64_t n, h, w, c;
};
struct PooledShape {
  int64_t r, ph, pw, c;
};

inline FeatureShape feature_shape(ffi::Span<const int64_t> d, int32_t layout) {
  return layout == kNHWC ? FeatureShape{d[0], d[1], d[2], d[3]}
                         : FeatureShape{d[0], d[2], d[3], d[1]};
}
inline PooledShape pooled_shape(ffi::Span<const int64_t> d, int32_t layout) {
  return layout == kNHWC ? PooledShape{d[0], d[1], d[2], d[3]}
                         : PooledShape{d[0], d[2], d[3], d[1]};
}

// The operands and attributes of the handlers, after the platform context, so
// that the CPU and CUDA handlers of one op can never disagree on them.
// forward: (features, rois) -> (out, argmax).
template <typename Binding>
auto bind_forward(Binding binding) {
  return std::move(binding)
      .template Arg<ffi::AnyBuffer>()
      .template Arg<ffi::AnyBuffer>()
      .template Ret<ffi::AnyBuffer>()
      .template Ret<ffi::Buffer<ffi::S32>>()
      .template Attr<int32_t>("pooled_h")
      .template Attr<int32_t>("pooled_w")
      .template Attr<double>("spatial_scale")
      .template Attr<int32_t>("layout")
      .template Attr<int32_t>("bins");
}

// gather: (source, argmax) -> out; scatter: (cotangent, argmax) -> grad.
template <typename Binding>
auto bind_argmax_op(Binding binding) {
  return std::move(binding)
      .template Arg<ffi::AnyBuffer>()
      .template Arg<ffi::Buffer<ffi::S32>>()
      .template Ret<ffi::AnyBuffer>()
      .template Attr<int32_t>("layout");
}

}  // namespace roipool
