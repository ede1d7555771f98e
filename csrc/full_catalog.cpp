// Placeholder: the full_catalog CPU kernel is not written yet.
#include "common.h"

void register_full_catalog(pybind11::module_& m) { (void)m; }
