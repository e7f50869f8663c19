// A decode step's small float32 operations, each one call instead of the 4-10 torch dispatches its
// formula takes: on a 2-core CPU a dispatch costs 2-8 us, and a 270M decode step ran ~2,000 of
// them, half the step's time. Each computes what model/layers.py and model/attention.py write in
// torch, up to float summation order; tests/test_native_kernels.py holds them to it.

#include "kernels.h"
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define GEMMARUN_AVX2 1
#endif

namespace {

inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  int64_t k = 0;
  float acc = 0.f;
#if defined(__AVX512F__)
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  for (; k + 32 <= n; k += 32) {
    s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + k), _mm512_loadu_ps(b + k), s0);
    s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + k + 16), _mm512_loadu_ps(b + k + 16), s1);
  }
  acc = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
#elif defined(GEMMARUN_AVX2)
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  for (; k + 16 <= n; k += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 8), _mm256_loadu_ps(b + k + 8), s1);
  }
  __m256 s = _mm256_add_ps(s0, s1);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  acc = _mm_cvtss_f32(h);
#endif
  for (; k < n; ++k) acc += a[k] * b[k];
  return acc;
}

// y += a * x
inline void axpy(float a, const float* __restrict x, float* __restrict y, int64_t n) {
  for (int64_t k = 0; k < n; ++k) y[k] += a * x[k];
}

#if defined(__AVX512F__)
// e^x for x <= 0 (Cephes' expf: a degree-6 polynomial on x - n ln 2, scaled by 2^n; ~1 ulp).
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), x);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}
#endif

// Softmax weights in place: s_j <- e^(s_j - top), 0 where s_j is -inf (masked); returns their sum.
inline float softmax_weights(float* s, int64_t n, float top) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  int64_t j = 0;
  float total = 0.f;
#if defined(__AVX512F__)
  const __m512 t = _mm512_set1_ps(top), masked = _mm512_set1_ps(neg_inf);
  __m512 sum = _mm512_setzero_ps();
  for (; j + 16 <= n; j += 16) {
    const __m512 v = _mm512_loadu_ps(s + j);
    const __mmask16 seen = _mm512_cmp_ps_mask(v, masked, _CMP_NEQ_OQ);
    const __m512 w = _mm512_maskz_mov_ps(seen, exp_nonpositive(_mm512_sub_ps(v, t)));
    _mm512_storeu_ps(s + j, w);
    sum = _mm512_add_ps(sum, w);
  }
  total = _mm512_reduce_add_ps(sum);
#endif
  for (; j < n; ++j) {
    s[j] = s[j] == neg_inf ? 0.f : std::exp(s[j] - top);
    total += s[j];
  }
  return total;
}

// out[0:D] += sum_j w_j * rows_j over the rows with a nonzero weight (rows `stride` floats apart).
inline void weighted_rows(const float* w, const float* rows, int64_t stride, int64_t n, float* out, int64_t D) {
#if defined(__AVX512F__)
  if (D % 128 == 0) {  // 8 accumulators of 16 floats stay in registers across the rows
    for (int64_t d0 = 0; d0 < D; d0 += 128) {
      __m512 acc[8];
      for (int i = 0; i < 8; ++i) acc[i] = _mm512_loadu_ps(out + d0 + 16 * i);
      for (int64_t j = 0; j < n; ++j) {
        if (w[j] == 0.f) continue;
        const __m512 wj = _mm512_set1_ps(w[j]);
        const float* r = rows + j * stride + d0;
        for (int i = 0; i < 8; ++i) acc[i] = _mm512_fmadd_ps(wj, _mm512_loadu_ps(r + 16 * i), acc[i]);
      }
      for (int i = 0; i < 8; ++i) _mm512_storeu_ps(out + d0 + 16 * i, acc[i]);
    }
    return;
  }
#endif
  for (int64_t j = 0; j < n; ++j)
    if (w[j] != 0.f) axpy(w[j], rows + j * stride, out, D);
}

void check_float_cpu(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32, name, ": a float32 CPU tensor");
}

}  // namespace

// y = x / sqrt(mean(x^2) + eps) * weight over the last dimension (layers.rms_norm).
torch::Tensor rms_norm(torch::Tensor x, c10::optional<torch::Tensor> weight, double eps) {
  check_float_cpu(x, "x");
  const torch::Tensor xc = x.contiguous();
  const int64_t D = xc.size(-1), N = D == 0 ? 0 : xc.numel() / D;
  const float* w = nullptr;
  torch::Tensor wc;
  if (weight.has_value()) {
    wc = weight.value().contiguous();
    check_float_cpu(wc, "weight");
    TORCH_CHECK(wc.numel() == D, "weight: ", D, " values, got ", wc.numel());
    w = wc.data_ptr<float>();
  }
  torch::Tensor y = torch::empty_like(xc);
  const float* xp = xc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float epsf = static_cast<float>(eps);
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const float* row = xp + n * D;
      float* out = yp + n * D;
      const float r = 1.f / std::sqrt(dot(row, row, D) / float(D) + epsf);
      if (w) for (int64_t k = 0; k < D; ++k) out[k] = (row[k] * r) * w[k];
      else for (int64_t k = 0; k < D; ++k) out[k] = row[k] * r;
    }
  });
  return y;
}

// Rotate-half RoPE (layers.apply_rope): dim j pairs with j + D/2. cos and sin broadcast to x.
torch::Tensor rope(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  check_float_cpu(x, "x");
  check_float_cpu(cos, "cos");
  check_float_cpu(sin, "sin");
  const torch::Tensor xc = x.contiguous();
  const torch::Tensor c = cos.expand(xc.sizes()), s = sin.expand(xc.sizes());  // stride 0 where broadcast
  const int64_t nd = xc.dim(), D = xc.size(-1), half = D / 2;
  TORCH_CHECK(nd >= 1 && D % 2 == 0 && c.stride(-1) == 1 && s.stride(-1) == 1, "rope: cos/sin rows must be contiguous, D even");
  const int64_t N = D == 0 ? 0 : xc.numel() / D;
  torch::Tensor y = torch::empty_like(xc);
  const float* xp = xc.data_ptr<float>();
  const float* cp = c.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      int64_t rest = n, c_off = 0, s_off = 0;  // the cos/sin row of x's row n, from their strides
      for (int64_t d = nd - 2; d >= 0; --d) {
        const int64_t i = rest % xc.size(d);
        rest /= xc.size(d);
        c_off += i * c.stride(d);
        s_off += i * s.stride(d);
      }
      const float* xr = xp + n * D;
      const float* cr = cp + c_off;
      const float* sr = sp + s_off;
      float* out = yp + n * D;
      for (int64_t j = 0; j < half; ++j) {
        out[j] = xr[j] * cr[j] - xr[j + half] * sr[j];
        out[j + half] = xr[j + half] * cr[j + half] + xr[j] * sr[j + half];
      }
    }
  });
  return y;
}

// One decode query's attention (attention.Attention._attend_one) over a cache, the mask read from
// positions (masks.visible without blocks): key j is seen iff 0 <= pos_j <= position and, with a
// window, pos_j > position - window. q [nH, D]; values [kv, S, D] (rows contiguous); key_positions
// [S] int64; softcap 0 = none. Returns [nH, D]. `key_row(g, j, scratch)` gives key row j of KV head
// g: stored keys, or one made from its value row (K=V layers, below).
//
// Each key and value row is read once for all the query heads that share it (grouped-query
// attention), long caches are split into chunks across threads whose partial softmaxes are merged
// at the end (as flash-decoding does), and the weights are a vectorized exp: one query head per
// task re-reading its KV head's rows, with a scalar expf per weight, took 54 us a layer at 600
// keys on the 270M's shapes, this 32.
namespace {

constexpr int64_t kValueTile = 64;  // value rows per tile: 64-128 KB at head dims 256-512

template <typename KeyRow>
torch::Tensor attend(const torch::Tensor& q, const torch::Tensor& values, const torch::Tensor& key_positions,
                     int64_t position, int64_t window, double scale, double softcap, KeyRow key_row) {
  const torch::Tensor qc = q.contiguous();
  const torch::Tensor kpos = key_positions.contiguous();
  TORCH_CHECK(qc.dim() == 2 && values.dim() == 3, "attend_one: q [nH, D], keys/values [kv, S, D]");
  TORCH_CHECK(kpos.scalar_type() == torch::kInt64 && kpos.numel() == values.size(1), "key_positions: [S] int64");
  const int64_t nH = qc.size(0), D = qc.size(1), kv = values.size(0), S = values.size(1);
  TORCH_CHECK(values.size(2) == D && kv > 0 && nH % kv == 0, "attend_one: head dims or counts do not match");
  TORCH_CHECK(values.stride(2) == 1, "attend_one: key/value rows must be contiguous");
  const float* qp = qc.data_ptr<float>();
  const float* vp = values.data_ptr<float>();
  const int64_t* pos = kpos.data_ptr<int64_t>();
  const int64_t groups = nH / kv, v_head = values.stride(0), v_row = values.stride(1);
  const float sc = static_cast<float>(scale), cap = static_cast<float>(softcap);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  // Chunks per KV head: enough tasks for the threads, none shorter than 64 keys.
  const int64_t threads = at::get_num_threads();
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>((threads + kv - 1) / kv, S / 64));
  const int64_t chunk_len = (S + chunks - 1) / std::max<int64_t>(chunks, 1);
  // Per (kv head, chunk, query head of the group): running max, sum of weights, weighted values.
  const int64_t part = D + 2;
  std::vector<float> partial(kv * chunks * groups * part, 0.f);
  at::parallel_for(0, kv * chunks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> scores(groups * chunk_len), scratch(D);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t g = t / chunks, j0 = (t % chunks) * chunk_len, j1 = std::min(S, j0 + chunk_len);
      const float* qg = qp + g * groups * D;
      float* out = partial.data() + t * groups * part;  // [groups][max, sum, D values]
      for (int64_t h = 0; h < groups; ++h) out[h * part] = neg_inf;
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t p = pos[j];
        const bool seen = p >= 0 && p <= position && !(window > 0 && p <= position - window);
        const float* kj = seen ? key_row(g, j, scratch.data()) : nullptr;
        for (int64_t h = 0; h < groups; ++h) {
          float s = neg_inf;
          if (seen) {
            s = dot(qg + h * D, kj, D) * sc;
            if (cap > 0.f) s = cap * std::tanh(s / cap);
            out[h * part] = std::max(out[h * part], s);
          }
          scores[h * chunk_len + (j - j0)] = s;
        }
      }
      for (int64_t h = 0; h < groups; ++h) {
        float* oh = out + h * part;
        if (oh[0] == neg_inf) continue;  // nothing visible in this chunk
        oh[1] = softmax_weights(scores.data() + h * chunk_len, j1 - j0, oh[0]);
      }
      // The weighted values, a tile of rows at a time for all the heads of the group: the rows
      // the first head reads from memory are in L2 for the others (each head reading the whole
      // chunk read a long cache `groups` times over from memory). Same sums in the same order.
      for (int64_t a = j0; a < j1; a += kValueTile) {
        const int64_t n = std::min(j1 - a, kValueTile);
        for (int64_t h = 0; h < groups; ++h) {
          float* oh = out + h * part;
          if (oh[0] == neg_inf) continue;
          weighted_rows(scores.data() + h * chunk_len + (a - j0), vp + g * v_head + a * v_row, v_row, n, oh + 2, D);
        }
      }
    }
  });
  torch::Tensor result = torch::zeros({nH, D}, qc.options());
  float* op = result.data_ptr<float>();
  for (int64_t g = 0; g < kv; ++g) {
    for (int64_t h = 0; h < groups; ++h) {
      float top = neg_inf;
      for (int64_t c = 0; c < chunks; ++c) top = std::max(top, partial[((g * chunks + c) * groups + h) * part]);
      if (top == neg_inf) continue;  // nothing visible (never in decode: the query sees itself)
      float total = 0.f;
      float* oh = op + (g * groups + h) * D;
      for (int64_t c = 0; c < chunks; ++c) {
        const float* pc = partial.data() + ((g * chunks + c) * groups + h) * part;
        if (pc[0] == neg_inf) continue;
        const float f = std::exp(pc[0] - top);
        total += f * pc[1];
        axpy(f, pc + 2, oh, D);
      }
      const float inv = 1.f / total;
      for (int64_t k = 0; k < D; ++k) oh[k] *= inv;
    }
  }
  return result;
}

}  // namespace

torch::Tensor attend_one(torch::Tensor q, torch::Tensor keys, torch::Tensor values, torch::Tensor key_positions,
                         int64_t position, int64_t window, double scale, double softcap) {
  check_float_cpu(q, "q");
  check_float_cpu(keys, "keys");
  check_float_cpu(values, "values");
  TORCH_CHECK(keys.dim() == 3 && keys.sizes() == values.sizes(), "attend_one: q [nH, D], keys/values [kv, S, D]");
  TORCH_CHECK(keys.stride(2) == 1, "attend_one: key/value rows must be contiguous");
  const float* kp = keys.data_ptr<float>();
  const int64_t k_head = keys.stride(0), k_row = keys.stride(1);
  return attend(q, values, key_positions, position, window, scale, softcap,
                [=](int64_t g, int64_t j, float*) { return kp + g * k_head + j * k_row; });
}

// attend_one for a layer that stores values only (K=V, spec 3.4): key j is RoPE(values_j *
// key_weight) at position pos_j, made row by row as the scores need it instead of as a [kv, S, D]
// tensor each step (with its cos/sin: 60 ms a layer at 16k keys on the 26B-A4B's full layers).
// rot_cos/rot_sin [P, r] hold positions 0..P-1 of the r frequency pairs that rotate (pair i is
// dims i and i + D/2; p-RoPE leaves the others as they are: cos 1, sin 0).
torch::Tensor attend_one_values_as_keys(torch::Tensor q, torch::Tensor values, torch::Tensor key_weight,
                                        torch::Tensor rot_cos, torch::Tensor rot_sin, torch::Tensor key_positions,
                                        int64_t position, int64_t window, double scale, double softcap) {
  check_float_cpu(q, "q");
  check_float_cpu(values, "values");
  check_float_cpu(key_weight, "key_weight");
  check_float_cpu(rot_cos, "rot_cos");
  check_float_cpu(rot_sin, "rot_sin");
  TORCH_CHECK(values.dim() == 3, "attend_one: q [nH, D], keys/values [kv, S, D]");
  const int64_t D = values.size(2), half = D / 2;
  const torch::Tensor w = key_weight.contiguous(), c = rot_cos.contiguous(), s = rot_sin.contiguous();
  TORCH_CHECK(w.numel() == D && D % 2 == 0, "attend_one_values_as_keys: key_weight must have the head dim, even");
  TORCH_CHECK(c.dim() == 2 && c.sizes() == s.sizes() && c.size(1) <= half,
              "attend_one_values_as_keys: rot_cos/rot_sin [P, r] with r <= D/2");
  TORCH_CHECK(c.size(0) > position, "attend_one_values_as_keys: the cos/sin table ends before position ", position);
  const float* vp = values.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* cp = c.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  TORCH_CHECK(key_positions.scalar_type() == torch::kInt64 && key_positions.is_contiguous(),
              "key_positions: [S] int64, contiguous");
  const int64_t r = c.size(1), v_head = values.stride(0), v_row = values.stride(1);
  const int64_t* pos = key_positions.data_ptr<int64_t>();
  return attend(q, values, key_positions, position, window, scale, softcap, [=](int64_t g, int64_t j, float* k) {
    const float* v = vp + g * v_head + j * v_row;
    for (int64_t d = 0; d < D; ++d) k[d] = v[d] * wp[d];
    const float* cr = cp + pos[j] * r;  // seen rows only: 0 <= pos_j <= position < P
    const float* sr = sp + pos[j] * r;
    for (int64_t i = 0; i < r; ++i) {  // as rope() does for a rotating pair
      const float a = k[i], b = k[i + half];
      k[i] = a * cr[i] - b * sr[i];
      k[i + half] = b * cr[i] + a * sr[i];
    }
    return static_cast<const float*>(k);
  });
}

// torch.argmax of a float32 vector: the first index of the largest value, the first NaN if there
// is one (torch counts NaN as the largest). torch's CPU argmax is a scalar loop, 0.4 ms over a
// 262k-entry vocabulary; this is one vectorized pass for the maximum and one to find it.
int64_t argmax(torch::Tensor x) {
  check_float_cpu(x, "x");
  const torch::Tensor xc = x.contiguous();
  const int64_t n = xc.numel();
  TORCH_CHECK(n > 0, "argmax of an empty tensor");
  const float* p = xc.data_ptr<float>();
  float best = -std::numeric_limits<float>::infinity();
  bool nan = false;
  int64_t i = 0;
#ifdef GEMMARUN_AVX2
  __m256 top = _mm256_set1_ps(best), unordered = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(p + i);
    top = _mm256_max_ps(top, v);
    unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  nan = _mm256_movemask_ps(unordered) != 0;
  float lanes[8];
  _mm256_storeu_ps(lanes, top);
  for (float lane : lanes) best = std::max(best, lane);
#endif
  for (; i < n; ++i) {
    if (std::isnan(p[i])) nan = true;
    else best = std::max(best, p[i]);
  }
  int64_t j = 0;
#ifdef GEMMARUN_AVX2
  if (!nan) {
    const __m256 target = _mm256_set1_ps(best);
    for (; j + 8 <= n; j += 8) {
      const int hits = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p + j), target, _CMP_EQ_OQ));
      if (hits) return j + __builtin_ctz(hits);
    }
  }
#endif
  for (; j < n; ++j)
    if (nan ? std::isnan(p[j]) : p[j] == best) return j;
  return 0;  // unreachable: the maximum is one of the values
}
