// The instruction-set paths of the CPU kernels. Every kernel source (csrc/build.json's cpu_kernels) is compiled once
// per path, with that path's flags (build.json's cpu_isa_paths) and LLAMA_KERNELS_ISA_PATH defined to its name;
// the rest of the build targets the compiler's baseline, so the extension loads on any x86-64 CPU and each process
// runs the widest path its CPU has (cpu_isa), or the one LLAMA_KERNELS_CPU_ISA names.
#pragma once

#include <array>
#include <string>

namespace llama_kernels::cpu {

// Each path adds to the one before: avx2 (+ FMA, F16C), avx512 (F, BW, VL, DQ), avx512_bf16 (vdpbf16ps), amx (the
// avx512_bf16 code with bf16 attention's block products on the AMX tiles: attention_tiles.h's tile_pair_matmul).
enum class CpuIsa { avx2, avx512, avx512_bf16, amx };
inline constexpr std::array<CpuIsa, 4> kCpuIsas = {CpuIsa::avx2, CpuIsa::avx512, CpuIsa::avx512_bf16, CpuIsa::amx};

const char* isa_name(CpuIsa isa);

// Whether this CPU (and its OS) can run the path; amx also asks Linux for the tile data permission.
bool cpu_has(CpuIsa isa);

// The path this process runs, chosen on the first call: LLAMA_KERNELS_CPU_ISA when set, else the widest path the
// CPU has. Throws std::runtime_error when the variable names no path, or a path this CPU lacks, or the CPU lacks
// even avx2.
CpuIsa cpu_isa();

// The paths this CPU has, as "avx2, avx512, ...".
std::string cpu_isas_available();

// f.template operator()<isa>(): calls the kernels compiled for isa, e.g.
//   on_isa(cpu_isa(), [&]<CpuIsa P> { rms_norm<P, T, W>(...); });
template <typename F>
decltype(auto) on_isa(CpuIsa isa, F&& f) {
  switch (isa) {
    case CpuIsa::avx512:
      return f.template operator()<CpuIsa::avx512>();
    case CpuIsa::avx512_bf16:
      return f.template operator()<CpuIsa::avx512_bf16>();
    case CpuIsa::amx:
      return f.template operator()<CpuIsa::amx>();
    case CpuIsa::avx2:
      break;
  }
  return f.template operator()<CpuIsa::avx2>();
}

}  // namespace llama_kernels::cpu

// In a kernel source: kIsaPath, the path this translation unit is compiled for, and the inline namespace that gives
// the inline helpers of the kernels' headers (dtypes.h, attention_tiles.h) a symbol per path, so that the linker
// never merges one path's copy, compiled for wider vectors, into another's. Outside the kernels: the baseline's.
#if defined(LLAMA_KERNELS_ISA_PATH)
#define LLAMA_KERNELS_ISA_NAMESPACE LLAMA_KERNELS_ISA_PATH
namespace llama_kernels::cpu {
inline constexpr CpuIsa kIsaPath = CpuIsa::LLAMA_KERNELS_ISA_PATH;
}
#else
#define LLAMA_KERNELS_ISA_NAMESPACE baseline
#endif
