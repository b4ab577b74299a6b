// The runner's small ops on CPU, fused: what a decode step does besides its matrix products.
//
// Why: at decode sizes each of these is a handful of ATen calls whose fixed cost (dispatch,
// allocation, a pass over memory each) outweighs their arithmetic; here each is one call and
// one pass. fp32, contiguous inputs (checked; the KV pools fp32 or fp16, read as floats);
// rows are split over torch's intra-op threads.
// Built with -ffp-contract=off so a*b + c*d rounds as the separate ATen ops do (RoPE is
// bit-exact against the runner's torch path); exp is a vectorizable polynomial (Cephes expf,
// about 1 ulp), used by SiLU and the attention's softmax.

#include "cpu_ops.h"

#include <ATen/ATen.h>

#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

void check_f32(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dimensions, got ", t.dim());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// the paged KV pools of one layer: [slots, kv_heads, head_dim] each, the same shape, both
// float32 or both float16 (the engine's kv_dtype)
void check_pools(const at::Tensor& key_pool, const at::Tensor& value_pool, int64_t dim) {
  for (const at::Tensor* pool : {&key_pool, &value_pool}) {
    TORCH_CHECK(pool->device().is_cpu() && pool->dim() == 3 && pool->is_contiguous(),
                "KV pools must be contiguous 3-D CPU tensors");
    TORCH_CHECK(pool->scalar_type() == at::kFloat || pool->scalar_type() == at::kHalf,
                "KV pools must be float32 or float16, got ", pool->scalar_type());
  }
  TORCH_CHECK(key_pool.scalar_type() == value_pool.scalar_type(),
              "key and value pools must have one dtype");
  TORCH_CHECK(key_pool.sizes() == value_pool.sizes() && key_pool.size(2) == dim,
              "key and value pools must both be [slots, kv_heads, head_dim ", dim, "]");
}

// a pool element as a float, and a float rounded into one (to nearest even, as .to() does)
inline float widen(float x) { return x; }
inline float widen(at::Half x) { return static_cast<float>(x); }
inline void narrow(float x, float* out) { *out = x; }
inline void narrow(float x, at::Half* out) { *out = at::Half(x); }

void check_index(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.dim() == dim &&
                  t.is_contiguous(),
              name, " must be a contiguous int64 CPU tensor with ", dim, " dimensions");
}

// e^x for x in float range, branch-free (Cephes expf: ~1 ulp).
inline float exp_poly(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

#if defined(__AVX2__) && defined(__FMA__)
// exp_poly on eight lanes (the same polynomial, with FMA)
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_floor_ps(
      _mm256_add_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                    _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(0.693359375f)));
  r = _mm256_sub_ps(r, _mm256_mul_ps(n, _mm256_set1_ps(-2.12194440e-4f)));
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

inline float sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// asks for a pool row ahead of its use; at most this many bytes of keys and values a request
// (a share of L2: longer contexts stream the rest)
constexpr int64_t kPrefetchBytes = 256 * 1024;
template <typename T>
inline void prefetch_row(const T* row, int64_t n) {
  constexpr int64_t line = 64 / sizeof(T);
  for (int64_t i = 0; i < n; i += line) __builtin_prefetch(row + i);
}
// past the rows fetched up front, the attention loops ask for the row this many keys ahead
// (pool rows jump between blocks, where the hardware prefetcher loses the stream)
constexpr int64_t kAheadKeys = 32;
// query heads the attention kernels take at once: 4 x 3 accumulators and 4 keys fill the
// sixteen AVX2 registers
constexpr int64_t kGroupHeads = 3;

#if defined(__AVX2__) && defined(__FMA__)
// eight pool elements as floats (float16 widens exactly)
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::Half* p) {
#if defined(__F16C__)
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  float wide[8];
  for (int i = 0; i < 8; ++i) wide[i] = static_cast<float>(p[i]);
  return _mm256_loadu_ps(wide);
#endif
}
#endif

// sum of a[i] * b[i]
template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
  int64_t i = 0;
  float total = 0;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 even = _mm256_setzero_ps(), odd = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    even = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), even);
    odd = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), load8(b + i + 8), odd);
  }
  for (; i + 8 <= n; i += 8) even = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), even);
  total = sum8(_mm256_add_ps(even, odd));
#endif
  for (; i < n; ++i) total += a[i] * widen(b[i]);
  return total;
}

// x[i] = e^(x[i] - shift); returns their sum
inline float exp_shifted(float* x, int64_t n, float shift) {
  int64_t i = 0;
  float total = 0;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 lanes = _mm256_setzero_ps();
  const __m256 by = _mm256_set1_ps(shift);
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), by));
    _mm256_storeu_ps(x + i, e);
    lanes = _mm256_add_ps(lanes, e);
  }
  total = sum8(lanes);
#endif
  for (; i < n; ++i) {
    x[i] = exp_poly(x[i] - shift);
    total += x[i];
  }
  return total;
}

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

#if defined(__AVX2__) && defined(__FMA__)
// [sum(a), sum(b), sum(c), sum(d)] of four vectors in one reduction
inline __m128 sum4x8(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

// N query heads (N <= kGroupHeads: a GQA group, or a part of one; their queries q, one after
// another) over a request's context, reading each key once for all of them:
// scores[h * len + l] = q_h . k_l * scale, row l of a pool at base + used[l] * stride. Four
// keys a pass, each head's four dot products reduced together; every head's sums run in the
// order a single head's would (4 x N accumulators, query chunks read from L1), so the
// grouping changes no bit of the result.
template <int Chunks, int N, typename T>
void group_scores(const float* q, const T* base, const int64_t* used, int64_t len,
                  int64_t stride, float scale, float* scores) {
  constexpr int64_t dim = 8 * Chunks;
  int64_t l = 0;
  const __m128 by = _mm_set1_ps(scale);
  for (; l + 4 <= len; l += 4) {
    const T* k[4] = {base + used[l] * stride, base + used[l + 1] * stride,
                     base + used[l + 2] * stride, base + used[l + 3] * stride};
    for (int64_t j = l + kAheadKeys; j < std::min(l + kAheadKeys + 4, len); ++j)
      prefetch_row(base + used[j] * stride, 8 * Chunks);
    __m256 acc[N][4];
    for (int h = 0; h < N; ++h) {
      const __m256 q0 = _mm256_loadu_ps(q + h * dim);
      for (int j = 0; j < 4; ++j) acc[h][j] = _mm256_mul_ps(q0, load8(k[j]));
    }
    for (int c = 1; c < Chunks; ++c) {
      __m256 key[4];
      for (int j = 0; j < 4; ++j) key[j] = load8(k[j] + 8 * c);
      for (int h = 0; h < N; ++h) {
        const __m256 qc = _mm256_loadu_ps(q + h * dim + 8 * c);
        for (int j = 0; j < 4; ++j) acc[h][j] = _mm256_fmadd_ps(qc, key[j], acc[h][j]);
      }
    }
    for (int h = 0; h < N; ++h)
      _mm_storeu_ps(scores + h * len + l,
                    _mm_mul_ps(sum4x8(acc[h][0], acc[h][1], acc[h][2], acc[h][3]), by));
  }
  for (; l < len; ++l) {
    const T* k = base + used[l] * stride;
    for (int h = 0; h < N; ++h) {
      const float* qh = q + h * dim;
      __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(qh), load8(k));
      for (int c = 1; c < Chunks; ++c)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(qh + 8 * c), load8(k + 8 * c), acc);
      scores[h * len + l] = sum8(acc) * scale;
    }
  }
}

// out_h = weight[h] * sum_l p[h * len + l] v_l for N heads (weight: each softmax's 1 / sum,
// applied once at the end), each value row read once for all of them, four chunks of it at
// a time (4 x N accumulators); each (head, chunk) sums in a single head's order. The heads'
// outputs go to out one after another.
template <int Chunks, int N, typename T>
void group_values(const float* p, const T* base, const int64_t* used, int64_t len,
                  int64_t stride, const float* weight, float* out) {
  constexpr int64_t dim = 8 * Chunks;
  for (int c0 = 0; c0 < Chunks; c0 += 4) {
    __m256 acc[N][4];
    for (int h = 0; h < N; ++h)
      for (int c = 0; c < 4; ++c) acc[h][c] = _mm256_setzero_ps();
    for (int64_t l = 0; l < len; ++l) {
      if (c0 == 0 && l + kAheadKeys < len) prefetch_row(base + used[l + kAheadKeys] * stride,
                                                         8 * Chunks);
      const T* v = base + used[l] * stride + 8 * c0;
      __m256 row[4];
      for (int c = 0; c < 4; ++c) row[c] = load8(v + 8 * c);
      for (int h = 0; h < N; ++h) {
        const __m256 w = _mm256_set1_ps(p[h * len + l]);
        for (int c = 0; c < 4; ++c) acc[h][c] = _mm256_fmadd_ps(w, row[c], acc[h][c]);
      }
    }
    for (int h = 0; h < N; ++h) {
      const __m256 by = _mm256_set1_ps(weight[h]);
      for (int c = 0; c < 4; ++c)
        _mm256_storeu_ps(out + h * dim + 8 * (c0 + c), _mm256_mul_ps(acc[h][c], by));
    }
  }
}
#endif

// the largest of x[0..n)
inline float max_of(const float* x, int64_t n) {
  int64_t i = 0;
  float top = x[0];
#if defined(__AVX2__) && defined(__FMA__)
  if (n >= 8) {
    __m256 m = _mm256_loadu_ps(x);
    for (i = 8; i + 8 <= n; i += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(x + i));
    float lanes[8];
    _mm256_storeu_ps(lanes, m);
    for (float lane : lanes) top = lane > top ? lane : top;
  }
#endif
  for (; i < n; ++i) top = x[i] > top ? x[i] : top;
  return top;
}

// N query heads (one GQA group's, or part of it, N <= kGroupHeads) sharing one kv head:
// scores (scaled dots with the keys), softmax, then the p-weighted sum of the values; the
// register kernels where the head dim has one (64, 128), else the generic loops head by
// head. q and out: the N heads' rows of dim floats, one after another; scores: N * len.
template <int N, typename T>
void attend_group(const float* q, const T* keys, const T* values, const int64_t* used,
                  int64_t len, int64_t stride, int64_t dim, float scale, float* scores,
                  float* out) {
#if defined(__AVX2__) && defined(__FMA__)
  if (dim == 64 || dim == 128) {
    (dim == 64 ? group_scores<8, N, T> : group_scores<16, N, T>)(q, keys, used, len, stride,
                                                                 scale, scores);
    float inv[N];
    for (int h = 0; h < N; ++h) {
      float* row = scores + h * len;
      inv[h] = 1.0f / exp_shifted(row, len, max_of(row, len));
    }
    (dim == 64 ? group_values<8, N, T> : group_values<16, N, T>)(scores, values, used, len,
                                                                 stride, inv, out);
    return;
  }
#endif
  for (int h = 0; h < N; ++h) {
    const float* qh = q + h * dim;
    float* oh = out + h * dim;
    for (int64_t l = 0; l < len; ++l) scores[l] = dot(qh, keys + used[l] * stride, dim) * scale;
    const float inv = 1.0f / exp_shifted(scores, len, max_of(scores, len));
    std::fill(oh, oh + dim, 0.0f);
    for (int64_t l = 0; l < len; ++l) {
      const T* v = values + used[l] * stride;
      for (int64_t d = 0; d < dim; ++d) oh[d] += scores[l] * widen(v[d]);
    }
    for (int64_t d = 0; d < dim; ++d) oh[d] *= inv;
  }
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

// decode_attention's work on requests [begin, end) over pools of T: each request's context's
// pool rows are fetched ahead (they jump between blocks and pages, where the hardware
// prefetcher stops), then each kv head's query heads run over them together, kGroupHeads at a
// time; scores: scratch, grown as needed
template <typename T>
void attend_range(const float* queries, const T* keys, const T* values, int64_t heads,
                  int64_t kv_heads, int64_t dim, const int64_t* slot, int64_t width,
                  const int64_t* length, float scale, float* result, int64_t begin,
                  int64_t end, std::vector<float>& scores) {
  const int64_t group = heads / kv_heads, row = kv_heads * dim;
  for (int64_t b = begin; b < end; ++b) {
    const int64_t len = length[b];
    const int64_t* used = slot + b * width;
    scores.resize(kGroupHeads * len);
    const int64_t ahead =
        std::min<int64_t>(len, kPrefetchBytes / (2 * row * static_cast<int64_t>(sizeof(T))));
    for (int64_t l = 0; l < ahead; ++l) {
      prefetch_row(keys + used[l] * row, row);
      prefetch_row(values + used[l] * row, row);
    }
    for (int64_t h = 0; h < heads;) {
      const int64_t offset = (h / group) * dim;
      const int64_t n = std::min<int64_t>(kGroupHeads, group - h % group);
      const float* qh = queries + (b * heads + h) * dim;
      float* oh = result + (b * heads + h) * dim;
      static_assert(kGroupHeads == 3, "attend_group is instantiated for 1 to 3 heads");
      (n == 3 ? attend_group<3, T> : n == 2 ? attend_group<2, T> : attend_group<1, T>)(
          qh, keys + offset, values + offset, used, len, row, dim, scale, scores.data(), oh);
      h += n;
    }
  }
}

// one task per request
template <typename T>
void attend_requests(const at::Tensor& q, const T* keys, const T* values, int64_t kv_heads,
                     const int64_t* slot, int64_t width, const int64_t* length, float scale,
                     at::Tensor& out) {
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2);
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    attend_range(q.data_ptr<float>(), keys, values, heads, kv_heads, dim, slot, width, length,
                 scale, out.data_ptr<float>(), begin, end, scores);
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

void attend_rows(const float* q, const float* keys, const float* values, int64_t heads,
                 int64_t kv_heads, int64_t dim, const int64_t* slots, int64_t width,
                 const int64_t* lengths, float scale, float* out, int64_t begin, int64_t end,
                 std::vector<float>& scores) {
  attend_range(q, keys, values, heads, kv_heads, dim, slots, width, lengths, scale, out, begin,
               end, scores);
}

void attend_rows(const float* q, const at::Half* keys, const at::Half* values, int64_t heads,
                 int64_t kv_heads, int64_t dim, const int64_t* slots, int64_t width,
                 const int64_t* lengths, float scale, float* out, int64_t begin, int64_t end,
                 std::vector<float>& scores) {
  attend_range(q, keys, values, heads, kv_heads, dim, slots, width, lengths, scale, out, begin,
               end, scores);
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
  const int64_t rows = qkv.size(0), dim = cos.size(1), half = dim / 2;
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

// One query per request against its own paged keys and values: q [B, h, D], pools [slots,
// kvh, D], slots [B, L] (request b's first lengths[b] are its context) -> [B, h * D].
// Query head i reads kv head i / (h / kvh), as the runner's grouped view does.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& key_pool,
                            const at::Tensor& value_pool, const at::Tensor& slots,
                            const at::Tensor& lengths, double scale) {
  RECORD_FUNCTION("readmoe::decode_attention", c10::ArrayRef<const c10::IValue>{});
  check_f32(q, "q", 3);
  check_index(slots, "slots", 2);
  check_index(lengths, "lengths", 1);
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2);
  check_pools(key_pool, value_pool, dim);
  const int64_t kv_heads = key_pool.size(1), width = slots.size(1), pool = key_pool.size(0);
  TORCH_CHECK(heads % kv_heads == 0, heads, " query heads do not share ", kv_heads,
              " kv heads evenly");
  TORCH_CHECK(slots.size(0) == batch && lengths.size(0) == batch,
              "slots and lengths must have one row per query");
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t* length = lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(length[b] >= 1 && length[b] <= width, "request ", b, " has length ",
                length[b], " for ", width, " slots");
    for (int64_t l = 0; l < length[b]; ++l)
      TORCH_CHECK(slot[b * width + l] >= 0 && slot[b * width + l] < pool, "slot ",
                  slot[b * width + l], " outside the pool of ", pool);
  }
  auto out = at::empty({batch, heads * dim}, q.options());
  if (key_pool.scalar_type() == at::kHalf) {
    attend_requests(q, key_pool.data_ptr<at::Half>(), value_pool.data_ptr<at::Half>(),
                    kv_heads, slot, width, length, static_cast<float>(scale), out);
  } else {
    attend_requests(q, key_pool.data_ptr<float>(), value_pool.data_ptr<float>(), kv_heads,
                    slot, width, length, static_cast<float>(scale), out);
  }
  return out;
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
