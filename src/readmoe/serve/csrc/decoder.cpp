// A decode-only step of the backbone in one call (Decoder), and the slots its attention reads
// (decode_slots, shared with router.cpp).
//
// Why: with the layers' small ops fused and every layer one call (layer.cpp), what a decode
// step still spent outside its products was the Python around them: building the step's slot,
// length and RoPE tensors, embedding, grouping rows by expert, the final norm; about 30 ATen
// calls a step, each slow when a step's weights have just streamed through the caches (1.0
// ms a step at batch 1, 2.1 at batch 32, 2 threads). Here they are a few passes in C++.

#include "steps.h"

#include <algorithm>
#include <cstring>

namespace readmoe {

DecodeSlots decode_slots(const std::vector<at::Tensor>& contexts) {
  const int64_t rows = static_cast<int64_t>(contexts.size());
  int64_t width = 0;
  for (const at::Tensor& c : contexts) {
    TORCH_CHECK(c.device().is_cpu() && c.scalar_type() == at::kLong && c.dim() == 1,
                "each context must be a 1-D int64 CPU tensor of slots");
    TORCH_CHECK(c.size(0) > 0, "a context holds at least its query's slot");
    width = std::max(width, c.size(0));
  }
  const auto index = at::TensorOptions().dtype(at::kLong);
  DecodeSlots slots{at::zeros({rows, width}, index), at::empty({rows}, index),
                    at::empty({rows}, index)};
  int64_t* key_slots = slots.key_slots.data_ptr<int64_t>();
  int64_t* lengths = slots.lengths.data_ptr<int64_t>();
  int64_t* write = slots.write.data_ptr<int64_t>();
  for (int64_t b = 0; b < rows; ++b) {
    const at::Tensor c = contexts[b].contiguous();
    const int64_t length = c.size(0);
    std::memcpy(key_slots + b * width, c.data_ptr<int64_t>(), sizeof(int64_t) * length);
    lengths[b] = length;
    write[b] = key_slots[b * width + length - 1];
  }
  return slots;
}

Decoder::Decoder(int64_t heads, int64_t kv_heads, double scale, at::Tensor embed,
                 at::Tensor norm, double eps)
    : heads_(heads), kv_heads_(kv_heads), scale_(scale), embed_(std::move(embed)),
      norm_(std::move(norm)), eps_(eps) {
  TORCH_CHECK(embed_.dim() == 2 && norm_.dim() == 1 && norm_.size(0) == embed_.size(1),
              "the embedding must be [vocab, hidden] and the final norm [hidden]");
}

void Decoder::add_layer(const at::Tensor& attn_norm, double attn_eps, const at::Tensor& qkv,
                        const MaybeTensor& qkv_blocked, const MaybeTensor& qkv_bias,
                        const at::Tensor& o, const MaybeTensor& o_blocked,
                        const MaybeTensor& o_bias, const at::Tensor& key_pool,
                        const at::Tensor& value_pool, const at::Tensor& ffn_norm,
                        double ffn_eps, const std::optional<Expert>& shared,
                        const std::vector<Expert>& routed, const MaybeTensor& bias) {
  for (const Expert& e : routed) check_expert(e);
  if (shared) check_expert(*shared);
  layers_.push_back({attn_norm, attn_eps, qkv, qkv_blocked, qkv_bias, o, o_blocked, o_bias,
                     key_pool, value_pool, ffn_norm, ffn_eps, shared, routed, bias});
  team_fits_ = team_fits_ && team_fits(layers_.back());
}

// the layers one call each (layer.cpp): one row, more than 48, or oneDNN's products
void Decoder::layers(at::Tensor& hidden, const DecodeSlots& slots, const at::Tensor& cos,
                     const at::Tensor& sin, const std::vector<int64_t>& present,
                     const std::vector<int64_t>& starts,
                     const std::vector<int64_t>& counts) const {
  const std::vector<int64_t> none;
  for (const DecodeLayer& l : layers_) {
    const bool dense = l.routed.empty();  // its FFN is the shared expert alone
    std::vector<Expert> routed;
    for (const int64_t e : dense ? none : present) routed.push_back(l.routed[e]);
    hidden = decode_attention_block(hidden, l.attn_norm, l.attn_eps, l.qkv, l.qkv_blocked,
                                    l.qkv_bias, l.o, l.o_blocked, l.o_bias, cos, sin,
                                    l.key_pool, l.value_pool, slots.write, slots.key_slots,
                                    slots.lengths, heads_, kv_heads_, scale_);
    hidden = sorted_moe_ffn(hidden, l.ffn_norm, l.ffn_eps, l.shared, routed,
                            dense ? none : present, dense ? none : starts,
                            dense ? none : counts, l.bias);
  }
}

bool Decoder::team_runs(int64_t rows) const {
  return team && team_fits_ && panels_supported() && rows >= panel_min_rows() &&
         rows <= kBlockedMaxRows;
}

// The routing is the same in every layer (a pre-gating router fixes it for the step), so the
// rows are put in expert order once, as they are gathered (tokens, slots, RoPE factors), and
// back once at the end, not gathered and scattered per layer.
at::Tensor Decoder::step(const std::vector<int64_t>& tokens,
                         const std::vector<at::Tensor>& contexts, const at::Tensor& cos,
                         const at::Tensor& sin, const std::vector<int64_t>& rope_rows,
                         const std::vector<int64_t>& experts) const {
  const int64_t rows = static_cast<int64_t>(tokens.size());
  TORCH_CHECK(rows > 0 && static_cast<int64_t>(contexts.size()) == rows &&
                  static_cast<int64_t>(rope_rows.size()) == rows,
              "one context and one RoPE row per token");
  TORCH_CHECK(experts.empty() || static_cast<int64_t>(experts.size()) == rows,
              "one routed expert per token, or none");
  // the rows by expert, stably: expert e's rows are starts[i] .. + counts[i] (e = present[i])
  std::vector<int64_t> order(rows), present, starts, counts;
  for (int64_t b = 0; b < rows; ++b) order[b] = b;
  if (!experts.empty()) {
    for (const int64_t e : experts) TORCH_CHECK(e >= 0, "expert ", e, " is not an expert");
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return experts[a] < experts[b]; });
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t e = experts[order[i]];
      if (present.empty() || present.back() != e) {
        present.push_back(e);
        starts.push_back(i);
        counts.push_back(0);
      }
      ++counts.back();
    }
  }
  bool sorted = true;
  for (int64_t i = 0; i < rows; ++i) sorted = sorted && order[i] == i;
  std::vector<int64_t> sorted_tokens(rows), sorted_rope(rows);
  std::vector<at::Tensor> sorted_contexts(rows);
  for (int64_t i = 0; i < rows; ++i) {
    sorted_tokens[i] = tokens[order[i]];
    sorted_rope[i] = rope_rows[order[i]];
    sorted_contexts[i] = contexts[order[i]];
  }
  const auto index = at::TensorOptions().dtype(at::kLong);
  const DecodeSlots slots = decode_slots(sorted_contexts);
  const at::Tensor rope = at::tensor(sorted_rope, index);
  const at::Tensor row_cos = cos.index_select(0, rope), row_sin = sin.index_select(0, rope);
  at::Tensor hidden = embed_.index_select(0, at::tensor(sorted_tokens, index));  // [B, H]
  // every layer's routed experts of the step exist (present is in ascending order)
  for (const DecodeLayer& l : layers_) {
    if (l.routed.empty()) continue;
    TORCH_CHECK(!present.empty(), "a layer with routed experts needs the step's routing");
    TORCH_CHECK(present.back() < static_cast<int64_t>(l.routed.size()), "expert ",
                present.back(), " outside the layer's ", l.routed.size());
  }
  TORCH_CHECK(!products_only || team_runs(rows), "products_only times the one-region step: ",
              rows, " rows do not run as one (2-48 rows, every layer on panels, team on)");
  if (team_runs(rows)) {
    team_layers(layers_, heads_, kv_heads_, scale_, hidden, slots, row_cos, row_sin, present,
                starts, counts, products_only);
  } else {
    layers(hidden, slots, row_cos, row_sin, present, starts, counts);
  }
  hidden = rms_norm(hidden, norm_, eps_);
  if (sorted) return hidden;
  return at::empty_like(hidden).index_copy_(0, at::tensor(order, index), hidden);
}

}  // namespace readmoe
