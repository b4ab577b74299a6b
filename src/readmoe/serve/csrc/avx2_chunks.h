// The loops the AVX2 panel kernels share (gemm_avx2.cpp's float32, gemm_bf16_avx2.cpp's bf16):
// each panel's k steps in chunks, every row block of up to 48 rows taking a chunk before the
// next, and the panel's successor asked for a line at a time over all of its passes; and, for
// products of a few rows, the panels in groups read side by side (avx2_panel_groups).
//
// Why: a row block's pass over a whole panel (110-295 KB) reads it from L2, and with 3-4 rows a
// block the weight loads alone asked L2 for half its bandwidth; by chunks, one block reads a
// chunk (64 steps, 12 KB) from L2 and the others from L1. The successor used to be asked for
// during each block's first pass only, up to a line a step, and nothing in the second passes;
// spread over every pass, 4 and 8 rows streamed 1.1-1.4x faster (measured on the AMD EPYC,
// Zen 3, one thread). Included where __AVX2__ and __FMA__ are defined.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "cpu_ops.h"
#include "panel_blocks.h"

namespace readmoe {

constexpr int64_t kAvx2Chunk = 64;      // steps a chunk: 12 KB of a panel, kept in L1
constexpr int64_t kAvx2GroupRows = 48;  // rows whose partial sums wait between chunks
constexpr int kAvx2Streams = 4;  // panels a product of a few rows reads side by side

// For panels [begin, end) of a product of N columns, in groups of up to kAvx2Streams read
// side by side: kernel(p, count, col, cols) for each group, its first panel p, its `count`
// panels, their first column col = 48p, and the real columns of its last panel (48, or the
// product's last few).
template <typename Kernel>
inline void avx2_panel_groups(int64_t begin, int64_t end, int64_t N, Kernel&& kernel) {
  for (int64_t p = begin; p < end; p += kAvx2Streams) {
    const int64_t count = std::min<int64_t>(kAvx2Streams, end - p);
    kernel(p, count, p * kPanelColumns,
           std::min<int64_t>(kPanelColumns, N - (p + count - 1) * kPanelColumns));
  }
}

// Asks for a panel's successor a line at a time, `count` lines spread evenly over `steps`
// calls of step() (Bresenham's stepping: an add and a compare a step, no division). A kernel
// steps a copy held in registers and hands it back after its loop: stepping the caller's
// through a reference stored `due` every step, a store-to-load chain as long as the step's
// FMAs.
struct Avx2Prefetch {
  const char* next;
  int64_t line, count, steps, due = 0;
  void step() {
    for (due += count; due >= steps; due -= steps, ++line)
      _mm_prefetch(next + 64 * line, _MM_HINT_T0);
  }
};

// For panels [begin, end) of `panel_bytes` each, `steps` steps deep, and M rows in blocks of
// `block_rows`: kernel(panel, prefetch, row, rows, k0, k1, first, sums, col, cols) for each
// chunk [k0, k1) of each panel, each group of up to 48 rows, each of its blocks and each pass
// over the block's columns: a block of up to `one_pass_rows` rows (or a panel of 24 columns or
// fewer) takes the panel's columns in one pass, larger ones in two of 24, the second from
// first = 24. sums is the pass's parking place, [col, col + cols) the pass's columns of y. A
// kernel finishing its chunk at k1 == steps writes y. (steps = 0 still runs one empty chunk: y
// gets bias and add.)
template <typename Kernel>
inline void avx2_chunked_panels(const void* panels, int64_t panel_bytes, int64_t steps,
                                int64_t begin, int64_t end, int64_t M, int64_t N,
                                int64_t block_rows, int64_t one_pass_rows, Kernel&& kernel) {
  alignas(32) float sums[kAvx2GroupRows * kPanelColumns];
  const auto* all = static_cast<const char*>(panels);
  for (int64_t p = begin; p < end; ++p) {
    const char* panel = all + p * panel_bytes;
    const int64_t col = p * kPanelColumns, cols = std::min<int64_t>(kPanelColumns, N - col);
    const auto passes = [&](int64_t rows) -> int64_t {
      return rows <= one_pass_rows || cols <= 24 ? 1 : 2;
    };
    int64_t all_passes = 0;
    for (int64_t row = 0; row < M; row += block_rows)
      all_passes += passes(std::min(block_rows, M - row));
    Avx2Prefetch prefetch{p + 1 < end ? panel + panel_bytes : nullptr, 0, panel_bytes / 64,
                          std::max<int64_t>(1, all_passes * steps)};
    for (int64_t group = 0; group < M; group += kAvx2GroupRows) {
      const int64_t last = std::min(M, group + kAvx2GroupRows);
      for (int64_t k0 = 0; k0 == 0 || k0 < steps; k0 += kAvx2Chunk) {
        const int64_t k1 = std::min(steps, k0 + kAvx2Chunk);
        for (int64_t row = group; row < last; row += block_rows) {
          const int64_t rows = std::min(block_rows, last - row);
          float* parked = sums + (row - group) * kPanelColumns;
          if (passes(rows) == 1) {
            kernel(panel, prefetch, row, rows, k0, k1, 0, parked, col, cols);
          } else {
            kernel(panel, prefetch, row, rows, k0, k1, 0, parked, col, 24);
            kernel(panel, prefetch, row, rows, k0, k1, 24, parked + 24, col + 24, cols - 24);
          }
        }
      }
    }
  }
}

}  // namespace readmoe
