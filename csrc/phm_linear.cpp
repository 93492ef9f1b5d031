// PHM linear layer on CPU: y = x @ H + bias, H = sum_i kron(rules[i], weights[i]).
//
//   x: [N, n*I]  rules: [n, n, n]  weights: [n, I, O]  bias: [n*O] or None  out: [N, n*O]
//
// H[a*I + p, b*O + q] = sum_i rules[i, a, b] * weights[i, p, q] is built once per call in float32
// (n^3 * I * O multiply-adds, small next to the GEMM), rounded once to the input dtype, and the
// product is one BLAS call. Backward:
// dx = dy @ H^T (one GEMM), dH = x^T dy (one GEMM, in its faster orientation), then, with dH rearranged to [(a,b), (p,q)],
// dweights = rules[i, (a,b)] @ dH and drules = weights[i, (p,q)] @ dH^T (two tiny GEMMs) and
// dbias = dy.sum(0). The big GEMMs run in the input dtype: PyTorch's CPU fp16/bf16 GEMMs (oneDNN, or
// cpublas with float opmath) accumulate in float32 and round once on output, and with AMX/AVX512-BF16
// they are several times faster than converting x to float32. The small reductions run in float32.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>

namespace {

void check_common(const at::Tensor& x, const at::Tensor& rules, const at::Tensor& weights) {
  TORCH_CHECK(x.device().is_cpu() && rules.device().is_cpu() && weights.device().is_cpu(),
              "phm_linear (cpp): tensors must be on the CPU");
  TORCH_CHECK(x.dim() == 2, "phm_linear (cpp): x must be 2-D [N, in_features], got ", x.sizes());
  TORCH_CHECK(rules.dim() == 3 && rules.size(0) >= 1 && rules.size(1) == rules.size(0) &&
                  rules.size(2) == rules.size(0),
              "phm_linear (cpp): rules must be [n, n, n], got ", rules.sizes());
  TORCH_CHECK(weights.dim() == 3 && weights.size(0) == rules.size(0),
              "phm_linear (cpp): weights must be [n, I, O], got ", weights.sizes());
  TORCH_CHECK(x.size(1) == rules.size(0) * weights.size(1), "phm_linear (cpp): x has ", x.size(1),
              " features, expected n * I = ", rules.size(0) * weights.size(1));
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "phm_linear (cpp): dtype must be float32, float16 or bfloat16");
  TORCH_CHECK(rules.scalar_type() == dt && weights.scalar_type() == dt,
              "phm_linear (cpp): x, rules and weights must share a dtype");
}

void check_out(const at::Tensor& t, at::IntArrayRef shape, at::ScalarType dt, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dt && t.sizes() == shape, "phm_linear (cpp): ", name,
              " must be a CPU tensor of shape ", shape, " and dtype ", dt, ", got ", t.sizes(), " ",
              t.scalar_type());
}

at::Tensor as_float(const at::Tensor& t) { return t.scalar_type() == at::kFloat ? t : t.to(at::kFloat); }

// H [n*I, n*O] in float32, written row by row (row a*I + p) straight into its final layout.
at::Tensor build_h(const at::Tensor& rules_f, const at::Tensor& w_f) {
  const int64_t n = w_f.size(0), I = w_f.size(1), O = w_f.size(2);
  auto h = at::empty({n * I, n * O}, w_f.options());
  const float* r = rules_f.data_ptr<float>();
  const float* w = w_f.data_ptr<float>();
  float* hp = h.data_ptr<float>();
  // Rows per task: at least ~256k multiply-adds, so small layers build H inline (no thread hand-off).
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(1, n * n * O));
  at::parallel_for(0, n * I, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t a = row / I, p = row % I;
      for (int64_t b = 0; b < n; ++b) {
        float* dst = hp + row * n * O + b * O;
        std::fill(dst, dst + O, 0.f);
        for (int64_t i = 0; i < n; ++i) {
          const float c = r[(i * n + a) * n + b];
          const float* src = w + (i * I + p) * O;
          for (int64_t q = 0; q < O; ++q) dst[q] += c * src[q];
        }
      }
    }
  });
  return h;
}

void phm_linear_forward(const at::Tensor& x, const at::Tensor& rules, const at::Tensor& weights,
                        const std::optional<at::Tensor>& bias, const at::Tensor& out) {
  check_common(x, rules, weights);
  const int64_t N = x.size(0), out_features = rules.size(0) * weights.size(2);
  const auto dt = x.scalar_type();
  check_out(out, {N, out_features}, dt, "out");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) check_out(*bias, {out_features}, dt, "bias");

  const at::Tensor h = build_h(as_float(rules).contiguous(), as_float(weights).contiguous()).to(dt);
  at::Tensor o = out;  // a handle we may write through
  if (has_bias && dt != at::kFloat) {
    at::addmm_out(o, *bias, x, h);  // the bias joins the float accumulator: one rounding
  } else {
    // fp32: GEMM then an in-place bias add; addmm's beta = 1 path (copy the bias into out, then
    // accumulate) is measurably slower on CPU BLAS for wide outputs.
    at::mm_out(o, x, h);
    if (has_bias) o.add_(*bias);
  }
}

void phm_linear_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& rules,
                         const at::Tensor& weights, const at::Tensor& grad_x, const at::Tensor& grad_rules,
                         const at::Tensor& grad_weights, const at::Tensor& grad_bias, bool compute_dx,
                         bool compute_dparams, bool compute_db) {
  check_common(x, rules, weights);
  const int64_t n = rules.size(0), I = weights.size(1), O = weights.size(2);
  const int64_t N = x.size(0);
  const auto dt = x.scalar_type();
  check_out(grad_out, {N, n * O}, dt, "grad_out");
  if (compute_dx) check_out(grad_x, {N, n * I}, dt, "grad_x");
  if (compute_dparams) {
    check_out(grad_rules, {n, n, n}, dt, "grad_rules");
    check_out(grad_weights, {n, I, O}, dt, "grad_weights");
    TORCH_CHECK(grad_rules.is_contiguous() && grad_weights.is_contiguous(),
                "phm_linear (cpp): grad_rules and grad_weights must be contiguous");
  }
  if (compute_db) check_out(grad_bias, {n * O}, dt, "grad_bias");

  const bool is_float = dt == at::kFloat;
  const at::Tensor rules_f = as_float(rules).contiguous();
  const at::Tensor w_f = as_float(weights).contiguous();

  if (compute_dx) {
    const at::Tensor h = build_h(rules_f, w_f).to(dt);
    at::Tensor gx = grad_x;
    at::mm_out(gx, grad_out, h.t());
  }
  if (compute_dparams) {
    // dH = x^T dy, computed as whichever of dH ([in, out], laid out (a, p, b, q)) or dH^T
    // ([out, in], laid out (b, q, a, p)) has fewer rows: the faster GEMM orientation on CPU BLAS.
    // Then one small float copy to [(a, b), (p, q)] and two tiny float GEMMs for the reductions
    // onto weights and rules.
    const at::Tensor dh_ab = at::empty({n, n, I, O}, w_f.options());
    if (I <= O)
      dh_ab.copy_(at::mm(x.t(), grad_out).view({n, I, n, O}).permute({0, 2, 1, 3}));
    else
      dh_ab.copy_(at::mm(grad_out.t(), x).view({n, O, n, I}).permute({2, 0, 3, 1}));
    const at::Tensor dh2 = dh_ab.view({n * n, I * O});
    at::Tensor gw = grad_weights.view({n, I * O});
    at::Tensor gr = grad_rules.view({n, n * n});
    if (is_float) {
      at::mm_out(gw, rules_f.view({n, n * n}), dh2);
      at::mm_out(gr, w_f.view({n, I * O}), dh2.t());
    } else {
      gw.copy_(at::mm(rules_f.view({n, n * n}), dh2));
      gr.copy_(at::mm(w_f.view({n, I * O}), dh2.t()));
    }
  }
  if (compute_db) {
    at::Tensor gb = grad_bias;
    if (is_float)
      at::sum_out(gb, grad_out, {0});
    else
      gb.copy_(at::sum(grad_out, {0}, false, at::kFloat));
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(prompt_kernels_cpp, m) {
  m.def("phm_linear_forward(Tensor x, Tensor rules, Tensor weights, Tensor? bias, Tensor(a!) out) -> ()");
  m.def(
      "phm_linear_backward(Tensor grad_out, Tensor x, Tensor rules, Tensor weights, Tensor(a!) grad_x, "
      "Tensor(b!) grad_rules, Tensor(c!) grad_weights, Tensor(d!) grad_bias, bool compute_dx, "
      "bool compute_dparams, bool compute_db) -> ()");
}

TORCH_LIBRARY_IMPL(prompt_kernels_cpp, CPU, m) {
  m.impl("phm_linear_forward", &phm_linear_forward);
  m.impl("phm_linear_backward", &phm_linear_backward);
}
