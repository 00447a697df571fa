// The choice of the CPU kernels' instruction-set path (isa.h), once per process.
#include "cpu/isa.h"

#include <cstdlib>
#include <stdexcept>

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace llama_kernels::cpu {
namespace {

// Linux lends the AMX tile data state (8 KiB per thread) only to a process that asks (arch_prctl, Linux >= 5.16).
bool amx_permitted() {
#if defined(LLAMA_KERNELS_AMX_EMULATED)
  return true;  // ctest's build: its tiles are emulated (amx.h), with no tile state to ask for
#elif defined(__linux__)
  constexpr int kArchReqXcompPerm = 0x1023;
  constexpr int kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

bool cpu_supports(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case CpuIsa::avx512:
      return cpu_supports(CpuIsa::avx2) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    case CpuIsa::avx512_bf16:
      return cpu_supports(CpuIsa::avx512) && __builtin_cpu_supports("avx512bf16");
    case CpuIsa::amx:
#if defined(LLAMA_KERNELS_AMX_EMULATED)
      return cpu_supports(CpuIsa::avx512_bf16);  // ctest's build, whose tiles are emulated
#else
      return cpu_supports(CpuIsa::avx512_bf16) && __builtin_cpu_supports("amx-tile") &&
             __builtin_cpu_supports("amx-bf16");
#endif
  }
  return false;
}

CpuIsa choose_isa() {
  const char* forced = std::getenv("LLAMA_KERNELS_CPU_ISA");
  if (forced != nullptr && *forced != '\0') {
    for (CpuIsa isa : kCpuIsas) {
      if (std::string(forced) != isa_name(isa)) continue;
      if (!cpu_has(isa)) {
        throw std::runtime_error(std::string("LLAMA_KERNELS_CPU_ISA=") + forced + ": this CPU has no " + forced +
                                 " path; it has: " + cpu_isas_available());
      }
      return isa;
    }
    throw std::runtime_error(std::string("LLAMA_KERNELS_CPU_ISA=") + forced +
                             ": expected one of avx2, avx512, avx512_bf16, amx (this CPU has: " +
                             cpu_isas_available() + ")");
  }
  for (auto it = kCpuIsas.rbegin(); it != kCpuIsas.rend(); ++it) {
    if (cpu_has(*it)) return *it;
  }
  throw std::runtime_error("llama_kernels: the CPU kernels need AVX2, FMA and F16C, which this CPU lacks");
}

}  // namespace

const char* isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::avx2:
      return "avx2";
    case CpuIsa::avx512:
      return "avx512";
    case CpuIsa::avx512_bf16:
      return "avx512_bf16";
    case CpuIsa::amx:
      return "amx";
  }
  return "?";
}

bool cpu_has(CpuIsa isa) {
  if (isa != CpuIsa::amx) return cpu_supports(isa);
  static const bool amx = cpu_supports(CpuIsa::amx) && amx_permitted();  // asked once
  return amx;
}

std::string cpu_isas_available() {
  std::string names;
  for (CpuIsa isa : kCpuIsas) {
    if (cpu_has(isa)) names += (names.empty() ? "" : ", ") + std::string(isa_name(isa));
  }
  return names.empty() ? "none of them" : names;
}

CpuIsa cpu_isa() {
  static const CpuIsa chosen = choose_isa();  // a throw leaves it unset: the next call tries (and says) again
  return chosen;
}

}  // namespace llama_kernels::cpu
