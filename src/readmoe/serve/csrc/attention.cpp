// Decode attention over the paged KV pools: one query per request, each kv head's query heads
// together, keys and values read in place from the pool (float32 or float16).
//
// Why: a decode step's attention reads every key and value of every request once per layer
// (2.4 MB a layer at batch 32, 48 keys, fp32): register kernels for head dims 64 and 128 read
// each key and value row once for up to three query heads of a GQA group, four keys a pass,
// rows read up front (they jump between blocks and pages, where the hardware prefetcher
// stops); every head's sums run in a single head's order, so the grouping changes no bit.

#include "cpu_ops.h"
#include "fused.h"

#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <vector>

namespace {

using namespace readmoe::fused;

// a request's keys and values are read into the caches before its heads run, at most this many
// bytes of them (a share of L2: longer contexts stream the rest)
constexpr int64_t kTouchBytes = 256 * 1024;
// one word of each cache line of a pool row of n elements, or'd together: a plain load per
// line. Why loads, not prefetches: asking for a request's rows (73 KB at 48 keys) with
// prefetch instructions before its heads ran took 7.3-7.6 us a request on cold pools (AMD
// EPYC, one thread, batch 32), reading them with loads 5.1-5.3, the heads' work included.
template <typename T>
inline uint32_t touch_row(const T* row, int64_t n) {
  constexpr int64_t line = 64 / sizeof(T);
  uint32_t bits = 0;
  for (int64_t i = 0; i < n; i += line) {
    uint32_t word;
    std::memcpy(&word, row + i, sizeof(word));
    bits |= word;
  }
  return bits;
}
// asks for a pool row ahead of its use
template <typename T>
inline void prefetch_row(const T* row, int64_t n) {
  constexpr int64_t line = 64 / sizeof(T);
  for (int64_t i = 0; i < n; i += line) __builtin_prefetch(row + i);
}
// past the rows read up front, the attention loops ask for the row this many keys ahead
// (pool rows jump between blocks, where the hardware prefetcher loses the stream)
constexpr int64_t kAheadKeys = 32;
// query heads the attention kernels take at once: 4 x 3 accumulators, 3 query chunks (or
// weights) and one key (or value chunk) fill the sixteen AVX2 registers
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
    // a chunk's N query vectors stay while its four keys pass one at a time: 4 x N + N + 1
    // registers, 16 at N = 3 (holding four keys instead spilled an accumulator to the stack,
    // a store-to-load chain on every FMA)
    __m256 acc[N][4];
    for (int c = 0; c < Chunks; ++c) {
      __m256 qc[N];
      for (int h = 0; h < N; ++h) qc[h] = _mm256_loadu_ps(q + h * dim + 8 * c);
      for (int j = 0; j < 4; ++j) {
        const __m256 key = load8(k[j] + 8 * c);
        for (int h = 0; h < N; ++h)
          acc[h][j] = c == 0 ? _mm256_mul_ps(qc[h], key) : _mm256_fmadd_ps(qc[h], key, acc[h][j]);
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
      // the N weights stay while the row's four chunks pass one at a time (registers as in
      // group_scores)
      __m256 w[N];
      for (int h = 0; h < N; ++h) w[h] = _mm256_set1_ps(p[h * len + l]);
      for (int c = 0; c < 4; ++c) {
        const __m256 chunk = load8(v + 8 * c);
        for (int h = 0; h < N; ++h) acc[h][c] = _mm256_fmadd_ps(w[h], chunk, acc[h][c]);
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

// decode_attention's work on requests [begin, end) over pools of T: each request's context's
// pool rows are read up front (they jump between blocks and pages, where the hardware
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
        std::min<int64_t>(len, kTouchBytes / (2 * row * static_cast<int64_t>(sizeof(T))));
    uint32_t touched = 0;
    for (int64_t l = 0; l < ahead; ++l)
      touched |= touch_row(keys + used[l] * row, row) | touch_row(values + used[l] * row, row);
    asm volatile("" : : "r"(touched));  // the loads stay: their value is used
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

}  // namespace readmoe
