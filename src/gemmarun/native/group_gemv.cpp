// Matrix-vector products that read GGML-style quantized weights as they are stored.
//
//   y[m, r] = sum_g scale[r, g] * dot(x[m, g], code[r, g]) + (bias[r, g] + code_min * scale[r, g]) * sum(x[m, g])
//
// which is x @ W.T for W = (code + code_min) * scale + bias, group by group. Codes are int8 (5/6/8-bit
// formats) or 4-bit nibbles in gemmarun's halves layout (byte j of a row holds codes j and
// j + cols/2). The activations are rounded to int16 per group (see quantize_x) so the inner loop is
// integer multiply-adds; group results are scaled and summed in float32. Each weight row is read
// from memory once for all the (few) rows of x: decode becomes memory-bound, not dequantize-bound.
// Rows are split over torch's intra-op threads.

#include "kernels.h"
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define GEMMARUN_AVX2 1
#endif
// AVX-512 with VNNI (Intel since Ice Lake, AMD since Zen 4): one instruction multiplies 32 int16
// pairs and accumulates, where AVX2 needs a widening, a 16-wide multiply-add and an add for half of
// them. The 5/6/8-bit layers of a float32 decode were compute-bound at 16-22 GB/s without it.
#if defined(GEMMARUN_AVX2) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512VNNI__)
#define GEMMARUN_AVX512 1
#endif

namespace {

#ifdef GEMMARUN_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

#endif

struct Problem {
  const int16_t* xq;    // [M, C] activations as int16, per group: x ~= xq * xscale
  const int8_t* xq8;    // or as int8 (bfloat16 compute), the same way
  const float* xscale;  // [M, G]
  const float* xsum;    // [M, G] group sums of the rounded x (used with a bias or code_min)
  const uint8_t* xlo;   // or null: the int16 xq split into bytes, xq = 256 * xhi + xlo (exact), so
  const int8_t* xhi;    // nibbles take byte multiply-adds at int16 precision (AVX-512 VNNI)
  const uint8_t* codes; // [R, C] int8 or [R, C/2] nibbles
  const void* scale;    // [R, G] float32, or float16 (half_scales) where the format stores them so
  const void* bias;     // [R, G] or null, same type
  bool half_scales;
  float code_min;
  int64_t M, R, C, group, groups;
  bool offset;
  float* y;             // [M, R]
};

// Activations to int16, one scale per group (max |x| -> 32767): relative error <= 2^-16 of the
// group's largest value, far below any weight quantization's, and it lets a 16-wide integer
// multiply-add do the work of sixteen float conversions and FMAs.
// A group holding NaN or inf gets a NaN scale (codes 0), so every product it enters is NaN, as
// the exact one is NaN or infinite: a fault upstream shows instead of becoming plausible logits.
template <typename Q, int QMAX>
void quantize_x(const float* x, int64_t n, int64_t group, Q* xq, float* xscale, float* xsum) {
  for (int64_t g0 = 0, g = 0; g0 < n; g0 += group, ++g) {
    float amax = 0.f;
    bool finite = true;
    for (int64_t k = g0; k < g0 + group; ++k) {
      const float a = std::fabs(x[k]);
      finite &= a <= std::numeric_limits<float>::max();  // false for NaN and inf
      amax = std::max(amax, a);
    }
    if (!finite) {
      std::fill(xq + g0, xq + g0 + group, Q(0));
      xscale[g] = xsum[g] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    const float d = amax / QMAX;
    // Below ~1e-34, QMAX / amax overflows a float: such a group is scaled in double.
    const double inv = amax > 0.f ? QMAX / double(amax) : 0.0;
    const float inv_f = float(inv);
    int32_t sum = 0;  // of the rounded values: the offset term then uses the same x as the codes
    for (int64_t k = g0; k < g0 + group; ++k) {
      xq[k] = static_cast<Q>(std::isinf(inv_f) ? std::nearbyint(double(x[k]) * inv) : std::nearbyint(x[k] * inv_f));
      sum += xq[k];
    }
    xscale[g] = d;
    xsum[g] = float(sum) * d;
  }
}

// The activation rows of one call, rounded per group (int8 or int16) with their scales and sums.
struct Activations {
  std::vector<int16_t> xq;
  std::vector<int8_t> xq8;
  std::vector<float> xscale, xsum;  // [M, C / group]
  std::vector<uint8_t> xlo;         // after split_bytes(): xq = 256 * xhi + xlo, exactly
  std::vector<int8_t> xhi;
  Activations(const float* x, int64_t M, int64_t C, int64_t group, bool q8)
      : xq(q8 ? 0 : M * C), xq8(q8 ? M * C : 0), xscale(M * (C / group)), xsum(M * (C / group)) {
    const int64_t groups = C / group;
    for (int64_t m = 0; m < M; ++m) {
      if (q8) quantize_x<int8_t, 127>(x + m * C, C, group, xq8.data() + m * C, xscale.data() + m * groups, xsum.data() + m * groups);
      else quantize_x<int16_t, 32767>(x + m * C, C, group, xq.data() + m * C, xscale.data() + m * groups, xsum.data() + m * groups);
    }
  }
  // The int16 values as their low (unsigned) and high (signed, arithmetic shift) bytes, for byte
  // multiply-adds at int16 precision.
  void split_bytes() {
    xlo.resize(xq.size());
    xhi.resize(xq.size());
    for (size_t k = 0; k < xq.size(); ++k) {
      xlo[k] = static_cast<uint8_t>(xq[k] & 0xFF);
      xhi[k] = static_cast<int8_t>(xq[k] >> 8);
    }
  }
  template <typename P>
  void into(P& p) const {
    p.xq = xq.empty() ? nullptr : xq.data();
    p.xq8 = xq8.empty() ? nullptr : xq8.data();
    p.xscale = xscale.data();
    p.xsum = xsum.data();
    if constexpr (requires { p.xlo; }) {
      p.xlo = xlo.empty() ? nullptr : xlo.data();
      p.xhi = xhi.empty() ? nullptr : xhi.data();
    }
  }
};

// Row r of a [R, G] scale or bias table as float32: a pointer into it, or its float16 values
// widened into `buf` (one conversion per group of 16-32 weights).
inline const float* row_floats(const Problem& p, const void* table, int64_t r, float* buf) {
  if (table == nullptr) return nullptr;
  if (!p.half_scales) return static_cast<const float*>(table) + r * p.groups;
  const at::Half* src = static_cast<const at::Half*>(table) + r * p.groups;
  int64_t g = 0;
#if defined(GEMMARUN_AVX2) && defined(__F16C__)
  for (; g + 8 <= p.groups; g += 8)
    _mm256_storeu_ps(buf + g, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + g))));
#endif
  for (; g < p.groups; ++g) buf[g] = static_cast<float>(src[g]);
  return buf;
}

// sum_g (bias[g] + code_min * scale[g]) * xsum[g]. Vectorized by hand: the compiler may not reorder a
// float sum, and as one scalar chain of dependent adds (4 cycles each, a row's 48 groups on E2B) it
// capped the 4-bit kernel at ~12 GB/s a core.
inline float offset_term(const Problem& p, int64_t m, const float* __restrict sc, const float* __restrict bi) {
  const float* __restrict xs = p.xsum + m * p.groups;
  int64_t g = 0;
  float acc = 0.f;
#ifdef GEMMARUN_AVX2
  const __m256 cm = _mm256_set1_ps(p.code_min);
  __m256 acc_v = _mm256_setzero_ps();
  for (; g + 8 <= p.groups; g += 8) {
    const __m256 b = bi ? _mm256_loadu_ps(bi + g) : _mm256_setzero_ps();
    const __m256 w = _mm256_add_ps(b, _mm256_mul_ps(cm, _mm256_loadu_ps(sc + g)));
    acc_v = _mm256_fmadd_ps(w, _mm256_loadu_ps(xs + g), acc_v);
  }
  acc = hsum(acc_v);
#endif
  for (; g < p.groups; ++g) acc += ((bi ? bi[g] : 0.f) + p.code_min * sc[g]) * xs[g];
  return acc;
}

// How far ahead the AVX-512 loops ask for the codes they will read, one cache line per step. The
// other loops ask for a whole row a few rows ahead (rows<Dot>); with AVX-512 that burst stalled: a
// 6 KB row of E2B's down projection made 96 requests at once (A/B: 4-bit 1536x12288 17.6 -> 23.4
// GB/s, the 262k-row int8 head 28.9 -> 32.5, int8 640x2048 41.4 -> 50.2). The in-place GGUF block
// rows (MoE experts) had no prefetch at all: Q4_0 1408x2816 15.7 -> 18.5 GB/s with one.
constexpr int64_t kPrefetchBytes = 3072;

// Each format is a dot functor: `row_bytes` says how long a weight row is, `prefetches` whether its
// loop asks for the codes ahead itself, and `operator()(p, row, m, sc)` returns
// sum_g sc[g] * xscale[m, g] * dot(x[m, g], code[row, g]).
// One row loop (rows<Dot>) does the rest for all of them: row scales, activation rows, the
// offset term, the store.
//
// The group size is a template parameter so the per-group loop is fully unrolled (a runtime trip
// count of two iterations cost as much as the arithmetic).

// int8 codes, int16 activations
#ifdef GEMMARUN_AVX512
// The factors of the 32 codes at column k (weight scale times activation scale): one group of 32,
// or two of 16 (lanes 0-7 and 8-15). Shared by the one-row and several-rows int8 loops.
template <int GROUP>
inline __m512 step_factors(const float* sc, const float* xd, int64_t k) {
  if constexpr (GROUP == 32) {
    return _mm512_set1_ps(sc[k / 32] * xd[k / 32]);
  } else {
    const int64_t g = k / 16;
    return _mm512_insertf32x8(_mm512_set1_ps(sc[g] * xd[g]), _mm256_set1_ps(sc[g + 1] * xd[g + 1]), 1);
  }
}
#endif

template <int GROUP>
struct DotInt8 {
  static int64_t row_bytes(const Problem& p) { return p.C; }
  static bool prefetches(const Problem& p) {
#ifdef GEMMARUN_AVX512
    return p.C % 32 == 0;  // the AVX-512 loop below
#else
    return false;
#endif
  }
  float operator()(const Problem& p, const uint8_t* row_bytes_ptr, int64_t m, const float* __restrict sc) const {
    const int8_t* __restrict row = reinterpret_cast<const int8_t*>(row_bytes_ptr);
    const int16_t* __restrict x = p.xq + m * p.C;
    const float* __restrict xd = p.xscale + m * p.groups;
    const int64_t groups = p.groups;
#ifdef GEMMARUN_AVX512
    if (p.C % 32 == 0) {  // 32 codes a step: one group of 32, or two of 16 (lanes 0-7 and 8-15)
      __m512 acc_v = _mm512_setzero_ps();
      for (int64_t k = 0; k < p.C; k += 32) {
        _mm_prefetch(reinterpret_cast<const char*>(row + k + kPrefetchBytes), _MM_HINT_T0);
        const __m512i w = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k)));
        const __m512i d = _mm512_dpwssd_epi32(_mm512_setzero_si512(), w, _mm512_loadu_si512(x + k));
        acc_v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), step_factors<GROUP>(sc, xd, k), acc_v);
      }
      return _mm512_reduce_add_ps(acc_v);
    }
#endif
#ifdef GEMMARUN_AVX2
    if constexpr (GROUP % 16 == 0) {
      __m256 acc_v = _mm256_setzero_ps();
      for (int64_t g = 0; g < groups; ++g) {
        const int8_t* c = row + g * GROUP;
        const int16_t* xg = x + g * GROUP;
        __m256i a = _mm256_setzero_si256();
#pragma GCC unroll 4
        for (int k = 0; k < GROUP; k += 16) {
          const __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + k)));
          a = _mm256_add_epi32(a, _mm256_madd_epi16(w, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xg + k))));
        }
        acc_v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), _mm256_set1_ps(sc[g] * xd[g]), acc_v);
      }
      return hsum(acc_v);
    }
#endif
    float acc = 0.f;
    for (int64_t g = 0; g < groups; ++g) {
      int32_t s = 0;
      for (int k = 0; k < GROUP; ++k) s += int32_t(row[g * GROUP + k]) * int32_t(x[g * GROUP + k]);
      acc += sc[g] * xd[g] * float(s);
    }
    return acc;
  }

#ifdef GEMMARUN_AVX512
  // Activation rows m0 .. m0 + N - 1 at once, 32 codes a step (one group of 32, or two of 16: lanes
  // 0-7 and 8-15): each step is loaded and widened once for all of them (batched decode was
  // compute-bound: the 262k-row head took ~5x a single row's time at eight rows). Each row gets the
  // same operations in the same order as operator()'s AVX-512 loop, so each output is the same bits
  // as alone. operator() keeps its own copy of the loop: one row through several<1> was 8 % slower
  // (same-process A/B, 2048x640 and 65536x640 Q8_0).
  static bool several_ok(const Problem& p) { return p.C % 32 == 0; }
  template <int N>
  void several(const Problem& p, const uint8_t* row_bytes_ptr, int64_t m0, const float* __restrict sc,
               float* out) const {
    const int8_t* __restrict row = reinterpret_cast<const int8_t*>(row_bytes_ptr);
    const int16_t* __restrict x = p.xq + m0 * p.C;
    const float* __restrict xd = p.xscale + m0 * p.groups;
    __m512 acc_v[N];
#pragma GCC unroll 8
    for (int n = 0; n < N; ++n) acc_v[n] = _mm512_setzero_ps();
    for (int64_t k = 0; k < p.C; k += 32) {
      _mm_prefetch(reinterpret_cast<const char*>(row + k + kPrefetchBytes), _MM_HINT_T0);
      const __m512i w = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k)));
#pragma GCC unroll 8
      for (int n = 0; n < N; ++n) {
        const __m512i d = _mm512_dpwssd_epi32(_mm512_setzero_si512(), w, _mm512_loadu_si512(x + n * p.C + k));
        acc_v[n] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), step_factors<GROUP>(sc, xd + n * p.groups, k), acc_v[n]);
      }
    }
#pragma GCC unroll 8
    for (int n = 0; n < N; ++n) out[n] = _mm512_reduce_add_ps(acc_v[n]);
  }
#endif
};

// 4-bit nibbles in the halves layout, int16 activations
template <int GROUP>
struct DotNibbles {
  static int64_t row_bytes(const Problem& p) { return p.C / 2; }
  static bool split(const Problem& p) { return GROUP == 32 && (p.C / 2) % 64 == 0 && p.xlo != nullptr; }
  static bool prefetches(const Problem& p) { return split(p); }
  float operator()(const Problem& p, const uint8_t* __restrict row, int64_t m, const float* __restrict sc) const {
    const int64_t half = p.C / 2, half_groups = p.groups / 2;
    const int16_t* __restrict x = p.xq + m * p.C;
    const float* __restrict xd = p.xscale + m * p.groups;
#ifdef GEMMARUN_AVX512
    if (split(p)) {
      // a step: 64 bytes, two groups in each half of the row; one vpdpbusd multiplies 64 codes by
      // the activations' low bytes, one by their high bytes (lanes 0-7: the first group, 8-15: the next)
      const __m512i mask = _mm512_set1_epi8(0x0F);
      const uint8_t* __restrict xl = p.xlo + m * p.C;
      const int8_t* __restrict xh = p.xhi + m * p.C;
      __m512 acc_v = _mm512_setzero_ps();
      auto part = [&](__m512i codes, int64_t col, int64_t g, __m512 acc) {
        const __m512i lo = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(xl + col), codes);
        const __m512i hi = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes, _mm512_loadu_si512(xh + col));
        const __m512i d = _mm512_add_epi32(_mm512_slli_epi32(hi, 8), lo);
        const __m512 f = _mm512_insertf32x8(_mm512_set1_ps(sc[g] * xd[g]), _mm256_set1_ps(sc[g + 1] * xd[g + 1]), 1);
        return _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), f, acc);
      };
      for (int64_t g = 0; g < half_groups; g += 2) {
        _mm_prefetch(reinterpret_cast<const char*>(row + g * 32 + kPrefetchBytes), _MM_HINT_T0);
        const __m512i b = _mm512_loadu_si512(row + g * 32);
        acc_v = part(_mm512_and_si512(b, mask), g * 32, g, acc_v);
        acc_v = part(_mm512_and_si512(_mm512_srli_epi16(b, 4), mask), half + g * 32, half_groups + g, acc_v);
      }
      return _mm512_reduce_add_ps(acc_v);
    }
    if (GROUP == 32 && half % 32 == 0) {  // a step: 32 bytes, i.e. one group in each half of the row
      const __m256i mask = _mm256_set1_epi8(0x0F);
      __m512 acc_v = _mm512_setzero_ps();
      for (int64_t g = 0; g < half_groups; ++g) {
        const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + g * 32));
        const __m512i l = _mm512_cvtepu8_epi16(_mm256_and_si256(b, mask));
        const __m512i h = _mm512_cvtepu8_epi16(_mm256_and_si256(_mm256_srli_epi16(b, 4), mask));
        const __m512i lo = _mm512_dpwssd_epi32(_mm512_setzero_si512(), l, _mm512_loadu_si512(x + g * 32));
        const __m512i hi = _mm512_dpwssd_epi32(_mm512_setzero_si512(), h, _mm512_loadu_si512(x + half + g * 32));
        acc_v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), _mm512_set1_ps(sc[g] * xd[g]), acc_v);
        acc_v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), _mm512_set1_ps(sc[half_groups + g] * xd[half_groups + g]),
                                acc_v);
      }
      return _mm512_reduce_add_ps(acc_v);
    }
#endif
#ifdef GEMMARUN_AVX2
    if (GROUP % 16 == 0 && half % GROUP == 0) {
      const __m128i mask = _mm_set1_epi8(0x0F);
      __m256 acc_v = _mm256_setzero_ps();
      for (int64_t g = 0; g < half_groups; ++g) {
        const uint8_t* c = row + g * GROUP;
        const int16_t* xl = x + g * GROUP;         // low nibbles: the first half of the row
        const int16_t* xh = x + half + g * GROUP;  // high nibbles: the second half
        __m256i lo = _mm256_setzero_si256(), hi = _mm256_setzero_si256();
#pragma GCC unroll 4
        for (int k = 0; k < GROUP; k += 16) {
          const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c + k));
          const __m256i l = _mm256_cvtepu8_epi16(_mm_and_si128(b, mask));
          const __m256i h = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(b, 4), mask));
          lo = _mm256_add_epi32(lo, _mm256_madd_epi16(l, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xl + k))));
          hi = _mm256_add_epi32(hi, _mm256_madd_epi16(h, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xh + k))));
        }
        acc_v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), _mm256_set1_ps(sc[g] * xd[g]), acc_v);
        acc_v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), _mm256_set1_ps(sc[half_groups + g] * xd[half_groups + g]), acc_v);
      }
      return hsum(acc_v);
    }
#endif
    float acc = 0.f;
    for (int64_t k = 0; k < half; ++k) {
      const int64_t gl = k / GROUP, gh = (half + k) / GROUP;
      acc += sc[gl] * xd[gl] * float(int32_t(row[k] & 0x0F) * int32_t(x[k]));
      acc += sc[gh] * xd[gh] * float(int32_t(row[k] >> 4) * int32_t(x[half + k]));
    }
    return acc;
  }
};

#ifdef GEMMARUN_AVX2
// bfloat16 compute: activations rounded to int8 per group (what bfloat16's 8-bit mantissa keeps,
// and what llama.cpp's q8 dot products do), so 32 codes take one unsigned-by-signed byte
// multiply-add instead of two widenings and two 16-bit multiply-adds: the 4-bit formats were
// compute-bound at half the machine's bandwidth with int16 activations.
inline __m256 dot32_u8s8(__m256i codes_u8, const int8_t* x) {
  const __m256i pairs = _mm256_maddubs_epi16(codes_u8, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

// 4-bit nibbles in 32-wide groups, int8 activations
struct DotNibblesQ8 {
  static int64_t row_bytes(const Problem& p) { return p.C / 2; }
  static bool prefetches(const Problem&) { return false; }
  float operator()(const Problem& p, const uint8_t* __restrict row, int64_t m, const float* __restrict sc) const {
    const int64_t half = p.C / 2, half_groups = p.groups / 2;
    const int8_t* __restrict x = p.xq8 + m * p.C;
    const float* __restrict xd = p.xscale + m * p.groups;
    const __m256i mask = _mm256_set1_epi8(0x0F);
    __m256 acc_v = _mm256_setzero_ps();
    for (int64_t g = 0; g < half_groups; ++g) {
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + g * 32));
      const __m256i lo = _mm256_and_si256(b, mask), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), mask);
      acc_v = _mm256_fmadd_ps(dot32_u8s8(lo, x + g * 32), _mm256_set1_ps(sc[g] * xd[g]), acc_v);
      acc_v = _mm256_fmadd_ps(dot32_u8s8(hi, x + half + g * 32),
                              _mm256_set1_ps(sc[half_groups + g] * xd[half_groups + g]), acc_v);
    }
    return hsum(acc_v);
  }
};

// int8 codes in groups of 16 or 32, int8 activations (signed: |code| times the activation
// carrying the code's sign)
template <int GROUP>
struct DotInt8Q8 {
  static int64_t row_bytes(const Problem& p) { return p.C; }
  static bool prefetches(const Problem&) { return false; }
  float operator()(const Problem& p, const uint8_t* row_bytes_ptr, int64_t m, const float* __restrict sc) const {
    const int8_t* __restrict row = reinterpret_cast<const int8_t*>(row_bytes_ptr);
    const int8_t* __restrict x = p.xq8 + m * p.C;
    const float* __restrict xd = p.xscale + m * p.groups;
    __m256 acc_v = _mm256_setzero_ps();
    for (int64_t k = 0; k < p.C; k += 32) {
      const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k));
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + k));
      const __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(c, c), _mm256_sign_epi8(xv, c));
      const __m256 d = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
      __m256 f;
      if constexpr (GROUP == 32) {
        f = _mm256_set1_ps(sc[k / 32] * xd[k / 32]);
      } else {  // lanes 0-3 hold codes 0-15 (one group), lanes 4-7 codes 16-31 (the next)
        const int64_t g = k / 16;
        f = _mm256_setr_m128(_mm_set1_ps(sc[g] * xd[g]), _mm_set1_ps(sc[g + 1] * xd[g + 1]));
      }
      acc_v = _mm256_fmadd_ps(d, f, acc_v);
    }
    return hsum(acc_v);
  }
};
#endif

constexpr int64_t kPrefetchRows = 4;

// The problem's fields are copied to locals: through the struct, every store to y forced them to
// be reloaded.
// Weight row r times activation rows 0, 1, ... eight, four, two at a time (Dot::several); returns
// how many it did (the rest go one by one).
template <typename Dot>
int64_t rows_together(const Dot& dot, const Problem& p, const uint8_t* row, int64_t r, const float* sc,
                      const float* bi) {
  float acc[8];
  int64_t m = 0;
  auto store = [&](int n_rows) {
    for (int n = 0; n < n_rows; ++n)
      p.y[(m + n) * p.R + r] = p.offset ? acc[n] + offset_term(p, m + n, sc, bi) : acc[n];
    m += n_rows;
  };
  while (m + 8 <= p.M) { dot.template several<8>(p, row, m, sc, acc); store(8); }
  if (m + 4 <= p.M) { dot.template several<4>(p, row, m, sc, acc); store(4); }
  if (m + 2 <= p.M) { dot.template several<2>(p, row, m, sc, acc); store(2); }
  return m;
}

template <typename Dot>
void rows(const Problem& p, int64_t r0, int64_t r1) {
  const Dot dot{};
  const int64_t M = p.M, R = p.R, stride = Dot::row_bytes(p);
  float* __restrict y = p.y;
  std::vector<float> sc_buf(p.half_scales ? p.groups : 0), bi_buf(p.half_scales ? p.groups : 0);
  const bool burst = !Dot::prefetches(p);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = p.codes + r * stride;
#ifdef GEMMARUN_AVX2
    // Ask for the row kPrefetchRows ahead now: one thread's hardware prefetcher alone kept the
    // 262k-row head at ~70% of the machine's read bandwidth.
    if (burst && r + kPrefetchRows < r1)
      for (int64_t b = 0; b < stride; b += 64)
        _mm_prefetch(reinterpret_cast<const char*>(row + kPrefetchRows * stride + b), _MM_HINT_T0);
#endif
    const float* sc = row_floats(p, p.scale, r, sc_buf.data());
    const float* bi = row_floats(p, p.bias, r, bi_buf.data());
    int64_t m = 0;
    if constexpr (requires { Dot::several_ok(p); }) {
      if (M > 1 && Dot::several_ok(p)) m = rows_together(dot, p, row, r, sc, bi);
    }
    for (; m < M; ++m) {
      float acc = dot(p, row, m, sc);
      if (p.offset) acc += offset_term(p, m, sc, bi);
      y[m * R + r] = acc;
    }
  }
}

template <int GROUP>
void run_rows(const Problem& p, bool nibbles) {
  // At least ~32 KB of codes per thread: a 256-row k_proj still splits over two cores.
  const int64_t grain = std::max<int64_t>(16, 32768 / std::max<int64_t>(1, nibbles ? p.C / 2 : p.C));
  at::parallel_for(0, p.R, grain, [&](int64_t r0, int64_t r1) {
#ifdef GEMMARUN_AVX2
    if (p.xq8 != nullptr) {
      if (nibbles) rows<DotNibblesQ8>(p, r0, r1); else rows<DotInt8Q8<GROUP>>(p, r0, r1);
      return;
    }
#endif
    if (nibbles) rows<DotNibbles<GROUP>>(p, r0, r1); else rows<DotInt8<GROUP>>(p, r0, r1);
  });
}

// ---- GGUF blocks read in place (Q4_0, Q8_0): for MoE experts left in the memory-mapped file ------
// A Q4_0 block is a float16 scale d and 16 bytes: byte j holds codes j (low nibble) and j + 16
// (high), w = (code - 8) * d. A Q8_0 block is d and 32 int8 codes, w = code * d.

constexpr int64_t kQ4_0 = 2, kQ5_0 = 6, kQ8_0 = 8, kQ4_K = 12, kQ6_K = 14, kIQ4_NL = 20, kIQ4_XS = 23, kMXFP4 = 39;  // GGML types

// The codebook formats: a block's 16 bytes of nibbles index 16 int8 values (ggml's tables), after
// a float16 scale (IQ4_NL) or an E8M0 exponent byte (MXFP4: 2^(e-128), the values being doubled);
// IQ4_XS holds eight such 32-weight runs of IQ4_NL nibbles under one float16 d and 6-bit scales.
alignas(16) constexpr int8_t kIQ4Values[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
alignas(16) constexpr int8_t kMXFP4Values[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
inline bool is_codebook(int64_t type) { return type == kIQ4_NL || type == kMXFP4; }
inline const int8_t* codebook(int64_t type) { return type == kMXFP4 ? kMXFP4Values : kIQ4Values; }
inline int64_t codebook_nibbles(int64_t type) { return type == kMXFP4 ? 1 : 2; }  // byte offset

inline float half_at(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
#ifdef __F16C__
  return _cvtsh_ss(bits);
#else
  return c10::detail::fp16_ieee_to_fp32_value(bits);
#endif
}

// A 32-weight block's scale: its float16 d, or MXFP4's exponent as ggml_e8m0_to_fp32_half (e < 2:
// the float32 subnormals 2^-128 and 2^-127).
inline float block_scale(const uint8_t* blk, int64_t type) {
  if (type != kMXFP4) return half_at(blk);
  const uint32_t e = blk[0], bits = e < 2 ? 0x00200000u << e : (e - 1) << 23;
  float d;
  std::memcpy(&d, &bits, 4);
  return d;
}

struct BlockProblem {
  const uint8_t* blocks;  // [R, row_bytes]
  int64_t R, C, M, row_bytes, type;
  int64_t block, type_size;  // weights and bytes per block (set once, by block_gemv)
  const int16_t* xq;      // int16 activations, or
  const int8_t* xq8;      // int8 activations (per 32: x ~= xq * xscale)
  const uint8_t* xlo;     // or null: xq split into bytes (Q4_K's byte multiply-adds, AVX-512 VNNI)
  const int8_t* xhi;
  const float* xscale;    // [M, C/32]
  const float* xsum;      // [M, C/32] sums of the rounded x
  float* y;               // [M, R]
};

void block_rows(const BlockProblem& p, int64_t r0, int64_t r1) {
  const int64_t nb = p.C / 32, type_size = p.type_size;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = p.blocks + r * p.row_bytes;
    for (int64_t m = 0; m < p.M; ++m) {
      const float* xd = p.xscale + m * nb;
      const float* xs = p.xsum + m * nb;
      float acc = 0.f, offset = 0.f;
#ifdef GEMMARUN_AVX2
      __m256 acc_v = _mm256_setzero_ps();
#endif
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blk = row + b * type_size;
#ifdef GEMMARUN_AVX512
        if (m == 0) _mm_prefetch(reinterpret_cast<const char*>(blk + kPrefetchBytes), _MM_HINT_T0);
#endif
        const float d = half_at(blk);
        const uint8_t* qs = blk + 2;
        if (p.type == kQ4_0) offset += d * xs[b];
#ifdef GEMMARUN_AVX2
        __m256 dot;
        if (p.type == kQ4_0) {
          const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
          const __m128i mask = _mm_set1_epi8(0x0F);
          const __m128i lo = _mm_and_si128(raw, mask), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
          if (p.xq8) {
            dot = dot32_u8s8(_mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1), p.xq8 + m * p.C + b * 32);
          } else {
            const int16_t* x = p.xq + m * p.C + b * 32;
            const __m256i a = _mm256_add_epi32(
                _mm256_madd_epi16(_mm256_cvtepu8_epi16(lo), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))),
                _mm256_madd_epi16(_mm256_cvtepu8_epi16(hi), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16))));
            dot = _mm256_cvtepi32_ps(a);
          }
        } else {
          const int8_t* c = reinterpret_cast<const int8_t*>(qs);
          if (p.xq8) {
            const __m256i cv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c));
            const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.xq8 + m * p.C + b * 32));
            const __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(cv, cv), _mm256_sign_epi8(xv, cv));
            dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
          } else {
            const int16_t* x = p.xq + m * p.C + b * 32;
            const __m256i a = _mm256_add_epi32(
                _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c))),
                                  _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))),
                _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + 16))),
                                  _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16))));
            dot = _mm256_cvtepi32_ps(a);
          }
        }
        acc_v = _mm256_fmadd_ps(dot, _mm256_set1_ps(d * xd[b]), acc_v);
#else
        int32_t dot = 0;
        for (int k = 0; k < 32; ++k) {
          const int32_t code = p.type == kQ4_0 ? (k < 16 ? qs[k] & 0x0F : qs[k - 16] >> 4)
                                               : int32_t(reinterpret_cast<const int8_t*>(qs)[k]);
          const int32_t xv = p.xq8 ? p.xq8[m * p.C + b * 32 + k] : p.xq[m * p.C + b * 32 + k];
          dot += code * xv;
        }
        acc += float(dot) * d * xd[b];
#endif
      }
#ifdef GEMMARUN_AVX2
      acc += hsum(acc_v);
#endif
      p.y[m * p.R + r] = acc - 8.f * offset;
    }
  }
}


#ifdef GEMMARUN_AVX2
// 32 bits -> 32 bytes, byte j 0xFF where bit j is set: each byte gets its bit's byte of `bits`
// (a shuffle within 128-bit lanes; both lanes hold all four bytes), then tests its own bit.
inline __m256i bit_bytes(uint32_t bits) {
  const __m256i spread = _mm256_shuffle_epi8(
      _mm256_set1_epi32(static_cast<int32_t>(bits)),
      _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
  const __m256i bit = _mm256_set1_epi64x(0x8040201008040201LL);  // byte k of each 8: 1 << k
  return _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
}

// 16 bytes of nibbles (low: weights 0-15, high: 16-31) as the table values they index, codes 0-15
// in q0 and 16-31 in q1 (each half stays in its own 128-bit register: the int16 widening takes
// halves, so a 256-bit register would only be split again).
inline void table_codes(const uint8_t* nibbles, const int8_t* values, __m128i& q0, __m128i& q1) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(nibbles));
  const __m128i table = _mm_load_si128(reinterpret_cast<const __m128i*>(values));
  const __m128i m4 = _mm_set1_epi8(0x0F);
  q0 = _mm_shuffle_epi8(table, _mm_and_si128(raw, m4));
  q1 = _mm_shuffle_epi8(table, _mm_and_si128(_mm_srli_epi16(raw, 4), m4));
}

// The 32 codes of a Q5_0 block as signed bytes (-16..15), codes 0-15 in q0 and 16-31 in q1.
// A code is its nibble plus 16 times its fifth bit, minus 16: the nibble where the bit is set,
// the nibble - 16 where it is clear. AVX-512 takes the bits as a mask (a masked subtract);
// AVX2 spreads them to bytes.
inline void q5_0_codes(const uint8_t* blk, __m128i& q0, __m128i& q1) {
  uint32_t qh;
  std::memcpy(&qh, blk + 2, 4);
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 6));
  const __m128i m4 = _mm_set1_epi8(0x0F), sixteen = _mm_set1_epi8(16);
  const __m128i lo = _mm_and_si128(raw, m4), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), m4);
#ifdef GEMMARUN_AVX512
  q0 = _mm_mask_sub_epi8(lo, static_cast<__mmask16>(~qh), lo, sixteen);
  q1 = _mm_mask_sub_epi8(hi, static_cast<__mmask16>(~qh >> 16), hi, sixteen);
#else
  const __m256i fifth = _mm256_and_si256(bit_bytes(qh), _mm256_set1_epi8(0x10));
  q0 = _mm_sub_epi8(_mm_or_si128(lo, _mm256_castsi256_si128(fifth)), sixteen);
  q1 = _mm_sub_epi8(_mm_or_si128(hi, _mm256_extracti128_si256(fifth, 1)), sixteen);
#endif
}

// The 32 codes of a Q5_0 (-16..15), IQ4_NL or MXFP4 (their table's values) block as signed bytes.
inline void signed_codes(const uint8_t* blk, int64_t type, __m128i& q0, __m128i& q1) {
  if (type == kQ5_0) q5_0_codes(blk, q0, q1);
  else table_codes(blk + codebook_nibbles(type), codebook(type), q0, q1);
}

// Codes 0-15 and 16-31 of a Q4_0 (unsigned, 0..15: the -8 is the offset term's), Q8_0 or
// signed_codes block as int16, for the several-rows int16 loops.
inline void int16_codes(const uint8_t* blk, int64_t type, __m256i& c0, __m256i& c1) {
  if (type == kQ4_0) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2));
    const __m128i mask = _mm_set1_epi8(0x0F);
    c0 = _mm256_cvtepu8_epi16(_mm_and_si128(raw, mask));
    c1 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(raw, 4), mask));
  } else if (type == kQ8_0) {
    c0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2)));
    c1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 18)));
  } else {  // as signed_block makes them
    __m128i q0, q1;
    signed_codes(blk, type, q0, q1);
    c0 = _mm256_cvtepi8_epi16(q0);
    c1 = _mm256_cvtepi8_epi16(q1);
  }
}

// acc + s * (c . x) over one 32-weight block whose codes are int16 halves c0 (0-15), c1 (16-31):
// both halves' multiply-adds summed as integers, then one scaled FMA into 8 float lanes. The
// blocks' loops (one row, several rows, IQ4_XS runs) all take this, so their bits agree.
inline __m256 block32_fma(__m256i c0, __m256i c1, const int16_t* x, float s, __m256 acc) {
  const __m256i p = _mm256_add_epi32(
      _mm256_madd_epi16(c0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))),
      _mm256_madd_epi16(c1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16))));
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(s), acc);
}
#endif

#ifdef GEMMARUN_AVX2
// 32-weight block rows (Q4_0, Q8_0, Q5_0, IQ4_NL, MXFP4) times several int16 activation rows (MoE
// prefill, batched decode): each block's codes are widened to int16 once for all of them, where
// block_rows (signed_block for the last three) widened them for every row. Per row the same
// operations in the same order: the same bits. Same process, 4-64
// rows, Q4_0/Q8_0: Q8_0 1408x2816 1.4-1.7x, Q4_0 2816x704 1.1-1.4x, Q4_0 1408x2816 1.15x at 4 rows and level
// from 16 (its activation rows no longer stay in L1 across a weight row).
void block_rows_together(const BlockProblem& p, int64_t r0, int64_t r1) {
  const int64_t nb = p.C / 32, type_size = p.type_size, M = p.M;
  std::vector<__m256> acc(M);
  std::vector<float> offset(M);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = p.blocks + r * p.row_bytes;
    for (int64_t m = 0; m < M; ++m) {
      acc[m] = _mm256_setzero_ps();
      offset[m] = 0.f;
    }
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* blk = row + b * type_size;
#ifdef GEMMARUN_AVX512
      _mm_prefetch(reinterpret_cast<const char*>(blk + kPrefetchBytes), _MM_HINT_T0);
#endif
      const float d = block_scale(blk, p.type);
      __m256i c0, c1;
      int16_codes(blk, p.type, c0, c1);
      for (int64_t m = 0; m < M; ++m) {
        const int16_t* x = p.xq + m * p.C + b * 32;
        if (p.type == kQ4_0) offset[m] += d * p.xsum[m * nb + b];
        acc[m] = block32_fma(c0, c1, x, d * p.xscale[m * nb + b], acc[m]);
      }
    }
    for (int64_t m = 0; m < M; ++m) p.y[m * p.R + r] = (0.f + hsum(acc[m])) - 8.f * offset[m];
  }
}
#endif


#ifdef GEMMARUN_AVX512
// The same products two activation rows to a register: lanes 0-7 are row 2q's eight int32 sums
// and float lanes of block_rows, lanes 8-15 row 2q+1's, so each row gets block_rows' bits (integer
// sums are exact in any order; every float operation is the same per lane; Q4_0's offset chain
// runs one lane per row). The activations are laid out once per call so that a block of two rows
// is two loads: per block and row pair a multiply-add, a VNNI dot, a conversion, a scale and an
// FMA, where block_rows_together took twice as many 8-lane operations per row. Same process, 2
// threads, experts one at a time (240 of them: from memory), block_rows / block_rows_together ->
// these: Q4_0 1408x2816 at 2 rows 219 -> 160 us, 4 rows 388 -> 210, 16 rows 1299 -> 889; Q5_0
// 2816x704 (unpacked row by row before) 16 rows 1358 -> 319 us; Q8_0 2816x704 8 rows 316 -> 195 us.
struct PairedActivations {
  int64_t pairs, nb;
  std::vector<int16_t> x;   // [pairs, nb, 2 halves, 2 rows, 16]: a half-block of both rows
  std::vector<float> d;     // [pairs, nb, 2 rows, 8]: each row's activation scale, 8 lanes each
  std::vector<float> sums;  // [nb, 16]: xsum of row m in lane m (rows of one group of 16)
  PairedActivations(const BlockProblem& p, int64_t m0, int64_t rows)
      : pairs((rows + 1) / 2), nb(p.C / 32), x(pairs * nb * 64), d(pairs * nb * 16), sums(nb * 16, 0.f) {
    for (int64_t q = 0; q < pairs; ++q)
      for (int64_t half = 0; half < 2; ++half) {
        const int64_t m = m0 + std::min(2 * q + half, rows - 1);  // an odd last row pairs with itself
        for (int64_t b = 0; b < nb; ++b) {
          int16_t* dst = x.data() + (q * nb + b) * 64 + half * 16;
          std::memcpy(dst, p.xq + m * p.C + b * 32, 16 * sizeof(int16_t));
          std::memcpy(dst + 32, p.xq + m * p.C + b * 32 + 16, 16 * sizeof(int16_t));
          std::fill_n(d.data() + (q * nb + b) * 16 + half * 8, 8, p.xscale[m * nb + b]);
        }
      }
    for (int64_t j = 0; j < rows; ++j)
      for (int64_t b = 0; b < nb; ++b) sums[b * 16 + j] = p.xsum[(m0 + j) * nb + b];
  }
};

template <int P>
void block_rows_paired(const BlockProblem& p, const PairedActivations& a, int64_t m0, int64_t rows, int64_t r0, int64_t r1) {
  const int64_t nb = a.nb, type_size = p.type_size;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = p.blocks + r * p.row_bytes;
    __m512 acc[P];
    for (int q = 0; q < P; ++q) acc[q] = _mm512_setzero_ps();
    __m512 offset = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* blk = row + b * type_size;
      _mm_prefetch(reinterpret_cast<const char*>(blk + kPrefetchBytes), _MM_HINT_T0);
      const float dw = block_scale(blk, p.type);
      const __m512 d = _mm512_set1_ps(dw);
      __m256i c0, c1;
      int16_codes(blk, p.type, c0, c1);
      if (p.type == kQ4_0) offset = _mm512_add_ps(offset, _mm512_mul_ps(d, _mm512_loadu_ps(a.sums.data() + b * 16)));
      const __m512i w0 = _mm512_broadcast_i64x4(c0), w1 = _mm512_broadcast_i64x4(c1);
#pragma GCC unroll 8
      for (int q = 0; q < P; ++q) {
        const int16_t* x = a.x.data() + (q * nb + b) * 64;
        const __m512i dot = _mm512_dpwssd_epi32(_mm512_madd_epi16(w0, _mm512_loadu_si512(x)), w1, _mm512_loadu_si512(x + 32));
        const __m512 scale = _mm512_mul_ps(d, _mm512_loadu_ps(a.d.data() + (q * nb + b) * 16));
        acc[q] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[q]);
      }
    }
    alignas(64) float off[16];
    _mm512_store_ps(off, offset);
    for (int64_t j = 0; j < rows; ++j) {
      const __m512 v = acc[j / 2];
      const __m256 lanes = j % 2 ? _mm512_extractf32x8_ps(v, 1) : _mm512_castps512_ps256(v);
      p.y[(m0 + j) * p.R + r] = (0.f + hsum(lanes)) - 8.f * off[j];
    }
  }
}

// Weight rows r0..r1 times one group of up to 16 activation rows (8 pairs, 8 accumulators).
void block_rows_in_pairs(const BlockProblem& p, const PairedActivations& a, int64_t m0, int64_t rows, int64_t r0, int64_t r1) {
  switch (a.pairs) {
    case 1: return block_rows_paired<1>(p, a, m0, rows, r0, r1);
    case 2: return block_rows_paired<2>(p, a, m0, rows, r0, r1);
    case 3: return block_rows_paired<3>(p, a, m0, rows, r0, r1);
    case 4: return block_rows_paired<4>(p, a, m0, rows, r0, r1);
    case 5: return block_rows_paired<5>(p, a, m0, rows, r0, r1);
    case 6: return block_rows_paired<6>(p, a, m0, rows, r0, r1);
    case 7: return block_rows_paired<7>(p, a, m0, rows, r0, r1);
    default: return block_rows_paired<8>(p, a, m0, rows, r0, r1);
  }
}
#endif

// ---- Q4_K, Q6_K and Q5_0 blocks read in place (llama.cpp's Q4_K_M experts) ---------------------
// A super-block holds 256 weights. Q4_K: float16 d and dmin, 12 bytes packing eight 6-bit scales
// and eight 6-bit mins (one per 32 weights), 128 bytes of nibbles (each 32 bytes: the low nibbles
// are 32 weights, the high nibbles the next 32); w = d * scale * code - dmin * min. Q6_K: 128
// bytes of low nibbles, 64 bytes of 2-bit highs, sixteen int8 scales (one per 16 weights), float16
// d; w = d * scale * (code - 32). Each super-block is unpacked to int16 codes in a small buffer
// (L1), then multiplied like the other formats (Q4_K with AVX-512 VNNI is not: its nibbles multiply
// the activations' bytes directly, q4_k_rows_vnni). Q5_0 (where Q4_K_M falls back for rows that are
// not a multiple of 256: a 26B-A4B's 704-wide expert down projection) is a float16 d, 32 high
// bits and 16 bytes of nibbles, w = d * (code - 16). The activations stay int16 (per 32 values).

// acc += s * (q . x) over 16 int16 pairs: one 16-bit multiply-add, kept in 8 float lanes until the
// row ends (a horizontal sum per 16 weights cost more than the products).
#ifdef GEMMARUN_AVX2
using Acc = __m256;
inline Acc acc_zero() { return _mm256_setzero_ps(); }
inline float acc_sum(Acc a) { return hsum(a); }
inline Acc fma16(const int16_t* q, const int16_t* x, float s, Acc acc) {
  const __m256i p = _mm256_madd_epi16(_mm256_load_si256(reinterpret_cast<const __m256i*>(q)),
                                      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(s), acc);
}
#else
using Acc = float;
inline Acc acc_zero() { return 0.f; }
inline float acc_sum(Acc a) { return a; }
inline Acc fma16(const int16_t* q, const int16_t* x, float s, Acc acc) {
  int32_t d = 0;
  for (int k = 0; k < 16; ++k) d += int32_t(q[k]) * int32_t(x[k]);
  return acc + s * float(d);
}
#endif

// One Q4_K super-block times one activation row (xq, xd, xs: this super-block's part); the
// mins' term goes to `offset`.
inline Acc q4_k_block(const uint8_t* blk, const int16_t* xq, const float* xd, const float* xs, Acc acc,
                      float& offset) {
  const float d = half_at(blk), dmin = half_at(blk + 2);
  const uint8_t* sc6 = blk + 4;
  const uint8_t* qs = blk + 16;
  alignas(32) int16_t q[256];
  for (int c = 0; c < 4; ++c)
    for (int j = 0; j < 32; ++j) {
      q[c * 64 + j] = qs[c * 32 + j] & 0x0F;
      q[c * 64 + 32 + j] = qs[c * 32 + j] >> 4;
    }
  for (int j = 0; j < 8; ++j) {
    const int scale = j < 4 ? sc6[j] & 63 : (sc6[j + 4] & 0x0F) | ((sc6[j - 4] >> 2) & 0x30);
    const int min = j < 4 ? sc6[j + 4] & 63 : (sc6[j + 4] >> 4) | ((sc6[j] >> 2) & 0x30);
    const float f = d * float(scale) * xd[j];
    acc = fma16(q + j * 32, xq + j * 32, f, acc);
    acc = fma16(q + j * 32 + 16, xq + j * 32 + 16, f, acc);
    offset += dmin * float(min) * xs[j];
  }
  return acc;
}

#ifdef GEMMARUN_AVX512
// Q4_K rows without unpacking to int16, all activation rows at once: each super-block's 32-byte
// chunks of nibbles (32 low, then 32 high: weights 64c..64c+63 in order) multiply the int16
// activations' two bytes, a vpdpbusd each, scaled per 32 weights in the lanes (0-7: the low
// nibbles' sub-block, 8-15: the high ones'). A super-block's codes and its eight 6-bit scales and
// mins are unpacked once for every row (the unpacked path read 11-12 GB/s, compute-bound).
void q4_k_rows_vnni(const BlockProblem& p, int64_t r0, int64_t r1) {
  const int64_t nb = p.C / 256, M = p.M, groups = p.C / 32;
  std::vector<__m512> acc(M);
  std::vector<__m256> offset(M);
  const __m256i mask = _mm256_set1_epi8(0x0F);
  __m512i pair[4];  // chunk c's lanes: 0-7 take sub-block 2c's scale, 8-15 sub-block 2c + 1's
  for (int c = 0; c < 4; ++c)
    pair[c] = _mm512_inserti64x4(_mm512_set1_epi32(2 * c), _mm256_set1_epi32(2 * c + 1), 1);
  const uint32_t six = 0x3F3F3F3F, four = 0x0F0F0F0F, two = 0x03030303;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = p.blocks + r * p.row_bytes;
    for (int64_t m = 0; m < M; ++m) {
      acc[m] = _mm512_setzero_ps();
      offset[m] = _mm256_setzero_ps();
    }
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* blk = row + b * 144;
      _mm_prefetch(reinterpret_cast<const char*>(blk + kPrefetchBytes), _MM_HINT_T0);
      // The scales and mins four bytes at a time (scale_j, min_j for j < 4 are the low 6 bits of
      // bytes j and j + 4; for j >= 4 a nibble of byte j + 4 and the top 2 bits of bytes j - 4 and
      // j): a scalar unpack per sub-block cost as much as the products.
      uint32_t w[3];
      std::memcpy(w, blk + 4, 12);
      const uint32_t scales[2] = {w[0] & six, (w[2] & four) | (((w[0] >> 6) & two) << 4)};
      const uint32_t mins[2] = {w[1] & six, ((w[2] >> 4) & four) | (((w[1] >> 6) & two) << 4)};
      auto widen = [](const uint32_t* bytes) {
        return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes))));
      };
      const __m256 d_scale = _mm256_mul_ps(_mm256_set1_ps(half_at(blk)), widen(scales));
      const __m256 dmin_min = _mm256_mul_ps(_mm256_set1_ps(half_at(blk + 2)), widen(mins));
      __m512i codes[4];
      for (int c = 0; c < 4; ++c) {
        const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16 + c * 32));
        codes[c] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(q, mask)),
                                      _mm256_and_si256(_mm256_srli_epi16(q, 4), mask), 1);
      }
      for (int64_t m = 0; m < M; ++m) {
        const float* xd = p.xscale + m * groups + b * 8;
        const float* xs = p.xsum + m * groups + b * 8;
        const uint8_t* xlo = p.xlo + m * p.C + b * 256;
        const int8_t* xhi = p.xhi + m * p.C + b * 256;
        const __m512 f = _mm512_castps256_ps512(_mm256_mul_ps(d_scale, _mm256_loadu_ps(xd)));
        offset[m] = _mm256_fmadd_ps(dmin_min, _mm256_loadu_ps(xs), offset[m]);
        for (int c = 0; c < 4; ++c) {
          const __m512i lo = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(xlo + c * 64), codes[c]);
          const __m512i hi = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes[c], _mm512_loadu_si512(xhi + c * 64));
          const __m512i dot = _mm512_add_epi32(_mm512_slli_epi32(hi, 8), lo);
          acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_permutexvar_ps(pair[c], f), acc[m]);
        }
      }
    }
    for (int64_t m = 0; m < M; ++m) p.y[m * p.R + r] = _mm512_reduce_add_ps(acc[m]) - hsum(offset[m]);
  }
}
#endif

// A Q6_K super-block's 256 codes as int16 (code - 32) and its sixteen factors d * scale.
inline void q6_k_unpack(const uint8_t* blk, int16_t* q, float* f) {
  const uint8_t* ql = blk;
  const uint8_t* qh = blk + 128;
  const int8_t* scales = reinterpret_cast<const int8_t*>(blk + 192);
  const float d = half_at(blk + 208);
  // weights h*128 + s*32 + j: low nibble of ql[h*64 + (s&1)*32 + j] (high nibble for s >= 2),
  // high bits from qh[h*32 + j] >> 2s; constant shifts per (h, s) so the j loop vectorizes
  for (int h = 0; h < 2; ++h)
#pragma GCC unroll 4
    for (int s = 0; s < 4; ++s)
      for (int j = 0; j < 32; ++j) {
        const int lo = (ql[h * 64 + (s & 1) * 32 + j] >> (4 * (s >> 1))) & 0x0F;
        const int hi = (qh[h * 32 + j] >> (2 * s)) & 0x03;
        q[h * 128 + s * 32 + j] = static_cast<int16_t>((lo | (hi << 4)) - 32);
      }
  for (int k = 0; k < 16; ++k) f[k] = d * float(scales[k]);
}

// Unpacked Q6_K codes times one row: a 16-bit multiply-add per 16 weights.
inline Acc q6_k_dot(const int16_t* q, const float* f, const int16_t* xq, const float* xd, Acc acc) {
  for (int k = 0; k < 16; ++k) acc = fma16(q + k * 16, xq + k * 16, f[k] * xd[k / 2], acc);
  return acc;
}

inline Acc q6_k_block(const uint8_t* blk, const int16_t* xq, const float* xd, Acc acc) {
  alignas(32) int16_t q[256];
  float f[16];
  q6_k_unpack(blk, q, f);
  return q6_k_dot(q, f, xq, xd, acc);
}

// The scale of run j of an IQ4_XS super-block: d * (6-bit scale - 32), as formats.py forms it.
inline float iq4_xs_scale(const uint8_t* blk, int j) {
  uint16_t high;
  std::memcpy(&high, blk + 2, 2);
  const int ls = ((blk[4 + j / 2] >> (4 * (j % 2))) & 0x0F) | (((high >> (2 * j)) & 0x03) << 4);
  return half_at(blk) * float(ls - 32);
}

// An IQ4_XS super-block times one row: each 32-weight run's table codes, scaled by its own scale.
inline Acc iq4_xs_block(const uint8_t* blk, const int16_t* xq, const float* xd, Acc acc) {
  for (int j = 0; j < 8; ++j) {
    const float s = iq4_xs_scale(blk, j) * xd[j];
    const uint8_t* qs = blk + 8 + 16 * j;
#ifdef GEMMARUN_AVX2
    __m128i q0, q1;
    table_codes(qs, kIQ4Values, q0, q1);
    acc = block32_fma(_mm256_cvtepi8_epi16(q0), _mm256_cvtepi8_epi16(q1), xq + 32 * j, s, acc);
#else
    alignas(32) int16_t q[32];
    for (int k = 0; k < 16; ++k) {
      q[k] = kIQ4Values[qs[k] & 0x0F];
      q[k + 16] = kIQ4Values[qs[k] >> 4];
    }
    acc = fma16(q, xq + 32 * j, s, acc);
    acc = fma16(q + 16, xq + 32 * j + 16, s, acc);
#endif
  }
  return acc;
}

#ifdef GEMMARUN_AVX2
// Q6_K or IQ4_XS rows times several activation rows (MoE prefill, batched decode): each
// super-block is unpacked once (int16 codes and float factors) for all of them, where
// unpacked_rows unpacked it for every row. Per row the same operations in the same order as
// q6_k_block / iq4_xs_block: the same bits.
void super_block_rows_together(const BlockProblem& p, int64_t r0, int64_t r1) {
  const int64_t nb = p.C / 256, M = p.M;
  std::vector<Acc> acc(M);
  alignas(32) int16_t q[256];
  float f[16];
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = p.blocks + r * p.row_bytes;
    for (int64_t m = 0; m < M; ++m) acc[m] = acc_zero();
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* blk = row + b * p.type_size;
#ifdef GEMMARUN_AVX512
      for (int64_t k = 0; k < p.type_size; k += 64)
        _mm_prefetch(reinterpret_cast<const char*>(blk + k + kPrefetchBytes), _MM_HINT_T0);
#endif
      if (p.type == kQ6_K) {
        q6_k_unpack(blk, q, f);
        for (int64_t m = 0; m < M; ++m) acc[m] = q6_k_dot(q, f, p.xq + m * p.C + b * 256, p.xscale + m * (p.C / 32) + b * 8, acc[m]);
      } else {  // IQ4_XS: eight 32-weight runs, one scale each
        for (int j = 0; j < 8; ++j) {
          __m128i q0, q1;
          table_codes(blk + 8 + 16 * j, kIQ4Values, q0, q1);
          _mm256_store_si256(reinterpret_cast<__m256i*>(q + 32 * j), _mm256_cvtepi8_epi16(q0));
          _mm256_store_si256(reinterpret_cast<__m256i*>(q + 32 * j + 16), _mm256_cvtepi8_epi16(q1));
          f[j] = iq4_xs_scale(blk, j);
        }
        for (int64_t m = 0; m < M; ++m) {
          const int16_t* x = p.xq + m * p.C + b * 256;
          const float* xd = p.xscale + m * (p.C / 32) + b * 8;
          for (int j = 0; j < 8; ++j)
            acc[m] = block32_fma(_mm256_load_si256(reinterpret_cast<const __m256i*>(q + 32 * j)),
                           _mm256_load_si256(reinterpret_cast<const __m256i*>(q + 32 * j + 16)), x + 32 * j,
                           f[j] * xd[j], acc[m]);
        }
      }
    }
    for (int64_t m = 0; m < M; ++m) p.y[m * p.R + r] = acc_sum(acc[m]);
  }
}
#endif

#ifdef GEMMARUN_AVX2
// A Q5_0, IQ4_NL or MXFP4 block times one row, vectorized (Q5_0's fifth bits had taken a scalar
// shift and mask per code: 0.8 GB/s on a 26B-A4B expert's 704-wide down projection).
inline Acc signed_block(const uint8_t* blk, int64_t type, const int16_t* xq, float xd, Acc acc) {
  const float d = block_scale(blk, type);
  __m128i q0, q1;
  signed_codes(blk, type, q0, q1);
  return block32_fma(_mm256_cvtepi8_epi16(q0), _mm256_cvtepi8_epi16(q1), xq, d * xd, acc);
}
#endif

// ---- float32 compute: 32-weight blocks (Q4_0, Q8_0, Q5_0, IQ4_NL, MXFP4) dequantized in registers
// Each block's codes become float32 weights (code * d: exact) and multiply the float32 activations
// with fused multiply-adds: no rounding of the activations, and per activation row two FMAs per
// block where the int16 path took a widening, two multiply-adds, a conversion and a scaled FMA.
// A tile of weight rows times activation rows keeps its sums in registers. Every output is the
// same chain of FMAs (block by block, lanes reduced at the end) whatever the tile it falls in, so a
// row's result does not depend on the rows batched with it (but differs from block_gemv's, whose
// activations are rounded: quant/experts.py keeps block_gemv up to the rows a row must match its
// decode bits in). Tiles of 2 weight rows x 8 activation rows beat 4 x 4 and 1 x 16 from 8 rows
// on. Same process, 2 threads, experts one at a time from memory, against block_gemv's paired
// int16 rows: 1408x2816 at 32 rows Q4_0 1828 -> 1236 us, Q8_0 1805 -> 1225, Q5_0 1702 -> 1342;
// 0.8-1.1x on 2816x704; and 1.7-2.4x the AVX2 loop block_rows_together (Q4_0/Q8_0, 32 rows).

// The 32 codes of a block as signed bytes (q0: codes 0-15, q1: 16-31) and its scale.
inline float block_codes(const uint8_t* blk, int64_t type, int8_t* q) {
  const float d = block_scale(blk, type);
  if (is_codebook(type)) {
    const uint8_t* qs = blk + codebook_nibbles(type);
    for (int j = 0; j < 16; ++j) {
      q[j] = codebook(type)[qs[j] & 0x0F];
      q[j + 16] = codebook(type)[qs[j] >> 4];
    }
  } else if (type == kQ8_0) {
    std::memcpy(q, blk + 2, 32);
  } else if (type == kQ4_0) {
    for (int j = 0; j < 16; ++j) {
      q[j] = static_cast<int8_t>((blk[2 + j] & 0x0F) - 8);
      q[j + 16] = static_cast<int8_t>((blk[2 + j] >> 4) - 8);
    }
  } else {  // Q5_0
    uint32_t qh;
    std::memcpy(&qh, blk + 2, 4);
    for (int j = 0; j < 16; ++j) {
      q[j] = static_cast<int8_t>(((blk[6 + j] & 0x0F) | (((qh >> j) & 1) << 4)) - 16);
      q[j + 16] = static_cast<int8_t>(((blk[6 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16);
    }
  }
  return d;
}

#ifndef GEMMARUN_AVX2
inline Acc signed_block(const uint8_t* blk, int64_t type, const int16_t* xq, float xd, Acc acc) {
  int8_t codes[32];
  const float d = block_codes(blk, type, codes);
  alignas(32) int16_t q[32];
  for (int k = 0; k < 32; ++k) q[k] = codes[k];
  acc = fma16(q, xq, d * xd, acc);
  return fma16(q + 16, xq + 16, d * xd, acc);
}
#endif

#ifdef GEMMARUN_AVX2
// Vectorized: codes 0-15 and 16-31 as two registers of signed bytes.
inline float block_codes(const uint8_t* blk, int64_t type, __m128i& q0, __m128i& q1) {
  const float d = block_scale(blk, type);
  const __m128i m4 = _mm_set1_epi8(0x0F);
  if (type == kQ8_0) {
    q0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2));
    q1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 18));
  } else if (type == kQ4_0) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2));
    q0 = _mm_sub_epi8(_mm_and_si128(raw, m4), _mm_set1_epi8(8));
    q1 = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(raw, 4), m4), _mm_set1_epi8(8));
  } else {  // Q5_0, IQ4_NL, MXFP4
    signed_codes(blk, type, q0, q1);
  }
  return d;
}

#ifdef GEMMARUN_AVX512
using FVec = __m512;
constexpr int kLanes = 16, kRowTile = 2, kActTile = 8;  // 4 weight + 16 sum registers of 32
inline FVec fv_zero() { return _mm512_setzero_ps(); }
inline FVec fv_load(const float* p) { return _mm512_loadu_ps(p); }
inline FVec fv_fma(FVec a, FVec b, FVec c) { return _mm512_fmadd_ps(a, b, c); }
inline float fv_sum(FVec v) { return _mm512_reduce_add_ps(v); }
inline void block_weights(const uint8_t* blk, int64_t type, FVec* w) {
  __m128i q0, q1;
  const __m512 d = _mm512_set1_ps(block_codes(blk, type, q0, q1));
  w[0] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0)), d);
  w[1] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1)), d);
}
#else
using FVec = __m256;
constexpr int kLanes = 8, kRowTile = 2, kActTile = 2;  // 8 weight + 4 sum registers of 16
inline FVec fv_zero() { return _mm256_setzero_ps(); }
inline FVec fv_load(const float* p) { return _mm256_loadu_ps(p); }
inline FVec fv_fma(FVec a, FVec b, FVec c) { return _mm256_fmadd_ps(a, b, c); }
inline float fv_sum(FVec v) { return hsum(v); }
inline void block_weights(const uint8_t* blk, int64_t type, FVec* w) {
  __m128i q0, q1;
  const __m256 d = _mm256_set1_ps(block_codes(blk, type, q0, q1));
  w[0] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q0)), d);
  w[1] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q0, 8))), d);
  w[2] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q1)), d);
  w[3] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q1, 8))), d);
}
#endif

// Weight rows r..r+RB times activation rows m..m+MB, all blocks; asks for the codes ahead on the
// first pass over a weight row only (the later ones find them in L1).
template <int RB, int MB>
void float_block_tile(const BlockProblem& p, const float* x, int64_t r, int64_t m, bool prefetch) {
  constexpr int V = 32 / kLanes;
  const int64_t nb = p.C / 32;
  FVec acc[RB][MB];
  for (int i = 0; i < RB; ++i)
    for (int j = 0; j < MB; ++j) acc[i][j] = fv_zero();
  for (int64_t b = 0; b < nb; ++b) {
    FVec w[RB][V];
    for (int i = 0; i < RB; ++i) {
      const uint8_t* blk = p.blocks + (r + i) * p.row_bytes + b * p.type_size;
      if (prefetch) _mm_prefetch(reinterpret_cast<const char*>(blk + kPrefetchBytes), _MM_HINT_T0);
      block_weights(blk, p.type, w[i]);
    }
    for (int j = 0; j < MB; ++j) {
      const float* xr = x + (m + j) * p.C + b * 32;
      for (int v = 0; v < V; ++v) {
        const FVec xv = fv_load(xr + v * kLanes);
        for (int i = 0; i < RB; ++i) acc[i][j] = fv_fma(w[i][v], xv, acc[i][j]);
      }
    }
  }
  for (int i = 0; i < RB; ++i)
    for (int j = 0; j < MB; ++j) p.y[(m + j) * p.R + r + i] = fv_sum(acc[i][j]);
}

// Activation rows m.. in tiles of MB rows, then of MB/2, ... (the rest).
template <int RB, int MB>
void float_block_tiles(const BlockProblem& p, const float* x, int64_t r, int64_t m) {
  for (; m + MB <= p.M; m += MB) float_block_tile<RB, MB>(p, x, r, m, m == 0);
  if constexpr (MB > 1) float_block_tiles<RB, MB / 2>(p, x, r, m);
}

void float_block_rows(const BlockProblem& p, const float* x, int64_t r0, int64_t r1) {
  int64_t r = r0;
  for (; r + kRowTile <= r1; r += kRowTile) float_block_tiles<kRowTile, kActTile>(p, x, r, 0);
  for (; r < r1; ++r) float_block_tiles<1, kActTile>(p, x, r, 0);
}
#else
void float_block_rows(const BlockProblem& p, const float* x, int64_t r0, int64_t r1) {
  int8_t q[32];
  const int64_t nb = p.C / 32;
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t m = 0; m < p.M; ++m) {
      float acc = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        const float d = block_codes(p.blocks + r * p.row_bytes + b * p.type_size, p.type, q);
        for (int k = 0; k < 32; ++k) acc += (float(q[k]) * d) * x[m * p.C + b * 32 + k];
      }
      p.y[m * p.R + r] = acc;
    }
}
#endif

void unpacked_rows(const BlockProblem& p, int64_t r0, int64_t r1) {
  const int64_t block = p.block, nb = p.C / block, type_size = p.type_size;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = p.blocks + r * p.row_bytes;
    for (int64_t m = 0; m < p.M; ++m) {
      const int16_t* x = p.xq + m * p.C;
      const float* xd = p.xscale + m * (p.C / 32);
      const float* xs = p.xsum + m * (p.C / 32);
      Acc acc = acc_zero();
      float offset = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blk = row + b * type_size;
#ifdef GEMMARUN_AVX512
        if (m == 0)  // a cache line ahead for each one this block spans
          for (int64_t k = 0; k < type_size; k += 64)
            _mm_prefetch(reinterpret_cast<const char*>(blk + k + kPrefetchBytes), _MM_HINT_T0);
#endif
        if (p.type == kQ4_K) acc = q4_k_block(blk, x + b * 256, xd + b * 8, xs + b * 8, acc, offset);
        else if (p.type == kQ6_K) acc = q6_k_block(blk, x + b * 256, xd + b * 8, acc);
        else if (p.type == kIQ4_XS) acc = iq4_xs_block(blk, x + b * 256, xd + b * 8, acc);
        else acc = signed_block(blk, p.type, x + b * 32, xd[b], acc);
      }
      p.y[m * p.R + r] = acc_sum(acc) - offset;
    }
  }
}

// The problem for x @ W.T with W as GGUF block rows of `ggml_type` (one the caller reads), checked,
// and its output y [M, R] (the activations are the caller's to set).
BlockProblem block_problem(const torch::Tensor& x, const torch::Tensor& blocks, int64_t ggml_type, torch::Tensor& y) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: float32 [M, C]");
  TORCH_CHECK(x.device().is_cpu() && blocks.device().is_cpu(), "block kernels: CPU tensors only");
  TORCH_CHECK(blocks.dim() == 2 && blocks.scalar_type() == torch::kUInt8 && blocks.stride(1) == 1, "blocks: [R, bytes] uint8 rows");
  BlockProblem p{};
  p.type = ggml_type;
  p.block = ggml_type == kQ4_K || ggml_type == kQ6_K || ggml_type == kIQ4_XS ? 256 : 32;
  p.type_size = ggml_type == kQ4_0 || ggml_type == kIQ4_NL ? 18 : ggml_type == kQ8_0 ? 34 : ggml_type == kQ5_0 ? 22
                : ggml_type == kMXFP4 ? 17 : ggml_type == kIQ4_XS ? 136 : ggml_type == kQ4_K ? 144 : 210;
  p.M = x.size(0); p.C = x.size(1); p.R = blocks.size(0);
  TORCH_CHECK(p.C % p.block == 0 && blocks.size(1) == p.C / p.block * p.type_size, "blocks do not match x");
  p.blocks = blocks.data_ptr<uint8_t>();
  p.row_bytes = blocks.stride(0);
  y = torch::empty({p.M, p.R}, x.options());
  p.y = y.data_ptr<float>();
  return p;
}

}  // namespace

// x: [M, C] float32; codes: [R, C] int8 or [R, C/2] uint8 nibbles; scale, bias: [R, C/group] float32 or float16;
// int8_activations: round x to int8 per group instead of int16 (faster, ~1e-2 relative: bfloat16's precision).
torch::Tensor group_gemv(torch::Tensor x, torch::Tensor codes, torch::Tensor scale, c10::optional<torch::Tensor> bias,
                         int64_t group, double code_min, bool nibbles, bool int8_activations) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "x: float32 [M, C]");
  x = x.contiguous();
  TORCH_CHECK(codes.dim() == 2 && codes.is_contiguous(), "codes: contiguous [R, C]");
  const bool half_scales = scale.scalar_type() == torch::kFloat16;
  TORCH_CHECK((half_scales || scale.scalar_type() == torch::kFloat32) && scale.is_contiguous(),
              "scale: contiguous float32 or float16");
  const int64_t M = x.size(0), C = x.size(1), R = codes.size(0);
  TORCH_CHECK(codes.size(1) == (nibbles ? C / 2 : C) && C % group == 0, "codes do not match x");
  TORCH_CHECK(scale.size(0) == R && scale.size(1) == C / group, "scale does not match the codes");
  Problem p{};
  p.codes = reinterpret_cast<const uint8_t*>(codes.data_ptr());
  p.scale = scale.data_ptr();
  p.half_scales = half_scales;
  torch::Tensor b;
  if (bias.has_value()) {
    b = bias.value();
    TORCH_CHECK(b.scalar_type() == scale.scalar_type() && b.is_contiguous() && b.sizes() == scale.sizes(),
                "bias: the scale's dtype and shape");
    p.bias = b.data_ptr();
  }
  p.code_min = static_cast<float>(code_min);
  p.M = M; p.R = R; p.C = C; p.group = group; p.groups = C / group;
  p.offset = p.bias != nullptr || code_min != 0.0;
  // int8 activations where a byte kernel exists: AVX2, rows of whole 32-code steps (nibble
  // halves of whole 32-wide groups); int16 otherwise.
  bool q8 = false;
#ifdef GEMMARUN_AVX2
  q8 = int8_activations && (nibbles ? group == 32 && (C / 2) % 32 == 0 : C % 32 == 0);
#endif
  Activations acts(x.data_ptr<float>(), M, C, group, q8);
#ifdef GEMMARUN_AVX512
  if (nibbles && !q8) acts.split_bytes();  // DotNibbles' byte multiply-adds
#endif
  acts.into(p);
  torch::Tensor y = torch::empty({M, R}, x.options());
  p.y = y.data_ptr<float>();
  switch (group) {  // GGML group sizes: 16 (Q6_K, Q3_K, Q2_K) and 32 (the rest)
    case 16: run_rows<16>(p, nibbles); break;
    case 32: run_rows<32>(p, nibbles); break;
    default: TORCH_CHECK(false, "group size ", group, " is not 16 or 32");
  }
  return y;
}

// x: [M, C] float32 (C a multiple of 32, of 256 for K-quants); blocks: [R, row_bytes] uint8 rows of
// Q4_0, Q8_0, Q5_0, IQ4_NL, MXFP4, Q4_K, Q6_K or IQ4_XS blocks.
torch::Tensor block_gemv(torch::Tensor x, torch::Tensor blocks, int64_t ggml_type, bool int8_activations) {
  TORCH_CHECK(ggml_type == kQ4_0 || ggml_type == kQ8_0 || ggml_type == kQ5_0 || is_codebook(ggml_type) ||
              ggml_type == kQ4_K || ggml_type == kQ6_K || ggml_type == kIQ4_XS,
              "block_gemv reads Q4_0, Q8_0, Q5_0, IQ4_NL, MXFP4, Q4_K, Q6_K and IQ4_XS blocks only");
  x = x.contiguous();
  torch::Tensor y;
  BlockProblem p = block_problem(x, blocks, ggml_type, y);
  const int64_t M = p.M, C = p.C, R = p.R;
  const bool unpacked = !(ggml_type == kQ4_0 || ggml_type == kQ8_0);  // int16 activations only
  bool q8 = false;
#ifdef GEMMARUN_AVX2
  q8 = int8_activations && !unpacked;
#endif
  Activations acts(x.data_ptr<float>(), M, C, 32, q8);  // per 32 whatever the block size
#ifdef GEMMARUN_AVX512
  if (ggml_type == kQ4_K) acts.split_bytes();  // q4_k_rows_vnni's byte multiply-adds
#endif
  acts.into(p);
#ifdef GEMMARUN_AVX512
  if (p.block == 32 && !q8 && M >= 2) {  // Q4_0/Q8_0/Q5_0, int16: two rows to a register
    for (int64_t m0 = 0; m0 < M; m0 += 16) {
      const int64_t rows = std::min<int64_t>(16, M - m0);
      const PairedActivations a(p, m0, rows);
      at::parallel_for(0, R, 256, [&](int64_t r0, int64_t r1) { block_rows_in_pairs(p, a, m0, rows, r0, r1); });
    }
    return y;
  }
#endif
  at::parallel_for(0, R, 256, [&](int64_t r0, int64_t r1) {
#ifdef GEMMARUN_AVX512
    if (ggml_type == kQ4_K) return q4_k_rows_vnni(p, r0, r1);
#endif
#ifdef GEMMARUN_AVX2
    // from 4 rows (2 rows: 8 % slower than one at a time, same process)
    if (p.block == 32 && M >= 4 && !q8) return block_rows_together(p, r0, r1);
    if ((ggml_type == kQ6_K || ggml_type == kIQ4_XS) && M >= 2) return super_block_rows_together(p, r0, r1);
#endif
    if (unpacked) unpacked_rows(p, r0, r1); else block_rows(p, r0, r1);
  });
  return y;
}

// x: [M, C] float32 (C a multiple of 32); blocks: [R, row_bytes] uint8 rows of Q4_0, Q8_0, Q5_0,
// IQ4_NL or MXFP4 blocks. The activations are used as they are (float_block_rows).
torch::Tensor block_gemm(torch::Tensor x, torch::Tensor blocks, int64_t ggml_type) {
  TORCH_CHECK(ggml_type == kQ4_0 || ggml_type == kQ8_0 || ggml_type == kQ5_0 || is_codebook(ggml_type),
              "block_gemm reads Q4_0, Q8_0, Q5_0, IQ4_NL and MXFP4 blocks only");
  x = x.contiguous();
  torch::Tensor y;
  const BlockProblem p = block_problem(x, blocks, ggml_type, y);
  const float* xf = x.data_ptr<float>();
  at::parallel_for(0, p.R, 256, [&](int64_t r0, int64_t r1) { float_block_rows(p, xf, r0, r1); });
  return y;
}
