/* Decode attention over a KV pool, bfloat16 in and out, float32 inside.
 *
 * Contract (runtime/decode_kernel.py calls it through ctypes): for each of n query rows r,
 * the H query heads of token column cols[r] of `q` ([H, T, d], element strides qs_head and
 * qs_tok, d contiguous) attend over keys [0, lens[r]) of pool slot slots[r] (`k`, `v`: [S,
 * kvh, capacity, d], element strides s0, s1, s2, d contiguous), a key j of them skipped where
 * mask (n x mask_stride bytes, may be NULL) has mask[r * mask_stride + j] == 0. Query head h
 * reads KV head h / (H / kvh) (grouped-query attention). out: [n, H, d], contiguous.
 * First, where new_k is not NULL, row r's own key and value (column cols[r] of new_k / new_v,
 * [kvh, T, d] with their element strides, d contiguous) are written to position pos[r] of its
 * slot. Returns 0, 1 for head counts that do not divide, 2 when scratch memory ran out.
 *
 * Why it exists: the CPU flash kernel behind torch's scaled_dot_product_attention tiles for
 * long query blocks; a decode step has one to eight query rows per cache, so most of its time
 * went to tile setup and padding (a pooled 12-row step of the embedded model: 0.5 ms a layer
 * where its keys and values are 2.2 MB, 65 us of this machine's memory bandwidth). Here each
 * (row, KV head) reads its own keys and values once, scores the g = H / kvh query heads of its
 * group against them, and never touches a padded or foreign key.
 *
 * Numbers: products and sums in float32 (AVX512-BF16's dot product multiplies bfloat16 pairs
 * exactly), the softmax in float32, the output rounded to bfloat16 once (nearest even). The
 * library is built with -ffast-math so the softmax's expf vectorises (glibc's libmvec); that
 * assumes no infinities, so a hidden key scores PR_HIDDEN, a finite number whose exp is 0.
 *
 * Threads: an OpenMP loop over (row, KV head), on the libgomp that torch itself loaded (same
 * soname), with the thread count the caller passes (torch's intra-op count), so it runs on the
 * calling thread's existing team.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define PR_AVX512_BF16 1
#endif

#define PR_HIDDEN (-1e30f)

static inline float bf16_to_f32(uint16_t x) {
  uint32_t u = (uint32_t)x << 16;
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

/* Round to nearest even, as torch converts float32 to bfloat16 (inputs here are finite). */
static inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

/* Softmax of each of g rows of len scores, in place (a hidden key gets weight 0). */
static void softmax_rows(float *score, int64_t g, int64_t len) {
  for (int64_t j = 0; j < g; ++j) {
    float *sj = score + j * len, top = PR_HIDDEN, sum = 0.f;
    for (int64_t t = 0; t < len; ++t) top = sj[t] > top ? sj[t] : top;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < len; ++t) {
      const float p = expf(sj[t] - top);
      sj[t] = p;
      sum += p;
    }
    const float inv = 1.f / sum;
    for (int64_t t = 0; t < len; ++t) sj[t] *= inv;
  }
}

/* One (row, KV head), any head dim: q's g heads start at q (head stride qs_head), keys and
 * values at kb / vb (key stride s2); scratch holds 2 * g * dim + g * len floats. */
static void attend_any(const uint16_t *q, int64_t qs_head, const uint16_t *kb,
                       const uint16_t *vb, int64_t s2, int64_t len, const uint8_t *seen,
                       int64_t g, int64_t dim, float scale, float *scratch, uint16_t *o) {
  float *qf = scratch, *acc = scratch + g * dim, *score = scratch + 2 * g * dim;
  for (int64_t j = 0; j < g; ++j)  /* the query in float32 once, not once per key */
    for (int64_t e = 0; e < dim; ++e) qf[j * dim + e] = bf16_to_f32(q[j * qs_head + e]);
  for (int64_t t = 0; t < len; ++t) {
    const uint16_t *kt = kb + t * s2;
    for (int64_t j = 0; j < g; ++j) {
      const float *qj = qf + j * dim;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t e = 0; e < dim; ++e) s += qj[e] * bf16_to_f32(kt[e]);
      score[j * len + t] = (seen && !seen[t]) ? PR_HIDDEN : s * scale;
    }
  }
  softmax_rows(score, g, len);
  memset(acc, 0, sizeof(float) * (size_t)(g * dim));
  for (int64_t t = 0; t < len; ++t) {
    const uint16_t *vt = vb + t * s2;
    for (int64_t j = 0; j < g; ++j) {
      const float p = score[j * len + t];
      float *aj = acc + j * dim;
#pragma omp simd
      for (int64_t e = 0; e < dim; ++e) aj[e] += p * bf16_to_f32(vt[e]);
    }
  }
  for (int64_t e = 0; e < g * dim; ++e) o[e] = f32_to_bf16(acc[e]);
}

#ifdef PR_AVX512_BF16
/* The horizontal sums of 8 vectors as one vector (lane i: the sum of v[i]'s 16 lanes), in
 * about a quarter of the instructions of 8 separate reductions. */
static inline __m256 sum8(const __m512 *v) {
  __m256 h[8];
  for (int i = 0; i < 8; ++i) {
    const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v[i]), 1));
    h[i] = _mm256_add_ps(_mm512_castps512_ps256(v[i]), hi);
  }
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(h[0], h[1]), _mm256_hadd_ps(h[2], h[3]));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(h[4], h[5]), _mm256_hadd_ps(h[6], h[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

/* attend_any with AVX512-BF16 for a head dim of 64 or 128 (inlined with dim a constant, so
 * the per-key loops unroll and the value accumulators stay in registers). */
static inline __attribute__((always_inline)) void attend_avx512(
    const uint16_t *q, int64_t qs_head, const uint16_t *kb, const uint16_t *vb, int64_t s2,
    int64_t len, const uint8_t *seen, int64_t g, const int dim, float scale, float *score,
    uint16_t *o) {
  const int chunks = dim / 32, lanes = dim / 16;  /* 32 bf16 pairs a dot step, 16 floats */
  for (int64_t j = 0; j < g; ++j) {
    __m512bh qv[4];
    for (int c = 0; c < chunks; ++c)
      qv[c] = (__m512bh)_mm512_loadu_si512(q + j * qs_head + 32 * c);
    float *sj = score + j * len;
    int64_t t = 0;
    for (; t + 8 <= len; t += 8) {  /* 8 keys, then one shuffle-reduction for all 8 */
      __m512 acc[8];
      for (int i = 0; i < 8; ++i) {
        const uint16_t *kt = kb + (t + i) * s2;
        acc[i] = _mm512_setzero_ps();
        for (int c = 0; c < chunks; ++c)
          acc[i] = _mm512_dpbf16_ps(acc[i], qv[c], (__m512bh)_mm512_loadu_si512(kt + 32 * c));
      }
      _mm256_storeu_ps(sj + t, _mm256_mul_ps(sum8(acc), _mm256_set1_ps(scale)));
    }
    for (; t < len; ++t) {
      __m512 acc = _mm512_setzero_ps();
      for (int c = 0; c < chunks; ++c)
        acc = _mm512_dpbf16_ps(acc, qv[c], (__m512bh)_mm512_loadu_si512(kb + t * s2 + 32 * c));
      sj[t] = _mm512_reduce_add_ps(acc) * scale;
    }
    if (seen)
      for (t = 0; t < len; ++t)
        if (!seen[t]) sj[t] = PR_HIDDEN;
  }
  softmax_rows(score, g, len);
  for (int64_t j = 0; j < g; ++j) {
    __m512 acc[8];
    for (int c = 0; c < lanes; ++c) acc[c] = _mm512_setzero_ps();
    const float *pj = score + j * len;
    for (int64_t t = 0; t < len; ++t) {  /* a hidden key's weight is 0: no branch needed */
      const __m512 p = _mm512_set1_ps(pj[t]);
      const uint16_t *vt = vb + t * s2;
      for (int c = 0; c < lanes; ++c) {
        const __m256i raw = _mm256_loadu_si256((const __m256i *)(vt + 16 * c));
        const __m512i wide = _mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16);
        acc[c] = _mm512_fmadd_ps(p, _mm512_castsi512_ps(wide), acc[c]);
      }
    }
    for (int c = 0; c < lanes; ++c)  /* nearest even, as f32_to_bf16 */
      _mm256_storeu_si256((__m256i *)(o + j * dim + 16 * c),
                          (__m256i)_mm512_cvtneps_pbh(acc[c]));
  }
}
#endif

int pr_decode_attention(const uint16_t *q, int64_t qs_head, int64_t qs_tok, uint16_t *k,
                        uint16_t *v, int64_t s0, int64_t s1, int64_t s2,
                        const int64_t *cols, const int64_t *slots, const int64_t *lens, int64_t n,
                        const uint8_t *mask, int64_t mask_stride, int64_t heads,
                        int64_t kv_heads, int64_t dim, float scale, int threads,
                        const uint16_t *new_k, int64_t nk_head, int64_t nk_tok,
                        const uint16_t *new_v, int64_t nv_head, int64_t nv_tok,
                        const int64_t *pos, uint16_t *out) {
  if (kv_heads <= 0 || heads % kv_heads != 0 || dim <= 0) return 1;
  const int64_t g = heads / kv_heads;
  int64_t longest = 1;
  for (int64_t r = 0; r < n; ++r) longest = lens[r] > longest ? lens[r] : longest;
  int failed = 0;
#pragma omp parallel num_threads(threads)
  {
    float *scratch = malloc(sizeof(float) * (size_t)(2 * g * dim + g * longest));
    if (scratch == NULL) {
#pragma omp atomic write
      failed = 2;
    }
    if (new_k != NULL) {
      /* The step's own keys and values into their slots first (the loop's end waits for
       * all threads): a row may see the new key of another row of its segment. */
#pragma omp for
      for (int64_t w = 0; w < n * kv_heads; ++w) {
        const int64_t r = w / kv_heads, h = w % kv_heads, at = slots[r] * s0 + h * s1 + pos[r] * s2;
        memcpy(k + at, new_k + h * nk_head + cols[r] * nk_tok, sizeof(uint16_t) * (size_t)dim);
        memcpy(v + at, new_v + h * nv_head + cols[r] * nv_tok, sizeof(uint16_t) * (size_t)dim);
      }
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t w = 0; w < n * kv_heads; ++w) {
      if (scratch == NULL) continue;
      const int64_t r = w / kv_heads, h = w % kv_heads, len = lens[r];
      const uint8_t *seen = mask ? mask + r * mask_stride : NULL;
      const uint16_t *qh = q + h * g * qs_head + cols[r] * qs_tok;
      const uint16_t *kb = k + slots[r] * s0 + h * s1, *vb = v + slots[r] * s0 + h * s1;
      uint16_t *o = out + (r * heads + h * g) * dim;
#ifdef PR_AVX512_BF16
      if (dim == 64) {
        attend_avx512(qh, qs_head, kb, vb, s2, len, seen, g, 64, scale, scratch, o);
        continue;
      }
      if (dim == 128) {
        attend_avx512(qh, qs_head, kb, vb, s2, len, seen, g, 128, scale, scratch, o);
        continue;
      }
#endif
      attend_any(qh, qs_head, kb, vb, s2, len, seen, g, dim, scale, scratch, o);
    }
    free(scratch);
  }
  return failed;
}
