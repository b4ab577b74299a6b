// gemm.cpp's float32 panel products on CPUs with AVX2 and FMA but no AVX-512 (AMD Zen 2 and 3,
// Intel client cores): the same panels [P, K, 48], the same order of operations.
//
// Why: on the 2-core AMD EPYC (Zen 3) this project runs on, oneDNN's products of a decode step
// read their weights at about 17 GB/s on one row where the machine sums memory at 33, and a
// decode step made one call per product. With panels here the products stream each panel with
// its successor prefetched, and the team path (team.cpp: a step as one parallel region), which
// runs only on panels, runs on these CPUs too.
//
// One to three rows read four panels side by side over all their k steps (stream_rows: bound
// by how fast a core reads memory). More rows are cut in blocks of 1-4 whose 12 accumulators
// fill 16 ymm registers beside the loads: one or two rows take a panel's 48 columns in one
// pass (6 registers a row), three or four take it in two passes of 24 columns (3 a row). A
// panel's k steps run in chunks of 64 (avx2_chunks.h): every row block takes a chunk before
// the next, its partial sums parked in L1 between chunks. Either way each output sums its K
// products in order k = 0, 1, ... in one FMA chain from zero (a parked sum is stored and
// reloaded exactly), then adds bias and add, as gemm.cpp's AVX-512 kernel does: a row's
// result is the same bits alone or in any batch, and on either kernel.
//
// Measured on that EPYC, one thread, weights streamed from memory (products of K = 576 and
// 1536, and a 49152-column LM head): whole-panel passes, the next panel asked for during each
// block's first pass, ran 32 rows at 70-73 GFLOP/s of the core's 103 and 8 rows at 40-43;
// chunks with the next panel spread over every pass run 78-86 and 48-61.

#include "cpu_ops.h"
#include "panel_blocks.h"

#include <algorithm>
#include <cstdint>

#if defined(__AVX2__) && defined(__FMA__)
#include "avx2_chunks.h"
#include "avx2_sums.h"

namespace {

constexpr int64_t kPanel = readmoe::kPanelColumns;
constexpr int kRowBlock = 4;

// rows [R] of x (row stride K) times columns [first, first + 8W) of one panel [K, 48], over
// k steps [k0, k1): the sums resume from `sums` (zero at k0 == 0) and are parked there again,
// or, after the last chunk, go to y rows (stride ldy) with bias and add (may be y) applied,
// `cols` of the 8W columns real.
template <int R, int W>
void chunk_rows(const float* x, int64_t K, int64_t k0, int64_t k1, const float* panel,
                int64_t first, readmoe::Avx2Prefetch& prefetch, float* sums, const float* bias,
                const float* add, float* y, int64_t ldy, int64_t cols) {
  static_assert(R * W <= 12, "12 accumulators fit beside the loads");
  __m256 acc[R][W];
  readmoe::avx2_resume_sums(acc, k0, sums);
  readmoe::Avx2Prefetch ahead = prefetch;
  for (int64_t k = k0; k < k1; ++k) {
    const float* w = panel + k * kPanel + first;
    if (ahead.next != nullptr) ahead.step();
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
  prefetch = ahead;
  if (k1 < K) {
    readmoe::avx2_park_sums(acc, sums);
  } else {
    readmoe::avx2_store_sums<R, W>(acc, bias, add, y, ldy, cols);
  }
}

// rows [R] of x (row stride K) times panels [G] (panel_floats apart) over all K steps -> y
// rows (stride N; columns 48g .. of each panel, `cols` of the last panel's 48 real); bias and
// add (stride N, may be y) applied after the sum.
//
// Why: one or two rows are a stream of weights past a few activations, bound by how fast one
// core reads memory. A core reads one sequential stream at about 18 GB/s here but 25-28 when
// it reads 3-4 side by side (its prefetchers run a distance ahead of each stream), so these
// rows walk G panels at once instead of one after the other. Unchunked, as a few rows reuse a
// panel's weights within each k step; the accumulators beyond 12 live on the stack, whose
// loads and stores the memory-bound loop has cycles to spare for. Measured on the AMD EPYC,
// one thread, one dense step's products (538 MB): 1, 2 and 3 rows 1.5x, 1.4x and 1.2x the
// one-panel chunks' speed (1 row: 21 ms, 25 GB/s, against at::mm's 29), 4 rows no faster.
template <int R, int G>
void stream_rows(const float* x, int64_t K, const float* panel, int64_t panel_floats,
                 const float* bias, const float* add, float* y, int64_t N, int64_t cols) {
  __m256 acc[G][R][6];  // panel, row, 8 columns
  READMOE_UNROLL
  for (int g = 0; g < G; ++g) {
    READMOE_UNROLL
    for (int r = 0; r < R; ++r) {
      READMOE_UNROLL
      for (int j = 0; j < 6; ++j) acc[g][r][j] = _mm256_setzero_ps();
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    __m256 a[R];
    READMOE_UNROLL
    for (int r = 0; r < R; ++r) a[r] = _mm256_broadcast_ss(x + r * K + k);
    READMOE_UNROLL
    for (int g = 0; g < G; ++g) {
      const float* w = panel + g * panel_floats + k * kPanel;
      READMOE_UNROLL
      for (int j = 0; j < 6; ++j) {
        const __m256 weight = _mm256_loadu_ps(w + 8 * j);
        READMOE_UNROLL
        for (int r = 0; r < R; ++r) acc[g][r][j] = _mm256_fmadd_ps(a[r], weight, acc[g][r][j]);
      }
    }
  }
  READMOE_UNROLL
  for (int g = 0; g < G; ++g)
    readmoe::avx2_store_sums<R, 6>(acc[g], bias ? bias + g * kPanel : nullptr,
                                   add ? add + g * kPanel : nullptr, y + g * kPanel, N,
                                   g + 1 < G ? kPanel : cols);
}

constexpr int kStreamRows = 3;  // products of up to this many rows read panels side by side
using StreamRows = void (*)(const float*, int64_t, const float*, int64_t, const float*,
                            const float*, float*, int64_t, int64_t);
constexpr StreamRows kStreamKernels[kStreamRows + 1][readmoe::kAvx2Streams + 1] = {
    {},
    {nullptr, stream_rows<1, 1>, stream_rows<1, 2>, stream_rows<1, 3>, stream_rows<1, 4>},
    {nullptr, stream_rows<2, 1>, stream_rows<2, 2>, stream_rows<2, 3>, stream_rows<2, 4>},
    {nullptr, stream_rows<3, 1>, stream_rows<3, 2>, stream_rows<3, 3>, stream_rows<3, 4>}};

// the kernel of a block of 1-4 rows: 1-2 rows take a panel's 48 columns in one pass, 3-4 rows
// 24 at a time
using Rows = void (*)(const float*, int64_t, int64_t, int64_t, const float*, int64_t,
                      readmoe::Avx2Prefetch&, float*, const float*, const float*, float*, int64_t,
                      int64_t);
constexpr Rows kRows[kRowBlock + 1] = {nullptr, chunk_rows<1, 6>, chunk_rows<2, 6>,
                                       chunk_rows<3, 3>, chunk_rows<4, 3>};

}  // namespace

namespace readmoe {

bool avx2_panels_built() { return true; }

void avx2_panel_columns(const float* x, int64_t M, int64_t K, const float* panels,
                        int64_t begin, int64_t end, int64_t N, const float* bias,
                        const float* add, float* y) {
  if (M >= 1 && M <= kStreamRows) {
    avx2_panel_groups(begin, end, N, [&](int64_t p, int64_t count, int64_t col, int64_t cols) {
      kStreamKernels[M][count](x, K, panels + p * K * kPanel, K * kPanel,
                               bias ? bias + col : nullptr, add ? add + col : nullptr, y + col,
                               N, cols);
    });
    return;
  }
  avx2_chunked_panels(
      panels, K * kPanel * static_cast<int64_t>(sizeof(float)), K, begin, end, M, N, kRowBlock,
      2,
      [&](const char* panel, Avx2Prefetch& prefetch, int64_t row, int64_t rows, int64_t k0,
          int64_t k1, int64_t first, float* sums, int64_t col, int64_t cols) {
        kRows[rows](x + row * K, K, k0, k1, reinterpret_cast<const float*>(panel), first,
                    prefetch, sums, bias ? bias + col : nullptr,
                    add ? add + row * N + col : nullptr, y + row * N + col, N, cols);
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
