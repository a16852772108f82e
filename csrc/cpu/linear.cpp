// A projection of a few rows (decode) on the CPU, fp32, inference only:
//
//   out[m][o] = Σ_k x[m][k]·W[o][k]  (+ b[o])
//
// At one token a projection streams its O·K weights for 2·O·K FLOPs: memory-bound, and torch's
// matmul of one row (MKL's matrix-vector product) reads the weights at ~7 GB/s on the AMD EPYC
// machines we run on, where a plain stream reaches 30. Each output is one dot product along a
// contiguous weight row (rows.h); the threads share out the O outputs in runs, so each reads its
// part of W front to back. An output's value depends only on x's row, W's row and b. Up to
// kLinearParts projections of the same x (decode's q, k and v) run in one parallel region, each
// thread taking its share of each: one fork and join for all of them, and the same bits.
#include <algorithm>

#include "kernels.h"
#include "parallel.h"
#include "rows.h"

namespace inl {
namespace INL_ISA {
namespace {

template <int M>
void linear_rows_m(const LinearRowsArgs& a) {
  int tasks = 0;
  for (int p = 0; p < a.parts; ++p) tasks += (a.part[p].O + kRowsTask - 1) / kRowsTask;
#pragma omp parallel num_threads(threads_for(a.threads, tasks))
  {
    // each thread its share of every part: one region for all of them
    const int tid = omp_thread_id(), nth = omp_threads();
    for (int p = 0; p < a.parts; ++p) {
      const LinearPart& part = a.part[p];
      int o0, o1;
      share_outputs(part.O, tid, nth, o0, o1);
      dot_rows<M>(a.x, a.K, part.w, o0, o1, part.out, part.O);
      if (part.bias != nullptr)
        for (int m = 0; m < M; ++m)
          for (int o = o0; o < o1; ++o) part.out[size_t(m) * part.O + o] += part.bias[o];
    }
  }
}

}  // namespace

void linear_rows(const LinearRowsArgs& a) {
  switch (a.M) {
    case 1: return linear_rows_m<1>(a);
    case 2: return linear_rows_m<2>(a);
    case 3: return linear_rows_m<3>(a);
    default: return linear_rows_m<4>(a);
  }
}

}  // namespace INL_ISA
}  // namespace inl
