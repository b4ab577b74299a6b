// The decode step's products with bfloat16 weights on AVX512-BF16 CPUs (--quantize bf16):
// x @ W through W stored as bf16 column panels, each panel's successor prefetched while it
// is multiplied (gemm.cpp's scheme, half the bytes).
//
// Why: at decode sizes a product streams its weights past a few rows; half the bytes is up to
// half the time where memory bounds it. One VDPBF16PS multiplies a pair of bf16 activations
// into a pair of bf16 weights in each of 16 lanes and adds both to an fp32 sum, so a panel
// [ceil(K / 2), 48, 2] (k pairs, 48 columns, the pair innermost) is read as three registers a
// k pair. A prototype on a ReadME-shaped step (Xeon with AVX512-BF16): 1.8-1.9x the fp32
// panels at 1 row, 1.4-1.5x at 8; at 32 rows compute bounds both (one VDPBF16PS does the
// multiply-adds of two FMAs, on one port) and it ran at 0.93x.
//
// The activations are rounded to bf16 (nearest even) once per call. Each output sums its k
// pairs in order in one chain, whatever the rows or threads: a row's result is the same bits
// alone or in any batch. Compiled for AVX512-BF16 in this file only; callers ask
// bf16_panels_supported() first.

#include "cpu_ops.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define READMOE_BF16 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16")
#include <immintrin.h>
#endif

namespace {

#ifdef READMOE_BF16
constexpr int64_t kPanel = readmoe::kPanelColumns;
constexpr int kRowBlock = 8;  // rows a pass: 8 x 3 accumulators, 3 weight loads a k pair

// rows [R] of x as bf16 pairs (row stride 2 * K2 halves) times one panel [K2, 48, 2] -> y rows
// (stride ldy), `cols` of the 48 real; bias and add (may be y) applied after the sum. Asks
// for `per_step` lines of the next panel a k pair, from next + first_line.
template <int R>
void pair_rows(const uint16_t* x, int64_t K2, const uint16_t* panel, const uint16_t* next,
               int64_t first_line, int64_t per_step, int64_t next_lines, const float* bias,
               const float* add, float* y, int64_t ldy, int64_t cols) {
  __m512 acc[R][3];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 3; ++j) acc[r][j] = _mm512_setzero_ps();
  int64_t line = first_line;
  for (int64_t k = 0; k < K2; ++k) {
    const uint16_t* w = panel + k * kPanel * 2;
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(w + 32);
    const __m512bh w2 = (__m512bh)_mm512_loadu_si512(w + 64);
    if (next != nullptr)
      for (int64_t i = 0; i < per_step && line < next_lines; ++i, ++line)
        _mm_prefetch(reinterpret_cast<const char*>(next + 32 * line), _MM_HINT_T1);
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, x + r * 2 * K2 + 2 * k, sizeof(pair));
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, w0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, w1);
      acc[r][2] = _mm512_dpbf16_ps(acc[r][2], a, w2);
    }
  }
  for (int j = 0; j < 3; ++j) {
    const int64_t left = cols - 16 * j;
    if (left <= 0) break;
    const __mmask16 m = left >= 16 ? static_cast<__mmask16>(0xFFFF)
                                   : static_cast<__mmask16>((1u << left) - 1);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(m, bias + 16 * j) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r) {
      __m512 v = bias ? _mm512_add_ps(acc[r][j], b) : acc[r][j];
      if (add) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, add + r * ldy + 16 * j));
      _mm512_mask_storeu_ps(y + r * ldy + 16 * j, m, v);
    }
  }
}

using PairRows = void (*)(const uint16_t*, int64_t, const uint16_t*, const uint16_t*, int64_t,
                          int64_t, int64_t, const float*, const float*, float*, int64_t,
                          int64_t);
constexpr PairRows kPairRows[kRowBlock + 1] = {
    nullptr,       pair_rows<1>, pair_rows<2>, pair_rows<3>, pair_rows<4>,
    pair_rows<5>,  pair_rows<6>, pair_rows<7>, pair_rows<8>};

// x [M, K] -> bf16 [M, 2 * K2], rounded to nearest even, an odd K's last pair zero-padded
void round_rows(const float* x, int64_t M, int64_t K, int64_t K2, uint16_t* out) {
  for (int64_t r = 0; r < M; ++r) {
    const float* row = x + r * K;
    uint16_t* dst = out + r * 2 * K2;
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 m = K - k >= 16 ? static_cast<__mmask16>(0xFFFF)
                                      : static_cast<__mmask16>((1u << (K - k)) - 1);
      const __m256bh h = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, row + k));
      _mm256_mask_storeu_epi16(dst + k, m, (__m256i)h);
    }
    if (K % 2) dst[K] = 0;
  }
}
#endif

}  // namespace

namespace readmoe {

bool bf16_panels_supported() {
#ifdef READMOE_BF16
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

void bf16_panel_columns(const float* x, int64_t M, int64_t K, const at::BFloat16* panels,
                        int64_t begin, int64_t end, int64_t N, const float* bias,
                        const float* add, float* y) {
#ifdef READMOE_BF16
  const int64_t K2 = (K + 1) / 2;
  thread_local std::vector<uint16_t> rounded;
  rounded.resize(static_cast<size_t>(M * 2 * K2));
  round_rows(x, M, K, K2, rounded.data());
  const auto* all = reinterpret_cast<const uint16_t*>(panels);
  const int64_t panel_halves = K2 * kPanel * 2, panel_lines = panel_halves / 32;
  const int64_t blocks = (M + kRowBlock - 1) / kRowBlock;
  // the next panel's lines spread evenly over this panel's k pairs, every row block's
  const int64_t per_step = (panel_lines + blocks * K2 - 1) / (blocks * K2);
  for (int64_t p = begin; p < end; ++p) {
    const uint16_t* panel = all + p * panel_halves;
    const uint16_t* next = p + 1 < end ? panel + panel_halves : nullptr;
    const int64_t col = p * kPanel, cols = std::min<int64_t>(kPanel, N - col);
    for (int64_t block = 0; block < blocks; ++block) {
      const int64_t row = block * kRowBlock, rows = std::min<int64_t>(kRowBlock, M - row);
      kPairRows[rows](rounded.data() + row * 2 * K2, K2, panel, next, block * K2 * per_step,
                      per_step, panel_lines, bias ? bias + col : nullptr,
                      add ? add + row * N + col : nullptr, y + row * N + col, N, cols);
    }
  }
#else
  TORCH_CHECK(false, "the bf16 panel products need an AVX512-BF16 CPU");
#endif
}

}  // namespace readmoe

#ifdef READMOE_BF16
#pragma GCC pop_options
#endif
