// ContMix's dynamic aggregation (ops/neighborhood.py, kernel_av) on the CPU as one fused pass per pixel: the
// kernel's logits q_p . kw + bias_p, their softmax over the K*K window slots and the weighted sum of the clamped
// window's values run while the pixel's row of the kernel is in registers and L1, and the backward recomputes the
// kernel the same way (the PyTorch formulation instead runs dozens of small operators on full-size tensors); exact to
// it up to the order of the sums (float64 tests). Threads take (image, head) slices (heads in the backward, whose
// bias gradient is shared by the images); the values of a slice are transposed to (H*W, c) so a window tap is one
// contiguous vector of c channels.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

inline int64_t window_start(int64_t i, int64_t k, int64_t len) {
  return std::min(std::max<int64_t>(i - k / 2, 0), len - k);
}

// exp for the softmax, written so that the compiler vectorizes a loop of it (std::exp stays scalar without
// -ffast-math): Cephes' expf, range reduction x = n ln2 + r and a degree-6 polynomial, ~1 ulp; x <= 0 here
inline float exp_of(float x) {
  x = std::max(x, -87.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  return y * std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
}
inline double exp_of(double x) { return std::exp(x); }

constexpr int64_t LANES = 16;  // slots per block: one 512-bit register of floats
inline int64_t padded(int64_t n) { return (n + LANES - 1) / LANES * LANES; }

// NB blocks of LANES logits from t0 on, each summed over d in its own register: NB independent chains of
// multiply-adds, so the adds' latency overlaps (one chain waits ~4 cycles per add)
template <typename T, int NB>
inline void logit_blocks(const T* q, int64_t qstride, const T* kw, T* w, int64_t d, int64_t kkp, int64_t t0) {
  T acc[NB][LANES];
  for (int nb = 0; nb < NB; ++nb)
#pragma omp simd
    for (int64_t l = 0; l < LANES; ++l) acc[nb][l] = w[t0 + nb * LANES + l];
  for (int64_t e = 0; e < d; ++e) {
    const T qe = q[e * qstride];
    const T* row = kw + e * kkp + t0;
    for (int nb = 0; nb < NB; ++nb)
#pragma omp simd
      for (int64_t l = 0; l < LANES; ++l) acc[nb][l] += qe * row[nb * LANES + l];
  }
  for (int nb = 0; nb < NB; ++nb)
#pragma omp simd
    for (int64_t l = 0; l < LANES; ++l) w[t0 + nb * LANES + l] = acc[nb][l];
}

// w[t] += sum_e q[e * qstride] m[e * kkp + t] for t < kkp: a row vector times a (d, kkp) matrix, four blocks of
// LANES columns at a time
template <typename T>
inline void add_row_times(const T* q, int64_t qstride, const T* m, T* w, int64_t d, int64_t kkp) {
  int64_t t0 = 0;
  for (; t0 + 4 * LANES <= kkp; t0 += 4 * LANES) logit_blocks<T, 4>(q, qstride, m, w, d, kkp, t0);
  switch ((kkp - t0) / LANES) {
    case 3: logit_blocks<T, 3>(q, qstride, m, w, d, kkp, t0); break;
    case 2: logit_blocks<T, 2>(q, qstride, m, w, d, kkp, t0); break;
    case 1: logit_blocks<T, 1>(q, qstride, m, w, d, kkp, t0); break;
  }
}

// w[:kk] = softmax(q_p . kw + bias_p) over the kk slots, w[kk:kkp] = 0. q_p's d entries lie qstride apart; kw is
// (d, kkp), zero-padded. The slots are the vector lanes, four blocks of LANES at a time
template <typename T>
inline void kernel_row(const T* q, int64_t qstride, const T* kw, const T* bias, T* w, int64_t d, int64_t kk) {
  const int64_t kkp = padded(kk);
  std::memcpy(w, bias, kk * sizeof(T));
  for (int64_t t = kk; t < kkp; ++t) w[t] = 0;
  add_row_times(q, qstride, kw, w, d, kkp);
  T m = w[0];
  for (int64_t t = 1; t < kk; ++t) m = std::max(m, w[t]);
#pragma omp simd
  for (int64_t t = 0; t < kk; ++t) w[t] = exp_of(w[t] - m);
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t t = 0; t < kk; ++t) s += w[t];
  const T inv = T(1) / s;
#pragma omp simd
  for (int64_t t = 0; t < kkp; ++t) w[t] *= inv;
}

// kw (d, kk) -> (d, kkp), zero-padded
template <typename T>
inline void pad_kernel(const T* kw, T* out, int64_t d, int64_t kk) {
  const int64_t kkp = padded(kk);
  for (int64_t e = 0; e < d; ++e) {
    std::memcpy(out + e * kkp, kw + e * kk, kk * sizeof(T));
    std::fill(out + e * kkp + kk, out + (e + 1) * kkp, T(0));
  }
}

template <typename T>
inline void transpose(const T* src, T* dst, int64_t rows, int64_t cols) {  // (rows, cols) -> (cols, rows)
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * rows + r] = src[r * cols + c];
}

// C: the channels per head when it is one of the variants' (a compile-time width), 0 for any other
template <typename T, int C>
void forward_impl(const T* q, const T* kw, const T* bias, const T* value, T* out, int64_t B, int64_t G, int64_t H,
                  int64_t W, int64_t d, int64_t c_rt, int64_t k) {
  const int64_t hw = H * W, kk = k * k, c = C ? C : c_rt;
  at::parallel_for(0, B * G, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> v(hw * c), o(hw * c), w(padded(kk)), kwp(d * padded(kk));
    for (int64_t n = begin; n < end; ++n) {
      transpose(value + n * c * hw, v.data(), c, hw);
      const T* qn = q + n * d * hw;
      pad_kernel(kw + n * d * kk, kwp.data(), d, kk);
      const T* kwn = kwp.data();
      const T* bg = bias + (n % G) * hw * kk;
      for (int64_t i = 0; i < H; ++i) {
        const int64_t si = window_start(i, k, H);
        for (int64_t j = 0; j < W; ++j) {
          const int64_t sj = window_start(j, k, W), p = i * W + j;
          kernel_row(qn + p, hw, kwn, bg + p * kk, w.data(), d, kk);
          if constexpr (C > 0) {  // four chains of multiply-adds (window rows a mod 4), summed at the end
            T acc[4][C] = {};
            for (int64_t a = 0; a < k; ++a) {
              const T* vrow = v.data() + ((si + a) * W + sj) * C;
              const T* wa = w.data() + a * k;
              T* ac = acc[a & 3];
              for (int64_t b = 0; b < k; ++b) {
                const T wt = wa[b];
#pragma omp simd
                for (int64_t ch = 0; ch < C; ++ch) ac[ch] += wt * vrow[b * C + ch];
              }
            }
            T* op = o.data() + p * C;
#pragma omp simd
            for (int64_t ch = 0; ch < C; ++ch) op[ch] = (acc[0][ch] + acc[1][ch]) + (acc[2][ch] + acc[3][ch]);
          } else {
            T* op = o.data() + p * c;
            for (int64_t ch = 0; ch < c; ++ch) op[ch] = 0;
            for (int64_t a = 0; a < k; ++a) {
              const T* vrow = v.data() + ((si + a) * W + sj) * c;
              const T* wa = w.data() + a * k;
              for (int64_t b = 0; b < k; ++b)
                for (int64_t ch = 0; ch < c; ++ch) op[ch] += wa[b] * vrow[b * c + ch];
            }
          }
        }
      }
      transpose(o.data(), out + n * c * hw, hw, c);
    }
  });
}

template <typename T, int C>
void backward_impl(const T* q, const T* kw, const T* bias, const T* value, const T* gout, T* gq, T* gkw, T* gbias,
                   T* gvalue, int64_t B, int64_t G, int64_t H, int64_t W, int64_t d, int64_t c_rt, int64_t k) {
  const int64_t hw = H * W, kk = k * k, c = C ? C : c_rt;
  at::parallel_for(0, G, 1, [&](int64_t begin, int64_t end) {
    const int64_t kkp = padded(kk);
    // the values with LANES zeros after them: a block of LANES slots may read past a window row's end
    std::vector<T> vpad(c * hw + LANES), go(hw * c), gv(hw * c), w(kkp), kwp(d * kkp), gkwp(d * kkp);
    std::vector<T> glog(hw * kkp);  // the slice's logit gradients, one row per pixel: kw's gradient is q^T glog
    for (int64_t g = begin; g < end; ++g) {
      const T* bg = bias + g * hw * kk;
      T* gbg = gbias + g * hw * kk;
      std::fill(gbg, gbg + hw * kk, T(0));
      for (int64_t b = 0; b < B; ++b) {
        const int64_t n = b * G + g;
        std::memcpy(vpad.data(), value + n * c * hw, c * hw * sizeof(T));
        std::fill(vpad.end() - LANES, vpad.end(), T(0));
        const T* vn = vpad.data();
        transpose(gout + n * c * hw, go.data(), c, hw);
        std::fill(gv.begin(), gv.end(), T(0));
        const T* qn = q + n * d * hw;
        pad_kernel(kw + n * d * kk, kwp.data(), d, kk);
        const T* kwn = kwp.data();
        T* gqn = gq + n * d * hw;
        T* gkwn = gkwp.data();
        std::fill(gkwp.begin(), gkwp.end(), T(0));
        for (int64_t i = 0; i < H; ++i) {
          const int64_t si = window_start(i, k, H);
          for (int64_t j = 0; j < W; ++j) {
            const int64_t sj = window_start(j, k, W), p = i * W + j;
            kernel_row(qn + p, hw, kwn, bg + p * kk, w.data(), d, kk);
            const T* gop = go.data() + p * c;
            T* gw = glog.data() + p * kkp;
            // the kernel's gradient gw[t] = go_p . v_t from the values as given, (c, H*W): a window row's slots
            // are contiguous there, so they are the vector lanes; and the values' gradient w[t] go_p into each tap
            for (int64_t a0 = 0; a0 < k; a0 += 4) {  // four window rows at a time: independent chains
              const int64_t na = std::min<int64_t>(4, k - a0);
              for (int64_t b0 = 0; b0 < k; b0 += LANES) {
                T acc[4][LANES] = {};
                for (int64_t ch = 0; ch < c; ++ch) {
                  const T go_ch = gop[ch];
                  const T* vp = vn + ch * hw + (si + a0) * W + sj + b0;
                  for (int64_t r = 0; r < 4; ++r) {
                    if (r < na) {
#pragma omp simd
                      for (int64_t l = 0; l < LANES; ++l) acc[r][l] += go_ch * vp[r * W + l];
                    }
                  }
                }
                for (int64_t r = 0; r < na; ++r)
                  for (int64_t l = 0; l < std::min(LANES, k - b0); ++l) gw[(a0 + r) * k + b0 + l] = acc[r][l];
              }
            }
            for (int64_t a = 0; a < k; ++a) {
              const int64_t row = (si + a) * W + sj;
              const T* wa = w.data() + a * k;
              for (int64_t b2 = 0; b2 < k; ++b2) {
                T* gvp = gv.data() + (row + b2) * c;
                const T wt = wa[b2];
#pragma omp simd
                for (int64_t ch = 0; ch < c; ++ch) gvp[ch] += wt * gop[ch];
              }
            }
            // through the softmax: the logits' gradient w (gw - w . gw), into gw (zero past kk)
            T dot = 0;
#pragma omp simd reduction(+ : dot)
            for (int64_t t = 0; t < kk; ++t) dot += w[t] * gw[t];
            T* gbp = gbg + p * kk;
            for (int64_t t = 0; t < kk; ++t) {
              gw[t] = w[t] * (gw[t] - dot);
              gbp[t] += gw[t];
            }
            for (int64_t t = kk; t < kkp; ++t) gw[t] = 0;
            // the logits are q_p . kw: q's gradient gw . kw[e], kw's q_p[e] gw
            for (int64_t e0 = 0; e0 < d; e0 += 4) {  // four of q's channels at a time: independent chains
              const int64_t ne = std::min<int64_t>(4, d - e0);
              T part[4][LANES] = {};
              for (int64_t t0 = 0; t0 < kkp; t0 += LANES) {
                for (int64_t r = 0; r < 4; ++r) {
                  if (r < ne) {
                    const T* row = kwn + (e0 + r) * kkp + t0;
#pragma omp simd
                    for (int64_t l = 0; l < LANES; ++l) part[r][l] += gw[t0 + l] * row[l];
                  }
                }
              }
              for (int64_t r = 0; r < ne; ++r) {
                T acc = 0;
                for (int64_t l = 0; l < LANES; ++l) acc += part[r][l];
                gqn[(e0 + r) * hw + p] = acc;
              }
            }
          }
        }
        for (int64_t e = 0; e < d; ++e) {  // kw's gradient: sum over pixels of q_p[e] glog_p
          add_row_times(qn + e * hw, 1, glog.data(), gkwn + e * kkp, hw, kkp);
          std::memcpy(gkw + n * d * kk + e * kk, gkwn + e * kkp, kk * sizeof(T));
        }
        transpose(gv.data(), gvalue + n * c * hw, hw, c);
      }
    }
  });
}

void check(const torch::Tensor& q, const torch::Tensor& kw, const torch::Tensor& bias, const torch::Tensor& value,
           int64_t k) {
  TORCH_CHECK(q.device().is_cpu() && q.dim() == 4 && kw.dim() == 4 && bias.dim() == 3 && value.dim() == 4,
              "kernel_av (C++): CPU tensors q (B, G, d, HW), kw (B, G, d, K*K), bias (G, HW, K*K), value (B*G, c, H, W)");
  TORCH_CHECK(q.is_contiguous() && kw.is_contiguous() && bias.is_contiguous() && value.is_contiguous(),
              "kernel_av (C++): contiguous inputs expected");
  TORCH_CHECK(kw.size(0) == q.size(0) && kw.size(1) == q.size(1) && kw.size(2) == q.size(2) && kw.size(3) == k * k &&
              bias.size(0) == q.size(1) && bias.size(1) == q.size(3) && bias.size(2) == k * k &&
              value.size(0) == q.size(0) * q.size(1) && value.size(2) * value.size(3) == q.size(3) &&
              value.size(2) >= k && value.size(3) >= k, "kernel_av (C++): shapes do not fit K=", k);
  TORCH_CHECK(kw.scalar_type() == q.scalar_type() && bias.scalar_type() == q.scalar_type() &&
              value.scalar_type() == q.scalar_type(), "kernel_av (C++): one dtype expected");
}

// the variants' channels per head: 16 (XT, T, B), 14 (XT stage 4), 10 and 8 (S)
template <typename T, typename F>
void by_width(int64_t c, F&& f) {
  switch (c) {
    case 16: f(std::integral_constant<int, 16>()); break;
    case 14: f(std::integral_constant<int, 14>()); break;
    case 10: f(std::integral_constant<int, 10>()); break;
    case 8: f(std::integral_constant<int, 8>()); break;
    default: f(std::integral_constant<int, 0>());
  }
}

}  // namespace

torch::Tensor kernel_av_forward(torch::Tensor q, torch::Tensor kw, torch::Tensor bias, torch::Tensor value, int64_t k) {
  check(q, kw, bias, value, k);
  auto out = torch::empty_like(value);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "kernel_av_forward", [&] {
    by_width<scalar_t>(value.size(1), [&](auto width) {
      forward_impl<scalar_t, decltype(width)::value>(
          q.data_ptr<scalar_t>(), kw.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(),
          out.data_ptr<scalar_t>(), q.size(0), q.size(1), value.size(2), value.size(3), q.size(2), value.size(1), k);
    });
  });
  return out;
}

std::vector<torch::Tensor> kernel_av_backward(torch::Tensor q, torch::Tensor kw, torch::Tensor bias,
                                              torch::Tensor value, torch::Tensor gout, int64_t k) {
  check(q, kw, bias, value, k);
  TORCH_CHECK(gout.sizes() == value.sizes() && gout.is_contiguous() && gout.scalar_type() == value.scalar_type(),
              "kernel_av (C++): the output gradient must be laid out like the values");
  auto gq = torch::empty_like(q), gkw = torch::empty_like(kw), gbias = torch::empty_like(bias);
  auto gvalue = torch::empty_like(value);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "kernel_av_backward", [&] {
    by_width<scalar_t>(value.size(1), [&](auto width) {
      backward_impl<scalar_t, decltype(width)::value>(
          q.data_ptr<scalar_t>(), kw.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(),
          gout.data_ptr<scalar_t>(), gq.data_ptr<scalar_t>(), gkw.data_ptr<scalar_t>(), gbias.data_ptr<scalar_t>(),
          gvalue.data_ptr<scalar_t>(), q.size(0), q.size(1), value.size(2), value.size(3), q.size(2),
          value.size(1), k);
    });
  });
  return {gq, gkw, gbias, gvalue};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &kernel_av_forward, "ContMix kernel_av forward (CPU, fused)");
  m.def("backward", &kernel_av_backward, "ContMix kernel_av backward (CPU, fused)");
}
