// The fused CPU ops shared by kernels.cpp (single passes) and layer.cpp (a layer's parts).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace readmoe {

using MaybeTensor = std::optional<at::Tensor>;

// x [N, H] -> x / sqrt(mean(x^2) + eps) * weight
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);

// RoPE on the query and key heads of qkv [N, (h + 2 kvh) * D]; keys and values written to
// their pools [slots, kvh, D] at slots [N]; returns the rotated queries [N, h, D]
at::Tensor rope_write_kv(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                         at::Tensor& key_pool, at::Tensor& value_pool, const at::Tensor& slots,
                         int64_t heads, int64_t kv_heads);

// one query per request q [B, h, D] over its paged keys and values -> [B, h * D]
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& key_pool,
                            const at::Tensor& value_pool, const at::Tensor& slots,
                            const at::Tensor& lengths, double scale);

// gate_up [n, 2R] -> silu(gate) * up [n, R]
at::Tensor silu_mul(const at::Tensor& gate_up);

// x [S, V] -> the index of each row's first maximum [S] (int64)
at::Tensor argmax_rows(const at::Tensor& x);

// packed.py's BLOCKED_MIN_ROWS and BLOCKED_MAX_ROWS: products of this many rows use the
// matrix's blocked copy (oneDNN's prepacked weight or the panels)
constexpr int64_t kBlockedMinRows = 2;
constexpr int64_t kBlockedMaxRows = 48;

// the fewest rows a product multiplies through float32 panels (kBlockedMinRows for oneDNN's
// copies): 1 where the AVX2 kernel runs, else kBlockedMinRows. On the 2-core AMD EPYC one
// dense step's one-row products read 25 GB/s through the AVX2 panels (four side by side) and
// 18 through at::mm on one thread; on two, MKL's product barely used the second thread
// (results/kernel_probe_epyc*.md). AVX-512 CPUs keep at::mm for one row (not measured here).
int64_t panel_min_rows();

// x's bytes read once, each thread's part in `streams` (1, 2, 4, 8 or 16) places side by
// side, as the one-row panel products read (read_probe.cpp); the xor of its 32-bit words
int64_t read_streams(const at::Tensor& x, int64_t streams);

// output columns of one weight panel (gemm.cpp)
constexpr int64_t kPanelColumns = 48;

// whether this CPU runs panel_linear on float32 panels (AVX-512F, or AVX2 and FMA: gemm.cpp,
// gemm_avx2.cpp; checked at run time)
bool panels_supported();
bool avx512_panels();
bool avx2_panels_built();

// whether it runs panel_linear on bf16 panels (AVX512-BF16: gemm_bf16.cpp, or AVX2 and FMA:
// gemm_bf16_avx2.cpp)
bool bf16_panels_supported();
bool avx512_bf16_panels();
bool avx2_bf16_built();

// k pairs a bf16 panel holds for K inputs: ceil(K / 2) padded to a multiple of 16 (AMX's
// tile depth), zero past K
int64_t bf16_pairs(int64_t K);

// x [M, K] @ W.T (+ bias [N]) (+ add [M, N]) into out [M, N] if given, W [N, K] stored as
// panels [ceil(N / 48), K, 48] (panel p holds columns 48p .. 48p + 47, zero padded), or as
// bf16 panels [ceil(N / 48), bf16_pairs(K), 48, 2] (k pairs innermost; x rounded to bf16)
at::Tensor panel_linear(const at::Tensor& x, const at::Tensor& panels, int64_t out_features,
                        const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& add,
                        const std::optional<at::Tensor>& out);

// The same work on raw rows, for a caller that splits it over threads itself (team.cpp):
// each does rows (or requests, or panels) [begin, end) of the op above it names.

// rms_norm's rows of x [., width] into y
void rms_norm_rows(const float* x, const float* weight, double eps, int64_t width,
                   int64_t begin, int64_t end, float* y);

// rope_write_kv's rows of qkv [., width] (cos, sin [., dim]) into q [., heads, dim] and the
// pools at slots; rotated: dim floats of scratch
void rope_kv_rows(const float* qkv, int64_t width, const float* cos, const float* sin,
                  int64_t dim, float* keys, float* values, const int64_t* slots, int64_t heads,
                  int64_t kv_heads, float* q, int64_t begin, int64_t end, float* rotated);
void rope_kv_rows(const float* qkv, int64_t width, const float* cos, const float* sin,
                  int64_t dim, at::Half* keys, at::Half* values, const int64_t* slots,
                  int64_t heads, int64_t kv_heads, float* q, int64_t begin, int64_t end,
                  float* rotated);

// decode_attention's requests: q [B, heads, dim], slots [B, width], lengths [B] -> out
// [B, heads * dim]; scores: scratch
void attend_rows(const float* q, const float* keys, const float* values, int64_t heads,
                 int64_t kv_heads, int64_t dim, const int64_t* slots, int64_t width,
                 const int64_t* lengths, float scale, float* out, int64_t begin, int64_t end,
                 std::vector<float>& scores);
void attend_rows(const float* q, const at::Half* keys, const at::Half* values, int64_t heads,
                 int64_t kv_heads, int64_t dim, const int64_t* slots, int64_t width,
                 const int64_t* lengths, float scale, float* out, int64_t begin, int64_t end,
                 std::vector<float>& scores);

// silu_mul's rows of gate_up [., 2 width] into out [., width]
void silu_mul_rows(const float* gate_up, int64_t width, float* out, int64_t begin,
                   int64_t end);

// panel_linear's panels [begin, end) (output columns 48 begin .. 48 end) of x [M, K] into y
// [M, N] (bias [N], add [M, N] or none; add may be y)
void panel_columns(const float* x, int64_t M, int64_t K, const float* panels, int64_t begin,
                   int64_t end, int64_t N, const float* bias, const float* add, float* y);
void avx2_panel_columns(const float* x, int64_t M, int64_t K, const float* panels,
                        int64_t begin, int64_t end, int64_t N, const float* bias,
                        const float* add, float* y);
void avx2_bf16_panel_columns(const float* x, int64_t M, int64_t K, const at::BFloat16* panels,
                             int64_t begin, int64_t end, int64_t N, const float* bias,
                             const float* add, float* y);
void bf16_panel_columns(const float* x, int64_t M, int64_t K, const at::BFloat16* panels,
                        int64_t begin, int64_t end, int64_t N, const float* bias,
                        const float* add, float* y);

// layer.cpp: the runner's products and a layer's two halves

// x @ weight (+ bias) (+ add), into out if given: the runner's PackedMatrix call on CPU;
// blocked: the copy for 2-48 rows (oneDNN's prepacked weight or gemm.cpp's panels), for every
// row count where it is bf16 panels (gemm_bf16.cpp)
at::Tensor product(const at::Tensor& x, const at::Tensor& weight, const MaybeTensor& blocked,
                   const MaybeTensor& bias, const MaybeTensor& add,
                   const MaybeTensor& out = std::nullopt);

// down(silu(gate) * up) of rows x (+ add), into out if given
at::Tensor swiglu(const at::Tensor& x, const at::Tensor& gate_up,
                  const MaybeTensor& gate_up_blocked, const at::Tensor& down,
                  const MaybeTensor& down_blocked, const MaybeTensor& add,
                  const MaybeTensor& out);

// hidden [B, H] -> hidden + o(attention(RoPE(qkv(norm(hidden))))), one query per request;
// writes the step's keys and values to the pools first
at::Tensor decode_attention_block(const at::Tensor& hidden, const at::Tensor& norm, double eps,
                                  const at::Tensor& qkv, const MaybeTensor& qkv_blocked,
                                  const MaybeTensor& qkv_bias, const at::Tensor& o,
                                  const MaybeTensor& o_blocked, const MaybeTensor& o_bias,
                                  const at::Tensor& cos, const at::Tensor& sin,
                                  at::Tensor key_pool, at::Tensor value_pool,
                                  const at::Tensor& write_slots, const at::Tensor& key_slots,
                                  const at::Tensor& lengths, int64_t heads, int64_t kv_heads,
                                  double scale);

// An expert is its four matrices {gate_up, gate_up's blocked copy or none, down, down's
// blocked copy or none}
using Expert = std::vector<MaybeTensor>;

void check_expert(const Expert& e);

// hidden [N, H], rows sorted by expert -> hidden + shared(x) + each row's routed expert(x)
// (+ compensation bias), x = norm(hidden); see layer.cpp
at::Tensor sorted_moe_ffn(const at::Tensor& hidden, const at::Tensor& norm, double eps,
                          const std::optional<Expert>& shared, const std::vector<Expert>& routed,
                          const std::vector<int64_t>& experts, const std::vector<int64_t>& starts,
                          const std::vector<int64_t>& counts, const MaybeTensor& bias);

// sorted_moe_ffn for rows in any order (order [N] sorts them by expert)
at::Tensor moe_ffn(const at::Tensor& hidden, const at::Tensor& norm, double eps,
                   const std::optional<Expert>& shared, const std::vector<Expert>& routed,
                   const std::vector<int64_t>& experts, const MaybeTensor& order,
                   const std::vector<int64_t>& starts, const std::vector<int64_t>& counts,
                   const MaybeTensor& bias);

// decoder.cpp: what a decode step's attention reads of each request's context

// One decode query per request: its context's slots padded with slot 0 [B, L] (never read:
// lengths), the lengths [B] and the slot its new key and value go to (the last) [B]
struct DecodeSlots {
  at::Tensor key_slots, lengths, write;
};

// contexts: each request's slots of positions 0 .. p (int64 [p + 1]), its query at p
DecodeSlots decode_slots(const std::vector<at::Tensor>& contexts);

// router.cpp: experts from router logits [S, E] with hysteresis (pregating.sticky_argmax for
// one token a row): row i keeps previous[i] (-1: none) unless its best logit beats that
// expert's by more than margin -> [S] int64
at::Tensor sticky_rows(const at::Tensor& logits, double margin,
                       const std::vector<int64_t>& previous);

}  // namespace readmoe
