// Bin geometry of RoI max pooling, shared by the CPU and the CUDA kernels so
// that both pick exactly the same cells for every bin.
//
// C is the coordinate type: float for float16/bfloat16/float32 rois (the
// Python side upcasts 16-bit rois; fast_rcnn's float16 ones come with
// kFastRcnnBinary16), double for float64 rois. Every formula is evaluated in
// C exactly as written (no reciprocal multiplication, no fused operations
// that could move a bin edge by one cell).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define ROIPOOL_HD __host__ __device__ __forceinline__
#else
#define ROIPOOL_HD inline
#endif

namespace roipool {

// Values of the `layout` and `bins` attributes of every FFI handler.
enum Layout : int32_t { kNHWC = 0, kNCHW = 1 };
// kFastRcnnBinary16 is fast_rcnn for float16 rois: torchvision computes
// their scaled corners, bin sizes and edges in c10::Half, whose every
// operation is done in float and rounded to binary16; so is it here
// (to_binary16), with the spatial scale already rounded to binary16.
enum Bins : int32_t { kFastRcnn = 0, kPartition = 1, kFastRcnnBinary16 = 2 };

// torchvision computes the corners, the region's size and the bin edges in
// int (int32). Where one of those steps would overflow (undefined behaviour
// there), the RoI is invalid here, like a NaN one. 2^31 is exact in float.
constexpr double kInt32Bound = 2147483648.0;

// Half-open range of cells [begin, end) along one axis, already clipped to
// the feature map.
struct Span {
  int32_t begin;
  int32_t end;
  ROIPOOL_HD bool empty() const { return end <= begin; }
};

// One axis of one RoI: the region starts at cell `origin` (unclipped) and is
// `length` cells long; `bin_size` is length / pooled (fast_rcnn only).
template <typename C>
struct Axis {
  int32_t origin;
  int32_t length;
  C bin_size;
};

// A decoded RoI. When `valid` is false (batch index outside [0, images), a
// non-finite scaled coordinate, or an int32 overflow of the geometry) every
// bin is empty: output 0, argmax -1.
template <typename C>
struct RoiGrid {
  bool valid;
  int64_t batch;
  Axis<C> y;
  Axis<C> x;
};

// The images a RoI's batch index may name, and which image of the features
// each one pools. The forward pools the features' own N images. Gather and
// scatter read or write a source (gradient) that may hold `copies` copies of
// them, copy-major (image = copy * N + n), as a vmap over tangents or
// cotangents alone folds its batch into the images without copying the
// features. Image i's bins take their cells from features image
// features_image(i).
// The count fits int32 (with H * W, as argmax cells must), so the division
// is 32-bit: on a GPU a 64-bit one takes a long instruction sequence.
struct SourceImages {
  int32_t n;       // the features' images
  int32_t copies;  // >= 1

  ROIPOOL_HD int64_t count() const { return int64_t(n) * copies; }
  // For 0 <= image < count().
  ROIPOOL_HD int64_t features_image(int64_t image) const {
    if (copies == 1) return image;
    return uint32_t(image) % uint32_t(n);
  }
};

ROIPOOL_HD float round_half_away(float v) { return roundf(v); }
ROIPOOL_HD double round_half_away(double v) { return round(v); }
ROIPOOL_HD float floor_of(float v) { return floorf(v); }
ROIPOOL_HD double floor_of(double v) { return floor(v); }
ROIPOOL_HD float ceil_of(float v) { return ceilf(v); }
ROIPOOL_HD double ceil_of(double v) { return ceil(v); }

// The largest finite binary16 value.
constexpr float kMaxBinary16 = 65504.0f;

// v rounded to the nearest binary16 value, ties to even, as a float: +-inf
// from magnitude 65520 on, as IEEE conversion overflows; NaN stays NaN.
// Plain float and integer operations, so that host and device agree.
ROIPOOL_HD float to_binary16(float v) {
  float a = fabsf(v);
  if (!(a < 65520.0f)) {
    a *= INFINITY;  // inf, or NaN for NaN
  } else if (a < 6.103515625e-05f) {  // below 2^-14: subnormal, steps of 2^-24
    a = rintf(a * 16777216.0f) * 5.9604644775390625e-08f;  // exact scalings
  } else {
    // Keep 10 of float's 23 fraction bits, rounding the other 13 to nearest
    // even (a carry into the exponent is the correct result).
    uint32_t bits;
    memcpy(&bits, &a, sizeof bits);
    bits += 0x0FFFu + ((bits >> 13) & 1u);
    bits &= ~0x1FFFu;
    memcpy(&a, &bits, sizeof a);
  }
  return copysignf(a, v);
}

// True when `candidate` replaces the running maximum `best`: strictly
// greater (ties keep the first cell in row-major order), or the first NaN
// (NaN propagates, as jnp.max does).
// Written as "not <=" (true for v > best and for a NaN v) and "best is not
// NaN": two compares, which vectorise better than the three of the obvious form.
template <typename A>
ROIPOOL_HD bool replaces_max(A candidate, A best) {
  return !(candidate <= best) && best == best;
}

// Offset of (cell, channel c) in a feature-shaped buffer, where cell is the
// flat (n * H + h) * W + w index of an argmax and plane = H * W.
ROIPOOL_HD int64_t cell_offset(int64_t cell, int64_t c, int64_t channels,
                               int64_t plane, int32_t layout) {
  if (layout == kNHWC) return cell * channels + c;
  const int64_t n = cell / plane;
  return (n * channels + c) * plane + (cell - n * plane);
}

// Offset of (RoI r, bin k = ph * PW + pw, channel c) in an output-shaped
// buffer, [R, PH, PW, C] or [R, C, PH, PW]; bin_plane = PH * PW.
ROIPOOL_HD int64_t pooled_offset(int64_t r, int64_t k, int64_t c,
                                 int64_t channels, int64_t bin_plane,
                                 int32_t layout) {
  return layout == kNHWC ? (r * bin_plane + k) * channels + c
                         : (r * channels + c) * bin_plane + k;
}

// The RoI pooled in place `slot` of the pooling order: order[slot], or slot
// itself where order is null (the RoIs' own order). The order is a
// permutation of [0, rois) that the lowering computes (roi_order); an entry
// outside that range, which only a hand-written custom call can pass, gives
// -1: no RoI is pooled there, and nothing is read or written out of bounds.
ROIPOOL_HD int64_t roi_in_order(const int32_t* order, int64_t slot,
                                int64_t rois) {
  const int64_t r = order ? order[slot] : slot;
  return r >= 0 && r < rois ? r : -1;
}

// Scaled corner -> integer cell, rounding half away from zero (C `round`).
// False where the cell is outside int32, NaN and +-inf included.
template <typename C>
ROIPOOL_HD bool corner_cell(C scaled, int32_t* cell) {
  const C r = round_half_away(scaled);
  if (!(r >= C(-kInt32Bound) && r < C(kInt32Bound))) return false;
  *cell = static_cast<int32_t>(r);
  return true;
}

// One axis of one RoI; false where a step of torchvision's int arithmetic
// overflows (for partition, which has no torchvision counterpart, the same
// rule on its own steps).
template <typename C>
ROIPOOL_HD bool make_axis(C lo, C hi, int32_t pooled, int32_t bins, Axis<C>* a) {
  int32_t last;
  if (!corner_cell(lo, &a->origin) || !corner_cell(hi, &last)) return false;
  // Caffe / torchvision: integer corners are inclusive (last - origin + 1);
  // seed article: corners are pixel corners, the end is exclusive.
  const int64_t difference = int64_t(last) - a->origin;
  const int64_t size = bins == kPartition ? difference : difference + 1;
  if (difference < INT32_MIN || size > INT32_MAX) return false;
  // Malformed boxes become one cell wide (fast_rcnn) or empty (partition).
  const int32_t least = bins == kPartition ? 0 : 1;
  a->length = size > least ? int32_t(size) : least;
  if (bins == kFastRcnnBinary16) {
    // Corners and edges stay below 65520 (bins whose end overflows binary16
    // are empty), so neither they nor their sums can overflow int32.
    a->bin_size = C(to_binary16(to_binary16(float(a->length)) /
                                to_binary16(float(pooled))));
    return true;
  }
  a->bin_size = C(a->length) / C(pooled);
  if (bins == kPartition) return true;  // edges lie within [origin, last]
  // Float rounding is monotonic, so the last bin's end is the largest edge:
  // it, and it plus the origin, must fit int32.
  const C far = ceil_of(C(pooled) * a->bin_size);
  return far < C(kInt32Bound) && int64_t(far) + a->origin <= INT32_MAX;
}

// Decodes one row (batch_index, x1, y1, x2, y2) of the rois array.
template <typename C>
ROIPOOL_HD RoiGrid<C> make_roi_grid(const C* roi, C spatial_scale,
                                    int64_t batch_size, int32_t pooled_h,
                                    int32_t pooled_w, int32_t bins) {
  RoiGrid<C> g;
  const C b = roi[0];
  C x1 = roi[1] * spatial_scale;
  C y1 = roi[2] * spatial_scale;
  C x2 = roi[3] * spatial_scale;
  C y2 = roi[4] * spatial_scale;
  if (bins == kFastRcnnBinary16) {  // c10::Half products (exact in float)
    x1 = C(to_binary16(float(x1)));
    y1 = C(to_binary16(float(y1)));
    x2 = C(to_binary16(float(x2)));
    y2 = C(to_binary16(float(y2)));
  }
  // Batch index truncates toward zero (as a C cast); NaN fails the range
  // test, and so does 2^31, above every valid index (N * H * W fits int32).
  // The bound N is compared as an integer: C(N) may round (float32 above
  // 2^24), the truncated index cannot.
  const bool in_range = b > C(-1) && b < C(kInt32Bound);
  g.valid = batch_size > 0 && in_range && static_cast<int64_t>(b) < batch_size &&
            make_axis(y1, y2, pooled_h, bins, &g.y) &&
            make_axis(x1, x2, pooled_w, bins, &g.x);
  g.batch = g.valid ? static_cast<int64_t>(b) : 0;
  if (!g.valid) {
    g.y = Axis<C>{0, 0, C(0)};
    g.x = Axis<C>{0, 0, C(0)};
  }
  return g;
}

ROIPOOL_HD int32_t clip_cell(int32_t v, int32_t extent) {
  return v < 0 ? 0 : (v > extent ? extent : v);
}

// Cells of bin `i` (of `pooled`) along one axis of extent `extent`.
template <typename C>
ROIPOOL_HD Span bin_span(const Axis<C>& a, int32_t i, int32_t pooled,
                         int32_t extent, int32_t bins) {
  int32_t begin, end;
  if (bins == kFastRcnn) {
    // Bins overlap: [floor(i * bin), ceil((i + 1) * bin)) from the origin.
    begin = static_cast<int32_t>(floor_of(C(i) * a.bin_size));
    end = static_cast<int32_t>(ceil_of(C(i + 1) * a.bin_size));
  } else if (bins == kFastRcnnBinary16) {
    // The same, each operand and product rounded to binary16. Where that
    // overflows (RoIs of 65520 cells and more, output sizes from 65520 on;
    // torchvision's result is undefined there) the bin is empty.
    const float bin = float(a.bin_size);
    const float first = to_binary16(to_binary16(float(i)) * bin);
    const float past = to_binary16(to_binary16(float(i + 1)) * bin);
    const bool finite = past <= kMaxBinary16;  // and so is first <= past
    begin = finite ? static_cast<int32_t>(floor_of(first)) : 0;
    end = finite ? static_cast<int32_t>(ceil_of(past)) : 0;
  } else {
    // Non-overlapping sections [floor(i*L/P), floor((i+1)*L/P)), exact in
    // integers. When the region is shorter than the output, an empty section
    // takes the one cell at its start, which still lies inside the region.
    begin = static_cast<int32_t>(int64_t(i) * a.length / pooled);
    end = static_cast<int32_t>(int64_t(i + 1) * a.length / pooled);
    if (a.length > 0 && end <= begin) end = begin + 1;
  }
  Span s;
  s.begin = clip_cell(begin + a.origin, extent);
  s.end = clip_cell(end + a.origin, extent);
  return s;
}

}  // namespace roipool
