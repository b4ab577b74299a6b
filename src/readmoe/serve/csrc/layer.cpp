// A decoder layer's two halves as one call each: the attention block of a decode-only step,
// and the MoE FFN (shared expert, then each routed expert present on its rows); decoder.cpp
// and router.cpp chain them into whole steps.
//
// Why: with the small ops fused (kernels.cpp), what is left of a decode step besides its
// matrix products is the Python calling them, about twenty calls a layer. The products here
// are the calls the Python path makes (packed.py: at::mm / at::addmm on the runner's [in, out]
// weights for one row; for 2-48 rows the runner's copy, gemm.cpp's panels or oneDNN's
// prepacked weights; a residual added by the product), in the same order, so the results
// equal it.

#include "cpu_ops.h"

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <string>
#include <vector>

namespace readmoe {
namespace {

// oneDNN's x @ W.T (+ bias) (+ add) on its prepacked W, through the ops packed.py calls
at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& blocked,
                         const MaybeTensor& bias, const MaybeTensor& add) {
  static const c10::OperatorHandle plain =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  static const c10::OperatorHandle binary =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "binary");
  const c10::IValue b = bias ? c10::IValue(*bias) : c10::IValue();
  std::vector<c10::IValue> stack;
  if (add) {
    stack = {x, *add, blocked, b, c10::IValue(std::string("add"))};
    binary.callBoxed(&stack);
  } else {
    stack = {x, blocked, b, c10::IValue(std::string("none")),
             c10::IValue(c10::List<std::optional<at::Scalar>>()), c10::IValue(std::string())};
    plain.callBoxed(&stack);
  }
  return stack[0].toTensor();
}

}  // namespace

// x @ weight (+ bias) (+ add), into out if given: the runner's PackedMatrix call on CPU.
// blocked: the copy for 2-48 rows, oneDNN's prepacked weight (an mkldnn tensor) or this
// library's panels (gemm.cpp, a strided [P, in, 48] tensor; from panel_min_rows() rows); bf16
// panels [P, bf16_pairs(in), 48, 2] (gemm_bf16.cpp) for every row count
at::Tensor product(const at::Tensor& x, const at::Tensor& weight, const MaybeTensor& blocked,
                   const MaybeTensor& bias, const MaybeTensor& add, const MaybeTensor& out) {
  at::Tensor target = out ? *out : at::Tensor();  // a handle on the caller's storage
  // bf16 panels take every row count: the weights' one precision, prefill's as decode's
  const bool bf16 = blocked && blocked->scalar_type() == at::kBFloat16;
  const int64_t fewest = blocked && blocked->is_mkldnn() ? kBlockedMinRows : panel_min_rows();
  if (blocked && (bf16 || (x.size(0) >= fewest && x.size(0) <= kBlockedMaxRows))) {
    if (!blocked->is_mkldnn()) return panel_linear(x, *blocked, weight.size(1), bias, add, out);
    const at::Tensor y = onednn_linear(x, *blocked, bias, add);
    return out ? target.copy_(y) : y;
  }
  TORCH_CHECK(weight.device() == x.device(), "a ", weight.device(), " weight without a copy "
              "for these rows (bf16 panels keep only the float32 matrix's shape)");
  if (!bias && !add) return out ? at::mm_out(target, x, weight) : at::mm(x, weight);
  const at::Tensor base = add ? (bias ? *add + *bias : *add) : *bias;
  return out ? at::addmm_out(target, base, x, weight) : at::addmm(base, x, weight);
}

// down(silu(gate) * up) of rows x (+ add), into out if given; weights [in, out] (and their
// prepacked copies, if any), no biases
at::Tensor swiglu(const at::Tensor& x, const at::Tensor& gate_up,
                  const MaybeTensor& gate_up_blocked, const at::Tensor& down,
                  const MaybeTensor& down_blocked, const MaybeTensor& add,
                  const MaybeTensor& out) {
  const at::Tensor hidden = product(x, gate_up, gate_up_blocked, std::nullopt, std::nullopt);
  return product(silu_mul(hidden), down, down_blocked, std::nullopt, add, out);
}

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
                                  double scale) {
  const at::Tensor q = rope_write_kv(product(rms_norm(hidden, norm, eps), qkv, qkv_blocked,
                                             qkv_bias, std::nullopt),
                                     cos, sin, key_pool, value_pool, write_slots, heads,
                                     kv_heads);
  return product(decode_attention(q, key_pool, value_pool, key_slots, lengths, scale), o,
                 o_blocked, o_bias, hidden);
}

void check_expert(const Expert& e) {
  TORCH_CHECK(e.size() == 4 && e[0] && e[2], "an expert is [gate_up, blocked, down, blocked]");
}

namespace {

at::Tensor expert_on(const Expert& e, const at::Tensor& x, const MaybeTensor& add,
                     const MaybeTensor& out) {
  check_expert(e);
  return swiglu(x, *e[0], e[1], *e[2], e[3], add, out);
}

}  // namespace

// hidden [N, H], rows sorted by expert -> hidden + shared(x) + each row's routed expert(x)
// (+ that expert's compensation bias [E, H] row), x = norm(hidden); shared: none or one.
// Routed expert experts[i] (matrices routed[i]) takes rows starts[i] .. + counts[i] and adds
// its output to them in place, so no gather or scatter. No routed experts: the layer is
// dense (its bias, if any, is row 0).
at::Tensor sorted_moe_ffn(const at::Tensor& hidden, const at::Tensor& norm, double eps,
                          const std::optional<Expert>& shared, const std::vector<Expert>& routed,
                          const std::vector<int64_t>& experts, const std::vector<int64_t>& starts,
                          const std::vector<int64_t>& counts, const MaybeTensor& bias) {
  const size_t present = experts.size();
  TORCH_CHECK(routed.size() == present && starts.size() == present &&
                  counts.size() == present,
              "one expert's matrices, start and count per routed expert");
  const at::Tensor x = rms_norm(hidden, norm, eps);
  at::Tensor out = shared ? expert_on(*shared, x, hidden, std::nullopt) : hidden;
  if (present == 0) return bias ? out + (*bias)[0] : out;
  if (!shared) out = hidden.clone();  // the experts add in place: leave the caller's hidden
  auto expert = [&](int64_t i) {
    at::Tensor rows = out.narrow(0, starts[i], counts[i]);
    expert_on(routed[i], x.narrow(0, starts[i], counts[i]), rows, rows);
    if (bias) rows.add_((*bias)[experts[i]]);
  };
  // two or more experts: one task each (their rows are disjoint), their products run inside
  // it on one thread; a step's few-row products then cost one parallel region a layer, not
  // one each (about 4 us of fork and join apiece on two threads). One expert keeps the
  // threads for its own products (a parallel_for of one task would run them on one).
  if (present >= 2 && at::get_num_threads() > 1) {
    const at::ThreadLocalState caller;  // inference mode and grad mode reach the workers
    at::parallel_for(0, static_cast<int64_t>(present), 1, [&](int64_t begin, int64_t end) {
      const at::ThreadLocalStateGuard guard(caller);
      for (int64_t i = begin; i < end; ++i) expert(i);
    });
  } else {
    for (size_t i = 0; i < present; ++i) expert(static_cast<int64_t>(i));
  }
  return out;
}

// sorted_moe_ffn for rows in any order: order [N] sorts them by expert (none: one expert
// holds every row, or none does), and the result comes back in the rows' own order
at::Tensor moe_ffn(const at::Tensor& hidden, const at::Tensor& norm, double eps,
                   const std::optional<Expert>& shared, const std::vector<Expert>& routed,
                   const std::vector<int64_t>& experts, const MaybeTensor& order,
                   const std::vector<int64_t>& starts, const std::vector<int64_t>& counts,
                   const MaybeTensor& bias) {
  if (!order) return sorted_moe_ffn(hidden, norm, eps, shared, routed, experts, starts, counts,
                                    bias);
  const at::Tensor sorted = sorted_moe_ffn(hidden.index_select(0, *order), norm, eps, shared,
                                           routed, experts, starts, counts, bias);
  return at::empty_like(sorted).index_copy_(0, *order, sorted);
}

}  // namespace readmoe
