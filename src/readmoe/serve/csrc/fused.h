// What the fused CPU kernels (kernels.cpp, attention.cpp) share: input checks, a KV pool's
// elements widened to floats and floats rounded into them, and exp as a vectorizable
// polynomial (Cephes expf, about 1 ulp), used by SiLU and the attention's softmax. Compiled
// into each of them, with -ffp-contract=off (cpu_ops.py).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace readmoe {
namespace fused {

inline void check_f32(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dimensions, got ", t.dim());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// the paged KV pools of one layer: [slots, kv_heads, head_dim] each, the same shape, both
// float32 or both float16 (the engine's kv_dtype)
inline void check_pools(const at::Tensor& key_pool, const at::Tensor& value_pool, int64_t dim) {
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

inline void check_index(const at::Tensor& t, const char* name, int64_t dim) {
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

}  // namespace fused
}  // namespace readmoe
