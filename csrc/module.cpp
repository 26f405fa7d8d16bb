// Python module stub for sparsefl._C.  The kernels register themselves with the
// PyTorch dispatcher (TORCH_LIBRARY) when this shared library is loaded; importing
// the module is only the portable way to load it.  No pybind11: it would triple the
// compile time and the ops are reached through torch.ops.sparsefl_C.* anyway.
#include <Python.h>

static PyModuleDef sparsefl_c_module = {
    PyModuleDef_HEAD_INIT, "_C", "sparsefl native kernels (registered in torch.ops.sparsefl_C)",
    -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&sparsefl_c_module); }
