// The floating dtypes every sparsefl kernel accepts, and one dispatch over them.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace sparsefl {

// Calls fn(T{}) with T = float, c10::Half or c10::BFloat16; any other dtype is a TypeError
// that names the op.
template <typename Fn>
void dispatch_float_dtype(at::ScalarType t, const char* op, Fn&& fn) {
  switch (t) {
    case at::kFloat: fn(float{}); break;
    case at::kHalf: fn(c10::Half{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    default:
      TORCH_CHECK_TYPE(false, op, ": unsupported dtype ", t,
                       "; supported: float32, float16, bfloat16");
  }
}

}  // namespace sparsefl
