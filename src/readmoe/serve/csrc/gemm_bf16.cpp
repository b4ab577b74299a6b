// The decode step's products with bfloat16 weights on AVX512-BF16 CPUs (--quantize bf16; AVX2
// CPUs: gemm_bf16_avx2.cpp, chosen at run time):
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
// Two or more rows go through AMX where the CPU has it and Linux lets this process use it
// (the arch_prctl permission oneDNN asks for too; READMOE_AMX=0 turns it off): a tile
// multiply-add does a 16-row block times 16 columns over 16 k pairs in one instruction, so at
// 32 rows, where VDPBF16PS is compute-bound, the same step's products took 0.50-0.52x its
// time (1.1-1.2x at 8 rows; 1, 2 threads). One row stays on VDPBF16PS (AMX padded it to 16
// rows and ran at 0.88-0.96x). The panels hold their k pairs padded to a multiple of 16 (a
// tile's depth), zero, and so does the rounded activation buffer.
//
// The activations are rounded to bf16 (nearest even) once per call. Each kernel sums an
// output's k pairs in a fixed order, whatever the other rows or the threads: a row's result
// is the same bits in any batch of two or more rows (AMX) and alone (VDPBF16PS: equal to
// rounding, as the float32 products' one row through at::mm). Compiled for AVX512-BF16 and
// AMX in this file only; callers ask bf16_panels_supported() first.

#include "cpu_ops.h"
#include "panel_blocks.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define READMOE_BF16 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,amx-tile,amx-bf16")
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
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

// x [M, K] -> bf16 [rows, 2 * K2], rounded to nearest even; zero past K and past M
void round_rows(const float* x, int64_t M, int64_t K, int64_t K2, int64_t rows,
                uint16_t* out) {
  std::memset(out, 0, sizeof(uint16_t) * static_cast<size_t>(rows * 2 * K2));
  for (int64_t r = 0; r < M; ++r) {
    const float* row = x + r * K;
    uint16_t* dst = out + r * 2 * K2;
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 m = K - k >= 16 ? static_cast<__mmask16>(0xFFFF)
                                      : static_cast<__mmask16>((1u << (K - k)) - 1);
      const __m256bh h = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, row + k));
      _mm256_mask_storeu_epi16(dst + k, m, (__m256i)h);
    }
  }
}

// AMX: the CPU has AMX-BF16 (CPUID 7.0 EDX bits 22 and 24) and Linux grants this process the
// tile data state (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA); READMOE_AMX=0 says no
bool amx_usable() {
  static const bool usable = [] {
    const char* env = std::getenv("READMOE_AMX");
    if (env != nullptr && std::string(env) == "0") return false;
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 22)) || !(d & (1u << 24)))
      return false;
    constexpr long kRequestPermission = 0x1023, kTileData = 18;
    return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  }();
  return usable;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// tiles 0-5: sums (2 row blocks x 3 column blocks), 6: activations, 7: weights; each 16 rows
// of 64 bytes (16 floats, or 16 bf16 pairs). Loaded every call: other code (oneDNN) may have
// configured the tiles its own way in between.
void configure_tiles() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = 16;
    config.bytes_per_row[t] = 64;
  }
  asm volatile("" : : "r"(&config) : "memory");  // GCC does not see ldtilecfg read them
  _tile_loadconfig(&config);
}

// a sum tile's rows [rows] of 16 columns (`cols` real) into y (stride ldy), + bias + add
void store_tile(const float* sums, int64_t rows, int64_t cols, const float* bias,
                const float* add, float* y, int64_t ldy) {
  const __mmask16 m = cols >= 16 ? static_cast<__mmask16>(0xFFFF)
                                 : static_cast<__mmask16>((1u << cols) - 1);
  const __m512 b = bias ? _mm512_maskz_loadu_ps(m, bias) : _mm512_setzero_ps();
  for (int64_t r = 0; r < rows; ++r) {
    __m512 v = _mm512_add_ps(_mm512_loadu_ps(sums + 16 * r), b);
    if (add) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, add + r * ldy));
    _mm512_mask_storeu_ps(y + r * ldy, m, v);
  }
}

#define READMOE_TILE_STORE(t)                        \
  case t:                                            \
    _tile_stored(t, sums, 64);                       \
    break;

// one block of up to 32 rows (two 16-row tiles) of x rounded [., 2 * K2] (K2 a multiple of
// 16, rows past M zero) times one panel, by AMX; asks for per_step lines of the next panel a
// k step of 16 pairs, from next + first_line
void amx_block(const uint16_t* x, int64_t rows, int64_t K2, const uint16_t* panel,
               const uint16_t* next, int64_t first_line, int64_t per_step, int64_t lines,
               const float* bias, const float* add, float* y, int64_t ldy, int64_t cols) {
  alignas(64) float sums[16 * 16];
  const bool two = rows > 16;
  const uint16_t* a1 = x + 16 * 2 * K2;
  const int64_t row_bytes = 2 * K2 * 2;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_zero(4);
  _tile_zero(5);
  int64_t line = first_line;
  for (int64_t k = 0; k < K2; k += 16) {
    const uint16_t* w = panel + k * kPanel * 2;
    if (next != nullptr)
      for (int64_t i = 0; i < per_step && line < lines; ++i, ++line)
        _mm_prefetch(reinterpret_cast<const char*>(next + 32 * line), _MM_HINT_T1);
    _tile_loadd(6, x + 2 * k, row_bytes);
    _tile_loadd(7, w, 192);
    _tile_dpbf16ps(0, 6, 7);
    _tile_loadd(7, w + 32, 192);
    _tile_dpbf16ps(1, 6, 7);
    _tile_loadd(7, w + 64, 192);
    _tile_dpbf16ps(2, 6, 7);
    if (two) {
      _tile_loadd(6, a1 + 2 * k, row_bytes);
      _tile_dpbf16ps(5, 6, 7);
      _tile_loadd(7, w + 32, 192);
      _tile_dpbf16ps(4, 6, 7);
      _tile_loadd(7, w, 192);
      _tile_dpbf16ps(3, 6, 7);
    }
  }
  for (int half = 0; half < (two ? 2 : 1); ++half) {
    const int64_t first = half * 16, count = std::min<int64_t>(16, rows - first);
    for (int j = 0; j < 3 && cols > 16 * j; ++j) {
      switch (half * 3 + j) {
        READMOE_TILE_STORE(0)
        READMOE_TILE_STORE(1)
        READMOE_TILE_STORE(2)
        READMOE_TILE_STORE(3)
        READMOE_TILE_STORE(4)
        READMOE_TILE_STORE(5)
        default:
          break;
      }
      store_tile(sums, count, std::min<int64_t>(16, cols - 16 * j),
                 bias ? bias + 16 * j : nullptr, add ? add + first * ldy + 16 * j : nullptr,
                 y + first * ldy + 16 * j, ldy);
    }
  }
}
#undef READMOE_TILE_STORE
#endif

}  // namespace

namespace readmoe {

int64_t bf16_pairs(int64_t K) { return (K + 31) / 32 * 16; }

bool avx512_bf16_panels() {
#ifdef READMOE_BF16
  return avx512_panels() && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

bool bf16_panels_supported() {
  return avx512_bf16_panels() || (avx2_bf16_built() && __builtin_cpu_supports("avx2") &&
                                  __builtin_cpu_supports("fma"));
}

void bf16_panel_columns(const float* x, int64_t M, int64_t K, const at::BFloat16* panels,
                        int64_t begin, int64_t end, int64_t N, const float* bias,
                        const float* add, float* y) {
  if (!avx512_bf16_panels())
    return avx2_bf16_panel_columns(x, M, K, panels, begin, end, N, bias, add, y);
#ifdef READMOE_BF16
  const int64_t K2 = bf16_pairs(K);
  const bool amx = M >= 2 && amx_usable();
  const int64_t padded = amx ? (M + 15) / 16 * 16 : M;  // AMX reads whole 16-row blocks
  thread_local std::vector<uint16_t> rounded;
  rounded.resize(static_cast<size_t>(padded * 2 * K2));
  round_rows(x, M, K, K2, padded, rounded.data());
  const auto* all = reinterpret_cast<const uint16_t*>(panels);
  if (amx) {
    configure_tiles();
    panel_blocks(all, K2 * kPanel * 2, K2 / 16, begin, end, M, N, 32,
                 [&](const uint16_t* panel, const uint16_t* next, int64_t first_line,
                     int64_t per_step, int64_t lines, int64_t row, int64_t rows, int64_t col,
                     int64_t cols) {
                   amx_block(rounded.data() + row * 2 * K2, rows, K2, panel, next, first_line,
                             per_step, lines, bias ? bias + col : nullptr,
                             add ? add + row * N + col : nullptr, y + row * N + col, N, cols);
                 });
    _tile_release();
    return;
  }
  panel_blocks(all, K2 * kPanel * 2, K2, begin, end, M, N, kRowBlock,
               [&](const uint16_t* panel, const uint16_t* next, int64_t first_line,
                   int64_t per_step, int64_t lines, int64_t row, int64_t rows, int64_t col,
                   int64_t cols) {
                 kPairRows[rows](rounded.data() + row * 2 * K2, K2, panel, next, first_line,
                                 per_step, lines, bias ? bias + col : nullptr,
                                 add ? add + row * N + col : nullptr, y + row * N + col, N,
                                 cols);
               });
#endif
}

}  // namespace readmoe

#ifdef READMOE_BF16
#pragma GCC pop_options
#endif
