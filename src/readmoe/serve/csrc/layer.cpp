// A decoder layer's two halves as one call each: the attention block of a decode-only step,
// and the MoE FFN (shared expert, then each routed expert present on its rows); and a
// decode-only step's layers, all of them, as one call (Decoder).
//
// Why: with the small ops fused (kernels.cpp), what is left of a decode step besides its
// matrix products is the Python calling them, about twenty calls a layer. The products here
// are the calls the Python path makes (packed.py: at::mm / at::addmm on the runner's [in, out]
// weights for one row; for 2-48 rows the runner's copy, gemm.cpp's panels or oneDNN's
// prepacked weights; a residual added by the product), in the same order, so the results
// equal it.

#include "cpu_ops.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/extension.h>

#include <optional>
#include <vector>

namespace readmoe {
namespace {

using MaybeTensor = std::optional<at::Tensor>;

// packed.py's BLOCKED_MIN_ROWS and BLOCKED_MAX_ROWS: products of this many rows use the
// prepacked weight
constexpr int64_t kBlockedMinRows = 2;
constexpr int64_t kBlockedMaxRows = 48;

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

// x @ weight (+ bias) (+ add), into out if given: the runner's PackedMatrix call on CPU.
// blocked: the copy for 2-48 rows, oneDNN's prepacked weight (an mkldnn tensor) or this
// library's panels (gemm.cpp, a strided [P, in, 48] tensor)
at::Tensor product(const at::Tensor& x, const at::Tensor& weight, const MaybeTensor& blocked,
                   const MaybeTensor& bias, const MaybeTensor& add,
                   const MaybeTensor& out = std::nullopt) {
  at::Tensor target = out ? *out : at::Tensor();  // a handle on the caller's storage
  if (blocked && x.size(0) >= kBlockedMinRows && x.size(0) <= kBlockedMaxRows) {
    if (!blocked->is_mkldnn()) return panel_linear(x, *blocked, weight.size(1), bias, add, out);
    const at::Tensor y = onednn_linear(x, *blocked, bias, add);
    return out ? target.copy_(y) : y;
  }
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

// An expert is its four matrices {gate_up, gate_up prepacked or none, down, down prepacked
// or none}
using Expert = std::vector<MaybeTensor>;

void check_expert(const Expert& e) {
  TORCH_CHECK(e.size() == 4 && e[0] && e[2], "an expert is [gate_up, blocked, down, blocked]");
}

at::Tensor expert_on(const Expert& e, const at::Tensor& x, const MaybeTensor& add,
                     const MaybeTensor& out) {
  check_expert(e);
  return swiglu(x, *e[0], e[1], *e[2], e[3], add, out);
}

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
  for (size_t i = 0; i < present; ++i) {
    at::Tensor rows = out.narrow(0, starts[i], counts[i]);
    expert_on(routed[i], x.narrow(0, starts[i], counts[i]), rows, rows);
    if (bias) rows.add_((*bias)[experts[i]]);
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

// One layer's weights and KV pools as Decoder holds them
struct DecodeLayer {
  at::Tensor attn_norm;
  double attn_eps;
  at::Tensor qkv;
  MaybeTensor qkv_blocked, qkv_bias;
  at::Tensor o;
  MaybeTensor o_blocked, o_bias;
  at::Tensor key_pool, value_pool;
  at::Tensor ffn_norm;
  double ffn_eps;
  std::optional<Expert> shared;
  std::vector<Expert> routed;  // every routed expert of the layer, by index; none: dense
  MaybeTensor bias;            // compensation [E, H] (dense: [1, H]) or none
};

// Every layer of a decode-only step in one call: the runner's per-layer loop without the
// Python between the layers' calls (about 1.2 ms a step on the default model). Holds
// references to the runner's packed weights and KV pools, made once; each step passes what
// changes: the hidden rows, their RoPE factors and slots, and the step's routing, which a
// pre-gating router fixes for every layer at once.
class Decoder {
 public:
  Decoder(int64_t heads, int64_t kv_heads, double scale)
      : heads_(heads), kv_heads_(kv_heads), scale_(scale) {}

  void add_layer(const at::Tensor& attn_norm, double attn_eps, const at::Tensor& qkv,
                 const MaybeTensor& qkv_blocked, const MaybeTensor& qkv_bias, const at::Tensor& o,
                 const MaybeTensor& o_blocked, const MaybeTensor& o_bias,
                 const at::Tensor& key_pool, const at::Tensor& value_pool,
                 const at::Tensor& ffn_norm, double ffn_eps, const std::optional<Expert>& shared,
                 const std::vector<Expert>& routed, const MaybeTensor& bias) {
    for (const Expert& e : routed) check_expert(e);
    if (shared) check_expert(*shared);
    layers_.push_back({attn_norm, attn_eps, qkv, qkv_blocked, qkv_bias, o, o_blocked, o_bias,
                       key_pool, value_pool, ffn_norm, ffn_eps, shared, routed, bias});
  }

  // hidden [B, H] (one decode row per request) -> the last layer's output [B, H]; experts:
  // the routed experts present, with their rows as moe_ffn takes them. The routing is the
  // same in every layer, so the rows (and their RoPE factors, slots and lengths) are sorted
  // by expert once here and put back once at the end, not gathered and scattered per layer.
  at::Tensor step(at::Tensor hidden, at::Tensor cos, at::Tensor sin, at::Tensor write_slots,
                  at::Tensor key_slots, at::Tensor lengths, const std::vector<int64_t>& experts,
                  const MaybeTensor& order, const std::vector<int64_t>& starts,
                  const std::vector<int64_t>& counts) const {
    if (order) {
      for (at::Tensor* t : {&hidden, &cos, &sin, &write_slots, &key_slots, &lengths})
        *t = t->index_select(0, *order);
    }
    const std::vector<int64_t> none;
    for (const DecodeLayer& l : layers_) {
      const bool dense = l.routed.empty();  // its FFN is the shared expert alone
      std::vector<Expert> present;
      if (!dense) {
        TORCH_CHECK(!experts.empty(), "a layer with routed experts needs the step's routing");
        for (const int64_t e : experts) {
          TORCH_CHECK(e >= 0 && e < static_cast<int64_t>(l.routed.size()), "expert ", e,
                      " outside the layer's ", l.routed.size());
          present.push_back(l.routed[e]);
        }
      }
      hidden = decode_attention_block(hidden, l.attn_norm, l.attn_eps, l.qkv, l.qkv_blocked,
                                      l.qkv_bias, l.o, l.o_blocked, l.o_bias, cos, sin,
                                      l.key_pool, l.value_pool, write_slots, key_slots, lengths,
                                      heads_, kv_heads_, scale_);
      hidden = sorted_moe_ffn(hidden, l.ffn_norm, l.ffn_eps, l.shared, present,
                              dense ? none : experts, dense ? none : starts,
                              dense ? none : counts, l.bias);
    }
    return order ? at::empty_like(hidden).index_copy_(0, *order, hidden) : hidden;
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

 private:
  int64_t heads_, kv_heads_;
  double scale_;
  std::vector<DecodeLayer> layers_;
};

}  // namespace
}  // namespace readmoe

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // every call runs without the GIL, as torch's own ops do: a decode step holds no Python
  // lock for its tens of milliseconds, so the expert store's copy thread and a server's
  // front end run beside it
  const auto kFree = pybind11::call_guard<pybind11::gil_scoped_release>();
  m.def("rms_norm", &readmoe::rms_norm, "RMSNorm of rows [N, H]", kFree);
  m.def("rope_write_kv", &readmoe::rope_write_kv,
        "RoPE on q and k; k and v written to their pools", kFree);
  m.def("decode_attention", &readmoe::decode_attention,
        "one query per request over its paged KV", kFree);
  m.def("silu_mul", &readmoe::silu_mul, "silu(gate) * up of a fused gate|up product", kFree);
  m.def("panels_supported", &readmoe::panels_supported,
        "whether this CPU runs panel_linear (AVX-512F)");
  m.def("panel_linear", &readmoe::panel_linear,
        "x @ W.T (+ bias) (+ add) through W's panels, into out if given", kFree);
  m.def("argmax_rows", &readmoe::argmax_rows, "each row's first maximum, as torch.max", kFree);
  m.def("swiglu", &readmoe::swiglu, "one SwiGLU expert on rows (+ add, into out)", kFree);
  m.def("decode_attention_block", &readmoe::decode_attention_block,
        "a decode-only step's attention block, residual added", kFree);
  m.def("moe_ffn", &readmoe::moe_ffn, "a layer's FFN: shared and routed experts, residual added",
        kFree);
  pybind11::class_<readmoe::Decoder>(m, "Decoder")
      .def(pybind11::init<int64_t, int64_t, double>())
      .def("add_layer", &readmoe::Decoder::add_layer)
      .def("step", &readmoe::Decoder::step, kFree)
      .def_property_readonly("num_layers", &readmoe::Decoder::num_layers);
  m.attr("BLOCKED_MIN_ROWS") = readmoe::kBlockedMinRows;
  m.attr("BLOCKED_MAX_ROWS") = readmoe::kBlockedMaxRows;
  m.attr("PANEL_COLUMNS") = readmoe::kPanelColumns;
}
