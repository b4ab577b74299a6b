// A decoder layer's two halves as one call each: the attention block of a decode-only step,
// and the MoE FFN (shared expert, then each routed expert present on its rows).
//
// Why: with the small ops fused (kernels.cpp), what is left of a decode step besides its
// matrix products is the Python calling them, about twenty calls a layer. The products here
// are the ATen calls the Python path makes (at::mm / at::addmm on the runner's [in, out]
// weights, a residual added by the product), in the same order, so the results equal it.

#include "cpu_ops.h"

#include <torch/extension.h>

#include <optional>
#include <vector>

namespace readmoe {
namespace {

using MaybeTensor = std::optional<at::Tensor>;

// x @ weight (+ bias) (+ add), into out if given: the runner's PackedMatrix call on CPU
at::Tensor product(const at::Tensor& x, const at::Tensor& weight, const MaybeTensor& bias,
                   const MaybeTensor& add, const MaybeTensor& out = std::nullopt) {
  at::Tensor target = out ? *out : at::Tensor();  // a handle on the caller's storage
  if (!bias && !add) return out ? at::mm_out(target, x, weight) : at::mm(x, weight);
  const at::Tensor base = add ? (bias ? *add + *bias : *add) : *bias;
  return out ? at::addmm_out(target, base, x, weight) : at::addmm(base, x, weight);
}

// down(silu(gate) * up) of rows x (+ add), into out if given; weights [in, out], no biases
at::Tensor swiglu(const at::Tensor& x, const at::Tensor& gate_up, const at::Tensor& down,
                  const MaybeTensor& add, const MaybeTensor& out) {
  return product(silu_mul(at::mm(x, gate_up)), down, std::nullopt, add, out);
}

// hidden [B, H] -> hidden + o(attention(RoPE(qkv(norm(hidden))))), one query per request;
// writes the step's keys and values to the pools first
at::Tensor decode_attention_block(const at::Tensor& hidden, const at::Tensor& norm, double eps,
                                  const at::Tensor& qkv, const MaybeTensor& qkv_bias,
                                  const at::Tensor& o, const MaybeTensor& o_bias,
                                  const at::Tensor& cos, const at::Tensor& sin,
                                  at::Tensor key_pool, at::Tensor value_pool,
                                  const at::Tensor& write_slots, const at::Tensor& key_slots,
                                  const at::Tensor& lengths, int64_t heads, int64_t kv_heads,
                                  double scale) {
  const at::Tensor q = rope_write_kv(product(rms_norm(hidden, norm, eps), qkv, qkv_bias,
                                             std::nullopt),
                                     cos, sin, key_pool, value_pool, write_slots, heads,
                                     kv_heads);
  return product(decode_attention(q, key_pool, value_pool, key_slots, lengths, scale), o,
                 o_bias, hidden);
}

// hidden [N, H] -> hidden + shared(x) + each row's routed expert(x) (+ that expert's
// compensation bias [E, H] row), x = norm(hidden). shared: empty or {gate_up, down}. Routed
// expert experts[i] (weights gate_ups[i], downs[i]) takes rows starts[i] .. + counts[i] of
// the rows sorted by order, or every row when order is none. No routed experts: the layer is
// dense (its bias, if any, is row 0).
at::Tensor moe_ffn(const at::Tensor& hidden, const at::Tensor& norm, double eps,
                   const std::vector<at::Tensor>& shared, const std::vector<at::Tensor>& gate_ups,
                   const std::vector<at::Tensor>& downs, const std::vector<int64_t>& experts,
                   const MaybeTensor& order, const std::vector<int64_t>& starts,
                   const std::vector<int64_t>& counts, const MaybeTensor& bias) {
  TORCH_CHECK(shared.empty() || shared.size() == 2, "shared must be [] or [gate_up, down]");
  const size_t routed = experts.size();
  TORCH_CHECK(gate_ups.size() == routed && downs.size() == routed && starts.size() == routed &&
                  counts.size() == routed,
              "one gate_up, down, start and count per routed expert");
  const at::Tensor x = rms_norm(hidden, norm, eps);
  at::Tensor out = shared.empty() ? hidden : swiglu(x, shared[0], shared[1], hidden,
                                                    std::nullopt);
  if (routed == 0) return bias ? out + (*bias)[0] : out;
  if (!order) {
    for (size_t i = 0; i < routed; ++i) {
      out = swiglu(x, gate_ups[i], downs[i], out, std::nullopt);
      if (bias) out = out + (*bias)[experts[i]];
    }
    return out;
  }
  const at::Tensor grouped = x.index_select(0, *order);
  at::Tensor result = at::empty_like(grouped);
  for (size_t i = 0; i < routed; ++i) {
    at::Tensor rows = result.narrow(0, starts[i], counts[i]);
    swiglu(grouped.narrow(0, starts[i], counts[i]), gate_ups[i], downs[i], std::nullopt, rows);
    if (bias) rows.add_((*bias)[experts[i]]);
  }
  // without a shared expert out is the caller's hidden: leave it as it is
  return shared.empty() ? hidden.index_add(0, *order, result)
                        : out.index_add_(0, *order, result);
}

}  // namespace
}  // namespace readmoe

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &readmoe::rms_norm, "RMSNorm of rows [N, H]");
  m.def("rope_write_kv", &readmoe::rope_write_kv,
        "RoPE on q and k; k and v written to their pools");
  m.def("decode_attention", &readmoe::decode_attention,
        "one query per request over its paged KV");
  m.def("silu_mul", &readmoe::silu_mul, "silu(gate) * up of a fused gate|up product");
  m.def("swiglu", &readmoe::swiglu, "one SwiGLU expert on rows (+ add, into out)");
  m.def("decode_attention_block", &readmoe::decode_attention_block,
        "a decode-only step's attention block, residual added");
  m.def("moe_ffn", &readmoe::moe_ffn, "a layer's FFN: shared and routed experts, residual added");
}
