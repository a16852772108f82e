// The table of one compiled path: setup.py compiles this file with iterate.cpp, rms_norm.cpp,
// swiglu.cpp, linear.cpp, attention.cpp and rope.cpp once per instruction set, and csrc/cpu/entry.cpp picks a table at run time.
#include "kernels.h"

#include "simd.h"

namespace inl {
namespace INL_ISA {

void* iterate_pack(const IterateWeights&);
void iterate_pack_free(void*);
int64_t iterate_hidden_floats(int64_t N, int T, int H);
void iterate_forward(const IterateForwardArgs&);
void iterate_backward(const IterateBackwardArgs&);
void rms_norm_forward(const RmsNormArgs&);
void rms_norm_backward(const RmsNormBackwardArgs&);
void swiglu_forward(const SwigluArgs&);
void swiglu_backward(const SwigluArgs&);
void attention_decode(const AttentionDecodeArgs&);
void swiglu_rows(const SwigluRowsArgs&);
void rope(const RopeArgs&);
void attention_prefill(const AttentionPrefillArgs&);
void attention_prefill_backward(const AttentionPrefillBackwardArgs&);
void linear_rows(const LinearRowsArgs&);

#define INL_STRINGIFY2(x) #x
#define INL_STRINGIFY(x) INL_STRINGIFY2(x)

const CpuKernels kernels = {
    INL_STRINGIFY(INL_ISA), kVec,          kColBlock,        &iterate_pack,      &iterate_pack_free,
    &iterate_hidden_floats, &iterate_forward, &iterate_backward, &rms_norm_forward, &rms_norm_backward,
    &swiglu_forward,        &swiglu_backward,     &attention_decode, &swiglu_rows,     &rope,
    &attention_prefill,     &attention_prefill_backward, &linear_rows,
};

}  // namespace INL_ISA
}  // namespace inl
