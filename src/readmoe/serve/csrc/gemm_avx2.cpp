// gemm.cpp's float32 panel products on CPUs with AVX2 and FMA but no AVX-512 (AMD Zen 2 and 3,
// Intel client cores): the same panels [P, K, 48], the same order of operations.
//
// Why: on the 2-core AMD EPYC (Zen 3) this project runs on, oneDNN's products of a decode step
// read their weights at about 17 GB/s on one row where the machine sums memory at 33, and a
// decode step made one call per product. With panels here the products stream each panel with
// its successor prefetched, and the team path (team.cpp: a step as one parallel region), which
// runs only on panels, runs on these CPUs too.
//
// 16 ymm registers hold 12 accumulators: one or two rows take a panel's 48 columns in one
// pass (6 registers a row), three or four take it in two passes of 24 columns (3 a row), the
// panel staying in L2 between them. Each output still sums its K products in order k = 0, 1,
// ... in one FMA chain from zero, then adds bias and add, as gemm.cpp's AVX-512 kernel does:
// a row's result is the same bits alone or in any batch, and on either kernel.

#include "cpu_ops.h"
#include "panel_blocks.h"

#include <algorithm>
#include <cstdint>

#if defined(__AVX2__) && defined(__FMA__)
#include "avx2_sums.h"

namespace {

constexpr int64_t kPanel = readmoe::kPanelColumns;
constexpr int kRowBlock = 4;

// rows [R] of x (row stride K) times columns [first, first + 8W) of one panel [K, 48] -> y
// rows (stride ldy), `cols` of those columns real; bias and add (may be y) applied after the
// sum. Asks for `prefetch_lines` lines of the next panel a k step, from next + first_line.
template <int R, int W>
void panel_rows(const float* x, int64_t K, const float* panel, int64_t first, const float* next,
                int64_t first_line, int64_t prefetch_lines, int64_t next_lines,
                const float* bias, const float* add, float* y, int64_t ldy, int64_t cols) {
  static_assert(R * W <= 12, "12 accumulators fit beside the loads");
  __m256 acc[R][W];
  readmoe::avx2_zero_sums(acc);
  int64_t line = first_line;
  for (int64_t k = 0; k < K; ++k) {
    const float* w = panel + k * kPanel + first;
    if (next != nullptr)
      for (int64_t i = 0; i < prefetch_lines && line < next_lines; ++i, ++line)
        _mm_prefetch(reinterpret_cast<const char*>(next + 16 * line), _MM_HINT_T1);
    if constexpr (R <= 2) {  // R broadcasts, then one weight register at a time
      __m256 a[R];
      READMOE_UNROLL
      for (int r = 0; r < R; ++r) a[r] = _mm256_broadcast_ss(x + r * K + k);
      READMOE_UNROLL
      for (int j = 0; j < W; ++j) {
        const __m256 weight = _mm256_loadu_ps(w + 8 * j);
        READMOE_UNROLL
        for (int r = 0; r < R; ++r) acc[r][j] = _mm256_fmadd_ps(a[r], weight, acc[r][j]);
      }
    } else {  // the W weight registers, then one broadcast at a time
      __m256 weight[W];
      READMOE_UNROLL
      for (int j = 0; j < W; ++j) weight[j] = _mm256_loadu_ps(w + 8 * j);
      READMOE_UNROLL
      for (int r = 0; r < R; ++r) {
        const __m256 a = _mm256_broadcast_ss(x + r * K + k);
        READMOE_UNROLL
        for (int j = 0; j < W; ++j) acc[r][j] = _mm256_fmadd_ps(a, weight[j], acc[r][j]);
      }
    }
  }
  readmoe::avx2_store_sums<R, W>(acc, bias, add, y, ldy, cols);
}

template <int R>
void block(const float* x, int64_t K, const float* panel, const float* next, int64_t first_line,
           int64_t per_step, int64_t lines, const float* bias, const float* add, float* y,
           int64_t ldy, int64_t cols) {
  if constexpr (R <= 2) {
    panel_rows<R, 6>(x, K, panel, 0, next, first_line, per_step, lines, bias, add, y, ldy, cols);
  } else {  // the next panel is asked for during the first pass
    panel_rows<R, 3>(x, K, panel, 0, next, first_line, per_step, lines, bias, add, y, ldy, cols);
    if (cols > 24)
      panel_rows<R, 3>(x, K, panel, 24, nullptr, 0, 0, 0, bias ? bias + 24 : nullptr,
                       add ? add + 24 : nullptr, y + 24, ldy, cols - 24);
  }
}

using Block = void (*)(const float*, int64_t, const float*, const float*, int64_t, int64_t,
                       int64_t, const float*, const float*, float*, int64_t, int64_t);
constexpr Block kBlocks[kRowBlock + 1] = {nullptr, block<1>, block<2>, block<3>, block<4>};

}  // namespace

namespace readmoe {

bool avx2_panels_built() { return true; }

void avx2_panel_columns(const float* x, int64_t M, int64_t K, const float* panels,
                        int64_t begin, int64_t end, int64_t N, const float* bias,
                        const float* add, float* y) {
  panel_blocks(panels, K * kPanel, K, begin, end, M, N, kRowBlock,
               [&](const float* panel, const float* next, int64_t first_line, int64_t per_step,
                   int64_t lines, int64_t row, int64_t rows, int64_t col, int64_t cols) {
                 kBlocks[rows](x + row * K, K, panel, next, first_line, per_step, lines,
                               bias ? bias + col : nullptr, add ? add + row * N + col : nullptr,
                               y + row * N + col, N, cols);
               });
}

}  // namespace readmoe

#else

namespace readmoe {

bool avx2_panels_built() { return false; }

void avx2_panel_columns(const float*, int64_t, int64_t, const float*, int64_t, int64_t, int64_t,
                        const float*, const float*, float*) {
  TORCH_CHECK(false, "the panel products need an AVX-512, or AVX2 and FMA, CPU");
}

}  // namespace readmoe

#endif
