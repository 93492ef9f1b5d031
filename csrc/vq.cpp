// Vector-quantiser kernels on CPU: nearest code (vq_nearest) and sampling from
// softmax(-||x - e_k||^2 / temperature) (vq_sample), fused so that the N x K distance matrix is
// never stored.
//
//   x:        [N, D]  float / half / bfloat16, contiguous
//   codebook: [K, D]  same dtype, contiguous
//   vq_nearest -> indices int64 [N], distances float32 [N]
//   vq_sample  -> indices int64 [N, S]
//
// Tiling: rows are split into blocks of up to kRowBlock, spread evenly over the threads with
// at::parallel_for; codes into blocks of kCodeBlock. For each (row block, code block) one small
// fp32 GEMM (MKL through at::mm_out) writes the x.e products into a per-thread scratch tile of
// kRowBlock x kCodeBlock floats, which the scoring loop consumes at once (cache-hot). Extra memory:
// ||e||^2 (K floats) + one tile per thread (+ fp32 copies of the codebook and of one row block per
// thread for half / bf16 inputs).
//
// The nearest code minimises ||e||^2 - 2 x.e (||x||^2 is a per-row constant); ties go to the lowest
// index (codes are scanned in order, a later code must be strictly better). The returned distance
// is recomputed directly as sum_d (x_d - e_d)^2 for the winning code (double accumulation), which
// avoids the cancellation of the expanded form.
//
// Sampling is exact categorical sampling, streamed over the code blocks (no Gumbel noise per
// (sample, code)): per row it keeps a running max m and a running sum Z of exp(logit - m); for each
// code block with weight Zb, each sample switches to this block with probability Zb / (Z + Zb) and
// then picks a code inside it by inverse CDF. By induction code k ends up chosen with probability
// w_k / sum(w). The uniforms come from Philox4x32-10 keyed by the seed with counter
// (code block, sample, row): the result does not depend on the number of threads.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

namespace {

constexpr int64_t kRowBlock = 256;  // MKL reaches full-GEMM speed from ~256 x 512 tiles
constexpr int64_t kCodeBlock = 512;  // also fixes the sampler's random stream: keep constant

// Rows per block: at most kRowBlock, with the number of blocks a multiple of the thread count so
// that the threads get equal work (13 blocks of 256 rows on 2 threads would leave one idle 1/13 of
// the time).
int64_t rows_per_block(int64_t N) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t blocks = std::max<int64_t>(1, (N + kRowBlock - 1) / kRowBlock);
  blocks = (blocks + threads - 1) / threads * threads;
  return std::max<int64_t>(1, (N + blocks - 1) / blocks);
}

// scratch[i * kCodeBlock + j] = x[i] . e[j] for i < m rows, j < n codes (fp32 inputs). One MKL
// GEMM through at::mm_out on views of the raw buffers (cpublas::gemm is not exported by libtorch).
void tile_dots(const float* x, const float* e, int64_t m, int64_t n, int64_t D, float* scratch) {
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor a = at::from_blob(const_cast<float*>(x), {m, D}, opts);
  at::Tensor b = at::from_blob(const_cast<float*>(e), {n, D}, opts);
  at::Tensor c = at::from_blob(scratch, {m, n}, {kCodeBlock, 1}, opts);
  at::mm_out(c, a, b.t());
}

// The GEMM runs on fp32 operands: half / bfloat16 inputs are widened (the codebook once per call,
// each row block once, into per-thread scratch), so products and sums are exact-fp32 like the
// reference's.
template <typename T>
struct Fp32View {
  at::Tensor codebook_f;  // empty for float inputs
  const float* codes = nullptr;
  Fp32View(const at::Tensor& codebook) {
    if constexpr (std::is_same_v<T, float>) {
      codes = codebook.data_ptr<float>();
    } else {
      codebook_f = codebook.to(at::kFloat);
      codes = codebook_f.data_ptr<float>();
    }
  }
  // The rows [r0, r0 + m) of x as fp32: x itself for float, else widened into buf (m * D floats).
  static const float* rows(const T* x, int64_t r0, int64_t m, int64_t D, float* buf) {
    if constexpr (std::is_same_v<T, float>) {
      return x + r0 * D;
    } else {
      const T* src = x + r0 * D;
      for (int64_t i = 0; i < m * D; ++i) buf[i] = static_cast<float>(src[i]);
      return buf;
    }
  }
  static constexpr bool widens = !std::is_same_v<T, float>;
};

// ---------------------------------------------------------------------------------------------
// Vectorised row loops. The extension is built without -march flags, so the hot loops are written
// with GCC/Clang vector extensions (16 floats) and cloned per ISA (AVX-512, AVX2, baseline) with a
// run-time dispatch (target_clones, x86-64 only).

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define VQ_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VQ_CLONES
#endif

// The 64-byte vector types are passed between inlined helpers only; silence GCC's note that their
// ABI differs with and without AVX-512.
#pragma GCC diagnostic ignored "-Wpsabi"

typedef float vf16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));
typedef double vd8 __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;

inline vf16 load16(const float* p) {
  vf16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline vf16 splat16(float x) {
  return vf16{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x};
}

// min_j (en[j] - 2 s[j]) over j < n, and the lowest j reaching it (ties: lowest index). Each lane
// keeps its first minimum (strict <); the lanes' minima are merged by (value, index).
VQ_CLONES float score_min(const float* en, const float* s, int64_t n, int64_t* arg) {
  const float inf = std::numeric_limits<float>::infinity();
  vf16 lv = splat16(inf);
  vi16 li = {0};
  const vi16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const vf16 v = load16(en + j) - 2.0f * load16(s + j);
    const vi16 lt = v < lv;
    lv = lt ? v : lv;
    li = lt ? lane + static_cast<int32_t>(j) : li;
  }
  float m = inf;
  int64_t a = 0;
  for (int l = 0; l < kLanes; ++l) {
    if (lv[l] < m || (lv[l] == m && li[l] < a)) {
      m = lv[l];
      a = li[l];
    }
  }
  for (; j < n; ++j) {
    const float v = en[j] - 2.0f * s[j];
    if (v < m) {
      m = v;
      a = j;
    }
  }
  *arg = a;
  return m;
}

// s[j] <- (2 s[j] - en[j]) * inv_t (the logits up to a row constant); returns their maximum.
VQ_CLONES float logits_max(const float* en, float* s, int64_t n, float inv_t) {
  vf16 mv = splat16(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const vf16 v = (2.0f * load16(s + j) - load16(en + j)) * inv_t;
    std::memcpy(s + j, &v, sizeof(v));
    mv = v > mv ? v : mv;
  }
  float m = -std::numeric_limits<float>::infinity();
  for (int l = 0; l < kLanes; ++l) m = std::max(m, mv[l]);
  for (; j < n; ++j) {
    s[j] = (2.0f * s[j] - en[j]) * inv_t;
    m = std::max(m, s[j]);
  }
  return m;
}

// sum_d (x_d - e_d)^2: differences in fp32 (like the reference), squares summed in double.
VQ_CLONES float sq_distance(const float* x, const float* e, int64_t D) {
  vd8 acc = {0.0};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    const vf16 diff = load16(x + d) - load16(e + d);
    typedef float vf8 __attribute__((vector_size(32)));
    const vf8 lo = {diff[0], diff[1], diff[2], diff[3], diff[4], diff[5], diff[6], diff[7]};
    const vf8 hi = {diff[8], diff[9], diff[10], diff[11], diff[12], diff[13], diff[14], diff[15]};
    const vd8 dl = __builtin_convertvector(lo, vd8);
    const vd8 dh = __builtin_convertvector(hi, vd8);
    acc += dl * dl + dh * dh;
  }
  double s = 0.0;
  for (int l = 0; l < 8; ++l) s += acc[l];
  for (; d < D; ++d) {
    const double v = static_cast<double>(x[d] - e[d]);
    s += v * v;
  }
  return static_cast<float>(s);
}

template <typename T>
void code_sq_norms(const T* e, int64_t K, int64_t D, float* out) {
  at::parallel_for(0, K, 16, [&](int64_t b, int64_t end) {
    for (int64_t k = b; k < end; ++k) {
      double s = 0.0;
      const T* row = e + k * D;
      for (int64_t d = 0; d < D; ++d) {
        const double v = static_cast<float>(row[d]);
        s += v * v;
      }
      out[k] = static_cast<float>(s);
    }
  });
}

// float, half and bfloat16 only: the tile GEMM has fp32-output overloads for exactly these.
template <typename F>
void dispatch_float_types(at::ScalarType t, const char* name, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(at::Half{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    default: TORCH_CHECK(false, name, ": x must be float32, float16 or bfloat16, got ", t);
  }
}

void check_inputs(const at::Tensor& x, const at::Tensor& codebook) {
  TORCH_CHECK(x.device().is_cpu() && codebook.device().is_cpu(), "vq: x and codebook must be CPU tensors");
  TORCH_CHECK(x.dim() == 2 && codebook.dim() == 2, "vq: x must be [N, D] and codebook [K, D]");
  TORCH_CHECK(x.size(1) == codebook.size(1), "vq: x and codebook must have the same last dimension");
  TORCH_CHECK(codebook.size(0) >= 1, "vq: the codebook must have at least one code");
  TORCH_CHECK(x.size(1) >= 1, "vq: D must be >= 1");
  TORCH_CHECK(x.scalar_type() == codebook.scalar_type(), "vq: x and codebook must have the same dtype");
  TORCH_CHECK(x.is_contiguous() && codebook.is_contiguous(), "vq: x and codebook must be contiguous");
}

// ---------------------------------------------------------------------------------------------
// nearest

template <typename T>
void nearest_impl(const at::Tensor& x, const at::Tensor& codebook, at::Tensor& indices, at::Tensor& distances) {
  const int64_t N = x.size(0), D = x.size(1), K = codebook.size(0);
  const T* xp = x.data_ptr<T>();
  const T* ep = codebook.data_ptr<T>();
  int64_t* ip = indices.data_ptr<int64_t>();
  float* dp = distances.data_ptr<float>();

  at::Tensor norms = at::empty({K}, x.options().dtype(at::kFloat));
  float* np = norms.data_ptr<float>();
  code_sq_norms(ep, K, D, np);
  const Fp32View<T> f32(codebook);

  // Per thread: the dot tile, then (half / bf16 only) the widened row block.
  const int64_t per_thread = kRowBlock * kCodeBlock + (Fp32View<T>::widens ? kRowBlock * D : 0);
  at::Tensor scratch_t = at::empty({at::get_num_threads(), per_thread}, x.options().dtype(at::kFloat));
  float* scratch_all = scratch_t.data_ptr<float>();
  const int64_t bm = rows_per_block(N);
  const int64_t blocks = (N + bm - 1) / bm;

  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    float* scratch = scratch_all + static_cast<int64_t>(at::get_thread_num()) * per_thread;
    float* xbuf = scratch + kRowBlock * kCodeBlock;
    float best[kRowBlock];
    int64_t best_k[kRowBlock];
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * bm;
      const int64_t m = std::min(bm, N - r0);
      std::fill(best, best + m, std::numeric_limits<float>::infinity());
      std::fill(best_k, best_k + m, int64_t{0});
      const float* xf = Fp32View<T>::rows(xp, r0, m, D, xbuf);
      for (int64_t k0 = 0; k0 < K; k0 += kCodeBlock) {
        const int64_t n = std::min(kCodeBlock, K - k0);
        tile_dots(xf, f32.codes + k0 * D, m, n, D, scratch);
        const float* en = np + k0;
        for (int64_t i = 0; i < m; ++i) {
          int64_t j;
          const float tile_min = score_min(en, scratch + i * kCodeBlock, n, &j);
          if (tile_min < best[i]) {  // strict: an earlier block keeps a tie
            best[i] = tile_min;
            best_k[i] = k0 + j;
          }
        }
      }
      for (int64_t i = 0; i < m; ++i) {
        ip[r0 + i] = best_k[i];
        dp[r0 + i] = sq_distance(xf + i * D, f32.codes + best_k[i] * D, D);
      }
    }
  });
}

void vq_nearest_cpu(const at::Tensor& x, const at::Tensor& codebook, at::Tensor& indices, at::Tensor& distances) {
  check_inputs(x, codebook);
  TORCH_CHECK(indices.scalar_type() == at::kLong && indices.numel() == x.size(0) && indices.is_contiguous(),
              "vq_nearest: indices must be a contiguous int64 tensor of N elements");
  TORCH_CHECK(distances.scalar_type() == at::kFloat && distances.numel() == x.size(0) && distances.is_contiguous(),
              "vq_nearest: distances must be a contiguous float32 tensor of N elements");
  if (x.size(0) == 0) return;
  dispatch_float_types(x.scalar_type(), "vq_nearest", [&](auto tag) {
    nearest_impl<decltype(tag)>(x, codebook, indices, distances);
  });
}

// ---------------------------------------------------------------------------------------------
// sampling

struct Philox4x32 {
  // Philox4x32-10 (Salmon et al. 2011), the generator of tl.philox / curand.
  static void apply(uint32_t ctr[4], uint32_t k0, uint32_t k1) {
    for (int round = 0; round < 10; ++round) {
      const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * ctr[0];
      const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * ctr[2];
      const uint32_t c0 = static_cast<uint32_t>(p1 >> 32) ^ ctr[1] ^ k0;
      const uint32_t c2 = static_cast<uint32_t>(p0 >> 32) ^ ctr[3] ^ k1;
      ctr[1] = static_cast<uint32_t>(p1);
      ctr[3] = static_cast<uint32_t>(p0);
      ctr[0] = c0;
      ctr[2] = c2;
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
  }
};

// Two uniforms in (0, 1) with 53 random bits each, for (seed, row, sample, code block).
inline void uniforms(uint64_t seed, int64_t row, int64_t sample, int64_t block, double& u1, double& u2) {
  uint32_t c[4] = {static_cast<uint32_t>(block), static_cast<uint32_t>(sample), static_cast<uint32_t>(row),
                   static_cast<uint32_t>(static_cast<uint64_t>(row) >> 32)};
  Philox4x32::apply(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  constexpr double kScale = 1.0 / 9007199254740992.0;  // 2^-53
  const uint64_t a = (static_cast<uint64_t>(c[0]) << 21) | (c[1] >> 11);
  const uint64_t b = (static_cast<uint64_t>(c[2]) << 21) | (c[3] >> 11);
  u1 = (static_cast<double>(a) + 0.5) * kScale;
  u2 = (static_cast<double>(b) + 0.5) * kScale;
}

template <typename T>
void sample_impl(const at::Tensor& x, const at::Tensor& codebook, int64_t S, double temperature, uint64_t seed,
                 at::Tensor& indices) {
  const int64_t N = x.size(0), D = x.size(1), K = codebook.size(0);
  const T* xp = x.data_ptr<T>();
  const T* ep = codebook.data_ptr<T>();
  int64_t* ip = indices.data_ptr<int64_t>();
  const float inv_t = static_cast<float>(1.0 / temperature);

  at::Tensor norms = at::empty({K}, x.options().dtype(at::kFloat));
  float* np = norms.data_ptr<float>();
  code_sq_norms(ep, K, D, np);

  const Fp32View<T> f32(codebook);

  // Per thread: the dot tile, the rows' running max (floats) and sum (doubles), the block's
  // cumulative weights (doubles), then (half / bf16 only) the widened row block. Sizes in floats;
  // every offset is even, so the doubles are 8-byte aligned.
  const int64_t per_thread =
      kRowBlock * kCodeBlock + 4 * kRowBlock + 2 * kCodeBlock + (Fp32View<T>::widens ? kRowBlock * D : 0);
  at::Tensor scratch_t = at::empty({at::get_num_threads(), per_thread}, x.options().dtype(at::kFloat));
  float* scratch_all = scratch_t.data_ptr<float>();
  const int64_t bm = rows_per_block(N);
  const int64_t blocks = (N + bm - 1) / bm;

  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    float* scratch = scratch_all + static_cast<int64_t>(at::get_thread_num()) * per_thread;
    float* run_max = scratch + kRowBlock * kCodeBlock;
    double* run_sum = reinterpret_cast<double*>(run_max + 2 * kRowBlock);
    double* cum = run_sum + kRowBlock;
    float* xbuf = reinterpret_cast<float*>(cum + kCodeBlock);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * bm;
      const int64_t m = std::min(bm, N - r0);
      std::fill(run_max, run_max + m, -std::numeric_limits<float>::infinity());
      std::fill(run_sum, run_sum + m, 0.0);
      const float* xf = Fp32View<T>::rows(xp, r0, m, D, xbuf);
      for (int64_t k0 = 0; k0 < K; k0 += kCodeBlock) {
        const int64_t n = std::min(kCodeBlock, K - k0);
        const int64_t cblock = k0 / kCodeBlock;
        tile_dots(xf, f32.codes + k0 * D, m, n, D, scratch);
        const float* en = np + k0;
        for (int64_t i = 0; i < m; ++i) {
          const int64_t row = r0 + i;
          float* l = scratch + i * kCodeBlock;
          const float bmax = logits_max(en, l, n, inv_t);
          const float new_max = std::max(run_max[i], bmax);
          double acc = 0.0;
          for (int64_t j = 0; j < n; ++j) {
            acc += static_cast<double>(std::exp(l[j] - new_max));
            cum[j] = acc;
          }
          const double zb = acc;
          const double z_old = run_sum[i] > 0.0 ? run_sum[i] * std::exp(static_cast<double>(run_max[i] - new_max)) : 0.0;
          const double z = z_old + zb;
          int64_t* out = ip + row * S;
          for (int64_t s = 0; s < S; ++s) {
            double u1, u2;
            uniforms(seed, row, s, cblock, u1, u2);
            if (k0 == 0 || u1 * z < zb) {
              const int64_t j = std::upper_bound(cum, cum + n, u2 * zb) - cum;
              out[s] = k0 + std::min(j, n - 1);  // the clamp only matters for NaN input
            }
          }
          run_max[i] = new_max;
          run_sum[i] = z;
        }
      }
    }
  });
}

void vq_sample_cpu(const at::Tensor& x, const at::Tensor& codebook, int64_t num_samples, double temperature,
                   int64_t seed, at::Tensor& indices) {
  check_inputs(x, codebook);
  TORCH_CHECK(num_samples >= 1, "vq_sample: num_samples must be >= 1");
  TORCH_CHECK(temperature > 0.0 && std::isfinite(temperature), "vq_sample: temperature must be positive and finite");
  TORCH_CHECK(indices.scalar_type() == at::kLong && indices.numel() == x.size(0) * num_samples && indices.is_contiguous(),
              "vq_sample: indices must be a contiguous int64 tensor of N * num_samples elements");
  if (x.size(0) == 0) return;
  dispatch_float_types(x.scalar_type(), "vq_sample", [&](auto tag) {
    sample_impl<decltype(tag)>(x, codebook, num_samples, temperature, static_cast<uint64_t>(seed), indices);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(prompt_kernels_cpp, m) {
  m.def("vq_nearest(Tensor x, Tensor codebook, Tensor(a!) indices, Tensor(b!) distances) -> ()");
  m.def(
      "vq_sample(Tensor x, Tensor codebook, int num_samples, float temperature, int seed, Tensor(a!) indices) -> ()");
}

TORCH_LIBRARY_IMPL(prompt_kernels_cpp, CPU, m) {
  m.impl("vq_nearest", &vq_nearest_cpu);
  m.impl("vq_sample", &vq_sample_cpu);
}
