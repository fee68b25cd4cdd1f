// Python module jax_roipool._cuda: the CUDA FFI handlers of roipool_cuda.cu
// as capsules for jax.ffi.register_ffi_target(name, capsule, platform="CUDA").
// Compiled by the host compiler; importing it needs neither a GPU nor libcuda
// (the CUDA runtime is linked statically and initialised on first use).
#include <pybind11/pybind11.h>

#include "xla/ffi/api/c_api.h"

extern "C" {
XLA_FFI_Error* RoipoolForwardCuda(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* RoipoolGatherCuda(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* RoipoolScatterCuda(XLA_FFI_CallFrame* call_frame);
}

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "jax_roipool CUDA kernels (XLA FFI handlers)";
  m.def("registrations", []() {
    pybind11::dict handlers;
    handlers["roipool_forward"] =
        pybind11::capsule(reinterpret_cast<void*>(RoipoolForwardCuda));
    handlers["roipool_gather"] =
        pybind11::capsule(reinterpret_cast<void*>(RoipoolGatherCuda));
    handlers["roipool_scatter"] =
        pybind11::capsule(reinterpret_cast<void*>(RoipoolScatterCuda));
    return handlers;
  });
  m.def("build_jaxlib_version", []() { return JAXLIB_BUILD_VERSION; });
  m.def("channels_per_thread", []() { return ROIPOOL_CHANNELS_PER_THREAD; });
}
