// Placeholder: the topology CPU kernel is not written yet.
#include "common.h"

void register_topology(pybind11::module_& m) { (void)m; }
