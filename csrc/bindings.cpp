// The kdfast._C module: each op file registers its own functions.
#include "bindings.h"

PYBIND11_MODULE(_C, m) {
    m.doc() = "kdfast CPU kernels (OpenMP); called from kdfast/ops with raw buffers";
#ifdef _OPENMP
    m.attr("openmp") = true;
#else
    m.attr("openmp") = false;
#endif
    register_topk(m);
    register_plackett_luce(m);
    register_plackett_luce_emb_forward(m);
    register_plackett_luce_emb_backward(m);
    register_full_catalog(m);
    register_topology(m);
    register_sampling(m);
    register_rank_of_ids(m);
}
