// The fused CPU ops shared by kernels.cpp (single passes) and layer.cpp (a layer's parts).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace readmoe {

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

// output columns of one weight panel (gemm.cpp)
constexpr int64_t kPanelColumns = 48;

// whether this CPU runs panel_linear (AVX-512F, checked at run time)
bool panels_supported();

// x [M, K] @ W.T (+ bias [N]) (+ add [M, N]) into out [M, N] if given, W [N, K] stored as
// panels [ceil(N / 48), K, 48] (panel p holds columns 48p .. 48p + 47, zero padded)
at::Tensor panel_linear(const at::Tensor& x, const at::Tensor& panels, int64_t out_features,
                        const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& add,
                        const std::optional<at::Tensor>& out);

}  // namespace readmoe
