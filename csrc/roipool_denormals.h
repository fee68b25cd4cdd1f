// Exact denormals for the CPU kernels' bodies.
//
// XLA runs CPU computations, its thread pool included, with denormals
// flushed to zero: FTZ/DAZ in MXCSR on x86-64, FPCR.FZ on AArch64. Flushed,
// all subnormals compare equal to 0, so the max of a bin of subnormals would
// keep the first cell where torchvision and the CUDA kernels keep the
// largest. A kernel body runs inside an ExactDenormals scope, which keeps
// denormals and restores the caller's mode when it ends. On other CPUs the
// runtime's mode is kept.
#pragma once

#include <cstdint>

#if defined(__SSE__)
#include <xmmintrin.h>
#endif

namespace roipool {

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
#elif defined(__aarch64__) && defined(__GNUC__)
  // FPCR.FZ flushes float and double denormals, as inputs and as results
  // (FZ16, for half-precision arithmetic, does not matter: the kernels
  // compare 16-bit values in float).
  ExactDenormals() : saved_(fpcr()) {
    constexpr uint64_t kFlushToZero = uint64_t(1) << 24;
    set_fpcr(saved_ & ~kFlushToZero);
  }
  ~ExactDenormals() { set_fpcr(saved_); }

 private:
  static uint64_t fpcr() {
    uint64_t value;
    asm volatile("mrs %0, fpcr" : "=r"(value) : : "memory");
    return value;
  }
  // "memory": no load or store of the kernel moves across the mode change.
  static void set_fpcr(uint64_t value) {
    asm volatile("msr fpcr, %0" : : "r"(value) : "memory");
  }
  uint64_t saved_;
#endif
};

}  // namespace roipool
