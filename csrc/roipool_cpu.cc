// CPU kernels of roi_pool behind the XLA FFI: the forward pass (with or
// without argmax), the gather at the argmax (JVP tangent) and the scatter-add
// at the argmax (its transpose). Gather and scatter recompute the argmax from
// the features chunk by chunk instead of reading a stored one: the argmax
// never goes through memory, which halves the traffic of a forward +
// backward. Work is split over XLA's intra-op thread pool.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#elif defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "roipool_denormals.h"
#include "roipool_ffi.h"
#include "roipool_geometry.h"

namespace ffi = xla::ffi;

namespace roipool {
namespace {

// ---------------------------------------------------------------------------
// Element types. 16-bit floats arrive as raw bits; they are compared and
// accumulated in float. Loads widen exactly and stores narrow exactly what
// a load widened, NaN payloads (and the signalling bit) included, so the max
// is copied bit for bit, as by the CUDA kernels.

struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

template <typename To, typename From>
inline To bits_as(From v) {
  static_assert(sizeof(To) == sizeof(From));
  To out;
  std::memcpy(&out, &v, sizeof(out));
  return out;
}

template <typename T>
struct Element {  // float and double
  using Acc = T;
  static Acc load(T v) { return v; }
  static T store(Acc v) { return v; }
};

// a if pick else b, as masks rather than a branch, so that the loops that
// convert 16-bit values vectorize (GCC does not if-convert a chain of them).
inline uint32_t select_bits(bool pick, uint32_t a, uint32_t b) {
  const uint32_t mask = 0u - uint32_t(pick);
  return (a & mask) | (b & ~mask);
}

template <>
struct Element<Half> {
  using Acc = float;
  // Both conversions are integer operations and one float add or subtract,
  // computed for every value and merged with select_bits: no conversion
  // instruction or libgcc call, which kept the loops scalar (float16 pooling
  // was 15x slower than float32). Flushing modes do not matter: the float
  // operations see no denormal, except a float32 subnormal being stored,
  // whose result is a signed zero whether it is flushed or not.
  //
  // Widening: a normal float16 is rebiased (exponent + 112); a subnormal
  // m * 2^-24 is (1 + m/1024) * 2^-14 minus 2^-14; Inf and NaN take float's
  // all-ones exponent, mantissa kept.
  static float load(Half v) {
    constexpr uint32_t kExponent = 0x7c00u << 13;
    const uint32_t body = uint32_t(v.bits & 0x7fff) << 13;
    const uint32_t sign = uint32_t(v.bits & 0x8000) << 16;
    const uint32_t exponent = body & kExponent;
    const uint32_t normal = body + (112u << 23);
    const uint32_t small =
        bits_as<uint32_t>(bits_as<float>(body + (113u << 23)) - 0x1p-14f);
    const uint32_t special = exponent == kExponent ? 0x7f800000u : 0u;  // Inf, NaN
    return bits_as<float>(select_bits(exponent == 0, small, normal) | special | sign);
  }
  // Narrowing, rounded to nearest even: a normal result is rebiased
  // (exponent - 112) and rounded with integer adds (a carry into the
  // exponent is the right result, up to Inf); below 2^-14, |v| + 0.5 rounds
  // in float to a multiple of 2^-24, whose count is its low mantissa bits.
  // NaNs keep their top ten mantissa bits (0x200, quiet, if those are zero),
  // so a load's NaN comes back bit for bit.
  static Half store(float v) {
    const uint32_t u = bits_as<uint32_t>(v);
    const uint32_t a = u & 0x7fffffff;
    const uint32_t normal = (a - (112u << 23) + 0xfff + ((a >> 13) & 1)) >> 13;
    const uint32_t small = bits_as<uint32_t>(bits_as<float>(a) + 0.5f) - 0x3f000000u;
    const uint32_t mantissa = (a >> 13) & 0x3ff;
    const uint32_t nan = 0x7c00 | select_bits(mantissa != 0, mantissa, 0x200);
    uint32_t h = select_bits(a < (113u << 23), small, normal);
    h = select_bits(a >= (143u << 23), 0x7c00, h);  // 2^16 and above: Inf
    h = select_bits(a > 0x7f800000u, nan, h);
    return Half{uint16_t(h | ((u >> 16) & 0x8000))};
  }
};

template <>
struct Element<BFloat16> {
  using Acc = float;
  static float load(BFloat16 v) { return bits_as<float>(uint32_t(v.bits) << 16); }
  static BFloat16 store(float v) {  // round to nearest even
    uint32_t u = bits_as<uint32_t>(v);
    if (v != v)  // the mantissa a load widened, or a quiet NaN
      return BFloat16{uint16_t(((u >> 16) & 0x7f) ? u >> 16 : (u >> 16) | 0x40)};
    u += 0x7fff + ((u >> 16) & 1);
    return BFloat16{uint16_t(u >> 16)};
  }
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
// Pooling: max over each bin, and its cell index.

// Pooling is the hot spot of every kernel (NCHW ones pool from an NHWC
// copy). Its bin loop is compiled once per instruction set, with everything
// it calls inlined (ROIPOOL_FLATTEN), and pool_bins_for_cpu picks the build for
// the CPU at run time (cpu_isa): on x86-64 the baseline ISA, AVX2 and
// AVX-512; elsewhere the baseline only.
enum class Isa { kBaseline, kAvx2, kAvx512 };

#if defined(__x86_64__) && defined(__GNUC__)
#define ROIPOOL_X86_ISAS 1
#define ROIPOOL_TARGET_AVX2 __attribute__((target("avx2")))
#define ROIPOOL_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq")))
#else
#define ROIPOOL_X86_ISAS 0
#endif
#define ROIPOOL_INLINE inline __attribute__((always_inline))
#define ROIPOOL_FLATTEN __attribute__((flatten))

// The widest instruction set this CPU runs.
Isa best_isa() {
#if ROIPOOL_X86_ISAS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2")) return Isa::kAvx2;
#endif
  return Isa::kBaseline;
}

// The build's name, as JAX_ROIPOOL_CPU_ISA and _cpu.cpu_isa() spell it.
const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "baseline";
  }
}

// The instruction set the kernels use: best_isa, capped by
// JAX_ROIPOOL_CPU_ISA ("baseline", "avx2" or "avx512", so that the tests can
// run every build on one machine). Read once, at the first kernel call.
// Importing jax_roipool rejects other values; one set after the import
// (where a kernel could not raise) is ignored: no cap.
Isa cpu_isa() {
  static const Isa isa = [] {
    const char* cap = std::getenv("JAX_ROIPOOL_CPU_ISA");
    Isa capped = Isa::kAvx512;
    for (Isa narrower : {Isa::kBaseline, Isa::kAvx2})
      if (cap != nullptr && std::strcmp(cap, isa_name(narrower)) == 0) capped = narrower;
    return std::min(best_isa(), capped);
  }();
  return isa;
}

// Fold one more cell (its `channels` values) into the running maxima of a
// bin, and (kArgmax) its index into their cells. Each lane loads the old
// maximum and always stores the new one, so the compiler emits compare +
// blend; a conditional store would become a masked store, which is very slow
// on some x86 cores.
template <bool kArgmax, typename T>
ROIPOOL_INLINE void fold_cell(const T* __restrict px,
                              typename Element<T>::Acc* __restrict best,
                              int32_t* __restrict best_cell, int32_t cell,
                              int64_t channels) {
  for (int64_t c = 0; c < channels; ++c) {
    const auto v = Element<T>::load(px[c]);
    const auto b = best[c];
    const bool take = replaces_max(v, b);
    best[c] = take ? v : b;
    if constexpr (kArgmax) {
      const int32_t i = best_cell[c];
      best_cell[c] = take ? cell : i;
    }
  }
}

// One bin of an NHWC image as the pooling loops walk it: rows sy x columns
// sx of cells, `stride` values apart; `first_cell` is the flat index of its
// first cell. The loops take a pointer to that cell's first pooled channel.
struct BinCells {
  Span sy, sx;
  int64_t width, stride;  // cells per row, values per cell
  int32_t first_cell;
};

// Pools channels [c0, c1) of a bin, any value type, one cell at a time, into
// y / arg; `best` and `best_cell` are scratch for the channels.
template <bool kArgmax, typename T>
ROIPOOL_INLINE void pool_channels(const T* first, const BinCells& b,
                                   int64_t c0, int64_t c1, T* y, int32_t* arg,
                                   typename Element<T>::Acc* best,
                                   int32_t* best_cell) {
  for (int64_t c = c0; c < c1; ++c) best[c] = Element<T>::load(first[c]);
  if constexpr (kArgmax) std::fill(best_cell + c0, best_cell + c1, b.first_cell);
  for (int32_t h = 0; h < b.sy.end - b.sy.begin; ++h) {
    // The first cell is already folded in.
    for (int32_t w = h == 0 ? 1 : 0; w < b.sx.end - b.sx.begin; ++w)
      fold_cell<kArgmax, T>(first + (h * b.width + w) * b.stride + c0,
                            best + c0, best_cell + c0,
                            b.first_cell + h * int32_t(b.width) + w, c1 - c0);
  }
  for (int64_t c = c0; c < c1; ++c) y[c] = Element<T>::store(best[c]);
  if constexpr (kArgmax) std::copy(best_cell + c0, best_cell + c1, arg + c0);
}

// float32, the hot loop of all three kernels, for AVX2 and AVX-512: channels
// [0, lanes * kVecs) of a bin, whose running maxima (and cells, kArgmax)
// stay in registers while the bin's cells stream through, into out / arg.
// Folding a cell into a register is a chain of dependent instructions
// (compare, blend), so several registers, independent chains, keep the core
// busy. The baseline ISA pools float32 with pool_channels, like the other
// types.
// AVX2 is written with GCC vector extensions (GCC turns the blendv
// intrinsics into an extra compare per blend), AVX-512 with intrinsics (its
// masks). Each carries its target: GCC lowers a function's vector code for
// the function's own target, before inlining.
#if ROIPOOL_X86_ISAS
typedef float F32x8 __attribute__((vector_size(32), aligned(4), may_alias));
typedef int32_t I32x8 __attribute__((vector_size(32), aligned(4), may_alias));

template <bool kArgmax, int kVecs>
ROIPOOL_TARGET_AVX2 inline void pool_block_f32_avx2(const float* __restrict first,
                                                    const BinCells& b,
                                                    float* __restrict out,
                                                    int32_t* __restrict arg) {
  F32x8 best[kVecs];
  I32x8 cell[kVecs];
  for (int v = 0; v < kVecs; ++v) {
    best[v] = *reinterpret_cast<const F32x8*>(first + 8 * v);
    cell[v] = I32x8{} + b.first_cell;
  }
  for (int32_t h = 0; h < b.sy.end - b.sy.begin; ++h) {
    // Cell index at (h, 0); a valid cell, so it fits in int32.
    const int32_t row_cell = b.first_cell + h * int32_t(b.width);
    const float* px = first + h * b.width * b.stride;
    // The first cell is already folded in.
    for (int32_t w = h == 0 ? 1 : 0; w < b.sx.end - b.sx.begin; ++w) {
      const I32x8 here = I32x8{} + (row_cell + w);
      for (int v = 0; v < kVecs; ++v) {
        const F32x8 x = *reinterpret_cast<const F32x8*>(px + w * b.stride + 8 * v);
        // replaces_max, lane-wise: !(x <= best) && best == best.
        const I32x8 take = ~(x <= best[v]) & (best[v] == best[v]);
        if constexpr (kArgmax) cell[v] = take ? here : cell[v];
        best[v] = take ? x : best[v];
      }
    }
  }
  for (int v = 0; v < kVecs; ++v) {
    *reinterpret_cast<F32x8*>(out + 8 * v) = best[v];
    if constexpr (kArgmax) *reinterpret_cast<I32x8*>(arg + 8 * v) = cell[v];
  }
}

template <bool kArgmax, int kVecs>
ROIPOOL_TARGET_AVX512 inline void pool_block_f32_avx512(
    const float* __restrict first, const BinCells& b, float* __restrict out,
    int32_t* __restrict arg) {
  __m512 best[kVecs];
  __m512i cell[kVecs];
  for (int v = 0; v < kVecs; ++v) {
    best[v] = _mm512_loadu_ps(first + 16 * v);
    cell[v] = _mm512_set1_epi32(b.first_cell);
  }
  for (int32_t h = 0; h < b.sy.end - b.sy.begin; ++h) {
    const int32_t row_cell = b.first_cell + h * int32_t(b.width);
    const float* px = first + h * b.width * b.stride;
    for (int32_t w = h == 0 ? 1 : 0; w < b.sx.end - b.sx.begin; ++w) {
      const __m512i here = _mm512_set1_epi32(row_cell + w);
      for (int v = 0; v < kVecs; ++v) {
        const __m512 x = _mm512_loadu_ps(px + w * b.stride + 16 * v);
        // replaces_max: !(x <= best) && best == best.
        const __mmask16 take = _mm512_cmp_ps_mask(x, best[v], _CMP_NLE_UQ) &
                               _mm512_cmp_ps_mask(best[v], best[v], _CMP_EQ_OQ);
        if constexpr (kArgmax) cell[v] = _mm512_mask_mov_epi32(cell[v], take, here);
        best[v] = _mm512_mask_mov_ps(best[v], take, x);
      }
    }
  }
  for (int v = 0; v < kVecs; ++v) {
    _mm512_storeu_ps(out + 16 * v, best[v]);
    if constexpr (kArgmax) _mm512_storeu_si512(arg + 16 * v, cell[v]);
  }
}

// Pools the float32 channels [0, n) of a bin in as many whole register
// blocks as fit; returns how many it pooled. AVX2's widest blocks hold as
// many chains as its 16 registers fit; AVX-512's hold four, the count that
// was measured (more were not tried).
template <Isa kIsa, bool kArgmax>
ROIPOOL_INLINE int64_t pool_blocks_f32(const float* first, const BinCells& b,
                                       int64_t n, float* out, int32_t* arg) {
  int64_t c = 0;
  auto arg_at = [arg](int64_t channel) { return kArgmax ? arg + channel : nullptr; };
  if constexpr (kIsa == Isa::kAvx512) {
    for (; c + 64 <= n; c += 64)
      pool_block_f32_avx512<kArgmax, 4>(first + c, b, out + c, arg_at(c));
    for (; c + 16 <= n; c += 16)
      pool_block_f32_avx512<kArgmax, 1>(first + c, b, out + c, arg_at(c));
  } else if constexpr (kIsa == Isa::kAvx2) {
    // 16 registers: tracking cells as well takes twice as many per chain.
    constexpr int kVecs = kArgmax ? 4 : 8;
    for (; c + 8 * kVecs <= n; c += 8 * kVecs)
      pool_block_f32_avx2<kArgmax, kVecs>(first + c, b, out + c, arg_at(c));
    for (; c + 8 <= n; c += 8)
      pool_block_f32_avx2<kArgmax, 1>(first + c, b, out + c, arg_at(c));
  }
  return c;
}
#endif  // ROIPOOL_X86_ISAS

// The channels [begin, begin + count) of every cell: all of C, or the block
// one worker of a channel-split scatter owns.
struct Channels {
  int64_t begin, count;
};

// The bins [k_begin, k_end) (flat ph * PW + pw) of one RoI, channels `ch`,
// of an NHWC image [H, W, C], to pool into out[(k - k_begin) * ch.count + j]
// (channel ch.begin + j), and (argmax non-null) their cells into argmax
// likewise. `best` and `best_cell` are scratch for ch.count values.
template <typename T, typename C>
struct BinJob {
  const T* image;
  const RoiGrid<C>& g;
  const FeatureShape& f;
  const PooledShape& p;
  int32_t bins;
  Channels ch;
  int64_t k_begin, k_end;
  T* out;
  int32_t* argmax;
  typename Element<T>::Acc* best;
  int32_t* best_cell;
};

template <Isa kIsa, bool kArgmax, typename T, typename C>
ROIPOOL_INLINE void pool_bins_nhwc_loop(const BinJob<T, C>& job) {
  using Acc = typename Element<T>::Acc;
  const RoiGrid<C>& g = job.g;
  const FeatureShape& f = job.f;
  const PooledShape& p = job.p;
  const int32_t row0 = int32_t(g.batch * f.h);
  const int64_t nc = job.ch.count;
  for (int64_t k = job.k_begin; k < job.k_end; ++k) {
    const int32_t ph = int32_t(k / p.pw), pw = int32_t(k % p.pw);
    const Span sy = bin_span(g.y, ph, int32_t(p.ph), int32_t(f.h), job.bins);
    const Span sx = bin_span(g.x, pw, int32_t(p.pw), int32_t(f.w), job.bins);
    T* y = job.out + (k - job.k_begin) * nc;
    int32_t* arg = kArgmax ? job.argmax + (k - job.k_begin) * nc : nullptr;
    if (!g.valid || sy.empty() || sx.empty()) {
      std::fill(y, y + nc, Element<T>::store(Acc(0)));
      if constexpr (kArgmax) std::fill(arg, arg + nc, -1);
      continue;
    }
    const BinCells cells{sy, sx, f.w, f.c,
                         (row0 + sy.begin) * int32_t(f.w) + sx.begin};
    const T* first =
        job.image + (int64_t(sy.begin) * f.w + sx.begin) * f.c + job.ch.begin;
    int64_t c0 = 0;  // channels [0, c0) done
#if ROIPOOL_X86_ISAS
    if constexpr (std::is_same_v<T, float>)
      c0 = pool_blocks_f32<kIsa, kArgmax>(first, cells, nc, y, arg);
#endif
    if (c0 < nc)
      pool_channels<kArgmax>(first, cells, c0, nc, y, arg, job.best, job.best_cell);
  }
}

// The bin loop of each instruction set, everything inlined into it.
template <bool kArgmax, typename T, typename C>
ROIPOOL_FLATTEN void pool_bins_baseline(const BinJob<T, C>& job) {
  pool_bins_nhwc_loop<Isa::kBaseline, kArgmax>(job);
}
#if ROIPOOL_X86_ISAS
template <bool kArgmax, typename T, typename C>
ROIPOOL_TARGET_AVX2 ROIPOOL_FLATTEN void pool_bins_avx2(const BinJob<T, C>& job) {
  pool_bins_nhwc_loop<Isa::kAvx2, kArgmax>(job);
}
template <bool kArgmax, typename T, typename C>
ROIPOOL_TARGET_AVX512 ROIPOOL_FLATTEN void pool_bins_avx512(const BinJob<T, C>& job) {
  pool_bins_nhwc_loop<Isa::kAvx512, kArgmax>(job);
}
#endif

template <bool kArgmax, typename T, typename C>
void pool_bins_for_cpu(const BinJob<T, C>& job) {
#if ROIPOOL_X86_ISAS
  switch (cpu_isa()) {
    case Isa::kAvx512:
      return pool_bins_avx512<kArgmax>(job);
    case Isa::kAvx2:
      return pool_bins_avx2<kArgmax>(job);
    default:
      break;
  }
#endif
  pool_bins_baseline<kArgmax>(job);
}

// Pools the bins of `job`, with their cells when job.argmax is non-null.
template <typename T, typename C>
void pool_bins_nhwc(const BinJob<T, C>& job) {
  if (job.argmax)
    pool_bins_for_cpu<true>(job);
  else
    pool_bins_for_cpu<false>(job);
}

// NHWC forward: each RoI's bins go straight to the output. The RoIs are
// those of places [slot_begin, slot_end) of the pooling order.
template <typename T, typename C>
void forward_nhwc(const T* features, const C* rois, const PoolCall& s,
                  T* out, int32_t* argmax, C scale, int32_t bins,
                  int64_t slot_begin, int64_t slot_end) {
  const FeatureShape& f = s.f;
  const PooledShape& p = s.p;
  std::vector<typename Element<T>::Acc> best(f.c);
  std::vector<int32_t> best_cell(argmax ? f.c : 0);
  const int64_t roi_size = p.ph * p.pw * f.c;
  for (int64_t slot = slot_begin; slot < slot_end; ++slot) {
    const int64_t r = roi_in_order(s.order, slot, p.r);
    if (r < 0) continue;
    const RoiGrid<C> g = make_roi_grid<C>(rois + 5 * r, scale, f.n,
                                          int32_t(p.ph), int32_t(p.pw), bins);
    pool_bins_nhwc(BinJob<T, C>{features + g.batch * f.h * f.w * f.c, g, f, p,
                                bins, Channels{0, f.c}, 0, p.ph * p.pw,
                                out + r * roi_size,
                                argmax ? argmax + r * roi_size : nullptr,
                                best.data(), best_cell.data()});
  }
}

// How many bins pool_in_chunks pools at a time: about 16K values.
inline int64_t bins_per_chunk(const PooledShape& p, const Channels& ch) {
  constexpr int64_t kChunkElements = 16 * 1024;
  return std::min(p.ph * p.pw,
                  std::max<int64_t>(1, kChunkElements / std::max<int64_t>(ch.count, 1)));
}

// Pools the RoIs of places [slot_begin, slot_end) of the pooling order,
// channels `ch`, from NHWC features a cache-sized chunk of bins at a time,
// and hands every chunk to
// consume(r, k0, k1, max, arg): bins [k0, k1) of RoI r, their maxima and
// (when with_argmax) cells at [(k - k0) * ch.count + j] for channel
// ch.begin + j. Cells index the images the RoIs name (s.images), whichever
// features image they pool. The kernels other than the NHWC forward are
// this plus what they do with a chunk.
template <typename T, typename C, typename Consume>
void pool_in_chunks(const T* features_nhwc, const C* rois, const PoolCall& s,
                    C scale, int32_t bins, const Channels& ch, bool with_argmax,
                    int64_t slot_begin, int64_t slot_end, Consume&& consume) {
  const FeatureShape& f = s.f;
  const PooledShape& p = s.p;
  const int64_t bin_plane = p.ph * p.pw;
  const int64_t chunk_bins = bins_per_chunk(p, ch);
  std::vector<typename Element<T>::Acc> best(ch.count);
  std::vector<int32_t> best_cell(with_argmax ? ch.count : 0);
  std::vector<T> chunk_max(chunk_bins * ch.count);
  std::vector<int32_t> chunk_arg(with_argmax ? chunk_bins * ch.count : 0);
  int32_t* arg = with_argmax ? chunk_arg.data() : nullptr;
  for (int64_t slot = slot_begin; slot < slot_end; ++slot) {
    const int64_t r = roi_in_order(s.order, slot, p.r);
    if (r < 0) continue;
    const RoiGrid<C> g = make_roi_grid<C>(rois + 5 * r, scale, s.images.count(),
                                          int32_t(p.ph), int32_t(p.pw), bins);
    const T* image = features_nhwc + s.images.features_image(g.batch) * f.h * f.w * f.c;
    for (int64_t k0 = 0; k0 < bin_plane; k0 += chunk_bins) {
      const int64_t k1 = std::min(bin_plane, k0 + chunk_bins);
      pool_bins_nhwc(BinJob<T, C>{image, g, f, p, bins, ch, k0, k1,
                                  chunk_max.data(), arg, best.data(),
                                  best_cell.data()});
      consume(r, k0, k1, chunk_max.data(), arg);
    }
  }
}

#if defined(__SSE2__)
// dst[j * dst_stride + i] = src[i * src_stride + j] for i, j < 4, in SSE
// registers: 2-, 4- and 8-byte values move as integer, float or double
// lanes, bit exact (the unaligned SSE types may alias any type).
template <typename U>
inline void transpose_block_sse(const U* src, int64_t src_stride, U* dst,
                                int64_t dst_stride) {
  static_assert(sizeof(U) == 2 || sizeof(U) == 4 || sizeof(U) == 8);
  const auto row = [&](int i) { return src + i * src_stride; };
  const auto col = [&](int j) { return dst + j * dst_stride; };
  if constexpr (sizeof(U) == 2) {
    const auto load = [&](int i) {
      return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row(i)));
    };
    const __m128i r01 = _mm_unpacklo_epi16(load(0), load(1));
    const __m128i r23 = _mm_unpacklo_epi16(load(2), load(3));
    const __m128i c01 = _mm_unpacklo_epi32(r01, r23), c23 = _mm_unpackhi_epi32(r01, r23);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(col(0)), c01);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(col(1)), _mm_unpackhi_epi64(c01, c01));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(col(2)), c23);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(col(3)), _mm_unpackhi_epi64(c23, c23));
  } else if constexpr (sizeof(U) == 4) {
    const auto load = [&](int i) { return _mm_loadu_ps(reinterpret_cast<const float*>(row(i))); };
    __m128 r0 = load(0), r1 = load(1), r2 = load(2), r3 = load(3);
    _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
    _mm_storeu_ps(reinterpret_cast<float*>(col(0)), r0);
    _mm_storeu_ps(reinterpret_cast<float*>(col(1)), r1);
    _mm_storeu_ps(reinterpret_cast<float*>(col(2)), r2);
    _mm_storeu_ps(reinterpret_cast<float*>(col(3)), r3);
  } else {
    // Four 2 x 2 blocks of two-lane registers.
    for (int i = 0; i < 4; i += 2)
      for (int j = 0; j < 4; j += 2) {
        const __m128d a = _mm_loadu_pd(reinterpret_cast<const double*>(row(i) + j));
        const __m128d b = _mm_loadu_pd(reinterpret_cast<const double*>(row(i + 1) + j));
        _mm_storeu_pd(reinterpret_cast<double*>(col(j) + i), _mm_unpacklo_pd(a, b));
        _mm_storeu_pd(reinterpret_cast<double*>(col(j + 1) + i), _mm_unpackhi_pd(a, b));
      }
  }
}
#endif

// dst[j * dst_stride + i] = src[i * src_stride + j] for i < rows and
// j < cols: the copy between an NHWC-ordered buffer and an NCHW one. It goes
// in 4 x 4 blocks, each (with SSE) a few vector loads, shuffles and vector
// stores instead of 32 scalar moves.
template <typename U>
void transpose_copy(const U* __restrict src, int64_t src_stride,
                    U* __restrict dst, int64_t dst_stride, int64_t rows,
                    int64_t cols) {
  constexpr int64_t kBlock = 4;
  const auto copy = [&](int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t j = j0; j < j1; ++j) dst[j * dst_stride + i] = src[i * src_stride + j];
  };
  const int64_t block_rows = rows - rows % kBlock, block_cols = cols - cols % kBlock;
  for (int64_t i = 0; i < block_rows; i += kBlock) {
    for (int64_t j = 0; j < block_cols; j += kBlock) {
#if defined(__SSE2__)
      transpose_block_sse(src + i * src_stride + j, src_stride, dst + j * dst_stride + i,
                          dst_stride);
#else
      copy(i, i + kBlock, j, j + kBlock);
#endif
    }
    copy(i, i + kBlock, block_cols, cols);
  }
  copy(block_rows, rows, 0, cols);
}

// acc[arg[j] * channels + j] += cot[j] for `count` consecutive channels of
// one bin, acc being a gradient-sized NHWC accumulator offset by the first of
// them. A bin names a cell in every channel or (empty bin, invalid RoI) in
// none.
template <typename T>
void add_at_cells(const int32_t* __restrict arg, const T* __restrict cot,
                  typename Element<T>::Acc* __restrict acc, int64_t channels,
                  int64_t count) {
  if (count == 0 || arg[0] < 0) return;
  using Acc = typename Element<T>::Acc;
  const auto add = [&](const Acc* values, int64_t j0, int64_t n) {
    for (int64_t j = 0; j < n; ++j)
      acc[int64_t(arg[j0 + j]) * channels + j0 + j] += values[j];
  };
  if constexpr (std::is_same_v<T, Acc>) {
    add(cot, 0, count);
  } else {
    // 16-bit values are widened in a loop of their own, which vectorizes;
    // the scattered adds cannot, and widening float16 inside them took
    // most of the float16 backward.
    constexpr int64_t kBlock = 256;
    Acc wide[kBlock];
    for (int64_t j0 = 0; j0 < count; j0 += kBlock) {
      const int64_t n = std::min(kBlock, count - j0);
      for (int64_t j = 0; j < n; ++j) wide[j] = Element<T>::load(cot[j0 + j]);
      add(wide, j0, n);
    }
  }
}

// Offset of channel 0 of feature row `row` (= n * H + h; its first cell is
// row * W) in an NCHW buffer.
inline int64_t nchw_row_start(int64_t row, const FeatureShape& f) {
  return cell_offset(row * f.w, 0, f.c, f.h * f.w, kNCHW);
}

// [N, C, H, W] -> [N, H, W, C], split over images and rows.
template <typename T>
void transpose_to_nhwc(ffi::ThreadPool& pool, const T* src, T* dst,
                       const FeatureShape& f) {
  const int64_t rows = f.n * f.h;
  parallel_for(pool, rows, grain_for(pool, rows), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row)
      transpose_copy(src + nchw_row_start(row, f), f.h * f.w,
                     dst + row * f.w * f.c, f.c, f.c, f.w);
  });
}

// The features in NHWC order: themselves, or (NCHW) a transposed copy kept
// in `storage`, so that the channel loops vectorise in both layouts.
template <typename T>
const T* nhwc_features(ffi::ThreadPool& pool, const T* features,
                       const FeatureShape& f, int32_t layout,
                       std::vector<T>& storage) {
  if (layout == kNHWC) return features;
  storage.resize(f.n * f.h * f.w * f.c);
  transpose_to_nhwc(pool, features, storage.data(), f);
  return storage.data();
}

template <typename T>
const T* data_of(const ffi::AnyBuffer& buffer) {
  return reinterpret_cast<const T*>(buffer.untyped_data());
}
template <typename T>
T* data_of(ffi::Result<ffi::AnyBuffer>& buffer) {
  return reinterpret_cast<T*>(buffer->untyped_data());
}

// Dispatches on the value type of `values` (Half and BFloat16 as raw bits)
// and the coordinate type of `rois`: fn(TypeTag<T>, TypeTag<C>).
template <typename F>
ffi::Error dispatch_types(const ffi::AnyBuffer& values,
                          const ffi::AnyBuffer& rois, F&& fn) {
  return roipool::dispatch_types<Half, BFloat16>(values, rois,
                                                 std::forward<F>(fn));
}

// That the pooling order, here in host memory, is a permutation of [0, R),
// as the lowering's always is. A hand-written custom call's might name a RoI
// twice or not at all (leaving its outputs unwritten, or having two workers
// write one output); the CUDA kernels, whose order lies on the device,
// skip entries outside [0, R) instead.
ffi::Error check_order_is_permutation(const PoolCall& s) {
  if (!s.order) return ffi::Error::Success();
  std::vector<bool> named(s.p.r);
  for (int64_t slot = 0; slot < s.p.r; ++slot) {
    const int64_t r = roi_in_order(s.order, slot, s.p.r);
    if (r < 0 || named[r])
      return ffi::Error::InvalidArgument(
          "roi_pool: order must be a permutation of [0, R)");
    named[r] = true;
  }
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::AnyBuffer features,
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
  if (auto err = check_order_is_permutation(s); err.failure()) return err;
  // An empty argmax result asks for the maxima alone (no gradient needed).
  const bool with_argmax = argmax->element_count() != 0;
  const FeatureShape& f = s.f;
  const PooledShape& p = s.p;
  return dispatch_types(features, rois, [&](auto value_tag, auto coord_tag) {
    using T = typename decltype(value_tag)::type;
    using C = typename decltype(coord_tag)::type;
    const C* boxes = data_of<C>(rois);
    T* y = data_of<T>(out);
    int32_t* idx = with_argmax ? argmax->typed_data() : nullptr;
    const C scale = C(spatial_scale);
    advise_huge_pages(y, out->size_bytes());
    if (idx) advise_huge_pages(idx, argmax->size_bytes());
    if (p.r == 0 || f.c == 0) return ffi::Error::Success();  // nothing to pool
    const int64_t grain = grain_for(pool, p.r);
    if (layout == kNHWC) {
      parallel_for(pool, p.r, grain, [&](int64_t begin, int64_t end) {
        forward_nhwc(data_of<T>(features), boxes, s, y, idx, scale, bins, begin, end);
      });
      return ffi::Error::Success();
    }
    // NCHW: chunks of bins are transposed into each RoI's [C, PH, PW].
    std::vector<T> storage;
    const T* x = nhwc_features(pool, data_of<T>(features), f, layout, storage);
    const Channels all{0, f.c};
    const int64_t bin_plane = p.ph * p.pw;
    parallel_for(pool, p.r, grain, [&](int64_t begin, int64_t end) {
      pool_in_chunks(x, boxes, s, scale, bins, all, idx != nullptr,
                     begin, end, [&](int64_t r, int64_t k0, int64_t k1,
                              const T* max, const int32_t* arg) {
                       const int64_t o = pooled_offset(r, k0, 0, f.c, bin_plane, layout);
                       transpose_copy(max, f.c, y + o, bin_plane, k1 - k0, f.c);
                       if (idx) transpose_copy(arg, f.c, idx + o, bin_plane, k1 - k0, f.c);
                     });
    });
    return ffi::Error::Success();
  });
}

// ---------------------------------------------------------------------------
// Gather at the argmax (the JVP's tangent): out[o] = source[cell(o), c], 0
// for an empty bin, where cell(o) is the cell the forward picks for o.

ffi::Error Gather(ffi::ThreadPool pool, ffi::AnyBuffer source,
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
  if (auto err = check_order_is_permutation(s); err.failure()) return err;
  const FeatureShape& f = s.f;
  const PooledShape& p = s.p;
  return dispatch_types(features, rois, [&](auto value_tag, auto coord_tag) {
    using T = typename decltype(value_tag)::type;
    using C = typename decltype(coord_tag)::type;
    const T* src = data_of<T>(source);
    T* y = data_of<T>(out);
    advise_huge_pages(y, out->size_bytes());
    if (p.r == 0 || f.c == 0) return ffi::Error::Success();
    std::vector<T> storage;
    const T* x = nhwc_features(pool, data_of<T>(features), f, layout, storage);
    const Channels all{0, f.c};
    const int64_t plane = f.h * f.w;
    const T zero = Element<T>::store(0);
    const int64_t bin_plane = p.ph * p.pw;
    parallel_for(pool, p.r, grain_for(pool, p.r), [&](int64_t begin, int64_t end) {
      pool_in_chunks(
          x, data_of<C>(rois), s, C(spatial_scale), bins, all, true, begin, end,
          [&](int64_t r, int64_t k0, int64_t k1, const T*, const int32_t* arg) {
            const auto gathered = [&](int64_t k, int64_t c) {  // bin k0 + k
              const int32_t cell = arg[k * f.c + c];
              return cell < 0 ? zero : src[cell_offset(cell, c, f.c, plane, layout)];
            };
            // In the output's order, so that consecutive reads of `src` stay
            // in one channel plane (NCHW) or one cell (NHWC).
            T* first = y + pooled_offset(r, k0, 0, f.c, bin_plane, layout);
            if (layout == kNCHW) {
              for (int64_t c = 0; c < f.c; ++c)
                for (int64_t k = 0; k < k1 - k0; ++k) first[c * bin_plane + k] = gathered(k, c);
            } else {
              for (int64_t k = 0; k < k1 - k0; ++k)
                for (int64_t c = 0; c < f.c; ++c) first[k * f.c + c] = gathered(k, c);
            }
          });
    });
    return ffi::Error::Success();
  });
}

// ---------------------------------------------------------------------------
// Scatter-add at the argmax (the gather's transpose): grad[cell(o), c] +=
// cotangent[o]. Without atomics and in a fixed summation order
// (deterministic for a given thread count), by one of two splits:
// - RoIs: each worker pools a contiguous range of the pooling order and
//   adds into its own gradient-sized accumulator; the accumulators are summed
//   in worker order. Each RoI's cotangent streams through in order and its
//   cells stay in cache. Needs one accumulator per worker, so it is used
//   when they fit kPrivateBudget.
// - channels: each worker pools all RoIs for its own block of channels, so
//   no two workers add into the same element. One accumulator in all.
// Accumulators are NHWC-ordered; 16-bit types accumulate in float. The
// gradient may hold copies of the features' images (SourceImages).

constexpr int64_t kPrivateBudget = int64_t(128) << 20;  // bytes

ffi::Error Scatter(ffi::ThreadPool pool, ffi::AnyBuffer cotangent,
                   ffi::AnyBuffer features, ffi::AnyBuffer rois,
                   ffi::Buffer<ffi::S32> order, ffi::Result<ffi::AnyBuffer> grad,
                   int32_t pooled_h, int32_t pooled_w, double spatial_scale,
                   int32_t layout, int32_t bins) {
  PoolCall s;
  if (auto err = check_argmax_op_call(false, cotangent, features, rois, order, grad,
                                      features.element_type(), pooled_h,
                                      pooled_w, layout, bins, &s);
      err.failure())
    return err;
  if (auto err = check_order_is_permutation(s); err.failure()) return err;
  const FeatureShape& f = s.f;
  const PooledShape& p = s.p;
  return dispatch_types(features, rois, [&](auto value_tag, auto coord_tag) {
    using T = typename decltype(value_tag)::type;
    using C = typename decltype(coord_tag)::type;
    using Acc = typename Element<T>::Acc;
    const T* cot = data_of<T>(cotangent);
    T* out = data_of<T>(grad);
    if (grad->element_count() == 0) return ffi::Error::Success();
    advise_huge_pages(out, grad->size_bytes());
    std::vector<T> storage;
    const T* x = nhwc_features(pool, data_of<T>(features), f, layout, storage);
    const int64_t size = grad->element_count();
    // The pool's threads (the calling thread helps too, but more accumulators
    // than cores would only add memory traffic).
    const int64_t workers = std::max<int64_t>(pool.num_threads(), 1);
    const bool split_rois =
        workers > 1 && workers * size * int64_t(sizeof(Acc)) <= kPrivateBudget;
    std::vector<std::vector<Acc>> partial(split_rois ? workers : 1);
    const int64_t bin_plane = p.ph * p.pw;
    // Pools the RoIs of places [slot0, slot1) of the pooling order, channels
    // ch, adding the cotangent into acc.
    auto add = [&](Acc* acc, const Channels& ch, int64_t slot0, int64_t slot1) {
      // One chunk of pool_in_chunks (NCHW only).
      std::vector<T> cot_buffer(layout == kNHWC ? 0 : bins_per_chunk(p, ch) * ch.count);
      pool_in_chunks(
          x, data_of<C>(rois), s, C(spatial_scale), bins, ch, true, slot0, slot1,
          [&](int64_t r, int64_t k0, int64_t k1, const T*, const int32_t* arg) {
            // The chunk's cotangent: read in place (NHWC, bins f.c apart),
            // or copied into the chunk's order (NCHW).
            const T* in_place = cot + pooled_offset(r, k0, ch.begin, f.c, bin_plane, layout);
            const T* chunk_cot = in_place;
            int64_t bin_stride = f.c;
            if (layout == kNCHW) {
              transpose_copy(in_place, bin_plane, cot_buffer.data(), ch.count, ch.count, k1 - k0);
              chunk_cot = cot_buffer.data();
              bin_stride = ch.count;
            }
            for (int64_t k = 0; k < k1 - k0; ++k)
              add_at_cells(arg + k * ch.count, chunk_cot + k * bin_stride,
                           acc + ch.begin, f.c, ch.count);
          });
    };
    if (split_rois) {
      parallel_for(pool, workers, 1, [&](int64_t begin, int64_t end) {
        for (int64_t w = begin; w < end; ++w) {
          partial[w].assign(size, Acc(0));
          add(partial[w].data(), Channels{0, f.c}, p.r * w / workers,
              p.r * (w + 1) / workers);
        }
      });
    } else {
      partial[0].assign(size, Acc(0));
      // Multiples of 16 channels keep the workers' writes on separate cache
      // lines.
      const int64_t block = (f.c + 16 * workers - 1) / (16 * workers) * 16;
      const int64_t blocks = (f.c + block - 1) / block;
      parallel_for(pool, blocks, 1, [&](int64_t begin, int64_t end) {
        const int64_t c0 = begin * block, c1 = std::min(f.c, end * block);
        add(partial[0].data(), Channels{c0, c1 - c0}, 0, p.r);
      });
    }
    // Row by row, the accumulators are summed into the first in worker order
    // and the sum is stored; each loop is a plain one, which vectorizes.
    const int64_t rows = s.images.count() * f.h, row_size = f.w * f.c;
    Acc* total = partial[0].data();
    parallel_for(pool, rows, grain_for(pool, rows), [&](int64_t begin, int64_t end) {
      // NCHW: a row is stored in NHWC order here, then transposed into out.
      std::vector<T> row_buffer(layout == kNHWC ? 0 : row_size);
      for (int64_t row = begin; row < end; ++row) {
        Acc* __restrict sum = total + row * row_size;
        for (size_t w = 1; w < partial.size(); ++w) {
          const Acc* __restrict part = partial[w].data() + row * row_size;
          for (int64_t j = 0; j < row_size; ++j) sum[j] += part[j];
        }
        T* __restrict stored = layout == kNHWC ? out + row * row_size : row_buffer.data();
        for (int64_t j = 0; j < row_size; ++j) stored[j] = Element<T>::store(sum[j]);
        if (layout == kNCHW)
          transpose_copy(stored, f.c, out + nchw_row_start(row, f), f.h * f.w, f.w, f.c);
      }
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
  m.def("cpu_isa", []() { return roipool::isa_name(roipool::cpu_isa()); },
        "Instruction set of the pooling loops: baseline, avx2 or avx512.");
  m.def("best_cpu_isa", []() { return roipool::isa_name(roipool::best_isa()); },
        "The widest instruction set of this CPU that the kernels have a build for.");
}
