// What the CPU ops' entry points share: the switch from a tensor's dtype to the element type
// the kernel is instantiated for, and the number of OpenMP threads to start.
#pragma once

#include <ATen/Parallel.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace inl {

// f(scalar_t{}) for a float32, bfloat16 or float16 tensor (the entry points check the dtype first)
template <typename F>
void dispatch(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    default: f(c10::Half{}); break;
  }
}

// Threads for `tasks` independent pieces of work: never more than torch's thread setting, never
// more than there are pieces, and at least one (OpenMP wants num_threads > 0, also for no work).
inline int threads_for(int64_t tasks) {
  return int(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tasks)));
}

// threads of the enclosing parallel region
inline int omp_threads() {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

}  // namespace inl
