// Placeholder: the plackett_luce CPU kernel is not written yet.
#include "common.h"

void register_plackett_luce(pybind11::module_& m) { (void)m; }
