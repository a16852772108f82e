// The shape of the CUDA decode iterate's blocks (csrc/cuda/iterate.cu): threads, the narrowest
// column slice, and the shared memory one block takes. Plain C++, so that every build of
// inl_kernels._C can report the formula: the planner in inl_kernels/cuda/iterate.py mirrors it,
// and tests compare the two without a GPU.
#pragma once

#include <cstdint>

namespace inl {
namespace cuda {

constexpr int kThreads = 256;
constexpr int kMinCols = 32;  // columns of d per block at the narrowest slice; wider slices double it
constexpr int kRowSums = 4;   // Σ(x' - x)², Σv'², Σ|x' - mu|, Σ(x' - mu)²

// Bytes of shared memory of one block owning `cols` columns of N rows, hidden size H, in the
// kernel's order: w_out [4][H][cols] and w_in [2][cols][H]; x, v and (x' - x)² of the block's
// columns, each [N][cols]; c [N][H]; s, active and rms per row, each [N].
inline int64_t iterate_decode_shared_bytes(int64_t N, int64_t H, int64_t cols) {
  return int64_t(sizeof(float)) * (6 * H * cols + 3 * N * cols + N * H + 3 * N);
}

}  // namespace cuda
}  // namespace inl
