// CPU kernels of roi_pool behind the XLA FFI: the forward pass with argmax,
// the gather at argmax (JVP tangent) and the scatter-add at argmax (its
// transpose). Work is split over XLA's intra-op thread pool.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

#include "roipool_ffi.h"
#include "roipool_geometry.h"

namespace ffi = xla::ffi;

namespace roipool {
namespace {

// ---------------------------------------------------------------------------
// Element types. 16-bit floats arrive as raw bits; they are compared and
// accumulated in float, and outputs of the max are copied bit-exactly.

struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

template <typename T>
struct Element {  // float and double
  using Acc = T;
  static Acc load(T v) { return v; }
  static T store(Acc v) { return v; }
};

template <>
struct Element<Half> {
  using Acc = float;
  static float load(Half v) {
    _Float16 h;
    std::memcpy(&h, &v.bits, sizeof(h));
    return static_cast<float>(h);
  }
  static Half store(float v) {
    const _Float16 h = static_cast<_Float16>(v);
    Half out;
    std::memcpy(&out.bits, &h, sizeof(h));
    return out;
  }
};

template <>
struct Element<BFloat16> {
  using Acc = float;
  static float load(BFloat16 v) {
    const uint32_t u = uint32_t(v.bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
  }
  static BFloat16 store(float v) {  // round to nearest even
    uint32_t u;
    std::memcpy(&u, &v, sizeof(u));
    if (v != v) return BFloat16{uint16_t((u >> 16) | 0x40)};
    u += 0x7fff + ((u >> 16) & 1);
    return BFloat16{uint16_t(u >> 16)};
  }
};

template <typename F>
ffi::Error dispatch_value_type(ffi::DataType dtype, F&& fn) {
  return roipool::dispatch_value_type<Half, BFloat16>(dtype, std::forward<F>(fn));
}

// True when `candidate` should replace the running maximum `best`: strictly
// greater (ties keep the first cell in row-major order), or the first NaN.
template <typename A>
inline bool replaces_max(A candidate, A best) {
  return candidate > best || (candidate != candidate && best == best);
}

// XLA runs CPU computations, its thread pool included, with denormals
// flushed to zero (FTZ/DAZ). Under DAZ all subnormals compare equal to 0, so
// the max of a bin of subnormals would keep the first cell where torchvision
// and the CUDA kernels keep the largest. Every kernel body runs with exact
// denormals instead, restoring the caller's mode afterwards.
class ExactDenormals {
 public:
#if defined(__SSE__)
  ExactDenormals() : saved_(_mm_getcsr()) {
    constexpr unsigned kFlushToZero = 1u << 15, kDenormalsAreZero = 1u << 6;
    _mm_setcsr(saved_ & ~(kFlushToZero | kDenormalsAreZero));
  }
  ~ExactDenormals() { _mm_setcsr(saved_); }

 private:
  unsigned saved_;
#endif
};

// ---------------------------------------------------------------------------
// Parallel loop over [0, count) in chunks of `grain` on XLA's intra-op pool.
// The calling thread takes chunks too and waits only for chunks that were
// claimed, so it never blocks on a task the pool has not started; late tasks
// find no chunk left and return without touching `body`.

template <typename F>
void parallel_for(ffi::ThreadPool& pool, int64_t count, int64_t grain,
                  const F& body) {
  if (count <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t chunks = (count + grain - 1) / grain;
  const int64_t helpers =
      std::min<int64_t>(pool.num_threads(), chunks - 1);
  if (helpers <= 0) {
    ExactDenormals exact;
    body(0, count);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mu;
    std::condition_variable finished;
  };
  auto state = std::make_shared<State>();
  auto run_chunks = [state, chunks, count, grain, &body]() {
    ExactDenormals exact;
    for (int64_t i; (i = state->next.fetch_add(1)) < chunks;) {
      body(i * grain, std::min(count, (i + 1) * grain));
      if (state->done.fetch_add(1) + 1 == chunks) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->finished.notify_all();
      }
    }
  };
  for (int64_t t = 0; t < helpers; ++t) {
    auto task = run_chunks;  // Schedule takes ownership of a copy
    pool.Schedule(std::move(task));
  }
  run_chunks();
  std::unique_lock<std::mutex> lock(state->mu);
  state->finished.wait(lock, [&] { return state->done.load() == chunks; });
}

// A grain that gives each worker several chunks for load balance.
int64_t grain_for(ffi::ThreadPool& pool, int64_t count) {
  const int64_t workers = std::max<int64_t>(pool.num_threads(), 0) + 1;
  return std::max<int64_t>(1, count / (8 * workers));
}

// Large result buffers are fresh mmap allocations that the first write
// page-faults in, 4 KiB at a time; for the tens of MiB of a typical forward
// output that costs more than the pooling itself. Asking for transparent huge
// pages on the buffer (a hint, no effect on its contents) cuts the faults
// 512-fold where the system allows THP on request ("madvise" mode).
void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

// ---------------------------------------------------------------------------
// Offset of (cell, channel) in a feature-shaped buffer, where cell is the
// flat (n * H + h) * W + w index stored in argmax.
inline int64_t cell_offset(int64_t cell, int64_t c, const FeatureShape& f,
                           int32_t layout) {
  if (layout == kNHWC) return cell * f.c + c;
  const int64_t plane = f.h * f.w;
  return ((cell / plane) * f.c + c) * plane + cell % plane;
}

// ---------------------------------------------------------------------------
// Forward: max over each bin, and its cell index.

// The channel loops below are the hot spots of the NHWC kernels; they are
// compiled for AVX2 and for the baseline ISA, picked at load time.
#if defined(__x86_64__) && defined(__GNUC__)
#define ROIPOOL_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define ROIPOOL_VECTOR_CLONES
#endif

// Fold one more cell (its C channels) into the running maxima of a bin.
// Each lane loads the old maximum and always stores the new one, so the
// compiler emits compare + blend; a conditional store would become a masked
// store, which is very slow on some x86 cores.
template <typename T>
ROIPOOL_VECTOR_CLONES void fold_cell(const T* __restrict px,
                                     typename Element<T>::Acc* __restrict best,
                                     int64_t channels) {
  for (int64_t c = 0; c < channels; ++c) {
    const auto v = Element<T>::load(px[c]);
    const auto b = best[c];
    best[c] = replaces_max(v, b) ? v : b;
  }
}

template <typename T>
ROIPOOL_VECTOR_CLONES void fold_cell_argmax(
    const T* __restrict px, typename Element<T>::Acc* __restrict best,
    int32_t* __restrict best_cell, int32_t cell, int64_t channels) {
  for (int64_t c = 0; c < channels; ++c) {
    const auto v = Element<T>::load(px[c]);
    const auto b = best[c];
    const int32_t i = best_cell[c];
    const bool take = replaces_max(v, b);
    best[c] = take ? v : b;
    best_cell[c] = take ? cell : i;
  }
}

// Pools the bins [k_begin, k_end) (flat ph * PW + pw) of one RoI from an
// NHWC image [H, W, C] into out[(k - k_begin) * C + c], and their cells into
// argmax likewise when it is non-null. `best` and `best_cell` hold C values.
template <typename T, typename C>
void pool_bins_nhwc(const T* image, const RoiGrid<C>& g, const FeatureShape& f,
                    const PooledShape& p, int32_t bins, int64_t k_begin,
                    int64_t k_end, T* out, int32_t* argmax,
                    typename Element<T>::Acc* best, int32_t* best_cell) {
  using Acc = typename Element<T>::Acc;
  const int32_t row0 = int32_t(g.batch * f.h);
  for (int64_t k = k_begin; k < k_end; ++k) {
    const int32_t ph = int32_t(k / p.pw), pw = int32_t(k % p.pw);
    const Span sy = bin_span(g.y, ph, int32_t(p.ph), int32_t(f.h), bins);
    const Span sx = bin_span(g.x, pw, int32_t(p.pw), int32_t(f.w), bins);
    T* y = out + (k - k_begin) * f.c;
    int32_t* arg = argmax ? argmax + (k - k_begin) * f.c : nullptr;
    if (!g.valid || sy.empty() || sx.empty()) {
      std::fill(y, y + f.c, Element<T>::store(Acc(0)));
      if (arg) std::fill(arg, arg + f.c, -1);
      continue;
    }
    const T* first = image + (int64_t(sy.begin) * f.w + sx.begin) * f.c;
    for (int64_t c = 0; c < f.c; ++c) best[c] = Element<T>::load(first[c]);
    if (arg)
      std::fill(best_cell, best_cell + f.c,
                (row0 + sy.begin) * int32_t(f.w) + sx.begin);
    for (int32_t h = sy.begin; h < sy.end; ++h) {
      // The first cell is already folded in.
      for (int32_t w = (h == sy.begin ? sx.begin + 1 : sx.begin); w < sx.end;
           ++w) {
        const T* px = image + (int64_t(h) * f.w + w) * f.c;
        if (arg)
          fold_cell_argmax<T>(px, best, best_cell,
                              (row0 + h) * int32_t(f.w) + w, f.c);
        else
          fold_cell<T>(px, best, f.c);
      }
    }
    for (int64_t c = 0; c < f.c; ++c) y[c] = Element<T>::store(best[c]);
    if (arg) std::copy(best_cell, best_cell + f.c, arg);
  }
}

// NHWC: each RoI's bins go straight to the output.
template <typename T, typename C>
void forward_nhwc(const T* features, const C* rois, T* out, int32_t* argmax,
                  const FeatureShape& f, const PooledShape& p, C scale,
                  int32_t bins, int64_t roi_begin, int64_t roi_end) {
  std::vector<typename Element<T>::Acc> best(f.c);
  std::vector<int32_t> best_cell(argmax ? f.c : 0);
  const int64_t roi_size = p.ph * p.pw * f.c;
  for (int64_t r = roi_begin; r < roi_end; ++r) {
    const RoiGrid<C> g = make_roi_grid<C>(rois + 5 * r, scale, f.n,
                                          int32_t(p.ph), int32_t(p.pw), bins);
    pool_bins_nhwc(features + g.batch * f.h * f.w * f.c, g, f, p, bins, 0,
                   p.ph * p.pw, out + r * roi_size,
                   argmax ? argmax + r * roi_size : nullptr, best.data(),
                   best_cell.data());
  }
}

// NCHW: features were transposed to NHWC (`features_nhwc`) so that the
// channel loops vectorise; bins are pooled in chunks that stay in cache and
// are transposed into the [C, PH, PW] output of each RoI.
template <typename T, typename C>
void forward_nchw(const T* features_nhwc, const C* rois, T* out,
                  int32_t* argmax, const FeatureShape& f, const PooledShape& p,
                  C scale, int32_t bins, int64_t roi_begin, int64_t roi_end) {
  constexpr int64_t kChunkElements = 16 * 1024;
  const int64_t bin_plane = p.ph * p.pw;
  const int64_t chunk = std::max<int64_t>(1, kChunkElements / f.c);
  const int64_t chunk_bins = std::min(chunk, bin_plane);
  std::vector<typename Element<T>::Acc> best(f.c);
  std::vector<int32_t> best_cell(argmax ? f.c : 0);
  std::vector<T> chunk_out(chunk_bins * f.c);
  std::vector<int32_t> chunk_arg(argmax ? chunk_bins * f.c : 0);
  for (int64_t r = roi_begin; r < roi_end; ++r) {
    const RoiGrid<C> g = make_roi_grid<C>(rois + 5 * r, scale, f.n,
                                          int32_t(p.ph), int32_t(p.pw), bins);
    const T* image = features_nhwc + g.batch * f.h * f.w * f.c;
    for (int64_t k0 = 0; k0 < bin_plane; k0 += chunk_bins) {
      const int64_t k1 = std::min(bin_plane, k0 + chunk_bins);
      pool_bins_nhwc(image, g, f, p, bins, k0, k1, chunk_out.data(),
                     argmax ? chunk_arg.data() : nullptr, best.data(),
                     best_cell.data());
      for (int64_t c = 0; c < f.c; ++c) {
        const int64_t o = (r * f.c + c) * bin_plane;
        for (int64_t k = k0; k < k1; ++k) {
          out[o + k] = chunk_out[(k - k0) * f.c + c];
          if (argmax) argmax[o + k] = chunk_arg[(k - k0) * f.c + c];
        }
      }
    }
  }
}

// [N, C, H, W] -> [N, H, W, C], split over images and rows.
template <typename T>
void transpose_to_nhwc(ffi::ThreadPool& pool, const T* src, T* dst,
                       const FeatureShape& f) {
  const int64_t rows = f.n * f.h, plane = f.h * f.w;
  parallel_for(pool, rows, grain_for(pool, rows), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / f.h, h = row % f.h;
      const T* in = src + n * f.c * plane + h * f.w;
      T* o = dst + row * f.w * f.c;
      for (int64_t w = 0; w < f.w; ++w)
        for (int64_t c = 0; c < f.c; ++c) o[w * f.c + c] = in[c * plane + w];
    }
  });
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::AnyBuffer features,
                   ffi::AnyBuffer rois, ffi::Result<ffi::AnyBuffer> out,
                   ffi::Result<ffi::Buffer<ffi::S32>> argmax, int32_t pooled_h,
                   int32_t pooled_w, double spatial_scale, int32_t layout,
                   int32_t bins) {
  if (auto err = check_layout(layout); err.failure()) return err;
  const auto fd = features.dimensions();
  const auto rd = rois.dimensions();
  if (fd.size() != 4 || rd.size() != 2 || rd[1] != 5)
    return ffi::Error::InvalidArgument(
        "roi_pool: features must be rank 4 and rois [R, 5]");
  if (bins != kFastRcnn && bins != kPartition)
    return ffi::Error::InvalidArgument("roi_pool: unknown bins code");
  const FeatureShape f = feature_shape(fd, layout);
  const PooledShape p{rd[0], pooled_h, pooled_w, f.c};
  return dispatch_value_type(features.element_type(), [&](auto value_tag) {
    using T = typename decltype(value_tag)::type;
    return dispatch_coord_type(rois.element_type(), [&](auto coord_tag) {
      using C = typename decltype(coord_tag)::type;
      const T* x = reinterpret_cast<const T*>(features.untyped_data());
      const C* boxes = reinterpret_cast<const C*>(rois.untyped_data());
      T* y = reinterpret_cast<T*>(out->untyped_data());
      // An empty argmax result asks for the maxima alone (no gradient needed).
      int32_t* idx = argmax->element_count() ? argmax->typed_data() : nullptr;
      const C scale = C(spatial_scale);
      advise_huge_pages(y, out->size_bytes());
      if (idx) advise_huge_pages(idx, argmax->size_bytes());
      if (p.r == 0 || f.c == 0) return ffi::Error::Success();  // nothing to pool
      std::vector<T> transposed;
      if (layout == kNCHW) {
        transposed.resize(f.n * f.h * f.w * f.c);
        transpose_to_nhwc(pool, x, transposed.data(), f);
      }
      parallel_for(pool, p.r, grain_for(pool, p.r),
                   [&](int64_t begin, int64_t end) {
                     if (layout == kNHWC)
                       forward_nhwc(x, boxes, y, idx, f, p, scale, bins,
                                    begin, end);
                     else
                       forward_nchw(transposed.data(), boxes, y, idx, f, p,
                                    scale, bins, begin, end);
                   });
      return ffi::Error::Success();
    });
  });
}

// ---------------------------------------------------------------------------
// Gather at argmax: out[o] = source[cell(argmax[o]), channel(o)], 0 if -1.

ffi::Error Gather(ffi::ThreadPool pool, ffi::AnyBuffer source,
                  ffi::Buffer<ffi::S32> argmax, ffi::Result<ffi::AnyBuffer> out,
                  int32_t layout) {
  if (auto err = check_layout(layout); err.failure()) return err;
  if (source.dimensions().size() != 4 || argmax.dimensions().size() != 4)
    return ffi::Error::InvalidArgument("roi_pool gather: rank-4 operands");
  const FeatureShape f = feature_shape(source.dimensions(), layout);
  const PooledShape p = pooled_shape(argmax.dimensions(), layout);
  return dispatch_value_type(source.element_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* src = reinterpret_cast<const T*>(source.untyped_data());
    const int32_t* idx = argmax.typed_data();
    T* y = reinterpret_cast<T*>(out->untyped_data());
    const int64_t total = p.r * p.ph * p.pw * p.c;
    const int64_t bin_plane = p.ph * p.pw;
    const int64_t cells = f.n * f.h * f.w;
    advise_huge_pages(y, out->size_bytes());
    parallel_for(pool, total, grain_for(pool, total),
                 [&](int64_t begin, int64_t end) {
                   for (int64_t o = begin; o < end; ++o) {
                     const int64_t c = layout == kNHWC
                                           ? o % p.c
                                           : (o / bin_plane) % p.c;
                     y[o] = argmax_in_range(idx[o], cells)
                                ? src[cell_offset(idx[o], c, f, layout)]
                                : Element<T>::store(0);
                   }
                 });
    return ffi::Error::Success();
  });
}

// ---------------------------------------------------------------------------
// Scatter-add at argmax, without atomics and in a fixed summation order
// (deterministic for a given thread count), by one of two splits:
// - bins: each worker adds a contiguous range of bins into its own
//   feature-sized accumulator, then the accumulators are summed in worker
//   order. The cotangent and argmax stream through in order and each RoI's
//   cells stay in cache; several times faster in NHWC, but it needs one
//   accumulator per worker, so it is used when they fit kPrivateBudget.
// - channels: each worker owns a block of channels of the whole gradient, so
//   no two workers write the same element. No extra memory; the right split
//   for NCHW, where a channel's plane is small and contiguous.
// 16-bit types accumulate in float.

constexpr int64_t kPrivateBudget = int64_t(128) << 20;  // bytes

template <typename T>
void scatter_by_bins(ffi::ThreadPool& pool, const T* cot, const int32_t* idx,
                     T* out, const FeatureShape& f, const PooledShape& p,
                     int64_t workers) {
  using Acc = typename Element<T>::Acc;
  const int64_t cells = f.n * f.h * f.w, size = cells * f.c;
  const int64_t bins = p.r * p.ph * p.pw;
  std::vector<std::vector<Acc>> partial(workers);
  parallel_for(pool, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      partial[w].assign(size, Acc(0));
      Acc* acc = partial[w].data();
      for (int64_t b = bins * w / workers; b < bins * (w + 1) / workers; ++b) {
        for (int64_t c = 0; c < f.c; ++c) {
          const int64_t o = b * f.c + c;
          if (argmax_in_range(idx[o], cells))
            acc[int64_t(idx[o]) * f.c + c] += Element<T>::load(cot[o]);
        }
      }
    }
  });
  parallel_for(pool, cells, grain_for(pool, cells),
               [&](int64_t begin, int64_t end) {
                 for (int64_t i = begin * f.c; i < end * f.c; ++i) {
                   Acc sum = partial[0][i];
                   for (int64_t w = 1; w < workers; ++w) sum += partial[w][i];
                   out[i] = Element<T>::store(sum);
                 }
               });
}

template <typename T>
void scatter_channels(const T* cot, const int32_t* idx,
                      typename Element<T>::Acc* acc, const FeatureShape& f,
                      const PooledShape& p, int32_t layout, int64_t c_begin,
                      int64_t c_end) {
  using Acc = typename Element<T>::Acc;
  const int64_t cells = f.n * f.h * f.w;
  const int64_t bins = p.r * p.ph * p.pw;
  if (layout == kNHWC) {
    for (int64_t cell = 0; cell < cells; ++cell)
      std::fill(acc + cell * f.c + c_begin, acc + cell * f.c + c_end, Acc(0));
    for (int64_t b = 0; b < bins; ++b) {
      for (int64_t c = c_begin; c < c_end; ++c) {
        const int64_t o = b * p.c + c;
        if (argmax_in_range(idx[o], cells))
          acc[int64_t(idx[o]) * f.c + c] += Element<T>::load(cot[o]);
      }
    }
    return;
  }
  const int64_t plane = f.h * f.w;
  const int64_t bin_plane = p.ph * p.pw;
  for (int64_t c = c_begin; c < c_end; ++c) {
    for (int64_t n = 0; n < f.n; ++n) {
      Acc* dst = acc + (n * f.c + c) * plane;
      std::fill(dst, dst + plane, Acc(0));
    }
    for (int64_t r = 0; r < p.r; ++r) {
      const int64_t o0 = (r * p.c + c) * bin_plane;
      for (int64_t k = 0; k < bin_plane; ++k) {
        const int32_t cell = idx[o0 + k];
        if (argmax_in_range(cell, cells))
          acc[cell_offset(cell, c, f, layout)] += Element<T>::load(cot[o0 + k]);
      }
    }
  }
}

// Converts the channels [c_begin, c_end) of a float accumulator to T.
template <typename T>
void store_channels(const float* acc, T* grad, const FeatureShape& f,
                    int32_t layout, int64_t c_begin, int64_t c_end) {
  const int64_t cells = f.n * f.h * f.w;
  for (int64_t cell = 0; cell < cells; ++cell)
    for (int64_t c = c_begin; c < c_end; ++c) {
      const int64_t at = cell_offset(cell, c, f, layout);
      grad[at] = Element<T>::store(acc[at]);
    }
}

ffi::Error Scatter(ffi::ThreadPool pool, ffi::AnyBuffer cotangent,
                   ffi::Buffer<ffi::S32> argmax,
                   ffi::Result<ffi::AnyBuffer> grad, int32_t layout) {
  if (auto err = check_layout(layout); err.failure()) return err;
  if (cotangent.dimensions().size() != 4 || grad->dimensions().size() != 4)
    return ffi::Error::InvalidArgument("roi_pool scatter: rank-4 operands");
  const FeatureShape f = feature_shape(grad->dimensions(), layout);
  const PooledShape p = pooled_shape(cotangent.dimensions(), layout);
  return dispatch_value_type(cotangent.element_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Acc = typename Element<T>::Acc;
    const T* cot = reinterpret_cast<const T*>(cotangent.untyped_data());
    const int32_t* idx = argmax.typed_data();
    T* out = reinterpret_cast<T*>(grad->untyped_data());
    if (grad->element_count() == 0) return ffi::Error::Success();
    advise_huge_pages(out, grad->size_bytes());
    const int64_t workers = std::max<int64_t>(pool.num_threads(), 0) + 1;
    const int64_t private_bytes = workers * f.n * f.h * f.w * f.c * int64_t(sizeof(Acc));
    if (layout == kNHWC && workers > 1 && private_bytes <= kPrivateBudget) {
      scatter_by_bins(pool, cot, idx, out, f, p, workers);
      return ffi::Error::Success();
    }
    constexpr bool kSeparateAcc = !std::is_same_v<T, Acc>;
    std::vector<Acc> scratch(kSeparateAcc ? grad->element_count() : 0);
    Acc* acc = kSeparateAcc ? scratch.data() : reinterpret_cast<Acc*>(out);
    // One contiguous channel block per worker: long runs of each output row
    // stream through the cache; multiples of 16 channels keep the workers'
    // writes on separate cache lines in NHWC.
    const int64_t block = (f.c + 16 * workers - 1) / (16 * workers) * 16;
    const int64_t blocks = (f.c + block - 1) / block;
    parallel_for(pool, blocks, 1, [&](int64_t begin, int64_t end) {
      const int64_t c0 = begin * block, c1 = std::min(f.c, end * block);
      scatter_channels(cot, idx, acc, f, p, layout, c0, c1);
      if constexpr (kSeparateAcc) store_channels(acc, out, f, layout, c0, c1);
    });
    return ffi::Error::Success();
  });
}

}  // namespace
}  // namespace roipool

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    RoipoolForwardCpu, roipool::Forward,
    roipool::bind_forward(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    RoipoolGatherCpu, roipool::Gather,
    roipool::bind_argmax_op(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    RoipoolScatterCpu, roipool::Scatter,
    roipool::bind_argmax_op(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()));

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "jax_roipool CPU kernels (XLA FFI handlers)";
  m.def("registrations", []() {
    pybind11::dict handlers;
    handlers["roipool_forward"] =
        pybind11::capsule(reinterpret_cast<void*>(RoipoolForwardCpu));
    handlers["roipool_gather"] =
        pybind11::capsule(reinterpret_cast<void*>(RoipoolGatherCpu));
    handlers["roipool_scatter"] =
        pybind11::capsule(reinterpret_cast<void*>(RoipoolScatterCpu));
    return handlers;
  });
  m.def("build_jaxlib_version", []() { return JAXLIB_BUILD_VERSION; });
}
