// The rotate-half rotation of RoPE (SPEC §3) for one row, shared by csrc/cpu/rope.cpp (q and k
// of a whole sequence) and csrc/cpu/attention.cpp (decode, on the fly).
#pragma once

#include "parallel.h"

namespace inl {
namespace INL_ISA {

// A row of D = 2·half values x rotated by the angles whose cosines and sines are c[0..half),
// s[0..half):  y_i = x1_i·c_i − x2_i·s_i,  y_{half+i} = x2_i·c_i + x1_i·s_i  (x1 = x[0..half),
// x2 = x[half..D)), in fp32; sign = −1 rotates by −θ (the gradient: the rotation is orthogonal).
// put(j, y_j) stores each result. The products may be fused (FMA): the result then differs from
// the reference's separately rounded products by up to about an fp32 ulp of |x| (absolute: under
// cancellation that is many ulps of the result), and a low-precision result by one of its ulps.
template <typename scalar_t, typename Put>
inline void rotate_half_row(const scalar_t* x, int half, const float* c, const float* s, float sign, Put put) {
  for (int i = 0; i < half; ++i) {
    const float x1 = to_float(x[i]), x2 = to_float(x[half + i]), si = sign * s[i];
    put(i, x1 * c[i] - x2 * si);
    put(half + i, x2 * c[i] + x1 * si);
  }
}

}  // namespace INL_ISA
}  // namespace inl
