// prompt_pool on CPU: masked adaptive average pooling of x [B, T, D] to out [B, L, D].
//
// Bin j of a row with n real tokens covers the real tokens ranked s_j = floor(j n / L) ..
// e_j - 1 = ceil((j + 1) n / L) - 1. A pre-pass turns the mask into, per row, the positions of the
// real tokens (forward) or each token's rank (backward, -1 for padding). Then
//   forward:  one task per output row (b, j): the mean of the x rows at pos[s_j .. e_j);
//   backward: one task per input row (b, t): the sum of grad_out[b, j] / (e_j - s_j) over the bins
//             j in [floor(r L / n), ceil((r + 1) L / n)) that contain the token's rank r; zero for
//             padding.
// Rows are contiguous, the inner loops run over D with fp32 accumulation (vectorised by the
// compiler); consecutive output rows of one sequence share their overlapping input rows in cache.
#include <torch/extension.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kGrainElements = 32768;  // elements of work below which a loop stays serial

struct Bin {
  int64_t start, end;
};

inline Bin bin_of(int64_t j, int64_t n, int64_t L) { return {j * n / L, ((j + 1) * n + L - 1) / L}; }

// Per row b: n[b] = number of real tokens and, if pos != nullptr, pos[b * T + r] = position of the
// r-th real token; if rank != nullptr, rank[b * T + t] = rank of token t or -1 for padding.
template <typename mask_t>
void scan_mask(const mask_t* mask, int64_t B, int64_t T, int64_t* n, int64_t* pos, int64_t* rank) {
  at::parallel_for(0, B, std::max<int64_t>(1, kGrainElements / std::max<int64_t>(T, 1)), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const mask_t* m = mask + b * T;
      int64_t count = 0;
      for (int64_t t = 0; t < T; ++t) {
        const bool real = m[t] != 0;
        if (pos) pos[b * T + count] = t;  // overwritten until a real token claims the slot
        if (rank) rank[b * T + t] = real ? count : -1;
        count += real;
      }
      n[b] = count;
    }
  });
}

void scan(const std::optional<at::Tensor>& mask, int64_t B, int64_t T, int64_t* n, int64_t* pos, int64_t* rank) {
  if (!mask.has_value()) {
    for (int64_t b = 0; b < B; ++b) {
      n[b] = T;
      for (int64_t t = 0; t < T; ++t) {
        if (pos) pos[b * T + t] = t;
        if (rank) rank[b * T + t] = t;
      }
    }
    return;
  }
  AT_DISPATCH_INTEGRAL_TYPES_AND(at::kBool, mask->scalar_type(), "prompt_pool_scan_mask", [&] {
    scan_mask<scalar_t>(mask->data_ptr<scalar_t>(), B, T, n, pos, rank);
  });
}

void check_mask(const std::optional<at::Tensor>& mask, int64_t B, int64_t T) {
  if (!mask.has_value()) return;
  const at::Tensor& m = *mask;
  TORCH_CHECK(m.device().is_cpu(), "prompt_pool: attention_mask must be a CPU tensor");
  TORCH_CHECK(m.dim() == 2 && m.size(0) == B && m.size(1) == T, "prompt_pool: attention_mask must have shape [", B,
              ", ", T, "], got ", m.sizes());
  TORCH_CHECK(m.scalar_type() == at::kBool || at::isIntegralType(m.scalar_type(), /*includeBool=*/false),
              "prompt_pool: attention_mask must be bool or integer, got ", m.scalar_type());
  TORCH_CHECK(m.is_contiguous(), "prompt_pool: attention_mask must be contiguous");
}

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "prompt_pool: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 3, "prompt_pool: ", name, " must have 3 dimensions, got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16,
              "prompt_pool: ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "prompt_pool: ", name, " must be contiguous");
}

// acc[d] (+)= row[d] as float, for d < D.
template <typename scalar_t>
inline void load_row(float* __restrict__ acc, const scalar_t* __restrict__ row, int64_t D) {
  for (int64_t d = 0; d < D; ++d) acc[d] = static_cast<float>(row[d]);
}
template <typename scalar_t>
inline void add_row(float* __restrict__ acc, const scalar_t* __restrict__ row, int64_t D) {
  for (int64_t d = 0; d < D; ++d) acc[d] += static_cast<float>(row[d]);
}
template <typename scalar_t>
inline void add_scaled_row(float* __restrict__ acc, const scalar_t* __restrict__ row, float w, int64_t D) {
  for (int64_t d = 0; d < D; ++d) acc[d] += static_cast<float>(row[d]) * w;
}
template <typename scalar_t>
inline void store_scaled(scalar_t* __restrict__ out, const float* __restrict__ acc, float w, int64_t D) {
  for (int64_t d = 0; d < D; ++d) out[d] = static_cast<scalar_t>(acc[d] * w);
}
inline void scale_in_place(float* __restrict__ acc, float w, int64_t D) {
  for (int64_t d = 0; d < D; ++d) acc[d] *= w;
}

template <typename scalar_t>
void forward_rows(const scalar_t* x, const int64_t* n, const int64_t* pos, scalar_t* out, int64_t B, int64_t T,
                  int64_t D, int64_t L) {
  const int64_t work_per_row = std::max<int64_t>(1, D * (T / L + 1));
  const int64_t grain = std::max<int64_t>(1, kGrainElements / work_per_row);
  at::parallel_for(0, B * L, grain, [&](int64_t i0, int64_t i1) {
    // fp32 rows accumulate in place in the output; half/bf16 in a float buffer.
    std::vector<float> buffer(std::is_same<scalar_t, float>::value ? 0 : D);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / L, j = i % L;
      const Bin bin = bin_of(j, n[b], L);
      scalar_t* o = out + i * D;
      float* acc = std::is_same<scalar_t, float>::value ? reinterpret_cast<float*>(o) : buffer.data();
      if (bin.end == bin.start) {  // n = 0
        std::fill(o, o + D, scalar_t(0));
        continue;
      }
      const int64_t* p = pos + b * T;
      const scalar_t* xb = x + b * T * D;
      load_row(acc, xb + p[bin.start] * D, D);
      for (int64_t r = bin.start + 1; r < bin.end; ++r) add_row(acc, xb + p[r] * D, D);
      const float inv = 1.0f / static_cast<float>(bin.end - bin.start);
      if constexpr (std::is_same<scalar_t, float>::value) {
        scale_in_place(acc, inv, D);
      } else {
        store_scaled(o, acc, inv, D);
      }
    }
  });
}

template <typename scalar_t>
void backward_rows(const scalar_t* grad_out, const int64_t* n, const int64_t* rank, scalar_t* grad_x, int64_t B,
                   int64_t T, int64_t D, int64_t L) {
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, D * (L / std::max<int64_t>(T, 1) + 2)));
  at::parallel_for(0, B * T, grain, [&](int64_t i0, int64_t i1) {
    std::vector<float> buffer(std::is_same<scalar_t, float>::value ? 0 : D);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / T, r = rank[i], nb = n[b];
      scalar_t* o = grad_x + i * D;
      if (r < 0) {  // padding
        std::fill(o, o + D, scalar_t(0));
        continue;
      }
      float* acc = std::is_same<scalar_t, float>::value ? reinterpret_cast<float*>(o) : buffer.data();
      const int64_t j0 = r * L / nb, j1 = std::min(L, ((r + 1) * L + nb - 1) / nb);  // j0 < j1 for 0 <= r < nb
      const scalar_t* g = grad_out + b * L * D;
      Bin bin = bin_of(j0, nb, L);
      float w = 1.0f / static_cast<float>(bin.end - bin.start);
      for (int64_t d = 0; d < D; ++d) acc[d] = static_cast<float>(g[j0 * D + d]) * w;
      for (int64_t j = j0 + 1; j < j1; ++j) {
        bin = bin_of(j, nb, L);
        add_scaled_row(acc, g + j * D, 1.0f / static_cast<float>(bin.end - bin.start), D);
      }
      if constexpr (!std::is_same<scalar_t, float>::value) store_scaled(o, acc, 1.0f, D);
    }
  });
}

void prompt_pool_forward(const at::Tensor& x, const std::optional<at::Tensor>& mask, int64_t length,
                         const at::Tensor& out) {
  check_float(x, "x");
  check_float(out, "out");
  TORCH_CHECK(length >= 1, "prompt_pool: length must be >= 1, got ", length);
  const int64_t B = x.size(0), T = x.size(1), D = x.size(2);
  check_mask(mask, B, T);
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), "prompt_pool: out must have the dtype of x");
  TORCH_CHECK(out.size(0) == B && out.size(1) == length && out.size(2) == D, "prompt_pool: out must have shape [",
              B, ", ", length, ", ", D, "], got ", out.sizes());
  if (out.numel() == 0) return;
  std::vector<int64_t> n(B), pos(std::max<int64_t>(B * T, 1));
  scan(mask, B, T, n.data(), pos.data(), nullptr);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "prompt_pool_forward", [&] {
    forward_rows<scalar_t>(x.data_ptr<scalar_t>(), n.data(), pos.data(), out.data_ptr<scalar_t>(), B, T, D, length);
  });
}

void prompt_pool_backward(const at::Tensor& grad_out, const std::optional<at::Tensor>& mask, const at::Tensor& grad_x) {
  check_float(grad_out, "grad_out");
  check_float(grad_x, "grad_x");
  const int64_t B = grad_out.size(0), L = grad_out.size(1), D = grad_out.size(2), T = grad_x.size(1);
  TORCH_CHECK(L >= 1, "prompt_pool: grad_out must have length >= 1");
  check_mask(mask, B, T);
  TORCH_CHECK(grad_x.scalar_type() == grad_out.scalar_type(), "prompt_pool: grad_x must have the dtype of grad_out");
  TORCH_CHECK(grad_x.size(0) == B && grad_x.size(2) == D, "prompt_pool: grad_x must have shape [", B, ", T, ", D,
              "], got ", grad_x.sizes());
  if (grad_x.numel() == 0) return;
  std::vector<int64_t> n(B), rank(B * T);
  scan(mask, B, T, n.data(), nullptr, rank.data());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "prompt_pool_backward", [&] {
    backward_rows<scalar_t>(grad_out.data_ptr<scalar_t>(), n.data(), rank.data(), grad_x.data_ptr<scalar_t>(), B, T,
                            D, L);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(prompt_kernels_cpp, m) {
  m.def("prompt_pool_forward(Tensor x, Tensor? attention_mask, int length, Tensor(a!) out) -> ()");
  m.def("prompt_pool_backward(Tensor grad_out, Tensor? attention_mask, Tensor(a!) grad_x) -> ()");
  m.impl("prompt_pool_forward", torch::kCPU, &prompt_pool_forward);
  m.impl("prompt_pool_backward", torch::kCPU, &prompt_pool_backward);
}
