// The loop the AVX2 panel kernels share (gemm_avx2.cpp's float32, gemm_bf16_avx2.cpp's bf16):
// each panel's k steps in chunks, every row block of up to 48 rows taking a chunk before the
// next, and the panel's successor asked for a line at a time over all of its passes.
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

// sums [R][W] from a chunk's parking place (row stride 48), or zero before the first chunk
template <int R, int W>
inline void avx2_resume_sums(__m256 (&acc)[R][W], int64_t k0, const float* sums) {
  READMOE_UNROLL
  for (int r = 0; r < R; ++r) {
    READMOE_UNROLL
    for (int j = 0; j < W; ++j)
      acc[r][j] = k0 == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(sums + r * kPanelColumns + 8 * j);
  }
}

template <int R, int W>
inline void avx2_park_sums(const __m256 (&acc)[R][W], float* sums) {
  READMOE_UNROLL
  for (int r = 0; r < R; ++r) {
    READMOE_UNROLL
    for (int j = 0; j < W; ++j) _mm256_storeu_ps(sums + r * kPanelColumns + 8 * j, acc[r][j]);
  }
}

// For panels [begin, end) of `panel_bytes` each, `steps` steps deep, and M rows in blocks of
// `block_rows` (a block of up to `one_pass_rows` rows takes a panel's 48 columns in one pass,
// larger ones in two of 24): kernel(panel, prefetch, row, rows, k0, k1, sums, col, cols) for
// each chunk [k0, k1) of each panel, each group of up to 48 rows and each of its blocks, sums
// being the block's parking place. A kernel finishing its chunk at k1 == steps writes y.
// (steps = 0 still runs one empty chunk: y gets bias and add.)
template <typename Kernel>
inline void avx2_chunked_panels(const void* panels, int64_t panel_bytes, int64_t steps,
                                int64_t begin, int64_t end, int64_t M, int64_t N,
                                int64_t block_rows, int64_t one_pass_rows, Kernel&& kernel) {
  alignas(32) float sums[kAvx2GroupRows * kPanelColumns];
  const auto* all = static_cast<const char*>(panels);
  for (int64_t p = begin; p < end; ++p) {
    const char* panel = all + p * panel_bytes;
    const int64_t col = p * kPanelColumns, cols = std::min<int64_t>(kPanelColumns, N - col);
    int64_t passes = 0;
    for (int64_t row = 0; row < M; row += block_rows)
      passes += std::min(block_rows, M - row) <= one_pass_rows || cols <= 24 ? 1 : 2;
    Avx2Prefetch prefetch{p + 1 < end ? panel + panel_bytes : nullptr, 0, panel_bytes / 64,
                          std::max<int64_t>(1, passes * steps)};
    for (int64_t group = 0; group < M; group += kAvx2GroupRows) {
      const int64_t last = std::min(M, group + kAvx2GroupRows);
      for (int64_t k0 = 0; k0 == 0 || k0 < steps; k0 += kAvx2Chunk) {
        const int64_t k1 = std::min(steps, k0 + kAvx2Chunk);
        for (int64_t row = group; row < last; row += block_rows)
          kernel(panel, prefetch, row, std::min(block_rows, last - row), k0, k1,
                 sums + (row - group) * kPanelColumns, col, cols);
      }
    }
  }
}

}  // namespace readmoe
