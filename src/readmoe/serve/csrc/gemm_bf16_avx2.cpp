// gemm_bf16.cpp's products (--quantize bf16) on CPUs with AVX2 and FMA but no AVX512-BF16:
// the same bf16 panels [P, K2, 48, 2] and activations rounded to bf16, each weight widened to
// float32 in registers (a bf16 is a float32's high half: one shift or one mask).
//
// Why: at one row a decode step's products stream their weights from memory, and half the
// bytes is up to half the time there, whatever the arithmetic costs. At 32 rows the widening
// is extra work beside the same multiply-adds as float32 panels (gemm_avx2.cpp).
//
// The sums follow VDPBF16PS's order: for each k pair, the odd k's product added to the running
// float32 sum, then the even k's, each rounded once. A product of two bf16 values is exact in
// float32, so each step is one FMA; the results equal gemm_bf16.cpp's one-row kernel's but
// where it flushes denormals. A product of one row reads four panels side by side, all their
// k pairs in one pass (stream_pair_row). More rows are cut in blocks of 1-3: one row takes a
// panel's 48 columns in one pass, two or three rows take it in two of 24 (three rows: 9
// accumulators, each k pair's odd weights widened for every row, then its even ones: nine
// FMAs between a sum's two of a k pair, which depend on each other). A panel's k pairs run in
// chunks of 64, each row block taking a chunk before the next (avx2_chunks.h), the sums parked
// exactly between chunks. Either way a row's result is the same bits alone or in any batch.

#include "cpu_ops.h"
#include "panel_blocks.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include "avx2_chunks.h"
#include "avx2_sums.h"

namespace {

constexpr int64_t kPanel = readmoe::kPanelColumns;
constexpr int kRowBlock = 3;

// x [M, K] -> float32 [M, 2 * K2] holding x rounded to bf16 (nearest even, NaN kept), zero
// past K: what VDPBF16PS would multiply
void round_rows(const float* x, int64_t M, int64_t K, int64_t K2, float* out) {
  for (int64_t r = 0; r < M; ++r) {
    float* dst = out + r * 2 * K2;
    for (int64_t k = 0; k < K; ++k) {
      uint32_t bits;
      std::memcpy(&bits, x + r * K + k, sizeof(bits));
      if ((bits & 0x7FFFFFFFu) > 0x7F800000u) {
        bits |= 0x00400000u;  // quiet
      } else {
        bits += 0x7FFFu + ((bits >> 16) & 1u);
      }
      bits &= 0xFFFF0000u;
      std::memcpy(dst + k, &bits, sizeof(bits));
    }
    std::fill(dst + K, dst + 2 * K2, 0.0f);
  }
}

// rows [R] of x rounded (row stride 2 * K2) times columns [first, first + 8W) of one panel
// [K2, 48, 2], over k pairs [k0, k1): the sums resume from `sums` (zero at k0 == 0) and are
// parked there again, or, after the last chunk, go to y rows (stride ldy) with bias and add
// (may be y) applied, `cols` of them real.
template <int R, int W>
void pair_rows(const float* x, int64_t K2, int64_t k0, int64_t k1, const uint16_t* panel,
               int64_t first, readmoe::Avx2Prefetch& prefetch, float* sums, const float* bias,
               const float* add, float* y, int64_t ldy, int64_t cols) {
  static_assert(R * W <= 12, "accumulators beside the widened weights and the broadcasts");
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m256 acc[R][W];
  readmoe::avx2_resume_sums(acc, k0, sums);
  readmoe::Avx2Prefetch ahead = prefetch;
  for (int64_t k = k0; k < k1; ++k) {
    const uint16_t* w = panel + (k * kPanel + first) * 2;
    if (ahead.next != nullptr) ahead.step();
    if constexpr (R == 3) {  // the odd k's 24 weights, every row; then the even k's
      __m256 widened[W];
      READMOE_UNROLL
      for (int j = 0; j < W; ++j)
        widened[j] = _mm256_castsi256_ps(_mm256_and_si256(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 16 * j)), high));
      READMOE_UNROLL
      for (int r = 0; r < R; ++r) {
        const __m256 odd = _mm256_broadcast_ss(x + r * 2 * K2 + 2 * k + 1);
        READMOE_UNROLL
        for (int j = 0; j < W; ++j) acc[r][j] = _mm256_fmadd_ps(odd, widened[j], acc[r][j]);
      }
      READMOE_UNROLL
      for (int j = 0; j < W; ++j)
        widened[j] = _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 16 * j)), 16));
      READMOE_UNROLL
      for (int r = 0; r < R; ++r) {
        const __m256 even = _mm256_broadcast_ss(x + r * 2 * K2 + 2 * k);
        READMOE_UNROLL
        for (int j = 0; j < W; ++j) acc[r][j] = _mm256_fmadd_ps(even, widened[j], acc[r][j]);
      }
    } else {  // R's broadcasts, then 8 columns widened at a time
      __m256 even[R], odd[R];
      READMOE_UNROLL
      for (int r = 0; r < R; ++r) {
        even[r] = _mm256_broadcast_ss(x + r * 2 * K2 + 2 * k);
        odd[r] = _mm256_broadcast_ss(x + r * 2 * K2 + 2 * k + 1);
      }
      READMOE_UNROLL
      for (int j = 0; j < W; ++j) {
        const __m256i pairs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 16 * j));
        const __m256 low = _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16));
        const __m256 top = _mm256_castsi256_ps(_mm256_and_si256(pairs, high));
        READMOE_UNROLL
        for (int r = 0; r < R; ++r) {
          acc[r][j] = _mm256_fmadd_ps(odd[r], top, acc[r][j]);
          acc[r][j] = _mm256_fmadd_ps(even[r], low, acc[r][j]);
        }
      }
    }
  }
  prefetch = ahead;
  if (k1 < K2) {
    readmoe::avx2_park_sums(acc, sums);
  } else {
    readmoe::avx2_store_sums<R, W>(acc, bias, add, y, ldy, cols);
  }
}

// one row rounded (2 * K2 long) times panels [G] (panel_pairs k pairs of 48 columns apart)
// over all K2 k pairs -> y (columns 48g .. of each, `cols` of the last panel's 48 real); bias
// and add (may be y) applied after the sum. Each sum in pair_rows' order (odd k, then even).
//
// Why: one row is bound by how fast one core reads memory, and a core reads 3-4 streams side
// by side 1.4x faster than one (gemm_avx2.cpp's stream_rows, which this mirrors in bf16).
template <int G>
void stream_pair_row(const float* x, int64_t K2, const uint16_t* panel, int64_t panel_pairs,
                     const float* bias, const float* add, float* y, int64_t cols) {
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m256 acc[G][1][6];  // panel, row, 8 columns
  READMOE_UNROLL
  for (int g = 0; g < G; ++g) {
    READMOE_UNROLL
    for (int j = 0; j < 6; ++j) acc[g][0][j] = _mm256_setzero_ps();
  }
  for (int64_t k = 0; k < K2; ++k) {
    const __m256 even = _mm256_broadcast_ss(x + 2 * k), odd = _mm256_broadcast_ss(x + 2 * k + 1);
    READMOE_UNROLL
    for (int g = 0; g < G; ++g) {
      const uint16_t* w = panel + (g * panel_pairs + k) * kPanel * 2;
      READMOE_UNROLL
      for (int j = 0; j < 6; ++j) {
        const __m256i pairs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 16 * j));
        acc[g][0][j] = _mm256_fmadd_ps(
            odd, _mm256_castsi256_ps(_mm256_and_si256(pairs, high)), acc[g][0][j]);
        acc[g][0][j] = _mm256_fmadd_ps(
            even, _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16)), acc[g][0][j]);
      }
    }
  }
  READMOE_UNROLL
  for (int g = 0; g < G; ++g)
    readmoe::avx2_store_sums<1, 6>(acc[g], bias ? bias + g * kPanel : nullptr,
                                   add ? add + g * kPanel : nullptr, y + g * kPanel, 0,
                                   g + 1 < G ? kPanel : cols);
}

using StreamRow = void (*)(const float*, int64_t, const uint16_t*, int64_t, const float*,
                           const float*, float*, int64_t);
constexpr StreamRow kStreamRow[readmoe::kAvx2Streams + 1] = {
    nullptr, stream_pair_row<1>, stream_pair_row<2>, stream_pair_row<3>, stream_pair_row<4>};

// the kernel of a block of 1-3 rows: one row takes a panel's 48 columns in one pass, two or
// three rows 24 at a time
using Rows = void (*)(const float*, int64_t, int64_t, int64_t, const uint16_t*, int64_t,
                      readmoe::Avx2Prefetch&, float*, const float*, const float*, float*, int64_t,
                      int64_t);
constexpr Rows kRows[kRowBlock + 1] = {nullptr, pair_rows<1, 6>, pair_rows<2, 3>,
                                       pair_rows<3, 3>};

}  // namespace

namespace readmoe {

bool avx2_bf16_built() { return true; }

void avx2_bf16_panel_columns(const float* x, int64_t M, int64_t K, const at::BFloat16* panels,
                             int64_t begin, int64_t end, int64_t N, const float* bias,
                             const float* add, float* y) {
  const int64_t K2 = bf16_pairs(K);
  thread_local std::vector<float> rounded;
  rounded.resize(static_cast<size_t>(M * 2 * K2));
  round_rows(x, M, K, K2, rounded.data());
  if (M == 1) {
    const auto* all = reinterpret_cast<const uint16_t*>(panels);
    avx2_panel_groups(begin, end, N, [&](int64_t p, int64_t count, int64_t col, int64_t cols) {
      kStreamRow[count](rounded.data(), K2, all + p * K2 * kPanel * 2, K2,
                        bias ? bias + col : nullptr, add ? add + col : nullptr, y + col, cols);
    });
    return;
  }
  avx2_chunked_panels(
      panels, K2 * kPanel * 2 * static_cast<int64_t>(sizeof(uint16_t)), K2, begin, end, M, N,
      kRowBlock, 1,
      [&](const char* bytes, Avx2Prefetch& prefetch, int64_t row, int64_t rows, int64_t k0,
          int64_t k1, int64_t first, float* sums, int64_t col, int64_t cols) {
        kRows[rows](rounded.data() + row * 2 * K2, K2, k0, k1,
                    reinterpret_cast<const uint16_t*>(bytes), first, prefetch, sums,
                    bias ? bias + col : nullptr, add ? add + row * N + col : nullptr,
                    y + row * N + col, N, cols);
      });
}

}  // namespace readmoe

#else

namespace readmoe {

bool avx2_bf16_built() { return false; }

void avx2_bf16_panel_columns(const float*, int64_t, int64_t, const at::BFloat16*, int64_t,
                             int64_t, int64_t, const float*, const float*, float*) {
  TORCH_CHECK(false, "the bf16 panel products need an AVX512-BF16, or AVX2 and FMA, CPU");
}

}  // namespace readmoe

#endif
