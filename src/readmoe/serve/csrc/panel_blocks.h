// The loop every panel product shares (gemm.cpp's float32 panels, gemm_bf16.cpp's bf16 ones
// by VDPBF16PS or AMX): panels [begin, end) of one product, each panel's rows in blocks, and
// the next panel of the range asked for while this one is multiplied.
#pragma once

#include <algorithm>
#include <cstdint>

#include "cpu_ops.h"

// before a loop over a kernel's rows or registers: unrolled whole, so its accumulators,
// indexed by constants, live in registers (GCC otherwise kept the 2-4-row AVX2 kernels' in
// memory and stored them every k step, at half the speed)
#define READMOE_UNROLL _Pragma("GCC unroll 16")

namespace readmoe {

// For each panel p of [begin, end) (panel_size elements of T each, output columns 48p ..) and
// each block of up to block_rows of the M rows: kernel(panel, next, first_line, per_step,
// lines, row, rows, col, cols). next is the following panel of the range (nullptr for the
// last); its `lines` cache lines are spread evenly over the `steps` k steps of every row
// block: block b asks for per_step a step, from line b * steps * per_step.
template <typename T, typename Kernel>
inline void panel_blocks(const T* panels, int64_t panel_size, int64_t steps, int64_t begin,
                         int64_t end, int64_t M, int64_t N, int64_t block_rows,
                         Kernel&& kernel) {
  const int64_t lines = panel_size * static_cast<int64_t>(sizeof(T)) / 64;
  const int64_t blocks = (M + block_rows - 1) / block_rows;
  const int64_t per_step = (lines + blocks * steps - 1) / (blocks * steps);
  for (int64_t p = begin; p < end; ++p) {
    const T* panel = panels + p * panel_size;
    const T* next = p + 1 < end ? panel + panel_size : nullptr;
    const int64_t col = p * kPanelColumns, cols = std::min<int64_t>(kPanelColumns, N - col);
    for (int64_t block = 0; block < blocks; ++block) {
      const int64_t row = block * block_rows, rows = std::min<int64_t>(block_rows, M - row);
      kernel(panel, next, block * steps * per_step, per_step, lines, row, rows, col, cols);
    }
  }
}

}  // namespace readmoe
