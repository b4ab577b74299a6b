// The pre-gating router's decode step in one call (Router), and its hysteresis (sticky_rows).
//
// Why: each decoded token's expert must be known right after sampling, before the step that
// feeds it back, so the router's step sits on the critical path between two backbone steps.
// As Python over the fused ops it was about 40 ATen calls (slot tensors, embedding, two
// layer calls a block, the head, the hysteresis's gathers and wheres): 1.1-1.2 ms a batch-1
// step in the engine with 2 threads, where the same calls take 0.3 ms warm (the step's
// weights had just streamed through the caches, and the code and data of each call with them).

#include "steps.h"

#include <cmath>

namespace readmoe {

at::Tensor sticky_rows(const at::Tensor& logits, double margin,
                       const std::vector<int64_t>& previous) {
  TORCH_CHECK(logits.device().is_cpu() && logits.scalar_type() == at::kFloat &&
                  logits.dim() == 2 && logits.size(1) > 0,
              "router logits must be a float32 CPU tensor [tokens, experts]");
  const at::Tensor scores = logits.contiguous();
  const int64_t rows = scores.size(0), experts = scores.size(1);
  TORCH_CHECK(static_cast<int64_t>(previous.size()) == rows, "one previous expert per row");
  auto chosen = at::empty({rows}, scores.options().dtype(at::kLong));
  const float* x = scores.data_ptr<float>();
  int64_t* out = chosen.data_ptr<int64_t>();
  // top - margin as torch computes a float32 tensor minus a Python float: in float32
  const auto cut = static_cast<float>(margin);
  for (int64_t n = 0; n < rows; ++n) {
    const float* row = x + n * experts;
    int64_t best = 0;  // the first maximum, as argmax (a NaN wins, as there)
    for (int64_t e = 1; e < experts && !std::isnan(row[best]); ++e)
      if (row[e] > row[best] || std::isnan(row[e])) best = e;
    const int64_t held = previous[n];
    TORCH_CHECK(held >= -1 && held < experts, "previous expert ", held, " outside the ",
                experts, " experts");
    out[n] = margin != 0 && held >= 0 && row[held] >= row[best] - cut ? held : best;
  }
  return chosen;
}

Router::Router(at::Tensor embed, int64_t heads, double scale, double margin, at::Tensor cos,
               at::Tensor sin, at::Tensor norm, double eps, at::Tensor head)
    : embed_(std::move(embed)), heads_(heads), scale_(scale), margin_(margin),
      cos_(std::move(cos)), sin_(std::move(sin)), norm_(std::move(norm)), eps_(eps),
      head_(std::move(head)) {
  TORCH_CHECK(embed_.dim() == 2 && head_.dim() == 2 && head_.size(0) == embed_.size(1),
              "the router's embedding must be [vocab, dim] and its head [dim, experts]");
  TORCH_CHECK(cos_.sizes() == sin_.sizes() && cos_.dim() == 2,
              "the RoPE factors must be two [slots, head_dim] tables");
}

void Router::add_block(const at::Tensor& attn_norm, double attn_eps, const at::Tensor& qkv,
                       const MaybeTensor& qkv_blocked, const at::Tensor& out,
                       const MaybeTensor& out_blocked, const at::Tensor& mlp_norm,
                       double mlp_eps, const Expert& mlp, const at::Tensor& key_pool,
                       const at::Tensor& value_pool) {
  check_expert(mlp);
  blocks_.push_back({attn_norm, attn_eps, qkv, qkv_blocked, out, out_blocked, mlp_norm,
                     mlp_eps, mlp, key_pool, value_pool});
}

// The router's blocks as the Python path called them (a block: the attention as a decode
// attention block, the MLP as a shared expert), so the logits are the same bits
std::vector<int64_t> Router::step(const std::vector<int64_t>& tokens,
                                  const std::vector<at::Tensor>& contexts,
                                  const std::vector<int64_t>& previous) const {
  const int64_t rows = static_cast<int64_t>(tokens.size());
  if (rows == 0) return {};
  TORCH_CHECK(static_cast<int64_t>(contexts.size()) == rows &&
                  static_cast<int64_t>(previous.size()) == rows,
              "one context and one previous expert per token");
  const DecodeSlots slots = decode_slots(contexts);
  const at::Tensor positions = slots.lengths - 1;
  const at::Tensor cos = cos_.index_select(0, positions), sin = sin_.index_select(0, positions);
  const auto index = at::TensorOptions().dtype(at::kLong);
  at::Tensor x = embed_.index_select(0, at::tensor(tokens, index));  // [S, dim]
  const std::vector<int64_t> none;
  for (const Block& b : blocks_) {
    x = decode_attention_block(x, b.attn_norm, b.attn_eps, b.qkv, b.qkv_blocked, std::nullopt,
                               b.out, b.out_blocked, std::nullopt, cos, sin, b.key_pool,
                               b.value_pool, slots.write, slots.key_slots, slots.lengths,
                               heads_, heads_, scale_);
    x = sorted_moe_ffn(x, b.mlp_norm, b.mlp_eps, b.mlp, {}, none, none, none, std::nullopt);
  }
  const at::Tensor experts = sticky_rows(at::mm(rms_norm(x, norm_, eps_), head_), margin_,
                                         previous);
  const int64_t* chosen = experts.data_ptr<int64_t>();
  return {chosen, chosen + rows};
}

}  // namespace readmoe
