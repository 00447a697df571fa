// What the CPU kernels' tests share: the instruction-set path a test runs (its one argument, a cpu/isa.h name;
// ctest runs each test once per path), and the sampling of cases on the paths a process would not pick.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <string>

#include "cpu/isa.h"

namespace llama_kernels::cpu::testing {

// A path this CPU lacks exits with this code, which ctest reports as skipped (SKIP_RETURN_CODE).
inline constexpr int kSkipped = 77;

struct IsaUnderTest {
  CpuIsa isa;
  bool widest;  // the path this CPU's processes run: every case; the narrower ones run every third
  int listed = 0;

  // Whether the next case runs.
  bool sample() { return widest || listed++ % 3 == 0; }
};

inline IsaUnderTest isa_under_test(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s avx2|avx512|avx512_bf16|amx\n", argv[0]);
    std::exit(2);
  }
  for (CpuIsa isa : kCpuIsas) {
    if (std::string(argv[1]) != isa_name(isa)) continue;
    if (!cpu_has(isa)) {
      std::printf("skipped: this CPU has no %s path (it has: %s)\n", argv[1], cpu_isas_available().c_str());
      std::exit(kSkipped);
    }
    bool widest = true;
    for (CpuIsa other : kCpuIsas) widest = widest && (other <= isa || !cpu_has(other));
    std::printf("path %s%s\n", argv[1], widest ? " (this CPU's widest: every case)" : " (every third case)");
    return {isa, widest};
  }
  std::fprintf(stderr, "%s: no instruction-set path %s (expected avx2, avx512, avx512_bf16 or amx)\n", argv[0],
               argv[1]);
  std::exit(2);
}

}  // namespace llama_kernels::cpu::testing
