// roipool::ExactDenormals on this CPU: with denormals flushed as XLA's CPU
// runtime flushes them, a scope compares and produces subnormals exactly,
// and the caller's mode is back when it ends. Exit status 0 when it holds.
// Built and run by tests/test_exact_denormals.py; for AArch64 on an x86
// machine: aarch64-linux-gnu-g++ -std=c++17 -static -I csrc <this file>,
// then run the program under qemu-aarch64.
#include <cstdint>
#include <cstdio>

#include "roipool_denormals.h"

// Sets or clears the flushing mode the way XLA does.
static void flush_denormals(bool on) {
#if defined(__SSE__)
  constexpr unsigned kFlush = (1u << 15) | (1u << 6);  // FTZ and DAZ
  const unsigned csr = _mm_getcsr();
  _mm_setcsr(on ? csr | kFlush : csr & ~kFlush);
#elif defined(__aarch64__)
  constexpr uint64_t kFlush = uint64_t(1) << 24;  // FPCR.FZ
  uint64_t fpcr;
  asm volatile("mrs %0, fpcr" : "=r"(fpcr));
  fpcr = on ? fpcr | kFlush : fpcr & ~kFlush;
  asm volatile("msr fpcr, %0" : : "r"(fpcr));
#else
  (void)on;
#endif
}

// Out of line and through volatile, so that nothing is folded at compile time.
__attribute__((noinline)) static bool less(volatile float a, volatile float b) { return a < b; }
__attribute__((noinline)) static float halve(volatile float a) { return a * 0.5f; }

static bool exact_here() {
  const float smaller = 1e-41f, larger = 1e-40f;  // both subnormal
  return less(smaller, larger) && halve(1e-38f) != 0.0f;
}

int main() {
#if !defined(__SSE__) && !defined(__aarch64__)
  std::printf("no flushing mode on this CPU: nothing to check\n");
  return 0;
#else
  flush_denormals(true);
  const bool flushed_before = !exact_here();
  bool exact_inside;
  {
    roipool::ExactDenormals scope;
    exact_inside = exact_here();
  }
  const bool flushed_after = !exact_here();
  flush_denormals(false);
  std::printf("flushed before: %d, exact inside: %d, flushed after: %d\n", flushed_before,
              exact_inside, flushed_after);
  return flushed_before && exact_inside && flushed_after ? 0 : 1;
#endif
}
