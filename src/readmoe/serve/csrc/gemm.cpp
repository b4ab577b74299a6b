// The decode step's fp32 products of 2-48 rows: x @ W through W stored as column panels, each
// panel's successor prefetched while it is multiplied. AVX-512 CPUs run the kernel here,
// AVX2 ones gemm_avx2.cpp's (panel_columns picks at run time).
//
// Why: at these row counts a product is a stream of its weights past a few rows of
// activations. oneDNN's prepacked kernel multiplies 32 rows at about 150 GFLOP/s a core when
// the weight sits in cache, but at 92-96 when it streams from memory (the weights of a step
// are hundreds of MB, so they always do): it waits on each panel's first touch, reading about
// 6 GB/s where a core reads 13. Here each 48-column panel ([K, 48], contiguous, 110 KB at
// K = 576) stays in L2 for every row block of the product, and while it is being multiplied
// the next panel is asked for, spread over the k steps: measured 129-139 GFLOP/s streamed at
// 32 rows (1.3-1.5x oneDNN), equal at 8 rows, where both are bound by memory.
//
// Each output sums its K products in order k = 0, 1, ... in one FMA chain, whatever the row
// count or thread count: a row's result is bit-identical alone or in any batch. Compiled for
// AVX-512F in this file only; callers ask panels_supported() first (the CPU at run time).

#include "cpu_ops.h"
#include "panel_blocks.h"

#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <cstdint>

// GCC on x86-64 (its target pragmas compile the AVX-512 region whatever the build flags);
// elsewhere panels_supported() is false and the runner keeps oneDNN's products
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define READMOE_PANELS 1
#pragma GCC push_options
#pragma GCC target("avx512f")
#include <cpuid.h>
#include <immintrin.h>
#endif

namespace {

#ifdef READMOE_PANELS
constexpr int64_t kPanel = readmoe::kPanelColumns;  // three zmm registers of outputs
constexpr int kRowBlock = 8;  // rows a pass: 8 x 3 accumulators, 3 weight loads

// the first `cols` of 16 lanes
inline __mmask16 lanes(int64_t cols) {
  return cols >= 16 ? static_cast<__mmask16>(0xFFFF)
                    : static_cast<__mmask16>((1u << std::max<int64_t>(cols, 0)) - 1);
}

// rows [R] of x (row stride K) times one panel [K, 48] -> y rows (stride ldy), `cols` of the
// 48 columns real; bias (+) and add (+, stride ldy, may be y itself) applied after the sum.
// Asks for `prefetch_lines` lines of the next panel a k step, from next + first_line.
template <int R>
void panel_rows(const float* x, int64_t K, const float* panel, const float* next,
                int64_t first_line, int64_t prefetch_lines, int64_t next_lines,
                const float* bias, const float* add, float* y, int64_t ldy, int64_t cols) {
  __m512 acc[R][3];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 3; ++j) acc[r][j] = _mm512_setzero_ps();
  int64_t line = first_line;
  for (int64_t k = 0; k < K; ++k) {
    const float* w = panel + k * kPanel;
    const __m512 w0 = _mm512_loadu_ps(w), w1 = _mm512_loadu_ps(w + 16),
                 w2 = _mm512_loadu_ps(w + 32);
    if (next != nullptr)
      for (int64_t i = 0; i < prefetch_lines && line < next_lines; ++i, ++line)
        _mm_prefetch(reinterpret_cast<const char*>(next + 16 * line), _MM_HINT_T1);
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(x[r * K + k]);
      acc[r][0] = _mm512_fmadd_ps(a, w0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(a, w1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(a, w2, acc[r][2]);
    }
  }
  for (int j = 0; j < 3; ++j) {
    const __mmask16 m = lanes(cols - 16 * j);
    if (m == 0) break;
    const __m512 b = bias ? _mm512_maskz_loadu_ps(m, bias + 16 * j) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r) {
      __m512 v = bias ? _mm512_add_ps(acc[r][j], b) : acc[r][j];
      if (add) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, add + r * ldy + 16 * j));
      _mm512_mask_storeu_ps(y + r * ldy + 16 * j, m, v);
    }
  }
}

using PanelRows = void (*)(const float*, int64_t, const float*, const float*, int64_t, int64_t,
                           int64_t, const float*, const float*, float*, int64_t, int64_t);
constexpr PanelRows kPanelRows[kRowBlock + 1] = {
    nullptr,         panel_rows<1>, panel_rows<2>, panel_rows<3>, panel_rows<4>,
    panel_rows<5>,   panel_rows<6>, panel_rows<7>, panel_rows<8>};

// panels [begin, end) of the product (their columns of y), each one's successor in the range
// prefetched while it is multiplied
void panel_range(const float* x, int64_t M, int64_t K, const float* panels, int64_t begin,
                 int64_t end, int64_t N, const float* bias, const float* add, float* y) {
  readmoe::panel_blocks(
      panels, K * kPanel, K, begin, end, M, N, kRowBlock,
      [&](const float* panel, const float* next, int64_t first_line, int64_t per_step,
          int64_t lines, int64_t row, int64_t rows, int64_t col, int64_t cols) {
        kPanelRows[rows](x + row * K, K, panel, next, first_line, per_step, lines,
                         bias ? bias + col : nullptr, add ? add + row * N + col : nullptr,
                         y + row * N + col, N, cols);
      });
}

#endif

void check_rows(const at::Tensor& t, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 2 &&
                  t.is_contiguous() && t.size(0) == rows && t.size(1) == cols,
              name, " must be a contiguous float32 CPU tensor [", rows, ", ", cols, "]");
}

}  // namespace

namespace readmoe {

void panel_columns(const float* x, int64_t M, int64_t K, const float* panels, int64_t begin,
                   int64_t end, int64_t N, const float* bias, const float* add, float* y) {
#ifdef READMOE_PANELS
  if (avx512_panels()) return panel_range(x, M, K, panels, begin, end, N, bias, add, y);
#endif
  avx2_panel_columns(x, M, K, panels, begin, end, N, bias, add, y);
}

// AVX-512F that runs: the CPU has it and the OS saves its registers (XCR0's opmask and ZMM
// state bits), which a CPU's flags alone do not promise under every hypervisor. Asked once a
// process: every panel chunk asks, and CPUID exits to the hypervisor in a VM.
bool avx512_panels() {
#ifdef READMOE_PANELS
  static const bool runs = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__builtin_cpu_supports("avx512f") || !__get_cpuid(1, &eax, &ebx, &ecx, &edx) ||
        !(ecx & bit_OSXSAVE))
      return false;
    unsigned low = 0, high = 0;
    __asm__ volatile("xgetbv" : "=a"(low), "=d"(high) : "c"(0));
    constexpr unsigned kZmmState = 0xE6;  // SSE, AVX, opmask, ZMM_Hi256, Hi16_ZMM
    return (low & kZmmState) == kZmmState;
  }();
  return runs;
#else
  return false;
#endif
}

bool panels_supported() {
  return avx512_panels() || (avx2_panels_built() && __builtin_cpu_supports("avx2") &&
                             __builtin_cpu_supports("fma"));
}

int64_t panel_min_rows() { return avx512_panels() ? kBlockedMinRows : 1; }

// x and add may be strided views (made contiguous here); out, if not contiguous, gets a copy
at::Tensor panel_linear(const at::Tensor& x_in, const at::Tensor& panels, int64_t out_features,
                        const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& add_in,
                        const std::optional<at::Tensor>& out) {
  RECORD_FUNCTION("readmoe::panel_linear", c10::ArrayRef<const c10::IValue>{});
  const bool bf16 = panels.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf16 ? bf16_panels_supported() : panels_supported(),
              bf16 ? "the bf16 panel products need an AVX512-BF16, or AVX2 and FMA, CPU"
                   : "the panel products need an AVX-512, or AVX2 and FMA, CPU");
  TORCH_CHECK(x_in.device().is_cpu() && x_in.scalar_type() == at::kFloat && x_in.dim() == 2,
              "x must be a float32 CPU matrix");
  const at::Tensor x = x_in.contiguous();
  const std::optional<at::Tensor> add =
      add_in ? std::optional<at::Tensor>(add_in->contiguous()) : std::nullopt;
  const int64_t M = x.size(0), K = x.size(1), N = out_features;
  if (bf16) {
    TORCH_CHECK(panels.device().is_cpu() && panels.dim() == 4 && panels.is_contiguous() &&
                    panels.size(1) == bf16_pairs(K) && panels.size(2) == kPanelColumns &&
                    panels.size(3) == 2,
                "bf16 panels must be contiguous [P, ", bf16_pairs(K), ", ", kPanelColumns,
                ", 2], got ", panels.sizes());
  } else {
    TORCH_CHECK(panels.device().is_cpu() && panels.scalar_type() == at::kFloat &&
                    panels.dim() == 3 && panels.is_contiguous() && panels.size(1) == K &&
                    panels.size(2) == kPanelColumns,
                "panels must be contiguous float32 [P, ", K, ", ", kPanelColumns, "], got ",
                panels.sizes());
  }
  TORCH_CHECK(N > (panels.size(0) - 1) * kPanelColumns && N <= panels.size(0) * kPanelColumns,
              panels.size(0), " panels do not hold ", N, " output columns");
  if (bias) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == at::kFloat &&
                    bias->dim() == 1 && bias->is_contiguous() && bias->size(0) == N,
                "bias must be a contiguous float32 CPU vector [", N, "]");
  }
  if (add) check_rows(*add, "add", M, N);
  if (out) {
    TORCH_CHECK(out->device().is_cpu() && out->scalar_type() == at::kFloat &&
                    out->sizes() == at::IntArrayRef({M, N}),
                "out must be a float32 CPU tensor [", M, ", ", N, "]");
  }
  const bool direct = out && out->is_contiguous();
  at::Tensor y = direct ? *out : at::empty({M, N}, x.options());
  const float* b = bias ? bias->data_ptr<float>() : nullptr;
  const float* a = add ? add->data_ptr<float>() : nullptr;
  if (M > 0 && bf16) {
    at::parallel_for(0, panels.size(0), 1, [&](int64_t begin, int64_t end) {
      bf16_panel_columns(x.data_ptr<float>(), M, K, panels.data_ptr<at::BFloat16>(), begin, end,
                         N, b, a, y.data_ptr<float>());
    });
  }
  if (M > 0 && !bf16) {
    at::parallel_for(0, panels.size(0), 1, [&](int64_t begin, int64_t end) {
      panel_columns(x.data_ptr<float>(), M, K, panels.data_ptr<float>(), begin, end, N, b, a,
                    y.data_ptr<float>());
    });
  }
  if (out && !direct) {
    at::Tensor target = *out;  // a handle on the caller's storage
    return target.copy_(y);
  }
  return y;
}

}  // namespace readmoe

#ifdef READMOE_PANELS
#pragma GCC pop_options
#endif
