// roipool::to_binary16 (csrc/roipool_geometry.h) against the compiler's own
// float -> _Float16 conversion (IEEE, round to nearest even), for every one of
// the 2^32 float bit patterns: the same value, or NaN for NaN. Prints the
// first mismatches and exits 1 if there are any.
#include <cstdio>
#include <cmath>
#include <cstring>

#include "roipool_geometry.h"

int main() {
  unsigned long long mismatches = 0;
  uint32_t bits = 0;
  do {
    float v;
    memcpy(&v, &bits, sizeof v);
    const float got = roipool::to_binary16(v);
    const float want = static_cast<float>(static_cast<_Float16>(v));
    const bool same = got == want ? (got != 0 || std::signbit(got) == std::signbit(want))
                                  : (got != got && want != want);
    if (!same && ++mismatches <= 10) {
      printf("0x%08x (%a): got %a, want %a\n", bits, v, got, want);
    }
  } while (++bits != 0);
  printf("%llu mismatches\n", mismatches);
  return mismatches ? 1 : 0;
}
