// Whole decode steps as one call each: the backbone's (Decoder, decoder.cpp) and the
// pre-gating router's (Router, router.cpp). module.cpp binds them.
#pragma once

#include "cpu_ops.h"

#include <cstdint>
#include <optional>
#include <vector>

namespace readmoe {

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

// team.cpp: whether a layer's products all have panels (and its pools and biases are plain
// float32/float16 tensors), so team_layers can run it
bool team_fits(const DecodeLayer& l);

// the layers of a decode step of 2-48 rows as one parallel region, hidden [B, H] updated in
// place: rows sorted by expert (present[i] holds starts[i] .. + counts[i]; the caller checked
// they exist in every layer with routed experts), cos and sin
// [B, D] the rows' RoPE factors; products_only: Decoder::products_only
void team_layers(const std::vector<DecodeLayer>& layers, int64_t heads, int64_t kv_heads,
                 double scale, at::Tensor& hidden, const DecodeSlots& slots,
                 const at::Tensor& cos, const at::Tensor& sin,
                 const std::vector<int64_t>& present, const std::vector<int64_t>& starts,
                 const std::vector<int64_t>& counts, bool products_only);

// A decode-only step of the backbone, embedding to final norm, in one call. Holds references
// to the runner's packed weights and KV pools, made once; each step passes what changes.
class Decoder {
 public:
  // embed [V, H]: the token embedding; norm [H], eps: the final RMSNorm
  Decoder(int64_t heads, int64_t kv_heads, double scale, at::Tensor embed, at::Tensor norm,
          double eps);

  void add_layer(const at::Tensor& attn_norm, double attn_eps, const at::Tensor& qkv,
                 const MaybeTensor& qkv_blocked, const MaybeTensor& qkv_bias, const at::Tensor& o,
                 const MaybeTensor& o_blocked, const MaybeTensor& o_bias,
                 const at::Tensor& key_pool, const at::Tensor& value_pool,
                 const at::Tensor& ffn_norm, double ffn_eps, const std::optional<Expert>& shared,
                 const std::vector<Expert>& routed, const MaybeTensor& bias);

  // tokens [B]: one decode token per request; contexts[b]: request b's slots of positions
  // 0 .. p (its token at p, its key and value written to the last); request b's RoPE factors
  // are row rope_rows[b] of cos and sin [R, D]; experts [B]: each row's routed expert (empty
  // where no layer has routed experts) -> final norm of the last layer's output [B, H]
  at::Tensor step(const std::vector<int64_t>& tokens, const std::vector<at::Tensor>& contexts,
                  const at::Tensor& cos, const at::Tensor& sin,
                  const std::vector<int64_t>& rope_rows,
                  const std::vector<int64_t>& experts) const;

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

  // whether steps of 2-48 rows run their layers as one parallel region (team.cpp) where every
  // layer fits; off: one call a layer half (layer.cpp), the same bits
  bool team = true;

  // whether a step of `rows` rows runs as one parallel region (team on, every layer fits)
  bool team_runs(int64_t rows) const;

  // benchmarks' matmul floor: a step then runs only its products (zeroed buffers, no KV
  // written, hidden not the model's), as the one-region step runs them; needs team_runs
  bool products_only = false;

 private:
  void layers(at::Tensor& hidden, const DecodeSlots& slots, const at::Tensor& cos,
              const at::Tensor& sin, const std::vector<int64_t>& present,
              const std::vector<int64_t>& starts, const std::vector<int64_t>& counts) const;

  int64_t heads_, kv_heads_;
  double scale_;
  at::Tensor embed_, norm_;
  double eps_;
  std::vector<DecodeLayer> layers_;
  bool team_fits_ = true;  // every layer so far fits team_layers
};

// The pre-gating router's decode step: each request's newly sampled token -> its expert,
// the token's router keys and values written to the router's pools at the backbone's slot
class Router {
 public:
  // embed [V, dim]; cos, sin [slots, d]: the RoPE factors of every position a slot can hold
  // (sin's first half negated); norm, eps: the final RMSNorm; head [dim, E]
  Router(at::Tensor embed, int64_t heads, double scale, double margin, at::Tensor cos,
         at::Tensor sin, at::Tensor norm, double eps, at::Tensor head);

  void add_block(const at::Tensor& attn_norm, double attn_eps, const at::Tensor& qkv,
                 const MaybeTensor& qkv_blocked, const at::Tensor& out,
                 const MaybeTensor& out_blocked, const at::Tensor& mlp_norm, double mlp_eps,
                 const Expert& mlp, const at::Tensor& key_pool, const at::Tensor& value_pool);

  // tokens[i] at the last position of contexts[i] (its slots of positions 0 .. p);
  // previous[i]: the expert of the token before it (-1: none) -> each token's expert
  std::vector<int64_t> step(const std::vector<int64_t>& tokens,
                            const std::vector<at::Tensor>& contexts,
                            const std::vector<int64_t>& previous) const;

 private:
  struct Block {
    at::Tensor attn_norm;
    double attn_eps;
    at::Tensor qkv;
    MaybeTensor qkv_blocked;
    at::Tensor out;
    MaybeTensor out_blocked;
    at::Tensor mlp_norm;
    double mlp_eps;
    Expert mlp;
    at::Tensor key_pool, value_pool;
  };
  at::Tensor embed_;
  int64_t heads_;
  double scale_, margin_;
  at::Tensor cos_, sin_, norm_;
  double eps_;
  at::Tensor head_;
  std::vector<Block> blocks_;
};

}  // namespace readmoe
