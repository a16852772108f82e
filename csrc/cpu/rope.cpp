// RoPE (SPEC §3: rotate-half) of q and k in one call, forward or inverse (the gradient), at
// given positions: one position per sequence index ([S], the same for every row of the batch) or
// one per row and index ([B][S]: a left-padded batch counts each row's positions from its first
// real token). Inputs in any [B][H][S][D] strides with a unit last one; outputs contiguous;
// computed in fp32 and rounded once to the input dtype, as the reference rounds its rotation.
#include <algorithm>

#include "kernels.h"
#include "parallel.h"
#include "rope.h"
#include "simd.h"

namespace inl {
namespace INL_ISA {
namespace {

template <typename scalar_t>
void run(const RopeArgs& a) {
  const int half = a.D / 2;
  const float sign = a.inverse ? -1.f : 1.f;
  const int64_t q_rows = int64_t(a.B) * a.Hq * a.Sq, rows = q_rows + int64_t(a.B) * a.Hkv * a.Sk;
  // a decode step's rows are a few hundred floats: threads only when there is enough work
  const int threads = rows * a.D < (int64_t(1) << 15) ? 1 : threads_for(a.threads, rows);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const bool is_q = r < q_rows;
    const int64_t i = is_q ? r : r - q_rows;  // row of [B][H][S] in its own tensor
    const int H = is_q ? a.Hq : a.Hkv, S = is_q ? a.Sq : a.Sk;
    const int64_t b = i / (int64_t(H) * S), h = (i / S) % H, s = i % S;
    const int64_t* stride = is_q ? a.q_stride : a.k_stride;
    const scalar_t* src = static_cast<const scalar_t*>(is_q ? a.q : a.k) + b * stride[0] + h * stride[1] + s * stride[2];
    scalar_t* dst = static_cast<scalar_t*>(is_q ? a.q_out : a.k_out) + i * a.D;
    const int64_t* pos = is_q ? a.q_pos : a.k_pos;
    const int64_t p = pos[a.per_row ? b * S + s : s];
    rotate_half_row(src, half, a.cos + p * half, a.sin + p * half, sign,
                    [&](int j, float y) { dst[j] = from_float<scalar_t>(y); });
  }
}

}  // namespace

void rope(const RopeArgs& a) {
  dispatch(a.dtype, [&](auto tag) { run<decltype(tag)>(a); });
}

}  // namespace INL_ISA
}  // namespace inl
