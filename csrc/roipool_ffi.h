// Host-side helpers shared by the CPU and CUDA FFI handlers: element-type
// dispatch and the logical shapes of the operands in either layout.
#pragma once

#include <cstdint>
#include <cstddef>
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

// Calls fn(TypeTag<T>{}, TypeTag<C>{}) for the value type T of `values`
// (16-bit types as in dispatch_value_type) and the coordinate type C of
// `rois`.
template <typename Half, typename BFloat16, typename F>
ffi::Error dispatch_types(const ffi::AnyBuffer& values,
                          const ffi::AnyBuffer& rois, F&& fn) {
  return dispatch_value_type<Half, BFloat16>(
      values.element_type(), [&](auto value_tag) {
        return dispatch_coord_type(rois.element_type(), [&](auto coord_tag) {
          return fn(value_tag, coord_tag);
        });
      });
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

inline bool same_dims(ffi::Span<const int64_t> a, ffi::Span<const int64_t> b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i] != b[i]) return false;
  return true;
}

// One checked call: the logical shapes, from its features and rois, the
// images its RoIs may name, and its pooling order (roi_in_order; null: the
// RoIs' own).
struct PoolCall {
  FeatureShape f;
  PooledShape p;
  SourceImages images;
  const int32_t* order;

  // Whether `dims` are the dimensions of an output-shaped buffer.
  bool is_pooled(ffi::Span<const int64_t> dims, int32_t layout) const {
    const int64_t nhwc[4] = {p.r, p.ph, p.pw, p.c};
    const int64_t nchw[4] = {p.r, p.c, p.ph, p.pw};
    return same_dims(dims, ffi::Span<const int64_t>(layout == kNHWC ? nhwc : nchw, 4));
  }
};

// Checks what every handler shares: the attributes, features
// [N, H, W, C] / [N, C, H, W] with N * H * W within int32 (argmax cells),
// rois [R, 5] and the order [R] or [0]. The Python side validates all of
// this at trace time; these checks keep a hand-written custom call from
// reading out of bounds.
inline ffi::Error check_pool_call(const ffi::AnyBuffer& features,
                                  const ffi::AnyBuffer& rois,
                                  const ffi::Buffer<ffi::S32>& order,
                                  int32_t pooled_h, int32_t pooled_w,
                                  int32_t layout, int32_t bins,
                                  PoolCall* call) {
  if (layout != kNHWC && layout != kNCHW)
    return ffi::Error::InvalidArgument("roi_pool: unknown layout code");
  if (bins != kFastRcnn && bins != kPartition && bins != kFastRcnnBinary16)
    return ffi::Error::InvalidArgument("roi_pool: unknown bins code");
  if (pooled_h <= 0 || pooled_w <= 0)
    return ffi::Error::InvalidArgument("roi_pool: pooled size must be > 0");
  const auto fd = features.dimensions();
  const auto rd = rois.dimensions();
  if (fd.size() != 4 || rd.size() != 2 || rd[1] != 5)
    return ffi::Error::InvalidArgument(
        "roi_pool: features must be rank 4 and rois [R, 5]");
  call->f = feature_shape(fd, layout);
  const FeatureShape& f = call->f;
  if (f.h > INT32_MAX || f.w > INT32_MAX || f.n * f.h * f.w > INT32_MAX)
    return ffi::Error::InvalidArgument(
        "roi_pool: N * H * W must fit in int32 (argmax cell indices)");
  call->p = PooledShape{rd[0], pooled_h, pooled_w, f.c};
  call->images = SourceImages{int32_t(f.n), 1};
  const auto od = order.dimensions();
  if (od.size() != 1 || (od[0] != 0 && od[0] != rd[0]))
    return ffi::Error::InvalidArgument("roi_pool: order must be [R] or [0]");
  call->order = od[0] == 0 ? nullptr : order.typed_data();
  return ffi::Error::Success();
}

// check_pool_call plus the results of a forward: out pooled, like features;
// argmax pooled or empty (shape [0]: not wanted).
inline ffi::Error check_forward_call(const ffi::AnyBuffer& features,
                                     const ffi::AnyBuffer& rois,
                                     const ffi::Buffer<ffi::S32>& order,
                                     ffi::Result<ffi::AnyBuffer>& out,
                                     ffi::Result<ffi::Buffer<ffi::S32>>& argmax,
                                     int32_t pooled_h, int32_t pooled_w,
                                     int32_t layout, int32_t bins,
                                     PoolCall* call) {
  if (auto err = check_pool_call(features, rois, order, pooled_h, pooled_w,
                                 layout, bins, call);
      err.failure())
    return err;
  if (!call->is_pooled(out->dimensions(), layout) ||
      (argmax->element_count() != 0 &&
       !call->is_pooled(argmax->dimensions(), layout)) ||
      out->element_type() != features.element_type())
    return ffi::Error::InvalidArgument(
        "roi_pool: output/argmax shape or dtype does not match the inputs");
  return ffi::Error::Success();
}

// The dtype in which the CUDA scatter accumulates a gradient of dtype t:
// float32 for the 16-bit floats, so that its atomic adds do not round to 16
// bits each time.
inline ffi::DataType accumulator_type(ffi::DataType t) {
  return t == ffi::DataType::F16 || t == ffi::DataType::BF16 ? ffi::DataType::F32 : t;
}

// Whether `dims` are those of a feature-shaped buffer holding copies of the
// features' images (SourceImages): the features' dims, except for a
// multiple of their N (none of no images).
inline bool holds_copies(ffi::Span<const int64_t> dims, ffi::Span<const int64_t> features) {
  if (dims.size() != features.size() || dims.size() == 0) return false;
  const bool whole_copies = features[0] == 0 ? dims[0] == 0
                                             : dims[0] > 0 && dims[0] % features[0] == 0;
  if (!whole_copies) return false;
  for (size_t i = 1; i < dims.size(); ++i)
    if (dims[i] != features[i]) return false;
  return true;
}

// check_pool_call plus the operand and result of a gather (value like
// features, result pooled) or a scatter (value pooled, result like
// features); the value of the features' dtype, the result of result_type.
// "Like features" holds copies of their images (SourceImages), with
// N * H * W of the copies within int32.
inline ffi::Error check_argmax_op_call(bool gather, const ffi::AnyBuffer& value,
                                       const ffi::AnyBuffer& features,
                                       const ffi::AnyBuffer& rois,
                                       const ffi::Buffer<ffi::S32>& order,
                                       ffi::Result<ffi::AnyBuffer>& result,
                                       ffi::DataType result_type,
                                       int32_t pooled_h, int32_t pooled_w,
                                       int32_t layout, int32_t bins,
                                       PoolCall* call) {
  if (auto err = check_pool_call(features, rois, order, pooled_h, pooled_w,
                                 layout, bins, call);
      err.failure())
    return err;
  const auto pooled = gather ? result->dimensions() : value.dimensions();
  const auto like_features = gather ? value.dimensions() : result->dimensions();
  if (!call->is_pooled(pooled, layout) ||
      !holds_copies(like_features, features.dimensions()) ||
      value.element_type() != features.element_type() ||
      result->element_type() != result_type)
    return ffi::Error::InvalidArgument(
        gather ? "roi_pool gather: source must be like features, output pooled"
               : "roi_pool scatter: cotangent must be pooled, grad like features "
                 "(float32 for 16-bit features on CUDA)");
  const FeatureShape& f = call->f;
  if (like_features[0] * f.h * f.w > INT32_MAX)
    return ffi::Error::InvalidArgument(
        "roi_pool: N * H * W of the copies must fit in int32 (argmax cell indices)");
  const int64_t copies = f.n == 0 ? 1 : like_features[0] / f.n;
  call->images = SourceImages{int32_t(f.n), int32_t(copies)};
  return ffi::Error::Success();
}

// The operands and attributes of the handlers, after the platform context, so
// that the CPU and CUDA handlers of one op can never disagree on them. Every
// handler takes the pooling order after the rois, and the pooling
// attributes; gather and scatter recompute the forward's argmax from
// (features, rois) rather than reading a stored one.
template <typename Binding>
auto bind_pool_attrs(Binding binding) {
  return std::move(binding)
      .template Attr<int32_t>("pooled_h")
      .template Attr<int32_t>("pooled_w")
      .template Attr<double>("spatial_scale")
      .template Attr<int32_t>("layout")
      .template Attr<int32_t>("bins");
}

// forward: (features, rois, order) -> (out, argmax); argmax may be empty
// (shape [0]).
template <typename Binding>
auto bind_forward(Binding binding) {
  return bind_pool_attrs(std::move(binding)
                             .template Arg<ffi::AnyBuffer>()
                             .template Arg<ffi::AnyBuffer>()
                             .template Arg<ffi::Buffer<ffi::S32>>()
                             .template Ret<ffi::AnyBuffer>()
                             .template Ret<ffi::Buffer<ffi::S32>>());
}

// gather: (source, features, rois, order) -> source at each bin's argmax
// cell, output-shaped; scatter: (cotangent, features, rois, order) -> the
// cotangent added at each bin's argmax cell, features-shaped. The source
// and the gradient may hold copies of the features' images (SourceImages).
template <typename Binding>
auto bind_argmax_op(Binding binding) {
  return bind_pool_attrs(std::move(binding)
                             .template Arg<ffi::AnyBuffer>()
                             .template Arg<ffi::AnyBuffer>()
                             .template Arg<ffi::AnyBuffer>()
                             .template Arg<ffi::Buffer<ffi::S32>>()
                             .template Ret<ffi::AnyBuffer>());
}

}  // namespace roipool
