// The runner's small ops on CPU, fused: what a decode step does besides its matrix products.
//
// Why: at decode sizes each of these is a handful of ATen calls whose fixed cost (dispatch,
// allocation, a pass over memory each) outweighs their arithmetic; here each is one call and
// one pass. fp32, contiguous inputs (checked; the KV pools fp32 or fp16, written rounded);
// rows are split over torch's intra-op threads. The decode attention is attention.cpp.
// Built with -ffp-contract=off so a*b + c*d rounds as the separate ATen ops do (RoPE is
// bit-exact against the runner's torch path).

#include "cpu_ops.h"
#include "fused.h"

#include <ATen/ATen.h>

#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

using namespace readmoe::fused;

// out[r] = silu(gate[r]) * up[r]
inline void silu_mul_row(const float* gate, const float* up, float* out, int64_t n) {
  int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 one = _mm256_set1_ps(1.0f);
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
    const __m256 silu = _mm256_div_ps(g, _mm256_add_ps(one, e));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(silu, _mm256_loadu_ps(up + i)));
  }
#endif
  for (; i < n; ++i) out[i] = gate[i] / (1.0f + exp_poly(-gate[i])) * up[i];
}

// index of the first maximum of x[0..n) (of the first NaN if there is one, as torch.max)
inline int64_t first_max(const float* x, int64_t n) {
  int64_t i = 0;
  float top = x[0];
  bool nan = false;
#if defined(__AVX2__) && defined(__FMA__)
  if (n >= 32) {
    __m256 m[4], unordered = _mm256_setzero_ps();
    for (int j = 0; j < 4; ++j) m[j] = _mm256_loadu_ps(x + 8 * j);
    for (; i + 32 <= n; i += 32)
      for (int j = 0; j < 4; ++j) {
        const __m256 v = _mm256_loadu_ps(x + i + 8 * j);
        m[j] = _mm256_max_ps(m[j], v);
        unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      }
    nan = _mm256_movemask_ps(unordered) != 0;
    const __m256 both = _mm256_max_ps(_mm256_max_ps(m[0], m[1]), _mm256_max_ps(m[2], m[3]));
    float lanes[8];
    _mm256_storeu_ps(lanes, both);
    for (float lane : lanes) top = lane > top ? lane : top;
  }
#endif
  for (; i < n; ++i) {
    nan = nan || std::isnan(x[i]);
    top = x[i] > top ? x[i] : top;
  }
  if (nan)
    for (i = 0; i < n; ++i)
      if (std::isnan(x[i])) return i;
  i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 wanted = _mm256_set1_ps(top);
  for (; i + 8 <= n; i += 8) {
    const int hits = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), wanted,
                                                      _CMP_EQ_OQ));
    if (hits) return i + __builtin_ctz(hits);
  }
#endif
  for (; i < n; ++i)
    if (x[i] == top) return i;
  return 0;  // unreachable: top is one of x's values
}

// rows per thread: enough floats that a thread's share outweighs waking it (a few us)
inline int64_t grain(int64_t row_width) {
  constexpr int64_t kFloatsPerTask = 32768;
  return std::max<int64_t>(1, kFloatsPerTask / std::max<int64_t>(1, row_width));
}

// rope_write_kv's work on rows [begin, end) of qkv [N, width] over pools of T: queries into
// q [N, heads, dim], keys and values into the pools (a float16 pool takes each rotated key and
// each value rounded to nearest even, as .to() does); rotated: dim floats of scratch
template <typename T>
void rope_range(const float* src, int64_t width, const float* c, const float* s, int64_t dim,
                T* keys, T* values, const int64_t* slot, int64_t heads, int64_t kv_heads,
                float* q_out, int64_t begin, int64_t end, float* rotated) {
  const int64_t half = dim / 2;
  for (int64_t n = begin; n < end; ++n) {
    const float* row = src + n * width;
    const float* cn = c + n * dim;
    const float* sn = s + n * dim;
    for (int64_t head = 0; head < heads + kv_heads; ++head) {
      const float* x = row + head * dim;
      const bool query = head < heads;
      float* out = query ? q_out + (n * heads + head) * dim : rotated;
      for (int64_t d = 0; d < half; ++d) out[d] = x[d] * cn[d] + x[d + half] * sn[d];
      for (int64_t d = half; d < dim; ++d) out[d] = x[d] * cn[d] + x[d - half] * sn[d];
      if (query) continue;
      T* key = keys + (slot[n] * kv_heads + head - heads) * dim;
      for (int64_t d = 0; d < dim; ++d) narrow(out[d], key + d);
    }
    const float* value = row + (heads + kv_heads) * dim;
    T* stored = values + slot[n] * kv_heads * dim;
    for (int64_t d = 0; d < kv_heads * dim; ++d) narrow(value[d], stored + d);
  }
}

template <typename T>
void rope_rows(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, T* keys,
               T* values, const int64_t* slot, int64_t heads, int64_t kv_heads, at::Tensor& q) {
  const int64_t rows = qkv.size(0), width = qkv.size(1), dim = cos.size(1);
  at::parallel_for(0, rows, grain(width), [&](int64_t begin, int64_t end) {
    std::vector<float> rotated(dim);
    rope_range(qkv.data_ptr<float>(), width, cos.data_ptr<float>(), sin.data_ptr<float>(), dim,
               keys, values, slot, heads, kv_heads, q.data_ptr<float>(), begin, end,
               rotated.data());
  });
}

}  // namespace

namespace readmoe {

void rms_norm_rows(const float* x, const float* weight, double eps, int64_t width,
                   int64_t begin, int64_t end, float* y) {
  for (int64_t n = begin; n < end; ++n) {
    const float* in = x + n * width;
    float* out = y + n * width;
    float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= width; i += 8)
      for (int j = 0; j < 8; ++j) lanes[j] += in[i + j] * in[i + j];
    float sum = 0;
    for (int j = 0; j < 8; ++j) sum += lanes[j];
    for (; i < width; ++i) sum += in[i] * in[i];
    const float inv = 1.0f / std::sqrt(sum / static_cast<float>(width) +
                                       static_cast<float>(eps));
    for (i = 0; i < width; ++i) out[i] = in[i] * inv * weight[i];
  }
}

void rope_kv_rows(const float* qkv, int64_t width, const float* cos, const float* sin,
                  int64_t dim, float* keys, float* values, const int64_t* slots, int64_t heads,
                  int64_t kv_heads, float* q, int64_t begin, int64_t end, float* rotated) {
  rope_range(qkv, width, cos, sin, dim, keys, values, slots, heads, kv_heads, q, begin, end,
             rotated);
}

void rope_kv_rows(const float* qkv, int64_t width, const float* cos, const float* sin,
                  int64_t dim, at::Half* keys, at::Half* values, const int64_t* slots,
                  int64_t heads, int64_t kv_heads, float* q, int64_t begin, int64_t end,
                  float* rotated) {
  rope_range(qkv, width, cos, sin, dim, keys, values, slots, heads, kv_heads, q, begin, end,
             rotated);
}

void silu_mul_rows(const float* gate_up, int64_t width, float* out, int64_t begin,
                   int64_t end) {
  for (int64_t n = begin; n < end; ++n) {
    const float* gate = gate_up + n * 2 * width;
    silu_mul_row(gate, gate + width, out + n * width, width);
  }
}

// x [N, H] -> x / sqrt(mean(x^2) + eps) * weight
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  RECORD_FUNCTION("readmoe::rms_norm", c10::ArrayRef<const c10::IValue>{});
  check_f32(x, "x", 2);
  check_f32(weight, "weight", 1);
  const int64_t rows = x.size(0), width = x.size(1);
  TORCH_CHECK(weight.size(0) == width, "weight has ", weight.size(0), " entries for rows of ",
              width);
  auto y = at::empty_like(x);
  const float* src = x.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  float* dst = y.data_ptr<float>();
  at::parallel_for(0, rows, grain(width), [&](int64_t begin, int64_t end) {
    rms_norm_rows(src, w, eps, width, begin, end, dst);
  });
  return y;
}

// RoPE (x * cos + roll(x, D/2) * sin_signed, sin_signed having its first half negated) on
// the query and key heads of qkv [N, (h + 2 kvh) * D]; keys and values are written to their
// pools [slots, kvh, D] at slots [N]; returns the rotated queries [N, h, D].
at::Tensor rope_write_kv(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                         at::Tensor& key_pool, at::Tensor& value_pool, const at::Tensor& slots,
                         int64_t heads, int64_t kv_heads) {
  RECORD_FUNCTION("readmoe::rope_write_kv", c10::ArrayRef<const c10::IValue>{});
  check_f32(qkv, "qkv", 2);
  check_f32(cos, "cos", 2);
  check_f32(sin, "sin", 2);
  check_index(slots, "slots", 1);
  const int64_t rows = qkv.size(0), dim = cos.size(1);
  check_pools(key_pool, value_pool, dim);
  TORCH_CHECK(dim % 2 == 0, "head dim must be even, got ", dim);
  TORCH_CHECK(qkv.size(1) == (heads + 2 * kv_heads) * dim, "qkv has ", qkv.size(1),
              " columns, expected (heads + 2 kv_heads) * head_dim = ",
              (heads + 2 * kv_heads) * dim);
  TORCH_CHECK(cos.size(0) == rows && sin.size(0) == rows && sin.size(1) == dim &&
                  slots.size(0) == rows,
              "cos, sin and slots must have one row per qkv row");
  TORCH_CHECK(key_pool.size(1) == kv_heads, "the pools hold ", key_pool.size(1),
              " kv heads, qkv ", kv_heads);
  const int64_t pool = key_pool.size(0);
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t n = 0; n < rows; ++n)
    TORCH_CHECK(slot[n] >= 0 && slot[n] < pool, "slot ", slot[n], " outside the pool of ",
                pool);
  auto q = at::empty({rows, heads, dim}, qkv.options());
  if (key_pool.scalar_type() == at::kHalf) {
    rope_rows(qkv, cos, sin, key_pool.data_ptr<at::Half>(), value_pool.data_ptr<at::Half>(),
              slot, heads, kv_heads, q);
  } else {
    rope_rows(qkv, cos, sin, key_pool.data_ptr<float>(), value_pool.data_ptr<float>(), slot,
              heads, kv_heads, q);
  }
  return q;
}

// gate_up [n, 2R] (gate | up) -> silu(gate) * up [n, R]
at::Tensor silu_mul(const at::Tensor& gate_up) {
  RECORD_FUNCTION("readmoe::silu_mul", c10::ArrayRef<const c10::IValue>{});
  check_f32(gate_up, "gate_up", 2);
  const int64_t rows = gate_up.size(0), width = gate_up.size(1) / 2;
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "gate_up must have an even number of columns");
  auto out = at::empty({rows, width}, gate_up.options());
  const float* src = gate_up.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, rows, grain(2 * width), [&](int64_t begin, int64_t end) {
    silu_mul_rows(src, width, dst, begin, end);
  });
  return out;
}

// x [S, V] -> the index of each row's first maximum [S] (int64), as torch.max(-1).indices:
// greedy sampling's pass over the logits, one vectorized read instead of ATen's scalar one
at::Tensor argmax_rows(const at::Tensor& x) {
  RECORD_FUNCTION("readmoe::argmax_rows", c10::ArrayRef<const c10::IValue>{});
  check_f32(x, "x", 2);
  const int64_t rows = x.size(0), width = x.size(1);
  TORCH_CHECK(width > 0, "rows must not be empty");
  auto out = at::empty({rows}, x.options().dtype(at::kLong));
  const float* src = x.data_ptr<float>();
  int64_t* index = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, grain(width), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) index[n] = first_max(src + n * width, width);
  });
  return out;
}

}  // namespace readmoe
