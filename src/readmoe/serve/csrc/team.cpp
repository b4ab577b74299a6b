// A decode step's layers as the phases of one parallel region (phases.h): Decoder::step's path
// for 2-48 rows when every product of every layer has panels (gemm.cpp).
//
// Why: at batch 32 on two threads (the dense SmolLM2 served as one expert) a step spent about
// 9 of its 54 ms outside its products. Every small op was a parallel region of its own (about
// 4 us of fork and join), and every op and product a few ATen calls (allocation, views,
// checks) that run cold after the products have streamed megabytes of weights through the
// caches (torch.empty: 0.9 us hot, 12-27 us after 64 MB). Here a step allocates its buffers
// once, checks its inputs once, and each layer's ops are phases calling the fused ops' row
// kernels on raw pointers. A chunk runs the code the per-op calls run on the same rows, in
// the same order per output, so the results are the same bits, but for an expert's single
// row: through its panels here, through at::mm there (equal to float rounding).

#include "phases.h"
#include "steps.h"

#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <utility>

namespace readmoe {
namespace {

constexpr int64_t kPhasesPerLayer = 10;

// [begin, end) of part c of n items cut in `parts` contiguous runs, as at::parallel_for cuts
std::pair<int64_t, int64_t> part(int64_t n, int64_t parts, int64_t c) {
  const int64_t size = (n + parts - 1) / parts;
  return {std::min(n, c * size), std::min(n, (c + 1) * size)};
}

int64_t panel_count(int64_t columns) {
  return (columns + kPanelColumns - 1) / kPanelColumns;
}

const float* data(const MaybeTensor& t) { return t ? t->data_ptr<float>() : nullptr; }

bool is_bf16(const MaybeTensor& blocked) {
  return blocked && blocked->scalar_type() == at::kBFloat16;
}

// weight [K, N] with its panels [ceil(N / 48), K, 48] (a float32 CPU copy, not oneDNN's) or
// bf16 panels [ceil(N / 48), bf16_pairs(K), 48, 2]
bool on_panels(const at::Tensor& weight, const MaybeTensor& blocked, const MaybeTensor& bias) {
  const auto fp32 = [](const at::Tensor& t) {
    return t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous();
  };
  if (weight.dim() != 2 || !blocked || blocked->is_mkldnn() || !blocked->device().is_cpu() ||
      !blocked->is_contiguous() || blocked->size(0) != panel_count(weight.size(1)) ||
      (bias && !(fp32(*bias) && bias->dim() == 1 && bias->size(0) == weight.size(1))))
    return false;
  if (is_bf16(blocked))
    return bf16_panels_supported() && blocked->dim() == 4 &&
           blocked->size(1) == bf16_pairs(weight.size(0)) && blocked->size(2) == kPanelColumns &&
           blocked->size(3) == 2;
  return fp32(*blocked) && blocked->dim() == 3 && blocked->size(1) == weight.size(0) &&
         blocked->size(2) == kPanelColumns;
}

bool expert_on_panels(const Expert& e) {
  return e.size() == 4 && e[0] && e[2] && on_panels(*e[0], e[1], std::nullopt) &&
         on_panels(*e[2], e[3], std::nullopt);
}

// x [M, K] @ W (its panels, float32 or bf16) (+ bias) (+ add) -> y [M, N]; then `after` [N]
// added to each row (an expert's compensation bias, added after the residual as
// sorted_moe_ffn adds it)
struct Product {
  const float* x;
  int64_t M, K;
  const void* panels;
  bool bf16;
  int64_t N;
  const float* bias;
  const float* add;
  float* y;
  const float* after;
};

Product product_of(const at::Tensor& weight, const MaybeTensor& blocked, const float* x,
                   int64_t M, const float* bias, float* y, bool residual,
                   const float* after = nullptr) {
  return {x, M, weight.size(0), blocked->data_ptr(), is_bf16(blocked), weight.size(1), bias,
          residual ? y : nullptr, y, after};
}

// silu(gate) * up of gate_up [M, 2R] -> out [M, R]
struct Gating {
  const float* gate_up;
  int64_t M, R;
  float* out;
};

// what one layer's phases read and write
struct LayerPlan {
  const float *attn_norm, *ffn_norm;
  double attn_eps, ffn_eps;
  std::vector<Product> qkv, o, gate_up, down_shared, down_routed;
  std::vector<Gating> gating;
  void *keys, *values;
  bool half;  // float16 pools
};

// every product of the list, each cut in `parts` runs of its panels
void run_products(Phases& phases, Phases::Cursor& cursor, const std::vector<Product>& list,
                  int64_t parts) {
  phases.run(cursor, static_cast<int64_t>(list.size()) * parts, [&](int64_t c) {
    const Product& p = list[static_cast<size_t>(c / parts)];
    const auto [begin, end] = part(panel_count(p.N), parts, c % parts);
    if (begin >= end) return;
    if (p.bf16) {
      bf16_panel_columns(p.x, p.M, p.K, static_cast<const at::BFloat16*>(p.panels), begin, end,
                         p.N, p.bias, p.add, p.y);
    } else {
      panel_columns(p.x, p.M, p.K, static_cast<const float*>(p.panels), begin, end, p.N,
                    p.bias, p.add, p.y);
    }
    if (!p.after) return;
    const int64_t first = begin * kPanelColumns, last = std::min(p.N, end * kPanelColumns);
    for (int64_t r = 0; r < p.M; ++r)
      for (int64_t col = first; col < last; ++col) p.y[r * p.N + col] += p.after[col];
  });
}

}  // namespace

bool team_fits(const DecodeLayer& l) {
  const auto pools = [&](const at::Tensor& pool) {
    return pool.device().is_cpu() && pool.dim() == 3 && pool.is_contiguous() &&
           (pool.scalar_type() == at::kFloat || pool.scalar_type() == at::kHalf);
  };
  bool fits = on_panels(l.qkv, l.qkv_blocked, l.qkv_bias) &&
              on_panels(l.o, l.o_blocked, l.o_bias) && pools(l.key_pool) &&
              pools(l.value_pool) && l.key_pool.sizes() == l.value_pool.sizes() &&
              l.key_pool.scalar_type() == l.value_pool.scalar_type() &&
              (l.shared || !l.routed.empty()) && (!l.shared || expert_on_panels(*l.shared));
  for (const Expert& e : l.routed) fits = fits && expert_on_panels(e);
  return fits && (!l.bias || (l.bias->scalar_type() == at::kFloat && l.bias->is_contiguous() &&
                              l.bias->dim() == 2));
}

void team_layers(const std::vector<DecodeLayer>& layers, int64_t heads, int64_t kv_heads,
                 double scale, at::Tensor& hidden, const DecodeSlots& slots,
                 const at::Tensor& cos, const at::Tensor& sin,
                 const std::vector<int64_t>& present, const std::vector<int64_t>& starts,
                 const std::vector<int64_t>& counts, bool products_only) {
  const int64_t rows = hidden.size(0), H = hidden.size(1), dim = cos.size(1);
  const int64_t width = slots.key_slots.size(1), A = heads * dim;
  TORCH_CHECK(hidden.is_contiguous() && cos.is_contiguous() && sin.is_contiguous() &&
                  cos.size(0) == rows && sin.size(0) == rows,
              "hidden, cos and sin must be contiguous, one row per token");
  const int64_t* key_slots = slots.key_slots.data_ptr<int64_t>();
  const int64_t last_slot = *std::max_element(key_slots, key_slots + rows * width);
  TORCH_CHECK(*std::min_element(key_slots, key_slots + rows * width) >= 0,
              "a context holds a negative slot");
  // the buffers' widths: the widest qkv, shared and routed expert of any layer
  int64_t Q = 0, shared_R = 0, routed_R = 0;
  for (const DecodeLayer& l : layers) {
    TORCH_CHECK(l.qkv.size(0) == H && l.qkv.size(1) == (heads + 2 * kv_heads) * dim &&
                    l.o.size(0) == A && l.o.size(1) == H,
                "a layer's qkv or o does not fit ", heads, " + 2 x ", kv_heads,
                " heads of ", dim, " over a hidden size of ", H);
    TORCH_CHECK(l.key_pool.size(1) == kv_heads && l.key_pool.size(2) == dim &&
                    last_slot < l.key_pool.size(0),
                "a layer's KV pools [", l.key_pool.sizes(), "] do not hold slot ", last_slot,
                " of ", kv_heads, " heads of ", dim);
    for (const at::Tensor* norm : {&l.attn_norm, &l.ffn_norm})
      TORCH_CHECK(norm->scalar_type() == at::kFloat && norm->is_contiguous() &&
                      norm->numel() == H,
                  "a layer's norm weight must be a contiguous float32 vector of ", H);
    TORCH_CHECK(!l.bias || (l.bias->size(1) == H &&
                            l.bias->size(0) >= std::max<int64_t>(1, l.routed.size())),
                "a layer's compensation must be [experts, ", H, "], got ", l.bias->sizes());
    Q = std::max(Q, l.qkv.size(1));
    if (l.shared) shared_R = std::max(shared_R, (*l.shared)[2]->size(0));
    if (!l.routed.empty())
      for (const int64_t e : present) routed_R = std::max(routed_R, l.routed[e][2]->size(0));
  }
  const int64_t floats = rows * (H + Q + 2 * A + 3 * shared_R + 3 * routed_R);
  // products alone read buffers no op filled: zeros, not garbage (denormals slow FMA down)
  at::Tensor arena = products_only ? at::zeros({floats}, hidden.options())
                                   : at::empty({floats}, hidden.options());
  if (products_only) hidden.zero_();
  float* h = hidden.data_ptr<float>();
  float* x = arena.data_ptr<float>();
  float* qkv = x + rows * H;
  float* q = qkv + rows * Q;
  float* attn = q + rows * A;
  float* shared_gu = attn + rows * A;
  float* shared_act = shared_gu + rows * 2 * shared_R;
  float* routed_gu = shared_act + rows * shared_R;
  float* routed_act = routed_gu + rows * 2 * routed_R;
  std::vector<LayerPlan> plans;
  plans.reserve(layers.size());
  for (const DecodeLayer& l : layers) {
    LayerPlan p{l.attn_norm.data_ptr<float>(), l.ffn_norm.data_ptr<float>(), l.attn_eps,
                l.ffn_eps, {}, {}, {}, {}, {}, {}, l.key_pool.data_ptr(),
                l.value_pool.data_ptr(), l.key_pool.scalar_type() == at::kHalf};
    p.qkv.push_back(product_of(l.qkv, l.qkv_blocked, x, rows, data(l.qkv_bias), qkv, false));
    p.o.push_back(product_of(l.o, l.o_blocked, attn, rows, data(l.o_bias), h, true));
    const float* bias = data(l.bias);
    if (l.shared) {
      const Expert& e = *l.shared;
      const int64_t R = e[2]->size(0);
      p.gate_up.push_back(product_of(*e[0], e[1], x, rows, nullptr, shared_gu, false));
      p.gating.push_back({shared_gu, rows, R, shared_act});
      // a dense layer's compensation (row 0) follows its residual
      p.down_shared.push_back(product_of(*e[2], e[3], shared_act, rows, nullptr, h, true,
                                         l.routed.empty() ? bias : nullptr));
    }
    for (size_t i = 0; i < present.size() && !l.routed.empty(); ++i) {
      const Expert& e = l.routed[present[i]];
      const int64_t R = e[2]->size(0), first = starts[i], M = counts[i];
      float* gu = routed_gu + first * 2 * routed_R;
      float* act = routed_act + first * routed_R;
      p.gate_up.push_back(product_of(*e[0], e[1], x + first * H, M, nullptr, gu, false));
      p.gating.push_back({gu, M, R, act});
      p.down_routed.push_back(product_of(*e[2], e[3], act, M, nullptr, h + first * H, true,
                                         bias ? bias + present[i] * H : nullptr));
    }
    plans.push_back(std::move(p));
  }
  const int64_t* write = slots.write.data_ptr<int64_t>();
  const int64_t* lengths = slots.lengths.data_ptr<int64_t>();
  const float* row_cos = cos.data_ptr<float>();
  const float* row_sin = sin.data_ptr<float>();
  const auto S = static_cast<float>(scale);
  const int64_t parts = std::max<int64_t>(1, at::get_num_threads());
  const int64_t ops = products_only ? 0 : parts;  // chunks of each phase that is not a product
  Phases phases(static_cast<int64_t>(plans.size()) * kPhasesPerLayer);
  // each phase a profiler scope (the calling thread's, whose phases span the whole step)
  const auto scoped = [](const char* name, const auto& body) {
    RECORD_FUNCTION(name, c10::ArrayRef<const c10::IValue>{});
    body();
  };
  const auto walk = [&] {
    Phases::Cursor at;
    std::vector<float> rotated(dim), scores;
    const auto products = [&](const std::vector<Product>& list) {
      scoped("readmoe::panel_linear", [&] { run_products(phases, at, list, parts); });
    };
    const auto norm = [&](const float* weight, double eps) {
      scoped("readmoe::rms_norm", [&] {
        phases.run(at, ops, [&](int64_t c) {
          const auto [begin, end] = part(rows, parts, c);
          rms_norm_rows(h, weight, eps, H, begin, end, x);
        });
      });
    };
    for (const LayerPlan& p : plans) {
      norm(p.attn_norm, p.attn_eps);
      products(p.qkv);
      scoped("readmoe::rope_write_kv", [&] {
        phases.run(at, ops, [&](int64_t c) {
          const auto [begin, end] = part(rows, parts, c);
          if (p.half) {
            rope_kv_rows(qkv, Q, row_cos, row_sin, dim, static_cast<at::Half*>(p.keys),
                         static_cast<at::Half*>(p.values), write, heads, kv_heads, q, begin,
                         end, rotated.data());
          } else {
            rope_kv_rows(qkv, Q, row_cos, row_sin, dim, static_cast<float*>(p.keys),
                         static_cast<float*>(p.values), write, heads, kv_heads, q, begin, end,
                         rotated.data());
          }
        });
      });
      scoped("readmoe::decode_attention", [&] {
        // a request a chunk: contexts differ in length
        phases.run(at, products_only ? 0 : rows, [&](int64_t b) {
          if (p.half) {
            attend_rows(q, static_cast<const at::Half*>(p.keys),
                        static_cast<const at::Half*>(p.values), heads, kv_heads, dim,
                        key_slots, width, lengths, S, attn, b, b + 1, scores);
          } else {
            attend_rows(q, static_cast<const float*>(p.keys),
                        static_cast<const float*>(p.values), heads, kv_heads, dim, key_slots,
                        width, lengths, S, attn, b, b + 1, scores);
          }
        });
      });
      products(p.o);
      norm(p.ffn_norm, p.ffn_eps);
      products(p.gate_up);
      scoped("readmoe::silu_mul", [&] {
        phases.run(at, static_cast<int64_t>(p.gating.size()) * ops, [&](int64_t c) {
          const Gating& g = p.gating[static_cast<size_t>(c / parts)];
          const auto [begin, end] = part(g.M, parts, c % parts);
          silu_mul_rows(g.gate_up, g.R, g.out, begin, end);
        });
      });
      products(p.down_shared);
      products(p.down_routed);
    }
  };
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) walk();  // a thread given two: the 2nd finds all done
  });
  phases.rethrow();
}

}  // namespace readmoe
