// What the AVX2 panel kernels (gemm_avx2.cpp, gemm_bf16_avx2.cpp) do with their sums: parked
// between a panel's chunks (avx2_chunks.h) and resumed, and at the end bias and add applied
// after the sum, in that order, as the AVX-512 kernels do, and only the real columns of a
// panel stored. Included where __AVX2__ and __FMA__ are defined.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "cpu_ops.h"
#include "panel_blocks.h"

namespace readmoe {

// the mask of the first `cols` of 8 lanes (maskload / maskstore take the lanes' sign bits)
inline __m256i avx2_lanes(int64_t cols) {
  const __m256i index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const auto real = static_cast<int>(std::clamp<int64_t>(cols, 0, 8));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(real), index);
}

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

// sums [R][W] -> their parking place until the next chunk (stored exactly: the FMA chain
// goes on from the same bits)
template <int R, int W>
inline void avx2_park_sums(const __m256 (&acc)[R][W], float* sums) {
  READMOE_UNROLL
  for (int r = 0; r < R; ++r) {
    READMOE_UNROLL
    for (int j = 0; j < W; ++j) _mm256_storeu_ps(sums + r * kPanelColumns + 8 * j, acc[r][j]);
  }
}

// sums [R][W] of 8 columns each -> y rows (stride ldy), `cols` of the 8W real; + bias [cols],
// + add (stride ldy, may be y)
template <int R, int W>
inline void avx2_store_sums(const __m256 (&acc)[R][W], const float* bias, const float* add,
                            float* y, int64_t ldy, int64_t cols) {
  READMOE_UNROLL
  for (int j = 0; j < W; ++j) {
    const int64_t left = cols - 8 * j;
    if (left <= 0) break;
    const __m256i m = avx2_lanes(left);
    const __m256 b = bias ? _mm256_maskload_ps(bias + 8 * j, m) : _mm256_setzero_ps();
    READMOE_UNROLL
    for (int r = 0; r < R; ++r) {
      __m256 v = bias ? _mm256_add_ps(acc[r][j], b) : acc[r][j];
      if (add) v = _mm256_add_ps(v, _mm256_maskload_ps(add + r * ldy + 8 * j, m));
      _mm256_maskstore_ps(y + r * ldy + 8 * j, m, v);
    }
  }
}

}  // namespace readmoe
